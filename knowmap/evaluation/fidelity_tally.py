"""Counting KB fidelity over episodes: :class:`FidelityTally` applies the judge of :mod:`knowmap.evaluation.fidelity`
to the KB's current facts after every step and keeps precision, recall and staleness counts per relation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from knowmap.evaluation.fidelity import CHECKED, DOOR_KINDS, WorldState, canonical, holds, judge, revealed
from knowmap.schemas import Fact


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
        self.missed: Counter[str] = Counter()  # revealed true facts the KB lacked -> fact-steps
        self.max_examples = max_examples
        self._was_true: set[tuple[str, str, str, str, int]] = set()
        self._previous: WorldState | None = None
        self._measured: dict[int, dict[str, float]] = {}  # step -> uuid -> temperature, this episode
        self._timed: dict[tuple[str, str], tuple[bool, int, bool]] = {}  # measurement -> verdict at its step

    def examples(self, n: int | None = None) -> list[dict[str, Any]]:
        """The false facts, most often checked first: fact, why, first episode@step, how many fact-steps."""
        return [{"fact": f, "why": why, "first": self._first_false[(f, why)], "fact_steps": count}
                for (f, why), count in self.false_facts.most_common(n or self.max_examples)]

    def new_episode(self) -> None:
        """Forget which facts were true before (fact identities restart with a new KB)."""
        self._was_true.clear()
        self._previous = None
        self._measured.clear()
        self._timed.clear()

    def check(self, world: WorldState, facts: Iterable[Fact], texts: Iterable[str], step: int = 0,
              label: str = "") -> dict[str, Counts]:
        """Compare ``facts`` (the KB's current ones) with ``world`` after ``step``; returns this step's counts per
        relation (:func:`total` adds them up)."""
        texts = list(texts)
        view = world.in_view(texts)
        here = world.objects[world.room].name
        self._measured[step] = {u: o.temperature for u, o in world.objects.items() if o.temperature is not None}
        step_counts = {k: Counts() for k in CHECKED}
        credited: set[str] = set()  # objects whose containment the KB states (the k-th of identical siblings)
        values: dict[tuple[str, str], list[str]] = {}  # (kind, uuid) -> KB values about that object
        first: dict[tuple[str, str, str, str], int] = {}  # a contains fact and its inverse location fact: once
        for fact in facts:
            key4 = canonical(fact)
            first[key4] = min(first.get(key4, fact.valid_from), fact.valid_from)
        for (kind, subject, word, obj), valid_from in first.items():
            if kind not in step_counts or (kind in DOOR_KINDS and world.doors is None):
                self.unchecked[kind] += 1
                continue
            subjects = [] if kind in DOOR_KINDS else world.resolve(subject)[0]  # doors are not tree objects
            if kind in DOOR_KINDS:
                values.setdefault((kind, subject), []).append(obj)
                in_view = here in world.door_rooms.get(subject, ()) or here in (subject, obj)
            elif kind == "containment":
                children, k = world.resolve(obj)
                for p in subjects:
                    siblings = sorted((c for c in children if c.parent == p.uuid), key=lambda c: c.uuid)
                    if len(siblings) >= k:
                        credited.add(siblings[k - 1].uuid)
                in_view = any(o.uuid in view for o in (*subjects, *children))
            else:
                for o in subjects:
                    values.setdefault((kind, o.uuid), []).append(obj)
                in_view = kind == "agent_location" or any(o.uuid in view for o in subjects)
            timed = (subject, obj) if kind == "temperature" and " at step " in obj else None
            if timed is not None and timed in self._timed:  # a measurement is about its step: judged once
                ok, places, unmatched = self._timed[timed]
            else:
                ok, places, unmatched = judge(world, kind, subject, obj, view, self._previous, self._measured)
                if timed is not None:
                    self._timed[timed] = (ok, places, unmatched)
            c = step_counts[kind]
            if not (in_view or unmatched):
                c.memory_checked += 1
                c.memory_true += ok
                continue
            key = (kind, subject, word, obj, valid_from)
            c.checked += 1
            c.true += ok
            c.ambiguous += places > 1
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
        groups: Counter[tuple[str | None, frozenset[str]]] = Counter()
        uncredited: Counter[tuple[str | None, frozenset[str]]] = Counter()
        for kind, uuid, _subjects, value in revealed(world, view, texts):
            c = step_counts[kind]
            c.truth += 1
            found = c.found
            if kind == "containment":
                o = world.objects[uuid]
                c.found += uuid in credited
                groups[(o.parent, o.names)] += 1
                uncredited[(o.parent, o.names)] += uuid not in credited
            elif kind == "agent_location":
                c.found += any(v in world.objects[world.room].names for v in values.get((kind, world.agent), ()))
            elif kind == "door_state":
                c.found += value in values.get((kind, uuid), ())
            elif kind == "connects_to":
                c.found += value in values.get((kind, here), ()) or here in values.get((kind, value), ())
            else:  # found: a KB value about this object that holds (numbers within 1 C)
                c.found += any(holds(world.objects[uuid], kind, v) for v in values.get((kind, uuid), ()))
            if c.found == found:
                name = world.objects[uuid].name if uuid in world.objects else uuid
                where = world.objects.get(world.objects[uuid].parent) if uuid in world.objects else None
                self.missed[f"{kind}: {name}" + (f" in {where.name}" if where else "") + f" = {value}"] += 1
        for group, n in groups.items():
            if n > 1 and uncredited[group] < n:  # identical items in one container, some of them not counted
                step_counts["containment"].collapsed += uncredited[group]
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
