"""Entity identity: the objects an observation describes become entity names.

The parser (:mod:`knowmap.kb.extraction_patterns`) records each described object as a :class:`Node` in a
:class:`FactSink`; only when the whole observation has been read is it known which display names are shared, so
:func:`resolve` names them then. Identity is what the agent could tell apart from the text: the container an object
is shown in, and its position among identical items there.
"""

from __future__ import annotations

import functools
import re

from pydantic import ValidationError

from knowmap.schemas import Relation, Triple

AGENT = "agent"
INVENTORY = "inventory"
_SPACES = re.compile(r"\s+")
_QUALIFIED = re.compile(r"(?: #\d+)?(?: in .+)?$")


def display_name(entity: str) -> str:
    """The name an entity is shown by, without the count and container that tell namesakes apart:
    ``"pea seed #2 in pea plant in flower pot 8"`` -> ``"pea seed"``."""
    return _QUALIFIED.sub("", entity) or entity


def door_name(room: str, other: str) -> str:
    """A door's entity name: by the two rooms it joins, ``"door between hallway and kitchen"`` (sorted, lower case).
    ScienceWorld names a door by where it leads, so "door to kitchen" seen from two rooms is two doors."""
    return "door between {} and {}".format(*sorted((room.lower(), other.lower())))


class Node:
    """One object described in an observation, before it has its final entity name.

    Objects that share a display name are told apart when the observation's facts are resolved
    (:func:`resolve`): the k-th identical item in one container is ``"name #k"``, and a name shown in more
    than one container is qualified by its container, ``"pea plant in flower pot 8"``.
    """

    __slots__ = ("name", "parent")

    def __init__(self, name: str, parent: Node | str | None) -> None:
        self.name = name
        self.parent = parent

    def __repr__(self) -> str:
        return f"Node({self.name!r})"


Name = str | Node


class FactSink:
    """Collects facts and full-set keys in first-seen order, without duplicates, plus unparsed residue.

    Subjects and objects are plain names or :class:`Node` s (objects described in the text); :meth:`resolve` turns
    the nodes into entity names once the whole observation has been read, since whether a name is shared is only
    known then.
    """

    __slots__ = ("facts", "full_sets", "residue", "nodes")

    def __init__(self) -> None:
        self.facts: dict[tuple[Name, Relation, Name], None] = {}
        self.full_sets: dict[tuple[Name, Relation], None] = {}
        self.residue: list[str] = []
        self.nodes: list[Node] = []

    def node(self, name: str, parent: Node | str | None) -> Node:
        """A new described object named ``name`` inside ``parent`` (None: not known to be inside anything)."""
        node = Node(name, parent)
        self.nodes.append(node)
        return node

    def add(self, subject: Name, relation: Relation, obj: Name) -> None:
        """Add ``(subject, relation, obj)``."""
        self.facts[(subject, relation, obj)] = None

    def full(self, subject: Name, relation: Relation) -> None:
        """Record that the whole set of ``(subject, relation)`` was observed (it may be empty)."""
        self.full_sets[(subject, relation)] = None

    def unparsed(self, text: str) -> None:
        text = text.strip(" .")
        if text:
            self.residue.append(text)

    def extend(self, other: FactSink) -> None:
        """Take in another sink's facts, nodes and residue (another text of the same observation)."""
        self.facts.update(other.facts)
        self.full_sets.update(other.full_sets)
        self.residue.extend(other.residue)
        self.nodes.extend(other.nodes)


def resolve(sink: FactSink, shared_elsewhere: frozenset[str] = frozenset()
            ) -> tuple[list[Triple], list[tuple[str, Relation]], list[str], frozenset[str]]:
    """The sink's facts with every :class:`Node` named: ``(triples, full-set keys, residue, shared names)``.

    Identity rules, applied over everything the observation showed (feedback, look around and inventory together):

    - the k-th of several identical items in one container is ``"name #k"`` (k >= 2), so counts are kept;
    - a name listed in more than one container is qualified by its container: ``"pea plant in flower pot 8"``
      (recursively, ``"purple flower in pea plant in flower pot 8"``); the display name is its first words;
    - location and containment facts that the action's feedback states with a name qualified this way (here or,
      ``shared_elsewhere``, in listings of the same observation resolved apart) are dropped: the listings say
      which of the objects is where.

    A fact whose name is blank or over-long is no fact and goes to the residue.
    """
    index: dict[int, int] = {}
    counts: dict[tuple[int | str, str], int] = {}
    by_name: dict[str, list[Node]] = {}
    for node in sink.nodes:
        if node.parent is None or node.name == AGENT:
            continue
        key = (id(node.parent) if isinstance(node.parent, Node) else node.parent, node.name)
        counts[key] = index[id(node)] = counts.get(key, 0) + 1
        by_name.setdefault(node.name, []).append(node)
    names: dict[int, str] = {}
    shared: dict[str, bool] = {}

    def is_shared(name: str) -> bool:
        if name not in shared:
            shared[name] = False  # a name listed inside itself is not qualified by itself
            shared[name] = len({where(n.parent) for n in by_name.get(name, ())}) > 1
        return shared[name]

    def where(parent: Node | str | None) -> str:
        return parent if isinstance(parent, str) else ident(parent) if parent is not None else ""

    def ident(node: Node) -> str:
        if id(node) not in names:
            k = index.get(id(node), 1)
            name = node.name if k == 1 else f"{node.name} #{k}"
            names[id(node)] = f"{name} in {where(node.parent)}" if is_shared(node.name) else name
        return names[id(node)]

    def named(value: Name) -> str:
        return ident(value) if isinstance(value, Node) else value

    residue = list(sink.residue)
    triples: dict[Triple, None] = {}
    for subject, relation, obj in sink.facts:
        if relation in (Relation.LOCATION, Relation.CONTAINS) and any(
                isinstance(name, str) and (name in shared_elsewhere or is_shared(name)) for name in (subject, obj)):
            continue
        try:
            triples[_triple(named(subject), relation, named(obj))] = None
        except ValidationError:
            residue.append(f"{named(subject)} {relation.value} {named(obj)}"[:200])
    full_sets: dict[tuple[str, Relation], None] = {}
    for subject, relation in sink.full_sets:
        if name := _SPACES.sub(" ", named(subject)).strip().lower():
            full_sets[(name, relation)] = None
    return list(triples), list(full_sets), residue, frozenset(n for n in by_name if is_shared(n))


@functools.lru_cache(maxsize=65536)
def _triple(subject: str, relation: Relation, obj: str) -> Triple:
    return Triple(subject=subject, relation=relation, object=obj)
