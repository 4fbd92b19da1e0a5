"""Durability of the env KB without Ray: write-ahead log, snapshots, crash recovery, corruption, env ids."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from knowmap.actors.env_kb import EnvKBActor
from knowmap.errors import EnvKBClosedError, InvalidEnvIdError, KnowMapError, SnapshotError, WriteAheadLogError
from knowmap.kb.durable_kb import DurableEnvironmentKB
from knowmap.kb.environment_kb import build_env_kb
from knowmap.kb.storage import list_env_kbs, validate_env_id
from knowmap.schemas import Observation, Relation, Trajectory, Triple


def t(s: str, r: str, o: str) -> Triple:
    return Triple(subject=s, relation=Relation(r), object=o)


class LineExtractor:
    """A deterministic stand-in extractor: each ``subject|relation|object`` line of the text is a triple."""

    def extract(self, observation: Observation) -> SimpleNamespace:
        triples = [t(*line.split("|")) for line in observation.text.splitlines() if line.count("|") == 2]
        return SimpleNamespace(triples=triples, full_sets=[])


def open_kb(root: Path, env_id: str = "env-1", **kwargs) -> DurableEnvironmentKB:
    kwargs.setdefault("extractor", LineExtractor())
    return DurableEnvironmentKB(env_id, root, **kwargs)


def door_history(kb: DurableEnvironmentKB) -> list[tuple[str, int, int | None]]:
    return [(f.object, f.valid_from, f.valid_to) for f in kb.history("door", "open_state")]


def write_stream(kb: DurableEnvironmentKB, steps: range) -> None:
    """Writes that change state at every step, alternating observations and triples."""
    for step in steps:
        state = "open" if step % 2 else "closed"
        if step % 3 == 0:
            kb.ingest(Observation(step=step, text=f"door|open_state|{state}\nkitchen|contains|cup {step}"))
        else:
            kb.ingest_triples(step, [t("door", "open_state", state), t("cup", "location", f"table {step}")])


def test_writes_survive_close_and_reopen(tmp_path: Path) -> None:
    kb = open_kb(tmp_path, snapshot_every=4)
    write_stream(kb, range(10))
    before = kb.kb.to_dict()
    kb.close()

    again = open_kb(tmp_path)
    assert again.kb.to_dict() == before
    assert again.last_step == 9 and again.seq == 10
    assert again.stats()["writes_since_snapshot"] == 0  # close snapshotted; nothing left to replay
    assert door_history(again)[-1] == ("open", 9, None)


@pytest.mark.parametrize("snapshot_every", [1, 3, 1000])
def test_dropped_without_close_loses_no_acknowledged_write(tmp_path: Path, snapshot_every: int) -> None:
    kb = open_kb(tmp_path, snapshot_every=snapshot_every)
    write_stream(kb, range(10))
    before = kb.kb.to_dict()
    del kb  # no close, no final snapshot: what a crash leaves

    again = open_kb(tmp_path, snapshot_every=snapshot_every)
    assert again.kb.to_dict() == before
    assert again.seq == 10


def test_killed_process_loses_no_acknowledged_write(tmp_path: Path) -> None:
    # A real crash: SIGKILL a writer process mid-stream; every write it acknowledged must be on disk.
    writer = textwrap.dedent(f"""
        from knowmap.kb.durable_kb import DurableEnvironmentKB
        from knowmap.schemas import Triple
        kb = DurableEnvironmentKB("env-1", {str(tmp_path)!r}, snapshot_every=7)
        step = 0
        while True:
            kb.ingest_triples(step, [Triple(subject="thermometer", relation="reading", object=f"{{step}} degrees")])
            print(step, flush=True)
            step += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    acknowledged = [int(proc.stdout.readline()) for _ in range(40)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    kb = open_kb(tmp_path)
    readings = [f.object for f in kb.history("thermometer", "reading")]
    assert readings[: len(acknowledged)] == [f"{s} degrees" for s in acknowledged]
    assert readings == [f"{s} degrees" for s in range(len(readings))]  # in order, none twice


def test_torn_last_line_is_dropped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    kb = open_kb(tmp_path)
    write_stream(kb, range(3))
    before = kb.kb.to_dict()
    del kb
    log = tmp_path / "env-1" / "log.jsonl"
    with open(log, "ab") as fh:
        fh.write(b'{"crc":"0000","op":"triples","seq":4,"step":3,"tri')  # a write cut short by a crash

    with caplog.at_level(logging.WARNING, logger="knowmap.kb.durable_kb"):
        kb = open_kb(tmp_path)
    assert "torn last record" in caplog.text
    assert kb.kb.to_dict() == before and kb.seq == 3
    # The torn bytes were cut off, so the next record starts on a clean line and survives a reopen.
    kb.ingest_triples(3, [t("door", "open_state", "open")])
    del kb
    assert door_history(open_kb(tmp_path))[-1] == ("open", 3, None)


def test_damaged_record_before_the_end_raises(tmp_path: Path) -> None:
    kb = open_kb(tmp_path)
    write_stream(kb, range(4))
    del kb
    log = tmp_path / "env-1" / "log.jsonl"
    lines = log.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"open", b"shut")  # still JSON, wrong content
    log.write_bytes(b"\n".join(lines))

    with pytest.raises(WriteAheadLogError, match=r"line 2 .*checksum mismatch.*truncate the file to \d+ bytes"):
        open_kb(tmp_path)
    lines[1] = b"garbage"
    log.write_bytes(b"\n".join(lines))
    with pytest.raises(WriteAheadLogError, match="line 2 .*not JSON"):
        open_kb(tmp_path)


def test_damaged_previous_log_only_costs_recognising_resends(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    kb = open_kb(tmp_path, snapshot_every=2)
    write_stream(kb, range(5))
    before = kb.kb.to_dict()
    del kb
    (tmp_path / "env-1" / "log.prev.jsonl").write_bytes(b"garbage\n")
    with caplog.at_level(logging.WARNING, logger="knowmap.kb.durable_kb"):
        assert open_kb(tmp_path).kb.to_dict() == before
    assert "log.prev.jsonl from line 1 on" in caplog.text


def test_corrupt_snapshot_raises_and_is_not_replaced(tmp_path: Path) -> None:
    kb = open_kb(tmp_path, snapshot_every=2)
    write_stream(kb, range(4))
    kb.close()
    (snapshot,) = (tmp_path / "env-1").glob("snapshot-*.json")
    damaged = snapshot.read_bytes()[:-20]
    snapshot.write_bytes(damaged)

    with pytest.raises(SnapshotError, match="corrupt or truncated"):
        open_kb(tmp_path)
    assert snapshot.read_bytes() == damaged  # a failed open writes nothing over the evidence


def test_deleted_snapshot_is_detected_not_replayed_around(tmp_path: Path) -> None:
    kb = open_kb(tmp_path, snapshot_every=3)
    write_stream(kb, range(5))  # snapshot at 3, records 4 and 5 in the log
    del kb
    for snapshot in (tmp_path / "env-1").glob("snapshot-*.json"):
        snapshot.unlink()
    with pytest.raises(WriteAheadLogError, match=r"records 1\.\.3 are missing"):
        open_kb(tmp_path)


def test_crash_between_snapshot_and_log_truncation_applies_nothing_twice(tmp_path: Path) -> None:
    kb = open_kb(tmp_path, snapshot_every=1000)
    write_stream(kb, range(6))
    log = tmp_path / "env-1" / "log.jsonl"
    old_records = log.read_bytes()
    kb.snapshot()  # snapshot holds records 1..6, and the log is truncated
    write_stream(kb, range(6, 8))
    history, before = door_history(kb), kb.kb.to_dict()
    del kb
    # Put back what a crash just before the truncation would have left: records 1..6 ahead of 7..8.
    log.write_bytes(old_records + log.read_bytes())

    again = open_kb(tmp_path)
    assert door_history(again) == history
    assert again.kb.to_dict() == before and again.seq == 8


def test_retried_write_is_acknowledged_without_being_applied_again(tmp_path: Path) -> None:
    kb = open_kb(tmp_path)
    first = [t("door", "open_state", "open")]
    assert kb.ingest_triples(1, first) == 1
    kb.ingest_triples(2, [t("door", "open_state", "closed")])
    # Ray retries calls out of order after an actor restart; the first attempt of this one was logged.
    assert kb.ingest_triples(1, first) == 0
    assert door_history(kb) == [("open", 1, 2), ("closed", 2, None)]
    assert kb.seq == 2
    del kb
    again = open_kb(tmp_path, snapshot_every=1)
    assert again.ingest_triples(1, first) == 0  # remembered across a restart
    again.ingest_triples(3, [t("door", "open_state", "open")])  # snapshot; the log is rotated
    del again
    assert open_kb(tmp_path).ingest_triples(1, first) == 0  # and across a snapshot
    assert len(list((tmp_path / "env-1").glob("snapshot-*.json"))) == 1


def test_invalid_writes_are_refused_before_they_are_logged(tmp_path: Path) -> None:
    kb = open_kb(tmp_path)
    kb.ingest_triples(5, [t("door", "open_state", "open")])
    with pytest.raises(KnowMapError, match="step 4 is before the last ingested step 5.*reset"):
        kb.ingest_triples(4, [t("door", "open_state", "closed")])
    with pytest.raises(KnowMapError, match="single-valued relation 'location'; set-valued relations"):
        kb.ingest_triples(6, [], full_sets=[("cup", "location")])
    with pytest.raises(KnowMapError, match="unknown relation 'colour'; allowed"):
        kb.ingest_triples(6, [{"subject": "cup", "relation": "open_state", "object": "x"}],
                          full_sets=[("cup", "colour")])
    with pytest.raises(KnowMapError, match="invalid triple"):
        kb.ingest_triples(6, [{"subject": "cup", "relation": "colour", "object": "red"}])
    with pytest.raises(KnowMapError, match="invalid observation"):
        kb.ingest({"text": "no step"})
    with pytest.raises(KnowMapError, match="step must be an integer >= 0"):
        kb.ingest_triples(-1, [])
    with pytest.raises(KnowMapError, match="objects must be a list of names"):
        kb.about("door")
    assert kb.seq == 1
    del kb
    assert open_kb(tmp_path).seq == 1


def test_reset_is_durable(tmp_path: Path) -> None:
    kb = open_kb(tmp_path, snapshot_every=1000)
    write_stream(kb, range(4))
    kb.reset()
    kb.ingest_triples(0, [t("door", "open_state", "closed")])
    kb.ingest_triples(1, [t("door", "open_state", "closed")])  # not a retry: the window restarted at reset
    del kb
    kb = open_kb(tmp_path)
    assert door_history(kb) == [("closed", 0, None)]
    assert len(kb) == 1 and kb.last_step == 1


def test_one_process_at_a_time_and_closed_kb_refuses_writes(tmp_path: Path) -> None:
    kb = open_kb(tmp_path)
    with pytest.raises(KnowMapError, match="open elsewhere"):
        open_kb(tmp_path, lock_timeout_s=0.1)
    kb.close()
    kb.close()  # idempotent
    with pytest.raises(KnowMapError, match="closed; open it again"):
        kb.ingest_triples(1, [])
    open_kb(tmp_path, lock_timeout_s=0.1).close()


@pytest.mark.parametrize("env_id", ["", ".", "..", "a/b", "../up", "x" * 129, "with space", "ünï", None, 7])
def test_invalid_env_ids_are_refused(tmp_path: Path, env_id: object) -> None:
    with pytest.raises(InvalidEnvIdError, match=r"\[A-Za-z0-9\._-\]\{1,128\}"):
        DurableEnvironmentKB(env_id, tmp_path)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_valid_env_ids_and_listing(tmp_path: Path) -> None:
    assert validate_env_id("boil-train-0-expert-expert-0-1a2b3c4d") == "boil-train-0-expert-expert-0-1a2b3c4d"
    for env_id in ["b.2_x-y", "a", "x" * 128]:
        open_kb(tmp_path, env_id).close()
    (tmp_path / "not a kb").mkdir()
    (tmp_path / "empty").mkdir()
    assert list_env_kbs(tmp_path) == sorted(["b.2_x-y", "a", "x" * 128])
    assert list_env_kbs(tmp_path / "missing") == []


def test_reads_and_stats_are_plain_data(tmp_path: Path) -> None:
    kb = open_kb(tmp_path)
    write_stream(kb, range(4))
    stats = kb.stats()
    assert json.loads(json.dumps(stats)) == stats
    assert stats["facts"] == len(kb) and stats["seq"] == 4 and stats["last_step"] == 3
    assert [f.object for f in kb.as_of(1) if f.subject == "door"] == ["open"]
    assert {f.subject for f in kb.about(["cup"])} >= {"cup"}
    with pytest.raises(KnowMapError, match="unknown relation"):
        kb.history("door", "colour")


def test_replayed_observations_rebuild_the_same_kb_as_in_memory_ingest(tmp_path: Path) -> None:
    # The log holds raw observations; replay re-extracts them with the rule-based extractor.
    fixture = Path(__file__).parents[1] / "fixtures" / "trajectories" / "boil-0.json"
    trajectory = Trajectory.model_validate(json.loads(fixture.read_text()))
    kb = DurableEnvironmentKB(trajectory.episode_id, tmp_path, snapshot_every=10)
    for record in trajectory.steps:
        kb.ingest(record.as_observation().model_dump())
    expected = build_env_kb(trajectory).to_dict()
    assert kb.kb.to_dict() == expected
    del kb  # 37 writes: 3 snapshots, 7 records replayed
    assert DurableEnvironmentKB(trajectory.episode_id, tmp_path).kb.to_dict() == expected


def test_actor_class_runs_in_process_and_returns_plain_data(tmp_path: Path) -> None:
    fixture = Path(__file__).parents[1] / "fixtures" / "trajectories" / "find-living-thing-0.json"
    trajectory = Trajectory.model_validate(json.loads(fixture.read_text()))
    actor = EnvKBActor(trajectory.episode_id, str(tmp_path))
    for record in trajectory.steps:
        actor.ingest(record.as_observation())
    outputs = [actor.current(), actor.as_of(2), actor.about(["animal"]), actor.stats(),
               actor.segment(trajectory.model_dump())]
    assert json.loads(json.dumps(outputs)) == outputs
    assert outputs[3]["facts"] > 0 and outputs[4]
    assert actor.close()["closed"] is True


def test_a_batch_of_observations_is_stored_whole_or_not_at_all(tmp_path: Path) -> None:
    kb = open_kb(tmp_path)
    kb.ingest_many([Observation(step=3, text="apple|location|kitchen")])
    before = kb.current()
    for batch, where in (([6, 4], r"observations\[1\] has step 4, before observations\[0\]'s step \(6\)"),
                         ([2], r"observations\[0\] has step 2, before the last stored step \(3\)")):
        with pytest.raises(KnowMapError, match=where + ".*nothing of this batch was stored"):
            kb.ingest_many([Observation(step=s, text=f"pear|location|room {s}") for s in batch])
        assert kb.last_step == 3 and kb.current() == before
    assert kb.ingest_many([Observation(step=s, text=f"pear|location|room {s}") for s in (4, 6)]) > 0
    assert kb.last_step == 6
    kb.close()
    with pytest.raises(EnvKBClosedError, match="closed"):
        kb.ingest_many([Observation(step=7)])


def test_a_batch_is_logged_with_one_fsync_and_a_resent_batch_is_not_applied_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kb = open_kb(tmp_path, snapshot_every=1000)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    batch = [Observation(step=s, text=f"door|open_state|{'open' if s % 2 else 'closed'}") for s in range(1, 9)]
    assert kb.ingest_many(batch) > 0
    assert len(synced) == 1 and kb.seq == 8  # group commit: eight records, one fsync
    before = kb.kb.to_dict()
    del kb  # a crash after the batch was logged, before the writer heard back
    again = open_kb(tmp_path)
    assert again.kb.to_dict() == before and again.seq == 8
    # The writer resends the whole batch: recognised, acknowledged, nothing applied twice, no step refused.
    assert again.ingest_many(batch) == 0 and again.seq == 8
    again.ingest_many([*batch[-2:], Observation(step=9, text="door|open_state|open")])  # two resent, one new
    assert again.seq == 9 and door_history(again)[-3:] == [("open", 7, 8), ("closed", 8, 9), ("open", 9, None)]
