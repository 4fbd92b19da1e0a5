"""A rollout agent's env-KB slot (:class:`RayEnvKBSlot`) on a small local Ray, fed recorded observations (no JVM).

The slot pipelines: an episode's ``begin`` and its observation batches are sent without waiting. Each episode's
KB must hold exactly what a separate replay of that episode holds, whatever happened to the slot before it: a
failed episode whose batches were never awaited, its retry on the other slot, a slot whose actor died.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import ray
from ray.exceptions import ActorDiedError, RayActorError

from knowmap.actors.kb_handles import INGEST_BATCH, RayEnvKBSlot
from knowmap.config import KnowMapConfig
from knowmap.kb.durable_kb import DurableEnvironmentKB
from knowmap.schemas import Observation, Trajectory

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]
FIXTURES = Path(__file__).parents[1] / "fixtures" / "trajectories"


def recorded(name: str) -> tuple[Trajectory, list[Observation]]:
    trajectory = Trajectory.model_validate(json.loads((FIXTURES / name).read_text()))
    return trajectory, [step.as_observation() for step in trajectory.steps]


def held(kb: DurableEnvironmentKB) -> dict:
    """Every fact a KB ever held (with its step range) and its last step."""
    return {"facts": sorted(json.dumps(f, sort_keys=True) for f in kb.kb.to_dict()["facts"]),
            "last_step": kb.stats()["last_step"]}


def replayed(observations: list[Observation], directory: Path) -> dict:
    """What the episode's KB holds when its observations are ingested alone, in this process."""
    with DurableEnvironmentKB("replay", directory / uuid.uuid4().hex) as kb:
        kb.ingest_many(observations)
        return held(kb)


def on_disk(env_id: str, config: KnowMapConfig) -> dict:
    with DurableEnvironmentKB(env_id, config.paths.env_kb.resolve()) as kb:
        return held(kb)


def test_short_episodes_through_two_slots_each_hold_exactly_their_own_replay(tmp_path: Path) -> None:
    """Twelve short episodes of two tasks alternate over two slots; every third fails after its first batch was
    sent (not awaited) and is retried on the other slot, as the rollout pool does."""
    config = KnowMapConfig(data_dir=tmp_path)
    slots = [RayEnvKBSlot(config), RayEnvKBSlot(config)]
    episodes = [recorded("find-living-thing-0.json"), recorded("boil-0.json")]
    assert len(episodes[1][1]) > 2 * INGEST_BATCH  # boil is sent in several batches, find-living-thing in one
    expected = {}
    try:
        for i in range(12):
            _, observations = episodes[i % 2]
            env_id = f"episode-{i}"
            expected[env_id] = replayed(observations, tmp_path / "replays")
            slot = slots[i % 2]
            if i % 3 == 0:  # fails mid-episode: a batch sent, the rest dropped, nothing awaited
                slot.open(env_id)
                for observation in observations[:INGEST_BATCH + 3]:
                    slot.ingest(observation)
                slot.discard()
                slot = slots[(i + 1) % 2]  # the retry plays on the other agent
            slot.open(env_id)
            for observation in observations:
                slot.ingest(observation)
            slot.flush()
            stats = slot.close()
            assert stats["env_id"] == env_id and stats["facts"] == len(expected[env_id]["facts"]), env_id
    finally:
        for slot in slots:
            slot.discard()
    for env_id, want in expected.items():
        assert on_disk(env_id, config) == want, env_id


def test_a_slot_whose_actor_died_never_writes_into_another_episodes_kb(tmp_path: Path) -> None:
    """Ray restarts an actor by running its constructor again: a restarted slot would hold the first episode's KB
    and take the current episode's later batches into it (seen: the first KB grew, and ``close`` reported its
    stats as the current episode's). A slot's actor is never restarted: the current episode's calls fail (the
    pool plays it again) and the next episode gets a fresh actor."""
    config = KnowMapConfig(data_dir=tmp_path)
    slot = RayEnvKBSlot(config)
    _, first = recorded("find-living-thing-0.json")
    _, second = recorded("boil-0.json")
    try:
        slot.open("first")
        for observation in first:
            slot.ingest(observation)
        slot.flush()
        slot.close()

        slot.open("second")
        for observation in second[:INGEST_BATCH]:
            slot.ingest(observation)
        slot.flush()
        handle = slot._handle
        pid = ray.get(handle.stats.remote())["pid"]
        ray.kill(handle, no_restart=False)  # the actor dies between two batches, nothing in flight
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until Ray has restarted it, or it is gone for good
            try:
                if ray.get(handle.stats.remote())["pid"] != pid:
                    break
            except ActorDiedError:
                break
            except RayActorError:  # unavailable while it restarts
                pass
            time.sleep(0.2)
        with pytest.raises(RayActorError):
            for observation in second[INGEST_BATCH:]:
                slot.ingest(observation)
            slot.flush()
            slot.close()

        slot.open("second")  # the retry: a fresh actor, the KB from step 0
        for observation in second:
            slot.ingest(observation)
        slot.flush()
        assert slot.close()["env_id"] == "second"
    finally:
        slot.discard()
    assert on_disk("first", config) == replayed(first, tmp_path / "replays")
    assert on_disk("second", config) == replayed(second, tmp_path / "replays")

