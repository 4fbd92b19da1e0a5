"""How faithful the environmental KB is to ScienceWorld's own state: the pure half of ``benchmarks/kb_fidelity.py``.

The judge is the simulator, never a model: :class:`WorldState` reads ``env.getObjectTree()`` (every object with
its container, open/closed, activation, material and life records) and ScienceWorld's referent table (the names
an object is shown and addressed by), and the doors the JVM reports.
:class:`~knowmap.evaluation.fidelity_tally.FidelityTally` compares the KB's current facts with it after every step.

Names. A tree object answers to the KB's normalisation (:func:`normalise`) of its tree name, of its referents
(generic ones such as ``substance`` left out) and of those with its colour in front, as the display shows them. KB
names qualified by the KB's identity rules (``"pea seed #2 in pea plant in flower pot 8"``) resolve through their
container (:meth:`WorldState.resolve`); up to two leading modifiers the tree does not record (a flower's colour and
size) are dropped when nothing matches otherwise. A name that still denotes objects in several places is counted as
``ambiguous``; a fact about it is true if any of them satisfies it.

Scope. An object is *in view* at a step when it is inside the agent's room (inventory included; inside other objects
only where the text lists their contents) and one of its names occurs, as whole words, in that step's texts
(feedback, look around, inventory): what the agent could have read. Precision counts the KB's current facts whose
subject or object is in view (the agent's location always is; a name that matches no object anywhere counts too, as
``unmatched``, and is false); facts only about objects out of view are reported apart as ``memory``. Recall counts
the true facts about objects in view that the step's text reveals (containment always, each of n identical items
apart; open/closed, on/off, state of matter, a thermometer's reading, death, sickness and fire only where
ScienceWorld's display template states them next to the object's name, tested by the regexes of :func:`revealed`).
A KB fact that was true at an earlier check and is false now is *stale* (a change the KB missed).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from knowmap.kb.extraction_patterns import FactSink, entity
from knowmap.kb.identity import AGENT, INVENTORY, door_name
from knowmap.schemas import Fact, Relation

# Relations the tree can judge, as reported; "containment" joins contains and (non-agent) location facts, which
# the KB keeps as inverses of each other.
CHECKED = ("containment", "agent_location", "door_state", "connects_to", "open_state", "power_state",
           "state_of_matter", "temperature", "reading", "property")
TEMPERATURE_TOLERANCE_C = 1.0  # the thermometer prints whole degrees
_GENERIC = frozenset({"substance", "living thing", "organism", "object", "thing", "component", "plant", "animal",
                      "electrical component", "device", "container", "seed", "generator"})
_PART = re.compile(r"^(?:terminal \d+|anode|cathode)$")  # every object's electrical connection points
_PORTAL = re.compile(r"^(?:door to .+|drain)$")  # a door the KB could not place, and drains: not judged
_DOOR = re.compile(r"^door between (.+) and (.+)$")
DOOR_KINDS = ("door_state", "connects_to")  # judged only with the doors read from the JVM
_INSTANCE = re.compile(r"^(.+) #(\d+)$")
_MEASURED = re.compile(r" at step (\d+)$")
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
    label: str  # the tree name as the KB would key it
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
        doors: the doors, as :meth:`knowmap.environment.sciworld.ScienceWorld.doors` reads them (the tree leaves
            portals out); None: door states and room connections are not judged.

    Raises:
        ValueError: the tree holds no agent.
    """

    def __init__(self, tree: Mapping[str, Any], referents: Mapping[str, Iterable[str]] | None = None,
                 doors: Iterable[Mapping[str, Any]] | None = None) -> None:
        self.doors: dict[str, bool] | None = None  # "door between a and b" -> open
        self.door_rooms: dict[str, tuple[str, str]] = {}
        if doors is not None:
            self.doors = {}
            for door in (d for d in doors if len(d["rooms"]) == 2):
                name = door_name(*door["rooms"])
                self.doors[name], self.door_rooms[name] = bool(door["open"]), tuple(sorted(door["rooms"]))
        self.objects: dict[str, TreeObject] = {}
        self.by_name: dict[str, list[str]] = {}
        self._resolved: dict[str, tuple[list[TreeObject], int]] = {}
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
        """The objects whose own names include ``name`` (empty: no object answers to it)."""
        return [self.objects[u] for u in self.by_name.get(name, [])]

    def resolve(self, name: str) -> tuple[list[TreeObject], int]:
        """The objects a KB entity name may denote, and its instance number.

        Reads the KB's identity scheme (:mod:`knowmap.kb.identity`): ``"apple #2"`` is the second of identical
        apples in one container (instance 2), ``"pea plant in flower pot 8"`` is a pea plant inside an object
        that ``"flower pot 8"`` resolves to (recursively), and a generic referent with its place (``"substance in
        metal pot"``) resolves the way ScienceWorld's parser would, among that container's contents.
        """
        if name not in self._resolved:
            self._resolved[name] = ([], 1)  # a name that contains itself resolves to nothing
            self._resolved[name] = self._resolve(name)
        return self._resolved[name]

    def _resolve(self, name: str) -> tuple[list[TreeObject], int]:
        for known in _modified(name) if " in " not in name else [name]:
            if known in self.by_name:  # an object shown by that very name beats ones that merely answer to it
                found = self.matches(known)
                return [o for o in found if o.label == known] or found, 1
            if (m := _INSTANCE.match(known)) and m.group(1) in self.by_name:
                return self.matches(m.group(1)), int(m.group(2))
        start = 0
        while (i := name.find(" in ", start)) >= 0:
            head, tail, start = name[:i], name[i + 4:], i + 1
            containers = self.resolve(tail)[0]
            if not containers:
                continue
            k = 1
            if m := _INSTANCE.match(head):
                head, k = m.group(1), int(m.group(2))
            for known in _modified(head):
                found = [self.objects[c] for p in containers for c in p.children if known in self.objects[c].aliases]
                if found:
                    return found, k
        return [], 1

    def parent_names(self, obj: TreeObject) -> frozenset[str]:
        return self.objects[obj.parent].names if obj.parent in self.objects else frozenset()

    def in_view(self, texts: Iterable[str]) -> set[str]:
        """Objects in the agent's room that one of ``texts`` names (see the module docstring), plus the room.

        The walk enters an object only if the text lists its contents (``"a glass jar (containing"``, ``"On the pea
        plant you see:"``, ``"In the sink is:"``; the room, the agent and the inventory always): a drawer inside a
        closed cupboard is not in view because another drawer is named on the counter, nor are bees inside a
        flower (a flower shows no contents) because other bees fly in the room.
        """
        text = " ".join(" ".join(t.lower() for t in texts if t).split())  # ScienceWorld doubles some spaces
        view = {self.room}
        stack = list(self.objects[self.room].children)
        while stack:
            obj = self.objects[stack.pop()]
            if obj.name == INVENTORY or any(_mentioned(n, text) for n in obj.names):
                view.add(obj.uuid)
            if obj.name in (AGENT, INVENTORY) or any(_lists_contents(n, text) for n in obj.names):
                stack.extend(obj.children)
        return view


def _lists_contents(name: str, text: str) -> bool:
    return (f"{name} (containing" in text or f"the {name} you see:" in text or f"the {name} is:" in text
            or f"{name}, with:" in text)


def _tree_object(uuid: str, node: Mapping[str, Any], parent: str | None, referents: Iterable[str]) -> TreeObject:
    raw = str(node.get("name", ""))
    label = normalise(raw)
    names = {label} | {normalise(r) for r in referents}
    specific = {n for n in names if n and (n not in _GENERIC or n == raw.lower())}
    color = str((node.get("propMaterial") or {}).get("color") or "").lower()
    if color:  # the display shows an object's colour before its name ("a white pillow"); the tree does not
        specific |= {f"{color} {n}" for n in specific if not n.startswith(color)}
        names |= specific
    obj = TreeObject(uuid=uuid, name=raw.lower(), label=label, parent=parent, names=frozenset(specific),
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


def _modified(name: str) -> list[str]:
    """``name``, then without one and two leading words: the display puts modifiers the tree does not record
    before some names (a flower's colour and size come from the plant's genes: "small red flower" is a flower)."""
    words = name.split(" ")
    return [name] + [" ".join(words[cut:]) for cut in (1, 2) if len(words) > cut]


def _mentioned(name: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


def canonical(fact: Fact) -> tuple[str, str, str, str]:
    """``(checked relation, subject, relation word, object)``: ``(x, location, y)`` becomes ``(y, contains, x)``
    unless x is the agent, so containment is counted once however the KB stored it."""
    if _DOOR.match(fact.subject) and fact.relation is Relation.OPEN_STATE:
        return ("door_state", fact.subject, fact.relation.value, fact.object)
    if fact.relation is Relation.CONNECTS_TO:
        return ("connects_to", fact.subject, fact.relation.value, fact.object)
    if _PORTAL.match(fact.subject) or _DOOR.match(fact.subject) or (
            fact.relation in (Relation.CONTAINS, Relation.LOCATION) and _PORTAL.match(fact.object)):
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
          previous: WorldState | None = None,
          measured: Mapping[int, Mapping[str, float]] | None = None) -> tuple[bool, int, bool]:
    """Whether a canonical KB fact holds in ``world``: ``(true, places, unmatched)``.

    Names resolve through :meth:`WorldState.resolve`. A containment fact ``(S, contains, X #k)`` holds when an
    object ``S`` denotes holds at least k objects that ``X`` denotes. Any other fact holds when one of the objects
    its subject denotes satisfies it (those in ``view``, if any are). ``places`` is the number of containers the
    subject's (containment: the child's) candidates in view lie in: more than one means the name is ambiguous.
    ``unmatched`` is True when a name answers to no object at all (the fact is then false).

    A measurement ``"N degrees celsius at step s"`` holds if the object had that temperature at step s or just
    before it (``measured``: step -> uuid -> temperature, what the tally saw; a thermometer reads before the step's
    tick, the tree is written after it). A current reading holds if it matches the object now or in ``previous``.
    """
    if kind == "agent_location":
        return obj in world.objects[world.room].names, 1, False
    if kind == "door_state":
        if world.doors is None or subject not in world.doors:
            return False, 0, True
        return world.doors[subject] == (obj == "open"), 1, False
    if kind == "connects_to":
        return world.doors is not None and door_name(subject, obj) in world.doors, 1, False
    if kind == "containment":
        parents = world.resolve(subject)[0]
        children, k = world.resolve(obj)
        if not parents or not children:
            return False, _places(children, view) if children else 0, True
        held = Counter(c.parent for c in children)
        ok = any(held[p.uuid] >= k for p in parents)
        return ok, _places(children, view), False
    candidates = world.resolve(subject)[0]
    if not candidates:
        return False, 0, True
    seen = [c for c in candidates if c.uuid in view] or candidates
    if kind == "temperature" and measured is not None and (m := _MEASURED.search(obj)):
        step, value = int(m.group(1)), float(_NUMBER.search(obj).group())
        ok = any(abs(temps[c.uuid] - value) <= TEMPERATURE_TOLERANCE_C for s in (step, step - 1)
                 if (temps := measured.get(s)) is not None for c in seen if c.uuid in temps)
        return ok, _places(seen, view), False
    ok = any(holds(c, kind, obj) for c in seen)
    if not ok and previous is not None and kind in ("temperature", "reading"):
        ok = any(holds(previous.objects[c.uuid], kind, obj) for c in seen if c.uuid in previous.objects)
    return ok, _places(seen, view), False


def _places(objects: list[TreeObject], view: set[str]) -> int:
    seen = [o for o in objects if o.uuid in view] or objects
    return len({o.parent for o in seen})


def holds(o: TreeObject, kind: str, value: str) -> bool:
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
    here = world.objects[world.room].name
    for door, rooms in world.door_rooms.items():  # the doors of this room that the text names
        other = rooms[1] if rooms[0] == here else rooms[0] if rooms[1] == here else None
        if other is not None and re.search(rf"door to (?:the )?{re.escape(other)}\b", text):
            out.append(("door_state", door, frozenset({door}), "open" if world.doors[door] else "closed"))
            out.append(("connects_to", door, frozenset({here}), other))
    return out

