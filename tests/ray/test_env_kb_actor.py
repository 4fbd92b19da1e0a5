"""The env-KB actor on a small local Ray: crash recovery, retire and revive, isolation between env ids."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import ray
from ray.exceptions import RayActorError

from knowmap.actors.env_kb import env_kb_directory, get_or_create_env_kb, list_env_kbs, retire_env_kb
from knowmap.config import KnowMapConfig
from knowmap.errors import InvalidEnvIdError, KnowMapError
from knowmap.kb.environment_kb import build_env_kb
from knowmap.kb.segmentation import SubgoalSegmenter
from knowmap.schemas import Trajectory

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]

FIXTURES = Path(__file__).parents[1] / "fixtures" / "trajectories"


def make_config(tmp_path: Path, **ray_options) -> KnowMapConfig:
    """A config whose actors live in a namespace of their own, so tests never see each other's actors."""
    return KnowMapConfig(data_dir=tmp_path, ray={"namespace": f"test-{uuid.uuid4().hex[:8]}", **ray_options})


def reading(step: int) -> list[dict[str, str]]:
    return [{"subject": "thermometer", "relation": "reading", "object": f"{step} degrees"}]


def readings(kb: ray.actor.ActorHandle) -> list[str]:
    return [f["object"] for f in ray.get(kb.history.remote("thermometer", "reading"))]


def test_acknowledged_ingests_survive_a_kill_mid_stream(tmp_path: Path) -> None:
    config = make_config(tmp_path, max_task_retries=-1, env_kb_snapshot_every=50)
    kb = get_or_create_env_kb("stream", config)
    pid = ray.get(kb.stats.remote())["pid"]
    refs = [kb.ingest_triples.remote(step, reading(step)) for step in range(300)]
    ray.get(refs[30])
    ray.kill(kb, no_restart=False)

    failed = []
    for step, ref in enumerate(refs):
        try:
            ray.get(ref)
        except RayActorError:  # in flight at the kill: writes are not retried by Ray
            failed.append(step)
    stats = ray.get(kb.stats.remote())  # the restarted actor, reloaded from snapshot + log
    assert stats["pid"] != pid
    stored = [int(r.split()[0]) for r in readings(kb)]
    acknowledged = sorted(set(range(300)) - set(failed))
    assert set(acknowledged) <= set(stored)
    assert stored == list(range(len(stored)))  # an exact prefix of the stream: in order, nothing twice
    assert stats["seq"] == len(stored)

    # The writer resends from its first failed write, in order; writes logged before the crash are recognised.
    resent = ray.get([kb.ingest_triples.remote(step, reading(step)) for step in failed])
    assert all(changes in (0, 2) for changes in resent)
    assert [int(r.split()[0]) for r in readings(kb)] == list(range(300))
    assert ray.get(kb.stats.remote())["seq"] == 300
    retire_env_kb("stream", config)


def test_retire_then_revive_gives_the_same_facts(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    trajectory = Trajectory.model_validate(json.loads((FIXTURES / "boil-0.json").read_text()))
    env_id = trajectory.episode_id
    kb = get_or_create_env_kb(env_id, config)
    ray.get([kb.ingest.remote(s.as_observation().model_dump()) for s in trajectory.steps])
    before = ray.get([kb.current.remote(), kb.as_of.remote(10), kb.stats.remote()])

    # The actor extracts and segments exactly as the in-process KB does.
    local = build_env_kb(trajectory)
    assert before[0] == [f.model_dump(mode="json") for f in local.current()]
    assert ray.get(kb.segment.remote(trajectory.model_dump())) == [
        s.model_dump(mode="json") for s in SubgoalSegmenter().segment(trajectory, local)]

    final = retire_env_kb(env_id, config)
    assert final is not None and final["closed"] and final["writes_since_snapshot"] == 0
    with pytest.raises(RayActorError):
        ray.get(kb.stats.remote())
    assert retire_env_kb(env_id, config) is None  # nothing running any more
    assert list_env_kbs(env_kb_directory(config)) == [env_id]

    revived = get_or_create_env_kb(env_id, config)
    after = ray.get([revived.current.remote(), revived.as_of.remote(10), revived.stats.remote()])
    assert after[0] == before[0] and after[1] == before[1]
    assert after[2]["seq"] == before[2]["seq"] and after[2]["pid"] != before[2]["pid"]
    retire_env_kb(env_id, config)


def test_env_ids_never_see_each_others_facts(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    kitchen, garden = get_or_create_env_kb("kitchen", config), get_or_create_env_kb("garden", config)
    assert get_or_create_env_kb("kitchen", config)._actor_id == kitchen._actor_id  # looked up, not duplicated
    ray.get([kitchen.ingest_triples.remote(1, [{"subject": "stove", "relation": "power_state", "object": "on"}]),
             garden.ingest_triples.remote(1, [{"subject": "seed", "relation": "location", "object": "pot"}])])

    assert {f["subject"] for f in ray.get(kitchen.current.remote())} == {"stove"}
    assert {f["subject"] for f in ray.get(garden.current.remote())} == {"seed", "pot"}
    assert ray.get(garden.history.remote("stove", "power_state")) == []
    assert list_env_kbs(env_kb_directory(config)) == ["garden", "kitchen"]
    for env_id in ("kitchen", "garden"):
        retire_env_kb(env_id, config)


def test_bad_env_ids_and_inputs_are_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with pytest.raises(InvalidEnvIdError, match=r"\[A-Za-z0-9\._-\]\{1,128\}"):
        get_or_create_env_kb("../escape", config)
    kb = get_or_create_env_kb("strict", config)
    with pytest.raises(KnowMapError, match="invalid observation"):
        ray.get(kb.ingest.remote({"text": "no step"}))
    with pytest.raises(KnowMapError, match="unknown relation 'colour'"):
        ray.get(kb.history.remote("cup", "colour"))
    assert ray.get(kb.stats.remote())["seq"] == 0  # refused writes were never logged
    retire_env_kb("strict", config)
