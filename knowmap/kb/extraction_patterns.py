"""The grammar of ScienceWorld's object descriptions, as compiled regexes and a small recursive parser.

ScienceWorld writes every object the same way (``EnvObject.getDescription`` in its Scala source): an article and
a name, then optional clauses, e.g. ``a sink, which is turned off. In the sink is: a jug (containing a substance
called water).`` This module turns one such description into facts about the object and everything it contains.
It is pure and Ray-free; :mod:`knowmap.kb.extraction` builds the public extractor on it.

Every clause the parser does not recognise is kept as *residue*, so coverage can be measured honestly: a line
counts as understood only when nothing is left over.
"""

from __future__ import annotations

import functools
import re

from knowmap.kb.identity import AGENT, INVENTORY, FactSink, Name, Node, door_name
from knowmap.schemas import Relation

# -- names ---------------------------------------------------------------------------------------------------------
_ARTICLE = re.compile(r"^(?:a|an|the)\s+", re.IGNORECASE)
_SPACES = re.compile(r"\s+")
_SUBSTANCE = re.compile(r"^substance called (.+)$")
_STATE_PREFIX = re.compile(r"^(solid|liquid|gaseous) (.+)$")
_STATE_WORD = {"solid": "solid", "liquid": "liquid", "gaseous": "gas"}
# Water is the one substance ScienceWorld renames by state of matter instead of prefixing it.
_WATER_STATES = {"water": "liquid", "ice": "solid", "steam": "gas"}
_TITLED = re.compile(r"^(.+?) titled (.+)$")
_CONDITION = re.compile(r"^(dead|wilting|burned|blank) (.+)$")
_LIVING = re.compile(r"^(?:dead |wilting )?.+? in the [a-z]+ stage\b|^dead ")
_PLANT_STAGE = re.compile(r"^(.+?) in the ([a-z]+) stage(?: with (.+))?$")
_ANIMAL_STAGE_PREFIX = re.compile(r"^(baby|hatchling|juvenile|adult|young|larva|pupa) .+$")
_ANIMAL_STAGE_SUFFIX = re.compile(r"^.+ (egg|pupa|larva)$")


def clean_name(text: str) -> str:
    """Lower-case, fold whitespace, drop one leading article and trailing periods: ``"A  Drain."`` -> ``"drain"``."""
    text = _SPACES.sub(" ", text).strip().rstrip(".").strip()
    return _ARTICLE.sub("", text).lower()


def entity(raw: str, sink: FactSink, node: Node | None = None) -> str:
    """The entity name of a displayed name, adding the facts the name itself carries (state, stage, title).

    ``"liquid chocolate"`` -> ``chocolate`` with (chocolate, state_of_matter, liquid);
    ``"apple tree in the adult stage"`` -> ``apple tree`` with (apple tree, property, in the adult stage);
    ``"substance called ice"`` -> ``ice`` with (ice, state_of_matter, solid). With ``node`` the facts are about
    that described object instead of the bare name.
    """
    name, facts, full_properties = _name_facts(raw)
    subject: Name = node if node is not None else name
    for relation, obj in facts:
        sink.add(subject, relation, obj)
    if full_properties:
        sink.full(subject, Relation.PROPERTY)
    return name


@functools.lru_cache(maxsize=4096)
def _name_facts(raw: str) -> tuple[str, tuple[tuple[Relation, str], ...], bool]:
    """``(entity name, facts the displayed name carries, whether its properties were shown in full)``."""
    name = clean_name(raw)
    facts: list[tuple[Relation, str]] = []
    full = False
    if m := _SUBSTANCE.match(name):
        name = m.group(1)
    if m := _TITLED.match(name):
        name = m.group(1)
        facts.append((Relation.PROPERTY, f"titled {m.group(2)}"))
    if m := _CONDITION.match(name):
        name = m.group(2)
        facts.append((Relation.PROPERTY, m.group(1)))
        full = True  # a dead, wilting, burned or blank thing shows no other property
    if m := _STATE_PREFIX.match(name):
        name = m.group(2)
        facts.append((Relation.STATE_OF_MATTER, _STATE_WORD[m.group(1)]))
    elif name in _WATER_STATES:
        facts.append((Relation.STATE_OF_MATTER, _WATER_STATES[name]))
    if m := _PLANT_STAGE.match(name):
        # A plant keeps its name across stages, so its shown properties replace the old ones.
        name = m.group(1)
        facts.append((Relation.PROPERTY, f"in the {m.group(2)} stage"))
        if m.group(3):
            facts.append((Relation.PROPERTY, f"with {m.group(3)}"))
        full = True
    elif m := _ANIMAL_STAGE_PREFIX.match(name) or _ANIMAL_STAGE_SUFFIX.match(name):
        facts.append((Relation.PROPERTY, f"in the {m.group(1)} stage"))
    elif name == "caterpillar":  # the butterfly's and moth's larva stage has its own name
        facts.append((Relation.PROPERTY, "in the larva stage"))
    return name, tuple(facts), full


# -- lists ---------------------------------------------------------------------------------------------------------
# A list item never starts with these: they continue the previous item ("a switch, which is off").
_CONTINUATION = re.compile(r"^(?:which is |currently reading |that is covered in pollen|with: )")
# "On the pea plant you see:" / "In the bee hive is:" inside a list item opens a nested list.
_NESTED_LIST = re.compile(r"(?:On|In|Inside) the [^:]+? (?:is|you see):$")


def split_list(text: str) -> list[str]:
    """Split a ScienceWorld object list at top-level commas (or newlines, in the multi-line form).

    ``"a bowl (containing a, b), a switch, which is off"`` -> ``["a bowl (containing a, b)", "a switch, which is
    off"]``. A nested list (``"a pea plant. On the pea plant you see: a flower, a seed. , soil"``) belongs to its
    item up to the ``". ,"`` that ScienceWorld writes after it. ``"nothing"`` gives ``[]``.
    """
    text = text.strip()
    if "\n" in text:
        parts = [p.strip() for p in text.split("\n")]
    else:
        parts, depth, start, nested = [], 0, 0, False
        for i, ch in enumerate(text):
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth = max(0, depth - 1)
            elif depth:
                continue
            elif ch == ":" and _NESTED_LIST.search(text, start, i + 1):
                nested = True
            elif nested and ch == "." and text.startswith(". , ", i):
                parts.append(text[start:i + 1])
                start, nested = i + 4, False
            elif ch == "," and not nested and i >= start and text.startswith(", ", i):
                parts.append(text[start:i])
                start = i + 2
        parts.append(text[start:])
        merged: list[str] = []
        for part in parts:
            if merged and _CONTINUATION.match(part.strip()):
                merged[-1] += ", " + part
            else:
                merged.append(part)
        parts = [p.strip() for p in merged]
    return [p for p in parts if p and p.rstrip(".").strip().lower() != "nothing"]


def _closing_paren(text: str, start: int) -> int:
    """Index of the ``)`` that closes the ``(`` just before ``start``; ``len(text)`` if it never closes."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return len(text)


# -- descriptions --------------------------------------------------------------------------------------------------
DOOR = re.compile(r"^A door to the (.+?) \(that is (open|closed)\)\.?$", re.IGNORECASE)
_NAME_END = re.compile(
    r" \(containing |, which is |, currently reading |, with: |, that is covered in pollen| \(that looks unwell\)"
    r"| \(on fire\)|\.(?:\s|$)| ?its (?:anode|cathode|terminal \d+) is connected to: "
    r"|, |;"  # no name has these: a clause no rule knows, kept as residue rather than read as part of the name
)
_S = r"\.?\s*"  # a clause that is a new sentence may or may not follow the previous one's period
# One word per power state: looks say "turned on" (sink), "on" (light bulb) or "activated" (stopwatch) while the
# feedback of the same step says "The sink is now activated."; mixed words would make the KB record a change
# at every step. The canonical words are the actions' own (activate, deactivate).
POWER_STATES = {"turned on": "activated", "turned off": "deactivated", "on": "activated", "off": "deactivated",
                "activated": "activated", "deactivated": "deactivated"}
_CLAUSES: list[tuple[str, re.Pattern[str]]] = [
    ("containing", re.compile(r" \(containing ")),
    ("which", re.compile(r", which is (turned on|turned off|on|off|activated|deactivated|open|closed|flushing)")),
    ("reading", re.compile(r", currently reading a temperature of (-?\d+(?:\.\d+)? degrees celsius)")),
    ("plane", re.compile(r", with: +(.*)$", re.S)),
    ("door", re.compile(_S + r"The (.+?) door is (open|closed)\.")),
    ("openness", re.compile(_S + r"The (.+?) is (open|closed)\.")),
    ("list", re.compile(_S + r"(?:On|In|Inside) the (.+?) (?:is|you see): ?(.*)$", re.S)),
    ("ticks", re.compile(_S + r"The time reads (\d+) ticks\.")),
    ("terminal", re.compile(_S + r"its (anode|cathode|terminal \d+) is connected to: (.+?)\.(?=\s|$)")),
    ("connected", re.compile(_S + r"it is connected to: (.+?)\.(?=\s|$)")),
    ("unwell", re.compile(r" \(that looks unwell\)")),
    ("fire", re.compile(r" \(on fire\)")),
    ("pollen", re.compile(r", that is covered in pollen")),
    ("artist", re.compile(_S + r"The artist is listed as (.+?)\.")),
]
_PLANE_ITEM = re.compile(r"^(.+?) (approximately \d+% down the plane|at the (?:top|bottom) of the plane)$")
_TAIL = re.compile(r"^[\s.]*$")


def first_match(rules: list[tuple[str, re.Pattern[str]]], text: str) -> tuple[str, re.Match[str]] | None:
    """The first ``(kind, match)`` of ``rules`` whose pattern matches at the start of ``text``, else None."""
    for kind, pattern in rules:
        if m := pattern.match(text):
            return kind, m
    return None


def describe(text: str, sink: FactSink, parent: Node | str | None = None) -> Node | None:
    """Parse one object description into ``sink``; return the described object (None if no name was found).

    ``parent`` is what the object was listed in (None: not known, e.g. the feedback of ``look at``). Handles
    nesting: ``(containing ...)``, ``On/In the X is: ...`` and inclined planes' ``with:`` lists add
    (X, contains, child) for each child and mark (X, contains) as a full set. Unknown clauses go to the residue.
    """
    text = text.strip()
    end = _NAME_END.search(text)
    head, rest = (text[: end.start()], text[end.start():]) if end else (text, "")
    name, _, _ = _name_facts(head)
    if not name:
        sink.unparsed(text)
        return None
    node = sink.node(name, parent)
    entity(head, sink, node)
    if _LIVING.match(clean_name(head)):
        # A plant shows what is on it ("On the pea plant you see: ..."), or nothing when nothing is: seeds that
        # fell when it died are in its pot now, not on it. (A closed container is different: it hides contents.)
        sink.full(node, Relation.CONTAINS)
    while rest and not _TAIL.match(rest):
        hit = first_match(_CLAUSES, rest)
        if hit is None:
            sink.unparsed(rest)
            return node
        kind, m = hit
        rest = rest[m.end():]
        if kind == "containing":
            close = _closing_paren(rest, 0)
            _contents(node, rest[:close], sink)
            rest = rest[close + 1:]
        elif kind == "which":
            state = m.group(1)
            if state in ("open", "closed"):
                sink.add(node, Relation.OPEN_STATE, state)
            elif state == "flushing":
                sink.add(node, Relation.PROPERTY, "flushing")
            else:
                sink.add(node, Relation.POWER_STATE, POWER_STATES[state])
        elif kind == "reading":
            sink.add(node, Relation.READING, m.group(1))
        elif kind == "ticks":
            sink.add(node, Relation.READING, f"{m.group(1)} ticks")
        elif kind in ("door", "openness"):
            sink.add(node, Relation.OPEN_STATE, m.group(2))
        elif kind == "list":
            body = m.group(2).rstrip()
            _contents(node, body[:-1] if body.endswith(".") else body, sink)
        elif kind == "plane":
            _plane(node, m.group(1), sink)
        elif kind == "terminal":
            if clean_name(m.group(2)) != "nothing":
                sink.add(node, Relation.PROPERTY, f"{m.group(1)} connected to {clean_name(m.group(2))}")
        elif kind == "unwell":
            sink.add(node, Relation.PROPERTY, "unwell")
        elif kind == "fire":
            sink.add(node, Relation.PROPERTY, "on fire")
        elif kind == "pollen":
            sink.add(node, Relation.PROPERTY, "covered in pollen")
        elif kind == "artist":
            sink.add(node, Relation.PROPERTY, f"painted by {m.group(1).lower()}")
        # "connected" (a bare terminal's own links) names no object to attach them to: consumed, no fact.
    return node


def _contents(container: Node, body: str, sink: FactSink) -> None:
    sink.full(container, Relation.CONTAINS)
    for item in split_list(body):
        if child := describe(item, sink, container):
            sink.add(container, Relation.CONTAINS, child)


def _plane(plane: Node, body: str, sink: FactSink) -> None:
    sink.full(plane, Relation.CONTAINS)
    for item in split_list(body):
        m = _PLANE_ITEM.match(item)
        if not m:
            sink.unparsed(item)
            continue
        name, _, _ = _name_facts(m.group(1))
        block = sink.node(name, plane)
        entity(m.group(1), sink, block)
        sink.add(plane, Relation.CONTAINS, block)
        sink.add(block, Relation.PROPERTY, m.group(2))
        sink.full(block, Relation.PROPERTY)  # its position replaces the previous one


def object_line(line: str, container: str, sink: FactSink) -> None:
    """Facts from one listed line of ``container`` (a room, the inventory, or any container).

    A door line gives (room, connects_to, other room) and (door between the two rooms, open_state, ...);
    ``the agent`` gives (agent, location, room); any other object gives
    (container, contains, object) and its own facts.
    """
    line = line.strip()
    if m := DOOR.match(line):
        other = clean_name(m.group(1))
        sink.add(container, Relation.CONNECTS_TO, other)
        sink.add(door_name(container, other), Relation.OPEN_STATE, m.group(2).lower())
        return
    node = describe(line, sink, container)
    if node is None:
        return
    if node.name == AGENT:
        if container != INVENTORY:
            sink.add(AGENT, Relation.LOCATION, container)
    else:
        sink.add(container, Relation.CONTAINS, node)


# -- listings (look around, inventory, look in) ---------------------------------------------------------------------
LISTING_HEADERS = [
    re.compile(r"^This room is called the (.+?)\. In it, you see: ?$"),
    re.compile(r"^This outside location is called the (.+?)\. Here you see: ?$"),
    re.compile(r"^In your (inventory), you see: ?$"),
    re.compile(r"^Inside the (.+?) is: ?$"),
]
_NOTHING_IN = re.compile(r"^There is nothing in the (.+?)\.$")
_ALSO_SEE = re.compile(r"^You also see: ?(.*)$")


def listing_lines(text: str) -> tuple[str, list[str]] | None:
    """``(container, object lines)`` of a listing observation, or None if ``text`` is not a listing.

    Object lines include the door lines under ``You also see:`` (also in their one-line, comma-joined form).
    """
    lines = text.strip("\n").split("\n")
    header = lines[0].strip()
    for pattern in LISTING_HEADERS:
        if m := pattern.match(header):
            break
    else:
        return None
    out: list[str] = []
    for raw in lines[1:]:
        line = raw.strip()
        if also := _ALSO_SEE.match(line):
            out.extend(p.strip() for p in also.group(1).rstrip(".").split(", ") if p.strip())
        elif line and line.lower() != "nothing":
            out.append(line)
    return clean_name(m.group(1)), out


def listing(text: str, sink: FactSink) -> bool:
    """Parse a listing observation into ``sink``; return False (adding nothing) if ``text`` is not one."""
    if m := _NOTHING_IN.match(text.strip()):
        sink.full(clean_name(m.group(1)), Relation.CONTAINS)
        return True
    parsed = listing_lines(text)
    if parsed is None:
        return False
    container, lines = parsed
    sink.full(container, Relation.CONTAINS)
    doors = False
    for line in lines:
        doors = doors or bool(DOOR.match(line))
        object_line(line, container, sink)
    if doors:
        sink.full(container, Relation.CONNECTS_TO)
    return True
