"""Fact extraction: ScienceWorld observations in, ``(subject, relation, object)`` triples out.

:class:`FactExtractor` is the seam; :class:`RuleBasedExtractor` implements it with compiled regexes over
ScienceWorld's fixed sentence templates (no LLM), fast enough to run on every env step. It reads three texts of
an :class:`~knowmap.schemas.Observation`: the action's feedback (with the action, which names what the feedback
leaves out, e.g. what a thermometer was used on), the ``look around`` and the inventory.

Names are entity names: lower-case, without articles, ``a substance called water`` -> ``water``,
``liquid chocolate`` -> ``chocolate`` (its state becomes a ``state_of_matter`` fact). Power states are
``activated`` or ``deactivated``, whichever word ScienceWorld used ("turned on", "on", "activated"). Inverse
facts are not emitted: a look-around gives (kitchen, contains, sink), never (sink, location, kitchen); the KB
derives those.

``Extraction.full_sets`` lists the set-valued keys whose *whole* set was observed (a listed container, a room's
doors, an emptied cup), so the KB may replace that set; a key there with no triples is an observed empty set.
"""

from __future__ import annotations

import functools
import re
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from knowmap.kb.extraction_patterns import (
    DOOR,
    LISTING_HEADERS,
    POWER_STATES,
    clean_name,
    describe,
    entity,
    first_match,
    listing,
    listing_lines,
    object_line,
)
from knowmap.kb.identity import AGENT, FactSink, resolve
from knowmap.schemas import CARDINALITY, Cardinality, Observation, Relation, Triple

__all__ = ["Extraction", "FactExtractor", "LineFacts", "RuleBasedExtractor", "extract_line", "listing_container",
           "object_lines"]


class Extraction(BaseModel):
    """The facts of one observation.

    Attributes:
        triples: the facts, each once, in the order they were read.
        full_sets: ``(subject, relation)`` keys of set-valued relations whose complete set was observed; the
            triples with that key are the whole set (none: the set is empty, e.g. ``On the chair is: nothing.``).
    """

    model_config = ConfigDict(frozen=True)

    triples: list[Triple] = Field(default_factory=list)
    full_sets: list[tuple[str, Relation]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _sets_only(self) -> Extraction:
        for subject, relation in self.full_sets:
            if CARDINALITY[relation] is not Cardinality.SET:
                allowed = ", ".join(r.value for r, c in CARDINALITY.items() if c is Cardinality.SET)
                raise ValueError(f"full_sets key ({subject!r}, {relation.value!r}) is single-valued; a full set "
                                 f"can only be declared for set-valued relations: {allowed}")
        return self

    def objects(self, subject: str, relation: Relation) -> list[str]:
        """The objects of the extracted triples with this subject and relation, in order."""
        return [t.object for t in self.triples if t.subject == subject and t.relation == relation]

    def is_full(self, subject: str, relation: Relation) -> bool:
        """True if the complete set of ``(subject, relation)`` was observed."""
        return (subject, relation) in self.full_sets


@runtime_checkable
class FactExtractor(Protocol):
    """Anything that turns an observation into facts (rule-based here; an LLM-based one can slot in later)."""

    def extract(self, observation: Observation) -> Extraction:
        """Return the facts observed in ``observation`` (feedback, look and inventory)."""
        ...


# -- action feedback -----------------------------------------------------------------------------------------------
_DISCONNECTING = re.compile(r"^(?:\(disconnecting [^)]*\))+")
_FEEDBACK: list[tuple[str, re.Pattern[str]]] = [
    ("go", re.compile(r"^You move (?:through the door )?to the (.+?)\.$")),
    ("move", re.compile(r"^You move the (.+?) to the (.+?)\.$")),
    ("pour_all", re.compile(r"^You pour the contents of the (.+?) into the (.+?)\.$")),
    ("pour", re.compile(r"^You pour the (.+?) into the (.+?)\.$")),
    ("state", re.compile(r"^The (.+?) is (?:now|already) (open|closed|activated|deactivated|on|off)\.$")),
    ("focus", re.compile(r"^You focus on the (.+?)\.$")),
    ("measure", re.compile(r"^the thermometer measures a temperature of (-?\d+(?:\.\d+)? degrees celsius)\.?$")),
    ("mix", re.compile(r"^(.+?) mix(?:es)? to produce (.+?)\.$")),
    ("connect", re.compile(r"^(anode|cathode|terminal \d+) on (.+?) is now connected to "
                           r"(anode|cathode|terminal \d+) on (.+?)\.?$")),
    ("fire", re.compile(r"^The (.+?) catches fire\.$")),
    ("recipe", re.compile(r"^The recipe reads:\s*To make (.+?), you need to mix (.+?)\.?$", re.S)),
]
_ACTION_DOOR = re.compile(r"^(?:open|close) (door to .+)$")
_ACTION_OPEN = re.compile(r"^(?:open|close) (.+)$")
_ACTION_USE = re.compile(r"^use .+? on (.+)$")
_ACTION_MIX = re.compile(r"^mix (.+)$")
_ACTION_LOOK_AT = re.compile(r"^(?:look at|examine) .+")
# Actions name objects by a referent plus where it is ("unknown substance b in inventory"); the place is
# not part of the object's name. A life stage ("... in the adult stage") is, so it is kept.
_IN_PLACE = re.compile(r" in (?!the \w+ stage)(?:the )?[^,]+$")
# A referent may name an object by its contents ("mix cup containing blue paint and red paint"), which mixing
# changes: the contents are not part of its name.
_CONTAINING = re.compile(r" containing .+$")
# ScienceWorld's generic referents ("use thermometer on substance in metal pot"): without the place they would
# name every substance, so the place stays in the name.
_GENERIC = frozenset({"substance", "living thing", "organism", "component", "object", "thing"})


def _action_object(phrase: str, sink: FactSink) -> str:
    name = entity(_CONTAINING.sub("", _IN_PLACE.sub("", phrase.strip())), sink)
    return clean_name(phrase) if name in _GENERIC else name


def _feedback(text: str, action: str, step: int, sink: FactSink) -> None:
    """Facts from the action's feedback text (``step``: when it was observed, for measurements)."""
    text = _DISCONNECTING.sub("", text.strip()).strip()
    if not text or listing(text, sink):
        return
    hit = first_match(_FEEDBACK, text)
    if hit is None:
        if _ACTION_LOOK_AT.match(action):
            if door := DOOR.match(text):
                sink.add(f"door to {clean_name(door.group(1))}", Relation.OPEN_STATE, door.group(2).lower())
            else:
                describe(text, sink)
        return
    kind, m = hit
    if kind == "go":
        sink.add(AGENT, Relation.LOCATION, clean_name(m.group(1)))
    elif kind in ("move", "pour"):
        sink.add(entity(m.group(1), sink), Relation.LOCATION, clean_name(m.group(2)))
    elif kind == "pour_all":
        # Pouring moves all contents: the source is now empty.
        sink.full(entity(m.group(1), sink), Relation.CONTAINS)
    elif kind == "state":
        name = clean_name(m.group(1))
        if name == "door":  # "The door is now open.": the action says which door, or whose ("open cupboard")
            if door := _ACTION_DOOR.match(action):
                name = clean_name(door.group(1))
            elif opened := _ACTION_OPEN.match(action):
                name = _action_object(opened.group(1), sink)
                if name.endswith(" door"):  # "open bedroom door": a referent of the door to the bedroom
                    name = f"door to {name[:-5]}"
            if name == "door":  # no telling which
                return
        state = m.group(2)
        if state in ("open", "closed"):
            sink.add(name, Relation.OPEN_STATE, state)
        else:
            sink.add(name, Relation.POWER_STATE, POWER_STATES[state])
    elif kind == "focus":
        sink.add(AGENT, Relation.FOCUS, entity(m.group(1), sink))
    elif kind == "measure":
        if target := _ACTION_USE.match(action):
            sink.add(_action_object(target.group(1), sink), Relation.TEMPERATURE, f"{m.group(1)} at step {step}")
    elif kind == "mix":
        product = entity(m.group(2), sink)
        sink.add(product, Relation.PROPERTY, f"made by mixing {m.group(1).lower()}")
        if container := _ACTION_MIX.match(action):
            sink.add(_action_object(container.group(1), sink), Relation.CONTAINS, product)
    elif kind == "connect":
        end1, obj1, end2, obj2 = m.group(1), clean_name(m.group(2)), m.group(3), clean_name(m.group(4))
        sink.add(obj1, Relation.PROPERTY, f"{end1} connected to {end2} on {obj2}")
        sink.add(obj2, Relation.PROPERTY, f"{end2} connected to {end1} on {obj1}")
    elif kind == "fire":
        sink.add(clean_name(m.group(1)), Relation.PROPERTY, "on fire")
    elif kind == "recipe":
        sink.add("recipe", Relation.PROPERTY, f"to make {m.group(1).lower()}, mix {m.group(2).lower()}")


class RuleBasedExtractor:
    """Extracts facts from ScienceWorld's fixed text templates with compiled regexes (no model, no state).

    Reads, in order: the action's feedback (``observation.text``, interpreted with ``observation.action``), the
    ``look around`` (``observation.look``) and the inventory (``observation.inventory``). A text equal to one
    already read is skipped. Thread-safe and picklable: it holds nothing but its class.
    """

    def extract(self, observation: Observation) -> Extraction:
        """Return the facts of ``observation``; text the templates do not cover yields no facts, never an error."""
        return self.extract_with_residue(observation)[0]

    def extract_with_residue(self, observation: Observation) -> tuple[Extraction, list[str]]:
        """The facts of ``observation`` and the parts of its text that no rule understood."""
        feedback = FactSink()
        action = " ".join(observation.action.lower().split())
        # The feedback of "look around" is the look again, up to spacing: parse each text once, or every object
        # in it would be listed twice.
        seen: set[str] = set()
        listed = {listing_container(t) for t in (observation.look, observation.inventory) if t} - {None}
        if listing_container(observation.text) not in listed:  # "look at kitchen" in the kitchen: once
            seen.add(" ".join(observation.text.split()))
            _feedback(observation.text, action, observation.step, feedback)
        listings: list[str] = []
        for extra in (observation.look, observation.inventory):
            if extra and (key := " ".join(extra.split())) not in seen:
                seen.add(key)
                listings.append(extra)
        if any(node.parent is not None for node in feedback.nodes):
            # The feedback lists objects too ("inventory", "look in"): one identity space for everything.
            for text in listings:
                feedback.extend(_listing_sink(text))
            triples, full_sets, residue, _ = resolve(feedback)
        else:  # the usual step: the listings resolve as on the last step (cached), the feedback beside them
            listed_triples, listed_sets, listed_residue, shared = _resolved_listings(tuple(listings))
            triples, full_sets, residue, _ = resolve(feedback, shared)
            triples = list(dict.fromkeys([*triples, *listed_triples]))
            full_sets = list(dict.fromkeys([*full_sets, *listed_sets]))
            residue = [*residue, *listed_residue]
        return Extraction.model_construct(triples=triples, full_sets=full_sets), residue


@functools.lru_cache(maxsize=1024)
def _listing_sink(text: str) -> FactSink:
    """A listing's parse, cached: an agent sees the same room and inventory text step after step, and parsing a
    room is most of an ingest's cost. Pure in ``text``; callers only read it (:meth:`FactSink.extend` copies)."""
    sink = FactSink()
    listing(text, sink)
    return sink


@functools.lru_cache(maxsize=1024)
def _resolved_listings(texts: tuple[str, ...]) -> tuple[tuple[Triple, ...], tuple[tuple[str, Relation], ...],
                                                        tuple[str, ...], frozenset[str]]:
    """The look and inventory of a step resolved together, cached (they repeat step after step)."""
    sink = FactSink()
    for text in texts:
        sink.extend(_listing_sink(text))
    triples, full_sets, residue, shared = resolve(sink)
    return tuple(triples), tuple(full_sets), tuple(residue), shared


# -- per-line coverage (for the benchmark) --------------------------------------------------------------------------
class LineFacts(BaseModel):
    """The facts of one listed object line, and whatever part of it no rule understood."""

    model_config = ConfigDict(frozen=True)

    line: str
    triples: list[Triple]
    full_sets: list[tuple[str, Relation]]
    residue: list[str]

    @property
    def covered(self) -> bool:
        """True if the line yielded at least one fact and every clause of it was understood."""
        return bool(self.triples) and not self.residue


def object_lines(text: str) -> list[str]:
    """The object lines of a ``look around``, ``look in`` or inventory observation (door lines included).

    Returns [] for any other text.
    """
    parsed = listing_lines(text)
    return parsed[1] if parsed else []


def listing_container(text: str) -> str | None:
    """The room or container a listing observation lists (``"kitchen"``, ``"inventory"``), else None."""
    header = text.lstrip("\n").split("\n", 1)[0].strip()
    for pattern in LISTING_HEADERS:
        if m := pattern.match(header):
            return clean_name(m.group(1))
    return None


def extract_line(line: str, container: str) -> LineFacts:
    """Extract the facts of one object line listed in ``container`` (a room name or ``"inventory"``).

    Example: ``extract_line("a chair. On the chair is: nothing.", "kitchen")`` gives (kitchen, contains, chair)
    and the full set (chair, contains) with no triples.
    """
    sink = FactSink()
    object_line(line, clean_name(container), sink)
    triples, full_sets, residue, _ = resolve(sink)
    return LineFacts(line=line, triples=triples, full_sets=full_sets, residue=residue)
