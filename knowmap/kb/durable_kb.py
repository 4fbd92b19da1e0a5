"""A durable environmental KB: an :class:`EnvironmentKB` whose every acknowledged write survives a crash.

Files under ``<directory>/<env_id>/``:

- ``log.jsonl``: the write-ahead log, one JSON record per line, ``{"seq": n, "op": ..., ..., "crc": "<crc32>"}``.
  ``op`` is ``observation`` (the raw observation, re-extracted on replay), ``triples`` or ``reset``.
- ``log.prev.jsonl``: the log before the latest snapshot, kept only to recognise resent writes (never replayed).
- ``snapshot-<seq>.json``: an :meth:`EnvironmentKB.save` snapshot holding every write up to sequence ``<seq>``.
- ``lock``: an ``flock`` held by the one process that has the KB open.

A write is validated, appended to the log (``write`` + ``fsync``; a batch of observations shares one ``fsync``),
applied in memory, and only then acknowledged. Every ``snapshot_every`` writes, and on :meth:`close`, the KB is
saved atomically as ``snapshot-<seq>.json`` (the directory is fsynced), older snapshots are deleted and the log is
rotated.
Opening loads the newest snapshot and replays the log records with ``seq`` greater than its own. A crash between
any two of these steps leaves records that the snapshot already holds; replay skips them by sequence number, so
nothing is applied twice and nothing acknowledged is lost. A write resent after a crash whose first attempt was
logged is recognised by its content (among the last ``RETRY_WINDOW`` writes) and not applied again. A torn last
line (a write cut short by a crash, never acknowledged) is dropped with a warning; a damaged record before the
end of the log raises :class:`WriteAheadLogError` and a corrupt snapshot raises :class:`SnapshotError`: neither
becomes an empty KB.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from knowmap.errors import EnvKBClosedError, KnowMapError, SnapshotError, WriteAheadLogError
from knowmap.kb.environment_kb import EnvironmentKB, extract_logged
from knowmap.kb.storage import (
    LOG_NAME,
    PREVIOUS_LOG_NAME,
    SNAPSHOT_NAME,
    check_step_value,
    decode_record,
    encode_record,
    fsync_dir,
    full_set_pairs,
    lock_file,
    record_digest,
    relation_of,
    validate_env_id,
    validated,
)
from knowmap.schemas import Fact, Observation, Relation, Triple

logger = logging.getLogger(__name__)

# Digests of this many recent writes are remembered. A writer whose call failed in a crash resends it, but the
# first attempt may already be in the log: a write equal to a recent one is acknowledged, not applied again.
RETRY_WINDOW = 1024


class DurableEnvironmentKB:
    """An :class:`EnvironmentKB` backed by a write-ahead log and periodic snapshots (see the module docstring).

    Not thread-safe: one caller at a time (a Ray actor runs one call at a time). One process at a time may have
    a given env KB open; the directory is locked while it is.

    Args:
        env_id: which environment instance; 1 to 128 characters from ``[A-Za-z0-9._-]``.
        directory: the root under which ``<env_id>/`` holds this KB's files (created if missing).
        snapshot_every: writes between snapshots; the log replayed on open is at most this long.
        extractor: turns observations into triples; default the rule-based ScienceWorld extractor. Replay
            re-extracts logged observations, so it must be deterministic.
        lock_timeout_s: how long to wait for another process (a dying actor) to release the directory.

    Raises:
        InvalidEnvIdError: ``env_id`` is not allowed.
        SnapshotError: the newest snapshot is corrupt or belongs to another env id.
        WriteAheadLogError: the log is damaged before its last line, misses records, or a record cannot be
            replayed.
        KnowMapError: ``snapshot_every`` < 1, or another process holds the KB open.
    """

    def __init__(self, env_id: str, directory: str | Path, *, snapshot_every: int = 200,
                 extractor: Any | None = None, lock_timeout_s: float = 10.0) -> None:
        self.env_id = validate_env_id(env_id)
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise KnowMapError(f"snapshot_every must be an integer >= 1, got {snapshot_every!r}")
        self.snapshot_every = snapshot_every
        self.directory = Path(directory) / env_id
        self._extractor = extractor
        self._closed = False
        self._ingest_seconds = 0.0  # time spent in ingest() since this KB was opened (for benchmarks)
        self._broken = ""  # set when memory and log may disagree; writes are refused until reopened
        self.directory.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.directory.parent)
        self._lock_file = lock_file(self.directory / "lock", timeout_s=lock_timeout_s, env_id=env_id)
        try:
            for stale in self.directory.glob("snapshot-*.tmp"):  # a save cut short by a crash
                stale.unlink()
            self._restore()
            # Unbuffered appends: after a failed write nothing is left in a buffer to land later. File objects,
            # not bare fds, so a KB dropped without close() releases its files (and lock) like a dead process.
            self._log = open(self._log_path, "ab", buffering=0)  # noqa: SIM115 - held for the KB's lifetime
            fsync_dir(self.directory)
        except BaseException:
            self._lock_file.close()
            raise

    # -- writing ---------------------------------------------------------------------------------------------
    def ingest(self, observation: Observation | Mapping[str, Any]) -> int:
        """Log an observation, then extract triples from it and apply them at ``observation.step``.

        Returns:
            the number of facts opened or closed (0 for a repeat of a recent write).

        Raises:
            KnowMapError: the observation is malformed, its step is earlier than the last ingested step, or
                the KB is closed.
        """
        return self._ingest([observation], one=True)

    def ingest_many(self, observations: Sequence[Observation | Mapping[str, Any]]) -> int:
        """Apply a batch of observations whole or not at all, logged with one ``fsync`` (group commit); returns the
        facts opened or closed. Each is checked (valid, in step order, none before the last ingested step) before
        anything is logged: a KnowMapError names the one refused and nothing is stored."""
        return self._ingest(observations, one=False)

    def _ingest(self, observations: Sequence[Observation | Mapping[str, Any]], one: bool) -> int:
        started = time.perf_counter()
        try:
            self._check_writable()
            batch = [validated(Observation, o, "observation" if one else f"observations[{i}]")
                     for i, o in enumerate(observations)]
            records = [{"op": "observation", "observation": obs.model_dump(mode="json")} for obs in batch]
            # A write resent after a crash is acknowledged without a step check (its first attempt moved the KB on).
            fresh = [(i, obs, rec, digest) for i, (obs, rec) in enumerate(zip(batch, records, strict=True))
                     for resent, digest in [self._resent(rec)] if not resent]
            last, where = self._kb.last_step, "the last stored step"
            for i, obs, _, _ in fresh:
                if one:
                    self._check_step(obs.step)
                elif obs.step < last:
                    raise KnowMapError(f"observations[{i}] has step {obs.step}, before {where} ({last}) of env "
                                       f"{self.env_id!r}: a KB only moves forward; nothing of this batch was stored")
                last, where = obs.step, f"observations[{i}]'s step"
            return self._write([(record, partial(self._kb.ingest_triples, obs.step, ex.triples,
                                                 full_set_pairs(ex.full_sets)), digest)
                                for _, obs, record, digest in fresh for ex in [self._extract(obs)]])
        finally:
            self._ingest_seconds += time.perf_counter() - started

    def ingest_triples(self, step: int, triples: Sequence[Triple | Mapping[str, Any]],
                       full_sets: Iterable[Sequence[str]] = ()) -> int:
        """Log triples observed at ``step``, then apply them (see :meth:`EnvironmentKB.ingest_triples`).

        Args:
            step: the env step; never earlier than the last ingested step.
            triples: :class:`Triple` objects or dicts with ``subject``, ``relation``, ``object``.
            full_sets: ``(subject, set-valued relation)`` pairs observed in full.

        Returns:
            the number of facts opened or closed (0 for a repeat of a recent write).

        Raises:
            KnowMapError: a triple or full set is malformed, ``step`` is negative or earlier than the last
                ingested step, or the KB is closed.
        """
        self._check_writable()
        check_step_value(step)
        if isinstance(triples, (str, bytes, Mapping)):
            raise KnowMapError("triples must be a list of triples, not a single string or mapping")
        checked = [validated(Triple, t, "triple") for t in triples]
        sets = full_set_pairs(full_sets)
        record = {"op": "triples", "step": step, "triples": [[t.subject, t.relation.value, t.object] for t in checked],
                  "full_sets": [list(s) for s in sets]}
        resent, digest = self._resent(record)
        if resent:
            return 0
        self._check_step(step)
        return self._write([(record, lambda: self._kb.ingest_triples(step, checked, sets), digest)])

    def reset(self) -> None:
        """Forget every fact durably, bytes too (the log before it goes): the env starts again from step 0."""
        self._write([({"op": "reset"}, self._apply_reset, None)])
        self._snapshot_quietly()
        (self.directory / PREVIOUS_LOG_NAME).unlink(missing_ok=True)  # kept only for resends, which a reset ends

    def snapshot(self) -> int:
        """Save a snapshot of every write so far and start a new log; returns its sequence number.

        Raises:
            OSError: the snapshot could not be written (the log still holds every write).
            KnowMapError: the KB is closed.
        """
        self._check_writable()
        if self._seq == self._snapshot_seq:
            return self._seq
        path = self.directory / f"snapshot-{self._seq:012d}.json"
        self._kb.save(path)  # temp file, fsync, rename
        fsync_dir(self.directory)  # the rename is durable before anything it replaces goes
        for old_seq, old in self._snapshots():
            if old_seq < self._seq:
                old.unlink()
        # Every record in the log is <= seq now: a crash before this rotation only leaves records that replay
        # skips. The old log is kept one more round so that writes resent after a crash are still recognised.
        os.replace(self._log_path, self.directory / PREVIOUS_LOG_NAME)
        try:
            log = open(self._log_path, "ab", buffering=0)  # noqa: SIM115 - held for the KB's lifetime
        except OSError as e:  # the open file is the previous log now: appending to it would lose writes
            self._broken = f"starting a new log after snapshot {self._seq} failed ({e})"
            raise
        self._log.close()
        self._log = log
        fsync_dir(self.directory)
        self._snapshot_seq, self._since_snapshot = self._seq, 0
        return self._seq

    def close(self) -> None:
        """Snapshot, then release the log and the directory lock. Idempotent; later writes are refused."""
        if self._closed:
            return
        try:
            if not self._broken:
                self.snapshot()
        finally:
            self._closed = True
            self._log.close()
            self._lock_file.close()

    def __enter__(self) -> DurableEnvironmentKB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------------------------
    @property
    def kb(self) -> EnvironmentKB:
        """The in-memory KB, for reading only: a write made on it directly is not logged and will be lost."""
        return self._kb

    @property
    def last_step(self) -> int:
        return self._kb.last_step

    @property
    def seq(self) -> int:
        """The sequence number of the last acknowledged write (0 = none)."""
        return self._seq

    def __len__(self) -> int:
        """The number of facts ever recorded, open and closed."""
        return len(self._kb)

    def current(self) -> list[Fact]:
        """The facts that hold now."""
        return self._kb.current()

    def as_of(self, step: int) -> list[Fact]:
        """The facts that held at ``step`` (>= 0)."""
        return self._kb.as_of(check_step_value(step))

    def history(self, subject: str, relation: Relation | str) -> list[Fact]:
        """Every fact ever recorded for ``(subject, relation)``, oldest first."""
        if not isinstance(subject, str) or not subject.strip():
            raise KnowMapError(f"subject must be a non-blank string, got {subject!r}")
        return self._kb.history(subject, relation_of(relation))

    def entities(self) -> set[str]:
        """Every subject and object name the KB has seen."""
        return self._kb.entities()

    def about(self, objects: Iterable[str], step: int | None = None) -> list[Fact]:
        """Facts whose subject or object is one of ``objects``, as of ``step`` (default: now)."""
        if isinstance(objects, (str, bytes)) or not all(isinstance(o, str) for o in objects):
            raise KnowMapError(f"objects must be a list of names, got {objects!r}")
        return self._kb.about(objects, None if step is None else check_step_value(step))

    def stats(self) -> dict[str, Any]:
        """Counts and durability state, as plain data."""
        return {"env_id": self.env_id, "directory": str(self.directory), "facts": len(self._kb),
                "current_facts": len(self._kb.current()), "last_step": self._kb.last_step, "seq": self._seq,
                "snapshot_seq": self._snapshot_seq, "writes_since_snapshot": self._since_snapshot,
                "snapshot_every": self.snapshot_every, "closed": self._closed,
                "ingest_seconds": self._ingest_seconds}

    # -- internals -------------------------------------------------------------------------------------------
    @property
    def _log_path(self) -> Path:
        return self.directory / LOG_NAME

    def _snapshots(self) -> list[tuple[int, Path]]:
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := SNAPSHOT_NAME.fullmatch(p.name))]
        return sorted(found)

    def _restore(self) -> None:
        """Set the in-memory state from the newest snapshot plus the log records after it."""
        snapshots = self._snapshots()
        self._snapshot_seq = snapshots[-1][0] if snapshots else 0
        if snapshots:
            self._kb = EnvironmentKB.load(snapshots[-1][1], extractor=self._extractor)
            if self._kb.env_id != self.env_id:
                raise SnapshotError(f"snapshot {snapshots[-1][1]} belongs to env {self._kb.env_id!r}, not "
                                    f"{self.env_id!r}; move it back to its own directory")
        else:
            self._kb = EnvironmentKB(self.env_id, extractor=self._extractor)
        self._seq, self._since_snapshot = self._snapshot_seq, 0
        self._recent: deque[str] = deque(maxlen=RETRY_WINDOW)
        for record in self._read_log(self.directory / PREVIOUS_LOG_NAME, strict=False):
            self._remember(record)  # only to recognise resent writes: the snapshot holds all of these
        for record in self._read_log(self._log_path, strict=True):
            seq = record["seq"]
            if seq > self._snapshot_seq:
                if seq != self._seq + 1:
                    raise WriteAheadLogError(
                        f"{self._log_path} continues at record {seq} but the newest snapshot holds records up to "
                        f"{self._seq}: records {self._seq + 1}..{seq - 1} are missing (a snapshot was deleted?); "
                        "restore the missing snapshot")
                try:
                    self._apply(record)
                except Exception as e:
                    raise WriteAheadLogError(f"replaying record {seq} of {self._log_path} failed: {e}") from e
                self._seq, self._since_snapshot = seq, self._since_snapshot + 1
            self._remember(record)

    def _remember(self, record: dict[str, Any], digest: str | None = None) -> None:
        if record["op"] == "reset":  # writes before a reset are history, not candidates for a resend
            self._recent.clear()
        self._recent.append(digest or record_digest(record))

    def _read_log(self, path: Path, *, strict: bool) -> list[dict[str, Any]]:
        """Records of a log in order. ``strict``: drop (and cut off) a torn last line, raise on damage before it;
        otherwise (the previous log, used only to recognise resent writes) keep what reads cleanly."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        records: list[dict[str, Any]] = []
        offset = 0
        *lines, tail = data.split(b"\n")  # ``tail`` is b"" when the file ends with a newline
        for number, raw in enumerate(lines, start=1):
            record, problem = decode_record(raw)
            if record is not None and records and record["seq"] != records[-1]["seq"] + 1:
                record, problem = None, f"sequence {record['seq']} follows {records[-1]['seq']}"
            if record is None and not strict:
                logger.warning("env KB %s: ignoring %s from line %d on (%s)", self.env_id, path, number, problem)
                return records
            if record is None:
                raise WriteAheadLogError(
                    f"{path} is corrupt at line {number} (byte {offset}): {problem}. The {len(records)} "
                    f"records before it are intact; to keep them, truncate the file to {offset} bytes (losing "
                    "this and later writes), or restore the directory from a backup")
            records.append(record)
            offset += len(raw) + 1
        if tail and strict:
            logger.warning("env KB %s: ignoring a torn last record in %s (%d bytes, a write cut short by a crash "
                           "before it was acknowledged)", self.env_id, path, len(tail))
            with open(path, "r+b") as fh:
                fh.truncate(offset)
                os.fsync(fh.fileno())
        return records

    def _apply(self, record: dict[str, Any]) -> int:
        op = record["op"]
        if op == "observation":
            obs = Observation.model_validate(record["observation"])
            extraction = self._extract(obs)
            return self._kb.ingest_triples(obs.step, extraction.triples, full_set_pairs(extraction.full_sets))
        if op == "triples":
            triples = [Triple(subject=s, relation=Relation(r), object=o) for s, r, o in record["triples"]]
            return self._kb.ingest_triples(record["step"], triples, [tuple(s) for s in record["full_sets"]])
        if op == "reset":
            return self._apply_reset()
        raise WriteAheadLogError(f"unknown log operation {op!r}; this version knows observation, triples, reset")

    def _apply_reset(self) -> int:
        self._kb = EnvironmentKB(self.env_id, extractor=self._extractor)
        return 0

    def _extract(self, observation: Observation) -> Any:
        if self._extractor is None:
            from knowmap.kb.extraction import RuleBasedExtractor

            self._extractor = RuleBasedExtractor()
        return extract_logged(self._extractor, observation, self.env_id)

    def _resent(self, record: dict[str, Any]) -> tuple[bool, str]:
        """Whether ``record`` repeats a recent write, and its digest (for :meth:`_write` to remember)."""
        digest = record_digest(record)
        return digest in self._recent, digest

    def _check_step(self, step: int) -> None:
        if step < self._kb.last_step:
            raise KnowMapError(f"step {step} is before the last ingested step {self._kb.last_step} of env "
                               f"{self.env_id!r}: a KB only moves forward; call reset() to start the env again")

    def _check_writable(self) -> None:
        if self._closed:
            raise EnvKBClosedError(f"env KB {self.env_id!r} is closed; open it again to write")
        if self._broken:
            raise KnowMapError(f"env KB {self.env_id!r} refuses writes: {self._broken}; open it again")

    def _write(self, writes: Sequence[tuple[dict[str, Any], Callable[[], int], str | None]]) -> int:
        """Log every write, ``fsync`` once, then apply them in order; returns the changes. If logging fails none is
        kept; if applying one fails (a bug: inputs were validated) it and those after it leave the log, and memory
        is reloaded from disk so that both hold the ones before it."""
        self._check_writable()
        if not writes:
            return 0
        lines = [encode_record({"seq": self._seq + 1 + i, **record}) for i, (record, _, _) in enumerate(writes)]
        offsets = [os.fstat(self._log.fileno()).st_size]
        for line in lines:
            offsets.append(offsets[-1] + len(line))
        try:
            view = memoryview(b"".join(lines))
            while view:
                view = view[os.write(self._log.fileno(), view):]
            os.fsync(self._log.fileno())
        except OSError as e:
            self._undo_append(offsets[0], f"appending to the log failed ({e})")
            raise KnowMapError(f"could not log the write to {self._log_path}: {e}; it was not applied") from e
        changes = 0
        for i, (record, apply, digest) in enumerate(writes):
            try:
                changes += apply()
            except Exception:
                self._undo_append(offsets[i], "applying a logged write failed")
                try:
                    self._restore()
                except Exception as e:  # pragma: no cover - the disk changed under us
                    self._broken = f"reloading after a failed write failed ({e})"
                raise
            self._seq, self._since_snapshot = self._seq + 1, self._since_snapshot + 1
            self._remember(record, digest)
        if self._since_snapshot >= self.snapshot_every:
            self._snapshot_quietly()
        return changes

    def _snapshot_quietly(self) -> None:
        try:
            self.snapshot()
        except OSError as e:  # the write is in the log already: acknowledge it, snapshot again next time
            logger.warning("env KB %s: snapshot failed (%s); the log keeps every write", self.env_id, e)

    def _undo_append(self, offset: int, why: str) -> None:
        try:
            os.ftruncate(self._log.fileno(), offset)
            os.fsync(self._log.fileno())
        except OSError as e:
            self._broken = f"{why} and the partial record could not be removed ({e})"
