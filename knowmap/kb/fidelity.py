"""How faithful the environmental KB is to ScienceWorld's own state: the pure half of ``benchmarks/kb_fidelity.py``.

The judge is the simulator, never a model: :class:`WorldState` reads ``env.getObjectTree()`` (every object with
its container, open/closed, activation, material and life records) and ScienceWorld's referent table (the names
an object is shown and addressed by). :class:`FidelityTally` compares the KB's current facts with it after a step.

Names. The KB keys entities by display name, lower-cased, without article, state prefix or life stage
(:func:`knowmap.kb.extraction_patterns.entity`). A tree object answers to that same normalisation of its tree
name and of each of its referents, generic ones (``substance``, ``living thing``, ...) left out. A KB name may
match several objects (two drawers, two oranges): a fact is true if *any* of them satisfies it, and the check is
counted as ``ambiguous`` as well, because shared names are one of the defects being measured.

Scope. An object is *in view* at a step when it is inside the agent's room (at any depth, inventory included)
and one of its names occurs, as whole words, in that step's texts (feedback, look around, inventory): what the
agent could have read. Precision counts the KB's current facts whose subject or object is in view (the agent's
location always is; a name that matches no object anywhere counts too, as ``unmatched``, and is false); facts
only about objects out of view are reported apart as ``memory``. Recall counts the true facts about objects in
view that the step's text reveals (containment always; open/closed, on/off, state of matter, a thermometer's
reading, death, sickness and fire only where ScienceWorld's display template states them next to the object's
name, tested by the regexes of :func:`revealed`).
A KB fact that was true at an earlier check and is false now is *stale* (a change the KB missed).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from knowmap.kb.extraction_patterns import AGENT, INVENTORY, FactSink, entity
from knowmap.schemas import Fact, Relation

# Relations the tree can judge, as reported; "containment" joins contains and (non-agent) location facts, which
# the KB keeps as inverses of each other.
CHECKED = ("containment", "agent_location", "open_state", "power_state", "state_of_matter", "temperature",
           "reading", "property")
UNCHECKABLE: dict[str, str] = {
    "portal": "doors and drains are portals (Door, LiquidDrain), which EnvObject.toJSON leaves out of the tree "
              "(it walks getContainedObjects, not getPortals): their open state and containment are not checked",
    "connects_to": "room connections are portals too: not in the tree",
    "reading (ticks)": "a stopwatch's ticks are counted by the device, not stored in the tree (a thermometer's "
                       "reading is its own temperatureC, which is checked)",
    "focus": "the focused object is task state, not object state",
    "property (other)": "life stage, titles, pollen, positions on a plane, wiring and recipes are not in the "
                        "tree's JSON (LifeProperties.toJSON has isDead and isSickly, not the stage)",
}
TEMPERATURE_TOLERANCE_C = 1.0  # the thermometer prints whole degrees
_GENERIC = frozenset({"substance", "living thing", "organism", "object", "thing", "component", "plant", "animal",
                      "electrical component", "device", "container", "seed"})
_PART = re.compile(r"^(?:terminal \d+|anode|cathode)$")  # every object's electrical connection points
_PORTAL = re.compile(r"^(?:door to .+|drain)$")
_PLACED = re.compile(r"^(.+?) in (?:the )?(.+)$")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_PROPERTY_CHECKS = {"dead": "dead", "on fire": "burning", "unwell": "sick"}


def normalise(name: str) -> str:
    """A displayed or tree name as the KB keys it: ``"a substance called liquid chocolate"`` -> ``"chocolate"``."""
    return entity(name, FactSink())


@dataclass(slots=True)
class TreeObject:
    """One object of the object tree, reduced to what the KB's relations can say about it."""

    uuid: str
    name: str
    parent: str | None
    names: frozenset[str]
    aliases: frozenset[str]  # names plus generic referents ("substance"), for place-qualified KB names
    is_open: bool | None = None  # closable containers only
    activated: bool | None = None  # devices
    state: str | None = None  # solid | liquid | gas
    temperature: float | None = None
    dead: bool | None = None
    sick: bool | None = None
    burning: bool | None = None
    children: list[str] = field(default_factory=list)


class WorldState:
    """The simulator's state at one step, indexed by the names the KB would use.

    Args:
        tree: ``env.getObjectTree()`` (the universe and everything in it).
        referents: uuid -> referents, from ``get_all_object_ids_types_referents_LUTJSON``; optional.

    Raises:
        ValueError: the tree holds no agent.
    """

    def __init__(self, tree: Mapping[str, Any], referents: Mapping[str, Iterable[str]] | None = None) -> None:
        self.objects: dict[str, TreeObject] = {}
        self.by_name: dict[str, list[str]] = {}
        referents = referents or {}
        stack: list[tuple[Mapping[str, Any], str | None]] = [(tree, None)]
        while stack:
            node, parent = stack.pop()
            if node.get("isDeleted") or _PART.match(str(node.get("name", ""))):
                continue
            uuid = str(node["uuid"])
            obj = _tree_object(uuid, node, parent, referents.get(uuid, ()))
            self.objects[uuid] = obj
            if parent is not None:
                self.objects[parent].children.append(uuid)
                for name in obj.names:
                    self.by_name.setdefault(name, []).append(uuid)
            stack.extend((child, uuid) for child in node.get("contents", {}).values())
        agents = [u for u in self.by_name.get(AGENT, []) if self.objects[u].name == AGENT]
        if not agents:
            raise ValueError("the object tree holds no agent: pass env.getObjectTree() of a loaded task")
        self.agent = agents[0]
        self.room = self.objects[self.agent].parent or self.agent

    def matches(self, name: str) -> list[TreeObject]:
        """The objects a KB name may denote (empty: no object answers to it)."""
        return [self.objects[u] for u in self.by_name.get(name, [])]

    def parent_names(self, obj: TreeObject) -> frozenset[str]:
        return self.objects[obj.parent].names if obj.parent in self.objects else frozenset()

    def in_view(self, texts: Iterable[str]) -> set[str]:
        """Objects in the agent's room that one of ``texts`` names (see the module docstring), plus the room.

        The walk does not enter a closed container unless the text lists its contents (``"a glass jar
        (containing ..."``; ScienceWorld shows some closed containers' contents): a drawer inside a closed
        cupboard is not in view because another drawer is named on the counter.
        """
        text = " ".join(" ".join(t.lower() for t in texts if t).split())  # ScienceWorld doubles some spaces
        view = {self.room}
        stack = list(self.objects[self.room].children)
        while stack:
            obj = self.objects[stack.pop()]
            if obj.name == INVENTORY or any(_mentioned(n, text) for n in obj.names):
                view.add(obj.uuid)
            if obj.is_open is False and not any(f"{n} (containing" in text for n in obj.names):
                continue
            stack.extend(obj.children)
        return view


def _tree_object(uuid: str, node: Mapping[str, Any], parent: str | None, referents: Iterable[str]) -> TreeObject:
    raw = str(node.get("name", ""))
    names = {normalise(raw)} | {normalise(r) for r in referents}
    specific = {n for n in names if n and (n not in _GENERIC or n == raw.lower())}
    obj = TreeObject(uuid=uuid, name=raw.lower(), parent=parent, names=frozenset(specific),
                     aliases=frozenset(n for n in names if n))
    if (c := node.get("propContainer")) and c.get("isClosable"):
        obj.is_open = bool(c.get("isOpen"))
    if d := node.get("propDevice"):
        obj.activated = bool(d.get("isActivated"))
    if m := node.get("propMaterial"):
        obj.state = str(m.get("stateOfMatter") or "") or None
        obj.temperature = float(m["temperatureC"]) if m.get("temperatureC") is not None else None
        obj.burning = bool(m.get("isCombusting"))
    if life := node.get("propLife"):
        obj.dead, obj.sick = bool(life.get("isDead")), bool(life.get("isSickly"))
    return obj


def _mentioned(name: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


def canonical(fact: Fact) -> tuple[str, str, str, str]:
    """``(checked relation, subject, relation word, object)``: ``(x, location, y)`` becomes ``(y, contains, x)``
    unless x is the agent, so containment is counted once however the KB stored it."""
    if _PORTAL.match(fact.subject) or (fact.relation is Relation.CONTAINS and _PORTAL.match(fact.object)) or (
            fact.relation is Relation.LOCATION and _PORTAL.match(fact.object)):
        return ("portal", fact.subject, fact.relation.value, fact.object)
    if fact.relation is Relation.LOCATION:
        if fact.subject == AGENT:
            return ("agent_location", AGENT, "location", fact.object)
        return ("containment", fact.object, "contains", fact.subject)
    if fact.relation is Relation.CONTAINS:
        return ("containment", fact.subject, "contains", fact.object)
    if fact.relation is Relation.PROPERTY:
        kind = "property" if fact.object in _PROPERTY_CHECKS else "property (other)"
        return (kind, fact.subject, fact.relation.value, fact.object)
    if fact.relation is Relation.READING and "degrees" not in fact.object:
        return ("reading (ticks)", fact.subject, fact.relation.value, fact.object)
    return (fact.relation.value, fact.subject, fact.relation.value, fact.object)


def judge(world: WorldState, kind: str, subject: str, obj: str, view: set[str] = frozenset(),
          previous: WorldState | None = None) -> tuple[bool, int, bool]:
    """Whether a canonical KB fact holds in ``world``: ``(true, candidate objects, unmatched)``.

    A temperature or reading also holds if it matches the object in ``previous`` (the world before this step):
    a thermometer reads before the step's tick, the tree is written after it, and a heated object can change
    by more than the tolerance in one tick.

    The candidates for a name are the objects in ``view`` that answer to it, or, if none is in view, every object
    that does; more than one candidate means the name is ambiguous. ``unmatched`` is True when a name in the fact
    answers to no object at all (the fact is then false).
    """
    if kind == "agent_location":
        return obj in world.objects[world.room].names, 1, False
    if kind == "containment":
        # The container disambiguates: any object of that name in any container of that name makes it true
        # (the kitchen's sink while the agent looks at the bathroom's); ambiguity is counted among those in view.
        children = _candidates(world, obj, view)
        if not children or not world.matches(subject):
            return False, len(children), True
        everywhere = world.matches(obj) or children
        return any(subject in world.parent_names(c) for c in everywhere), len(children), False
    candidates = _candidates(world, subject, view)
    if not candidates:
        return False, 0, True
    ok = any(_holds(c, kind, obj) for c in candidates)
    if not ok and previous is not None and kind in ("temperature", "reading"):
        ok = any(_holds(previous.objects[c.uuid], kind, obj) for c in candidates if c.uuid in previous.objects)
    return ok, len(candidates), False


def _candidates(world: WorldState, name: str, view: set[str]) -> list[TreeObject]:
    found = world.matches(name)
    if not found and (m := _PLACED.match(name)):
        # The KB keeps the place in a generic referent's name ("substance in metal pot"): resolve it the way
        # ScienceWorld's parser would, among the objects inside a container of that name.
        found = [o for o in world.objects.values()
                 if m.group(1) in o.aliases and m.group(2) in world.parent_names(o)]
    seen = [o for o in found if o.uuid in view]
    return seen or found


def _holds(o: TreeObject, kind: str, value: str) -> bool:
    if kind == "open_state":
        return o.is_open is not None and o.is_open == (value == "open")
    if kind == "power_state":
        return o.activated is not None and o.activated == (value == "activated")
    if kind == "state_of_matter":
        return o.state == value
    if kind in ("temperature", "reading"):  # a thermometer reads its own temperature (getDeviceReading(this))
        m = _NUMBER.search(value)
        return o.temperature is not None and m is not None and abs(o.temperature - float(m.group())) <= (
            TEMPERATURE_TOLERANCE_C)
    if kind == "property":
        return bool(getattr(o, _PROPERTY_CHECKS[value]))
    return False


def revealed(world: WorldState, view: set[str], texts: Iterable[str]) -> list[tuple[str, str, frozenset[str],
                                                                                   str]]:
    """The true facts the step's texts reveal about objects in view: ``(kind, uuid, subject names, value)``.

    Containment of every object in view (but the agent and its inventory), the agent's room, and, where
    ScienceWorld's display shows them next to the object's name, open/closed, on/off, state of matter, a
    thermometer's reading, death, sickness and fire.
    """
    text = " ".join(" ".join(t.lower() for t in texts if t).split())
    out: list[tuple[str, str, frozenset[str], str]] = [("agent_location", world.agent, frozenset({AGENT}), "")]
    for uuid in sorted(view - {world.room}):
        o = world.objects[uuid]
        if not o.names or (o.name in (AGENT, INVENTORY) and o.parent in (world.room, world.agent)):
            continue
        out.append(("containment", uuid, world.parent_names(o), "contains"))
        names = "(?<![\\w-])(?:" + "|".join(re.escape(n) for n in sorted(o.names, key=len, reverse=True)) + ")"
        if o.is_open is not None and re.search(
                rf"(?:{names})(?: door)? is (?:now |already )?(?:open|closed)\b|(?:{names}), which is (?:open|closed)",
                text):
            out.append(("open_state", uuid, o.names, "open" if o.is_open else "closed"))
        if o.activated is not None and re.search(
                rf"(?:{names}), which is (?:turned on|turned off|on|off|activated|deactivated)\b"
                rf"|(?:{names}) is (?:now |already )?(?:activated|deactivated|on|off)\b", text):
            out.append(("power_state", uuid, o.names, "activated" if o.activated else "deactivated"))
        if o.state and (re.search(rf"\b(?:liquid|solid|gaseous) (?:{names})\b", text)
                        or o.names & {"water", "ice", "steam"}):
            out.append(("state_of_matter", uuid, o.names, o.state))
        if o.temperature is not None and o.activated is not None and re.search(
                rf"{names}, currently reading a temperature of", text):
            out.append(("reading", uuid, o.names, f"{round(o.temperature)} degrees celsius"))
        if o.dead and re.search(rf"\bdead (?:{names})\b", text):
            out.append(("property", uuid, o.names, "dead"))
        if o.sick and re.search(rf"{names} \(that looks unwell\)", text):
            out.append(("property", uuid, o.names, "unwell"))
        if o.burning and re.search(rf"{names} \(on fire\)", text):
            out.append(("property", uuid, o.names, "on fire"))
    return out


@dataclass
class Counts:
    """Precision, recall and staleness counts of one relation (or one task, or everything)."""

    checked: int = 0
    true: int = 0
    stale: int = 0
    ambiguous: int = 0
    unmatched: int = 0
    memory_checked: int = 0
    memory_true: int = 0
    truth: int = 0
    found: int = 0
    collapsed: int = 0

    def add(self, other: Counts) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> dict[str, Any]:
        """The counts with precision, recall, staleness and memory precision (None where nothing was counted)."""
        def ratio(a: int, b: int) -> float | None:
            return round(a / b, 6) if b else None
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__},
                "precision": ratio(self.true, self.checked), "recall": ratio(self.found, self.truth),
                "staleness": ratio(self.stale, self.checked),
                "memory_precision": ratio(self.memory_true, self.memory_checked)}


class FidelityTally:
    """Accumulates the per-step comparison of an env KB with the world, per relation, over an episode or more.

    Call :meth:`check` after every step with the KB's current facts; read :attr:`per_relation`,
    :attr:`unchecked` (KB facts of relations the tree cannot judge) and :meth:`examples` (the false facts).
    """

    def __init__(self, max_examples: int = 40) -> None:
        self.per_relation: dict[str, Counts] = {k: Counts() for k in CHECKED}
        self.unchecked: Counter[str] = Counter()
        self.false_facts: Counter[tuple[str, str]] = Counter()  # (fact, why) -> fact-steps it was open and false
        self._first_false: dict[tuple[str, str], str] = {}
        self.max_examples = max_examples
        self._was_true: set[tuple[str, str, str, str, int]] = set()
        self._previous: WorldState | None = None

    def examples(self, n: int | None = None) -> list[dict[str, Any]]:
        """The false facts, most often checked first: fact, why, first episode@step, how many fact-steps."""
        return [{"fact": f, "why": why, "first": self._first_false[(f, why)], "fact_steps": count}
                for (f, why), count in self.false_facts.most_common(n or self.max_examples)]

    def new_episode(self) -> None:
        """Forget which facts were true before (fact identities restart with a new KB)."""
        self._was_true.clear()
        self._previous = None

    def check(self, world: WorldState, facts: Iterable[Fact], texts: Iterable[str], step: int = 0,
              label: str = "") -> dict[str, Counts]:
        """Compare ``facts`` (the KB's current ones) with ``world`` after a step; returns this step's counts per
        relation (:func:`total` adds them up)."""
        texts = list(texts)
        view = world.in_view(texts)
        view_names = {n for u in view for n in world.objects[u].names} | {AGENT}
        step_counts = {k: Counts() for k in CHECKED}
        kb: set[tuple[str, str, str]] = set()
        values: dict[tuple[str, str], list[str]] = {}
        first: dict[tuple[str, str, str, str], int] = {}  # a contains fact and its inverse location fact: once
        for fact in facts:
            key4 = canonical(fact)
            first[key4] = min(first.get(key4, fact.valid_from), fact.valid_from)
        for (kind, subject, word, obj), valid_from in first.items():
            if kind not in step_counts:
                self.unchecked[kind] += 1
                continue
            kb.add((kind, subject, obj))
            values.setdefault((kind, subject), []).append(obj)
            ok, candidates, unmatched = judge(world, kind, subject, obj, view, self._previous)
            c = step_counts[kind]
            in_view = unmatched or subject in view_names or (kind == "containment" and obj in view_names)
            if not in_view:
                c.memory_checked += 1
                c.memory_true += ok
                continue
            key = (kind, subject, word, obj, valid_from)
            c.checked += 1
            c.true += ok
            c.ambiguous += candidates > 1
            c.unmatched += unmatched
            if ok:
                self._was_true.add(key)
            else:
                c.stale += key in self._was_true
                why = ("unmatched name" if unmatched else "was true, no longer" if key in self._was_true else
                       "false when first checked")
                example = (f"({subject}, {word}, {obj})", why)
                self.false_facts[example] += 1
                self._first_false.setdefault(example, f"{label}@{step}")
        seen: Counter[tuple[str, frozenset[str], frozenset[str]]] = Counter()
        for kind, uuid, subjects, _value in revealed(world, view, texts):
            c = step_counts[kind]
            c.truth += 1
            names = world.objects[uuid].names
            if kind == "containment":
                c.found += any((kind, s, n) in kb for s in subjects for n in names)
                seen[(kind, subjects, names)] += 1
            elif kind == "agent_location":
                c.found += any((kind, AGENT, n) in kb for n in world.objects[world.room].names)
            else:
                o = world.objects[uuid]  # found: a KB value for one of its names that holds (numbers within 1 C)
                c.found += any(_holds(o, kind, v) for n in subjects for v in values.get((kind, n), ()))
        for (kind, _, _), n in seen.items():
            step_counts[kind].collapsed += n - 1  # identical objects in one container: one KB fact for n of them
        for kind, c in step_counts.items():
            self.per_relation[kind].add(c)
        self._previous = world
        return step_counts


def total(per_relation: Mapping[str, Counts]) -> Counts:
    """The sum of per-relation counts."""
    out = Counts()
    for counts in per_relation.values():
        out.add(counts)
    return out
