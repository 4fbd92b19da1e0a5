"""The rollout pool on a small local Ray: real ScienceWorld JVMs in agent actors, real KB actors, Milvus Lite."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
import ray

from knowmap.actors.env_kb import env_kb_directory, list_env_kbs
from knowmap.actors.experience import get_experience_kb, release_experience_kb
from knowmap.actors.pool import RolloutPool
from knowmap.agent.rollout import EpisodeSpec
from knowmap.config import KnowMapConfig
from knowmap.kb.durable_kb import DurableEnvironmentKB

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.jvm, pytest.mark.usefixtures("ray_local")]

SPECS = [EpisodeSpec(task=t, variation=v) for t in ("find-living-thing", "use-thermometer") for v in (0, 1)]


@pytest.fixture
def configs():
    """Makes configs whose actors live in a namespace of their own; releases their experiential KBs after."""
    made: list[KnowMapConfig] = []

    def make(tmp_path: Path, step_limit: int = 100) -> KnowMapConfig:
        made.append(KnowMapConfig(data_dir=tmp_path, scienceworld={"step_limit": step_limit},
                                  ray={"namespace": f"test-{uuid.uuid4().hex[:8]}", "num_workers": 2,
                                       "num_cpus_per_agent": 1}))
        return made[-1]

    yield make
    for config in made:
        release_experience_kb(config)


def trajectory_rows(config: KnowMapConfig, results) -> dict[str, int]:
    experience = get_experience_kb(config)
    return {r.episode_id: ray.get(experience.count.remote(kind="trajectory", episode_id=r.episode_id))
            for r in results}


def test_pool_runs_every_episode_and_feeds_both_kbs(tmp_path: Path, configs) -> None:
    config = configs(tmp_path)
    pool = RolloutPool(config)
    try:
        seen = []
        results = pool.run(SPECS, on_result=seen.append)
        # An agent hands back its episode with the experiential-KB add still pending (it does not wait for it);
        # the pool's results carry the add's time, so the pool awaited it.
        played, pending = ray.get(pool.actors[0].play.remote(SPECS[0].model_dump(), True))
        assert isinstance(pending, ray.ObjectRef) and played.embed_seconds == 0
        assert ray.get(pending)["rows"] == played.subgoals + 1
    finally:
        pool.shutdown()
    assert [r.spec for r in results] == SPECS and len(seen) == len(SPECS)
    assert all(r.ok for r in results), [r.error for r in results]
    assert all(r.final_score == 100.0 and r.steps > 0 and r.facts > 0 for r in results)
    assert len({r.pid for r in results}) == 2  # both actors played
    assert all(r.embed_seconds > 0 and r.segment_seconds > 0 and r.ingest_seconds > 0 for r in results)

    # Env KBs: one per episode on disk (their actors were retired), holding what the episode saw.
    assert sorted(list_env_kbs(env_kb_directory(config))) == sorted(r.episode_id for r in results)
    for r in results:
        with DurableEnvironmentKB(r.episode_id, env_kb_directory(config)) as kb:
            assert len(kb) == r.facts and kb.last_step == r.steps
            assert any(f.subject == "agent" and f.relation == "location" for f in kb.current())
    # Experiential KB: exactly one trajectory row per episode and its sub-goals.
    assert trajectory_rows(config, results) == {r.episode_id: 1 for r in results}
    experience = get_experience_kb(config)
    assert ray.get(experience.count.remote(kind="subgoal")) == sum(r.subgoals for r in results)


def test_killing_an_agent_mid_episode_still_completes_each_episode_once(tmp_path: Path, configs) -> None:
    # Random-policy episodes build the valid-action list every step, so each lasts several seconds: the kill
    # 1.5 s in lands mid-episode on both busy actors' first episodes.
    config = configs(tmp_path, step_limit=60)
    specs = [spec.model_copy(update={"policy": "random"}) for spec in SPECS]
    pool = RolloutPool(config)
    killed = threading.Event()

    def kill_first_actor_mid_episode() -> None:
        time.sleep(1.5)
        ray.kill(pool.actors[0], no_restart=False)  # Ray restarts it (max_restarts from config)
        killed.set()

    try:
        ray.get([a.ping.remote() for a in pool.actors])  # actors up, JVMs started
        killer = threading.Thread(target=kill_first_actor_mid_episode)
        killer.start()
        results = pool.run(specs)
        killer.join()
    finally:
        pool.shutdown()
    assert killed.is_set()
    assert all(r.ok for r in results), [r.error for r in results]
    assert any(r.attempts > 1 for r in results), "the kill should have interrupted an episode"
    assert trajectory_rows(config, results) == {r.episode_id: 1 for r in results}
    for r in results:  # a retried episode's env KB starts again from step 0: no step seen twice
        with DurableEnvironmentKB(r.episode_id, env_kb_directory(config)) as kb:
            assert kb.last_step == r.steps and len(kb) == r.facts


def test_invalid_episode_is_a_result_not_an_exception(tmp_path: Path, configs) -> None:
    config = configs(tmp_path)
    pool = RolloutPool(config, num_workers=1)
    try:
        results = pool.run([EpisodeSpec(task="boil", variation=29, split="train")])
    finally:
        pool.shutdown()
    assert not results[0].ok and results[0].attempts == 1  # not retried: retrying cannot help
    assert "VariationOutOfRangeError" in results[0].error and "train variations are 0-13" in results[0].error


def test_a_jvm_that_dies_mid_episode_is_replaced_and_the_episode_retried(tmp_path: Path, configs) -> None:
    config = configs(tmp_path, step_limit=60)
    specs = [spec.model_copy(update={"policy": "random"}) for spec in SPECS[:2]]
    pool = RolloutPool(config, num_workers=1)
    try:
        jvm_pid = ray.get(pool.actors[0].ping.remote())["jvm_pid"]
        killer = threading.Timer(1.5, os.kill, args=(jvm_pid, signal.SIGKILL))
        killer.start()
        results = pool.run(specs)
        killer.join()
        assert ray.get(pool.actors[0].ping.remote())["jvm_pid"] != jvm_pid  # the agent started a new JVM
    finally:
        pool.shutdown()
    assert all(r.ok for r in results), [r.error for r in results]
    assert results[0].attempts == 2 and results[1].attempts == 1
    assert trajectory_rows(config, results) == {r.episode_id: 1 for r in results}
