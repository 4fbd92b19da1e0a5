"""The environmental knowledge base: what is true in one environment instance, now and at any earlier step.

One ``EnvironmentKB`` per environment instance. It applies the paper's replacement rule: a new value for a
single-valued ``(subject, relation)`` closes the old fact, and a set observed in full (a container listed with
all its contents) replaces the old set. Closed facts are kept with the step range in which they held, so the KB
answers "what is true now" (:meth:`current`), "what was true at step t" (:meth:`as_of`) and "how did this change"
(:meth:`history`). Nothing is silently lost.

``location`` and ``contains`` are kept as inverses: moving an object closes its old container's ``contains``
fact and opens the new one, and an object missing from a container observed in full loses that location.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from knowmap.errors import KnowMapError, SnapshotError
from knowmap.kb.identity import AGENT, display_name, door_name
from knowmap.schemas import CARDINALITY, Cardinality, Fact, Observation, Relation, Trajectory, Triple

SNAPSHOT_FORMAT = 1
_DOOR_TO = re.compile(r"^door to (.+)$")
_log = logging.getLogger(__name__)
_RESIDUE_LOGGED: set[str] = set()
_RESIDUE_LOG_LIMIT = 10_000  # distinct lines remembered; beyond it, residue is no longer logged


def extract_logged(extractor: Any, observation: Observation, env_id: str) -> Any:
    """``extractor.extract(observation)``, logging (once per distinct text, per process) what no rule understood,
    when the extractor reports it (``extract_with_residue``)."""
    if not hasattr(extractor, "extract_with_residue"):
        return extractor.extract(observation)
    extraction, residue = extractor.extract_with_residue(observation)
    for text in residue:
        if text not in _RESIDUE_LOGGED and len(_RESIDUE_LOGGED) < _RESIDUE_LOG_LIMIT:
            _RESIDUE_LOGGED.add(text)
            _log.warning("env %s: observation text no extraction rule understood (kept as residue, no facts): %r",
                         env_id, text[:300])
    return extraction


class EnvironmentKB:
    """Facts as triples with validity ranges for one environment instance.

    Args:
        env_id: the environment instance this KB describes (an episode id, or an external agent's env id).
        extractor: turns an :class:`Observation` into triples; default the rule-based ScienceWorld extractor.
    """

    def __init__(self, env_id: str, extractor: Any | None = None) -> None:
        if not env_id:
            raise KnowMapError("env_id must be a non-empty string")
        self.env_id = env_id
        self._extractor = extractor
        self._facts: list[Fact] = []  # every fact ever opened, in order; closed ones have valid_to set
        self._open: dict[tuple[str, Relation], dict[str, int]] = {}  # (subject, relation) -> object -> index
        self.last_step = 0

    # -- writing ---------------------------------------------------------------------------------------------
    def ingest(self, observation: Observation) -> int:
        """Extract triples from an observation and apply them at ``observation.step``.

        Returns:
            the number of facts opened or closed.
        """
        if self._extractor is None:
            from knowmap.kb.extraction import RuleBasedExtractor

            self._extractor = RuleBasedExtractor()
        extraction = extract_logged(self._extractor, observation, self.env_id)
        return self.ingest_triples(observation.step, extraction.triples, extraction.full_sets)

    def ingest_triples(
        self,
        step: int,
        triples: Sequence[Triple],
        full_sets: Iterable[tuple[str, Relation | str]] = (),
    ) -> int:
        """Apply triples observed at ``step``.

        Args:
            step: the env step they were observed at; never earlier than the last ingested step.
            triples: the observed triples.
            full_sets: ``(subject, set-valued relation)`` keys observed in full; their open facts that are not
                among ``triples`` are closed (an empty full set closes them all).

        Returns:
            the number of facts opened or closed.

        Raises:
            KnowMapError: ``step`` is earlier than the last ingested step, or a full set names a single-valued
                relation.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise KnowMapError(f"step must be an integer >= 0, got {step!r}")
        if step < self.last_step:
            raise KnowMapError(
                f"step {step} is before the last ingested step {self.last_step} of env {self.env_id!r}: "
                "a KB only moves forward; start a new EnvironmentKB for a new episode"
            )
        self.last_step = step
        changes = 0
        triples, full_sets = self._name_doors(triples, full_sets)
        observed: dict[tuple[str, Relation], set[str]] = {}
        lost: list[str] = []  # objects taken out of a container observed in full
        for t in triples:
            observed.setdefault(t.key, set()).add(t.object)
        for subject, relation in full_sets:
            relation = Relation(relation)
            if CARDINALITY[relation] is not Cardinality.SET:
                allowed = [r.value for r in Relation if CARDINALITY[r] is Cardinality.SET]
                raise KnowMapError(f"full set given for single-valued relation {relation.value!r}; "
                                   f"set-valued relations: {allowed}")
            key = (subject.strip().lower(), relation)
            keep = observed.get(key, set())
            for obj in list(self._open.get(key, {})):
                if obj not in keep:
                    changes += self._close(key, obj, step)
                    if relation is Relation.CONTAINS:
                        # The object is no longer in this container: its location there ends too.
                        changes += self._close((obj, Relation.LOCATION), key[0], step)
                        lost.append(obj)
        for triple in triples:
            changes += self._assert(triple, step)
        return changes + self._forget_vanished(lost, step)

    def _forget_vanished(self, lost: list[str], step: int) -> int:
        """Close every fact about objects that left a container observed in full and were seen nowhere else:
        the KB no longer knows where, or whether, they exist (water the soil absorbed, a pea plant that became
        "pea plant in flower pot 8" once a second one appeared). What they contained goes with them."""
        changes = 0
        while lost:
            name = lost.pop()
            if self._open.get((name, Relation.LOCATION)):
                continue  # it was seen somewhere else in this same step
            for relation in Relation:
                for obj in list(self._open.get((name, relation), {})):
                    changes += self._close((name, relation), obj, step)
                    if relation is Relation.CONTAINS:
                        changes += self._close((obj, Relation.LOCATION), name, step)
                        lost.append(obj)
        return changes

    def _name_doors(self, triples: Sequence[Triple], full_sets: Iterable[tuple[str, Relation | str]]
                    ) -> tuple[list[Triple], list[tuple[str, Relation | str]]]:
        """Name each ``door to X`` by the two rooms it joins, ``door between hallway and kitchen``: the text names
        a door by where it leads, so the same name from three rooms would be three doors sharing one state. The
        agent's room is the one this observation places it in, else the KB's current one; unknown: unchanged."""
        room = next((t.object for t in triples if t.subject == AGENT and t.relation is Relation.LOCATION), None)
        if room is None:
            here = self._open.get((AGENT, Relation.LOCATION), {})
            room = next(iter(here), None)
        if room is None:
            return list(triples), list(full_sets)

        def named(name: str) -> str:
            if (m := _DOOR_TO.match(name)) and m.group(1) != room:
                return door_name(room, m.group(1))
            return name

        out = [t if not (_DOOR_TO.match(t.subject) or _DOOR_TO.match(t.object)) else
               Triple(subject=named(t.subject), relation=t.relation, object=named(t.object)) for t in triples]
        return out, [(named(s), r) for s, r in full_sets]

    def _assert(self, triple: Triple, step: int) -> int:
        key, obj = triple.key, triple.object
        current = self._open.setdefault(key, {})
        if obj in current:
            return 0
        changes = 0
        if triple.cardinality is Cardinality.SINGLE:
            for old in list(current):
                changes += self._close(key, old, step)
                if triple.relation is Relation.LOCATION:
                    # The object left its old container (namesakes in two containers have two names: the
                    # extractor qualifies them, knowmap.kb.identity).
                    changes += self._close((old, Relation.CONTAINS), triple.subject, step)
        # The triple was validated; a fact is that triple and a step, so it is built without validating again.
        self._facts.append(Fact.model_construct(subject=key[0], relation=key[1], object=obj, valid_from=step,
                                                valid_to=None))
        current[obj] = len(self._facts) - 1
        changes += 1
        if triple.relation is Relation.LOCATION:
            changes += self._assert(Triple(subject=obj, relation=Relation.CONTAINS, object=key[0]), step)
        elif triple.relation is Relation.CONTAINS:
            changes += self._assert(Triple(subject=obj, relation=Relation.LOCATION, object=key[0]), step)
        return changes

    def _close(self, key: tuple[str, Relation], obj: str, step: int) -> int:
        idx = self._open.get(key, {}).pop(obj, None)
        if idx is None:
            return 0
        self._facts[idx] = self._facts[idx].model_copy(update={"valid_to": step})
        return 1

    # -- reading ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """The number of facts ever recorded, open and closed."""
        return len(self._facts)

    def current(self) -> list[Fact]:
        """The facts that hold now."""
        return [f for f in self._facts if f.valid_to is None]

    def as_of(self, step: int) -> list[Fact]:
        """The facts that held at ``step``."""
        if step < 0:
            raise KnowMapError(f"step must be >= 0, got {step}")
        return [f for f in self._facts if f.holds_at(step)]

    def history(self, subject: str, relation: Relation | str) -> list[Fact]:
        """Every fact ever recorded for ``(subject, relation)``, oldest first, with their step ranges."""
        subject, relation = " ".join(subject.split()).lower(), Relation(relation)
        return [f for f in self._facts if f.subject == subject and f.relation is relation]

    def entities(self) -> set[str]:
        """Every subject and object name the KB has seen, and the display names of qualified ones
        (``"pea plant"`` for ``"pea plant in flower pot 8"``)."""
        names = {f.subject for f in self._facts}
        names.update(f.object for f in self._facts if f.relation in (Relation.CONTAINS, Relation.LOCATION,
                                                                      Relation.FOCUS, Relation.CONNECTS_TO))
        return names | {display_name(n) for n in names}

    def about(self, objects: Iterable[str], step: int | None = None) -> list[Fact]:
        """Facts whose subject or object is one of ``objects``, as of ``step`` (default: now). A display name
        (``"pea plant"``) also finds the entities it names (``"pea plant in flower pot 8"``, ``"pea plant #2"``)."""
        names = {" ".join(o.split()).lower() for o in objects}
        facts = self.current() if step is None else self.as_of(step)
        return [f for f in facts if f.subject in names or f.object in names
                or display_name(f.subject) in names or display_name(f.object) in names]

    def to_dict(self) -> dict[str, Any]:
        return {"format": SNAPSHOT_FORMAT, "env_id": self.env_id, "last_step": self.last_step,
                "facts": [f.model_dump(mode="json") for f in self._facts]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], extractor: Any | None = None) -> EnvironmentKB:
        """Rebuild a KB from :meth:`to_dict` output. Raises :class:`SnapshotError` if it is malformed."""
        try:
            if data.get("format") != SNAPSHOT_FORMAT:
                raise SnapshotError(f"unsupported snapshot format {data.get('format')!r}; "
                                    f"this version reads format {SNAPSHOT_FORMAT}")
            kb = cls(str(data["env_id"]), extractor=extractor)
            kb.last_step = int(data["last_step"])
            for raw in data["facts"]:
                fact = Fact.model_validate(raw)
                kb._facts.append(fact)
                if fact.valid_to is None:
                    kb._open.setdefault(fact.key, {})[fact.object] = len(kb._facts) - 1
            return kb
        except SnapshotError:
            raise
        except Exception as e:  # KeyError, TypeError, ValidationError: all mean a malformed snapshot
            raise SnapshotError(f"malformed env KB snapshot: {e}") from e

    def save(self, path: str | Path) -> Path:
        """Write a checksummed snapshot atomically (temp file, fsync, rename); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)
        payload = json.dumps({"sha256": hashlib.sha256(body.encode()).hexdigest(), "body": body})
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, extractor: Any | None = None) -> EnvironmentKB:
        """Read a snapshot written by :meth:`save`.

        Raises:
            SnapshotError: the file is missing, truncated, fails its checksum or is malformed. A corrupt
                snapshot never loads as an empty KB.
        """
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            body = payload["body"]
            checksum = payload["sha256"]
        except FileNotFoundError as e:
            raise SnapshotError(f"no env KB snapshot at {path}") from e
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise SnapshotError(f"env KB snapshot {path} is corrupt or truncated ({e}); restore it from a "
                                "backup or rebuild the KB by replaying the episode") from e
        if hashlib.sha256(body.encode()).hexdigest() != checksum:
            raise SnapshotError(f"env KB snapshot {path} fails its checksum; it was modified or partly written")
        try:
            data = json.loads(body)
        except ValueError as e:
            raise SnapshotError(f"env KB snapshot {path} has a corrupt body: {e}") from e
        return cls.from_dict(data, extractor=extractor)


def build_env_kb(trajectory: Trajectory, extractor: object | None = None) -> EnvironmentKB:
    """A fresh env KB with every step of ``trajectory`` ingested, in order."""
    kb = EnvironmentKB(trajectory.episode_id, extractor=extractor)
    for record in trajectory.steps:
        kb.ingest(record.as_observation())
    return kb
