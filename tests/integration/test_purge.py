"""Deletion removes the bytes: after a delete, grepping every file under the data directory finds neither the
deleted texts nor the deleted vectors, in a real Milvus Lite file, the env KB's log and snapshots, and the
trajectory store. Each test first checks that the grep finds the marker before the delete (so a compressed file
cannot hide it), then that it finds it nowhere after.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from knowmap.config import KnowMapConfig
from knowmap.kb.durable_kb import DurableEnvironmentKB
from knowmap.kb.experience_kb import ExperienceKB, episode_rows
from knowmap.kb.experience_versions import VersionedExperienceKB
from knowmap.kb.purge import purge_copy_name
from knowmap.kb.trajectory_store import delete_trajectory, save_trajectory
from knowmap.kb.vectorstore import VectorStore
from knowmap.layout import DataLayout
from knowmap.models.embedder import Embedder
from knowmap.schemas import StepRecord, Subgoal, Trajectory, Triple, stable_id

pytestmark = pytest.mark.integration
DIM = 384
PURGE_BOUND_S = 60.0  # the most a DELETE may take to purge, as docs/service-and-api.md states


def occurrences(root: Path, needle: bytes) -> dict[str, int]:
    """How often ``needle`` occurs in each file under ``root`` (recursively, raw bytes); files without it left out."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and (n := path.read_bytes().count(needle)):
            found[str(path.relative_to(root))] = n
    return found


def marker() -> str:
    return f"PURGEMARK{uuid.uuid4().hex}"


def unit_vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)  # (n, dim)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def episode(name: str, subgoals: int, text: str = "", facts: list[Triple] | None = None,
            ) -> tuple[Trajectory, list[Subgoal]]:
    """An agent episode of ``subgoals`` sub-goals whose descriptions hold ``text`` and whose facts are ``facts``."""
    steps = [StepRecord(step=i, action=f"move seed {i} to flower pot", observation=f"done {i}", score=float(i))
             for i in range(2 * subgoals)]
    goals = [Subgoal(subgoal_id=stable_id(name, i), episode_id=name, task="grow-plant", variation=1, split="train",
                     source="agent", index=i, start_step=2 * i, end_step=2 * i + 1,
                     actions=[steps[2 * i].action, steps[2 * i + 1].action], objects=["seed", "flower pot"],
                     facts=facts or [Triple(subject="seed", relation="location", object="flower pot")],
                     score_before=float(2 * i), score_after=float(2 * i + 1),
                     description=f"grow-plant: plant seed {i} {text}", reflection=f"the seed grew {text}")
             for i in range(subgoals)]
    return Trajectory(episode_id=name, task="grow-plant", variation=1, split="train", source="agent",
                      task_description="Your task is to grow a plant.", steps=steps), goals


def rows(name: str, subgoals: int, seed: int, text: str = "") -> list[dict]:
    """The store rows of :func:`episode` (what the experiential KB writes), with random unit vectors."""
    found = episode_rows(*episode(name, subgoals, text))
    for row, vector in zip(found, unit_vectors(len(found), seed), strict=True):
        row["vector"] = vector
    return found


def test_a_deleted_rows_text_and_vector_leave_every_file_of_a_lite_store(tmp_path: Path) -> None:
    mark = marker()
    store = VectorStore(str(tmp_path / "kb.db"))
    store.ensure_collection("c", DIM)
    for i in range(6):  # one segment per write, as the KB writes
        store.upsert("c", rows(f"keep-{i}", 4, seed=i))
    deleted = rows("gone", 3, seed=99, text=mark)
    store.upsert("c", deleted)
    store.upsert("c", rows("keep-late", 4, seed=100))
    vector = deleted[0]["vector"].tobytes()[:32]
    assert occurrences(tmp_path, mark.encode()) and occurrences(tmp_path, vector)  # the grep sees them
    assert store.delete("c", filter={"episode_id": "gone"}) == 4
    assert occurrences(tmp_path, mark.encode()) == {} and occurrences(tmp_path, vector) == {}
    assert store.count("c") == 7 * 5 and store.count("c", {"episode_id": "gone"}) == 0
    kept = rows("keep-3", 4, seed=3)
    assert store.search("c", kept[0]["vector"], k=1)[0][0].id == kept[0]["id"]
    assert store.list_collections() == ["c"]

    mark = marker()  # by ids, in a store reopened from disk
    store.upsert("c", rows("gone-2", 2, seed=7, text=mark))
    store.close()
    store = VectorStore(str(tmp_path / "kb.db"))
    store.ensure_collection("c", DIM)
    ids = [r["id"] for r in rows("gone-2", 2, seed=7) if r["kind"] == "subgoal"]
    assert occurrences(tmp_path, mark.encode())
    store.delete("c", ids=ids)
    assert occurrences(tmp_path, mark.encode()) == {} and store.count("c") == 7 * 5 + 1
    store.close()


def test_a_delete_without_purge_leaves_the_bytes_as_milvus_does(tmp_path: Path) -> None:
    """The control: Milvus Lite's own delete writes a marker only; the bytes stay until a purge."""
    mark = marker()
    with VectorStore(str(tmp_path / "kb.db")) as store:
        store.ensure_collection("c", DIM)
        store.upsert("c", rows("keep", 4, seed=1))
        store.upsert("c", rows("gone", 2, seed=2, text=mark))
        store.delete("c", filter={"episode_id": "gone"}, purge=False)
        store._cli.compact("c")  # a no-op on Lite
        assert occurrences(tmp_path, mark.encode())
        store.purge("c")
        assert occurrences(tmp_path, mark.encode()) == {} and store.count("c") == 5


@pytest.mark.milvus_server
def test_a_delete_on_a_milvus_server_returns_once_its_compaction_has_completed(milvus_server_uri: str) -> None:
    """On a server a purge is the server's compaction: the delete returns after it completed (the files go at the
    server's garbage collection, which this test cannot grep: they live in the server's object storage)."""
    from tests.stores import server_database

    for uri in server_database(milvus_server_uri):
        with VectorStore(uri) as store:
            store.ensure_collection("c", DIM)
            store.upsert("c", rows("keep", 4, seed=1))
            store.upsert("c", rows("gone", 2, seed=2))
            started = time.perf_counter()
            assert store.delete("c", filter={"episode_id": "gone"}) == 3
            print(f"\ndelete + compaction on the Milvus server: {time.perf_counter() - started:.2f} s")
            assert store.count("c") == 5 and store.count("c", {"episode_id": "gone"}) == 0


def test_an_interrupted_purge_is_finished_when_the_collection_is_opened(tmp_path: Path) -> None:
    uri = str(tmp_path / "kb.db")
    with VectorStore(uri) as store:  # cut short while copying: the copy is partial, the collection intact
        store.ensure_collection("c", DIM)
        store.upsert("c", rows("keep", 4, seed=1))
        store.ensure_collection(purge_copy_name("c"), DIM)
        store.upsert(purge_copy_name("c"), rows("keep", 4, seed=1)[:2])
    with VectorStore(uri) as store:
        store.ensure_collection("c", DIM)
        assert store._cli.list_collections() == ["c"] and store.count("c") == 5
        store.ensure_collection(purge_copy_name("c"), DIM)  # cut short between drop and rename: the copy is whole
        store.upsert(purge_copy_name("c"), rows("keep", 4, seed=1))
        store.drop_collection("c")
    with VectorStore(uri) as store:
        store.ensure_collection("c", DIM)
        assert store._cli.list_collections() == ["c"] and store.count("c") == 5


def test_searches_and_counts_go_on_while_a_purge_swaps_the_collection(tmp_path: Path) -> None:
    with VectorStore(str(tmp_path / "kb.db")) as store:
        store.ensure_collection("c", DIM)
        for i in range(4):
            store.upsert("c", rows(f"keep-{i}", 20, seed=i))
        store.upsert("c", rows("gone", 5, seed=9))
        query, errors, done, reads = unit_vectors(1, 5)[0], [], threading.Event(), [0]

        def read() -> None:
            while not done.is_set():
                try:
                    assert len(store.search("c", query, k=5)[0]) == 5 and store.count("c") >= 84
                    reads[0] += 1
                except Exception as e:  # noqa: BLE001 - collected and asserted on below
                    errors.append(e)

        readers = [threading.Thread(target=read) for _ in range(2)]
        for t in readers:
            t.start()
        try:
            for _ in range(3):
                store.delete("c", filter={"episode_id": "gone"})
                store.upsert("c", rows("gone", 5, seed=9))
        finally:
            done.set()
            for t in readers:
                t.join()
        assert errors == [] and reads[0] > 0


@pytest.mark.slow
def test_purge_of_a_realistic_kb_takes_seconds(tmp_path: Path) -> None:
    """2,000 sub-goal rows (200 episodes of 10 sub-goals, with their meta) and one episode deleted: the purge's
    time is what a DELETE adds on Milvus Lite; it must stay under the bound the API docs state."""
    mark = marker()
    with VectorStore(str(tmp_path / "kb.db")) as store:
        store.ensure_collection("c", DIM)
        for i in range(199):
            store.upsert("c", rows(f"ep-{i}", 10, seed=i))
        store.upsert("c", rows("gone", 10, seed=1000, text=mark))
        assert store.count("c", {"kind": "subgoal"}) == 2000
        started = time.perf_counter()
        store.delete("c", filter={"episode_id": "gone"})
        seconds = time.perf_counter() - started
        print(f"\npurge of 2,000 sub-goal rows (+200 trajectory rows): {seconds:.2f} s")
        assert occurrences(tmp_path, mark.encode()) == {} and store.count("c") == 199 * 11
        assert seconds < PURGE_BOUND_S


def test_the_experiential_kb_purges_deleted_and_replaced_episodes_in_every_collection(tmp_path: Path,
                                                                                     embedder: Embedder) -> None:
    """Deleting an episode removes its bytes from the held version and from an older collection on disk; re-adding
    an episode without an env's facts and purging removes the facts' bytes everywhere."""
    config = KnowMapConfig(data_dir=tmp_path)
    kb = VersionedExperienceKB(config.model_dump(mode="json"))
    try:
        older = ExperienceKB(kb._store, embedder, collection_prefix=f"{config.store.collection_prefix}_old")
        mark, fact_mark = marker(), marker()
        keep, gone = episode("keep", 3), episode("gone", 3, text=mark)
        lent = episode("lent", 3, facts=[Triple(subject=fact_mark.lower(), relation="location", object="kitchen")])
        for trajectory, goals in (keep, gone, lent):
            kb.add_trajectory(trajectory, goals)
            older.add_trajectory(trajectory, goals)
        assert occurrences(tmp_path, mark.encode()) and occurrences(tmp_path, fact_mark.lower().encode())

        assert kb.delete_episode("gone") == 4
        assert occurrences(tmp_path, mark.encode()) == {}
        assert older.count(episode_id="gone") == 0 and kb.count(episode_id="keep") == 4

        kb.add_trajectory(*episode("lent", 3))  # segmented again without the env's facts
        assert occurrences(tmp_path, fact_mark.lower().encode())  # replaced rows: still in the files
        assert kb.purge(["lent"])["collections"] == 2
        assert occurrences(tmp_path, fact_mark.lower().encode()) == {}
        assert kb.count(episode_id="lent") == 4 and older.count(episode_id="lent") == 0
        assert [g["facts"][0]["object"] for g in kb.subgoals("lent")] == ["flower pot"] * 3
    finally:
        kb.close()


def test_an_env_kb_reset_leaves_no_forgotten_fact_in_its_log_or_snapshots(tmp_path: Path) -> None:
    mark = marker().lower()
    kb = DurableEnvironmentKB("env-1", tmp_path, snapshot_every=3)
    for step in range(7):  # snapshots, a rotated log and a live log all hold the marker
        kb.ingest_triples(step, [Triple(subject=f"{mark} {step}", relation="location", object="kitchen")])
    assert len(occurrences(tmp_path, mark.encode())) >= 3
    kb.reset()
    assert occurrences(tmp_path, mark.encode()) == {}
    kb.ingest_triples(0, [Triple(subject="seed", relation="location", object="greenhouse")])
    kb.close()
    with DurableEnvironmentKB("env-1", tmp_path) as reopened:
        assert "seed" in {f.subject for f in reopened.current()} and len(reopened) == len(reopened.current())
    assert occurrences(tmp_path, mark.encode()) == {}


def test_a_deleted_trajectory_leaves_no_file_behind(tmp_path: Path) -> None:
    mark = marker()
    paths = DataLayout(root=tmp_path)
    trajectory, _ = episode("acme@traj-1", 2, text=mark)
    trajectory = trajectory.model_copy(update={"task_description": mark})
    save_trajectory(paths, trajectory)
    paths.trajectory("acme@traj-1").with_suffix(".json.tmp").write_text(mark)  # a save cut short by a crash
    save_trajectory(paths, trajectory.model_copy(update={"episode_id": "acme@traj-2", "task_description": "x"}))
    assert occurrences(tmp_path, mark.encode())
    assert delete_trajectory(paths, "acme@traj-1")
    assert occurrences(tmp_path, mark.encode()) == {} and paths.trajectory("acme@traj-2").is_file()
