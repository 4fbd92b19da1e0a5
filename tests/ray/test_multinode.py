"""The pool on a local multi-node cluster (``ray.cluster_utils.Cluster``): placement and losing a node."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from knowmap.actors.experience import get_experience_kb, release_experience_kb
from knowmap.actors.pool import RolloutPool
from knowmap.agent.rollout import EpisodeSpec
from knowmap.config import KnowMapConfig
from tests.stores import server_database

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow, pytest.mark.jvm]


@pytest.fixture(scope="module")
def cluster():
    """A head and two worker nodes of one CPU each. The session's Ray is stopped first; this module runs after
    every other test (``RUN_LAST`` in tests/conftest.py), so nothing has to start a Ray after this cluster's."""
    if ray.is_initialized():
        ray.shutdown()
    cluster = _start_cluster()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _start_cluster(attempts: int = 3) -> Cluster:
    """Ray waits a fixed 30 s for a raylet to register, which 2 busy cores have missed: on that error, stop only
    the processes this cluster started (never `ray stop`, which would stop every Ray on the machine) and try again."""
    for attempt in range(1, attempts + 1):
        cluster = Cluster()
        try:
            cluster.add_node(num_cpus=1, include_dashboard=False)  # the first node added is the head
            return cluster
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for its startup deadline
            cluster.shutdown()
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            time.sleep(5 * attempt)
    raise AssertionError("unreachable")


def make_config(tmp_path: Path, step_limit: int = 100, store_uri: str = "") -> KnowMapConfig:
    return KnowMapConfig(data_dir=tmp_path, scienceworld={"step_limit": step_limit}, store={"uri": store_uri},
                         ray={"namespace": f"test-{uuid.uuid4().hex[:8]}", "num_workers": 2, "num_cpus_per_agent": 1,
                              "max_restarts": 3})


@pytest.mark.milvus_server
def test_actors_spread_over_nodes_and_survive_losing_one(cluster: Cluster, tmp_path: Path,
                                                        milvus_server_uri: str) -> None:
    """Agents on two nodes feed one experiential KB on a Milvus server (a cluster's store: Milvus Lite is one
    process's file) while a node that hosts one of them is removed: every episode completes, stored exactly once."""
    databases = server_database(milvus_server_uri)
    config = make_config(tmp_path, step_limit=60, store_uri=next(databases))
    ray.get(get_experience_kb(config).info.remote())
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    pool = RolloutPool(config)
    try:
        placed = ray.get([a.ping.remote() for a in pool.actors])
        assert len({p["node"] for p in placed}) == 2, placed  # one CPU per node: two nodes host agents

        # Random-policy episodes take seconds each; remove a worker node that hosts an agent mid-rollout.
        victim = next(n for n in workers if n.node_id in {p["node"] for p in placed})
        specs = [EpisodeSpec(task=t, variation=v, policy="random") for t in ("boil", "melt") for v in (0, 1)]
        removed = threading.Event()

        def remove_node_mid_rollout() -> None:
            time.sleep(1.5)
            cluster.remove_node(victim)
            removed.set()

        remover = threading.Thread(target=remove_node_mid_rollout)
        remover.start()
        results = pool.run(specs)
        remover.join()
    finally:
        pool.shutdown()

    assert removed.is_set()
    assert [r.spec for r in results] == specs
    assert all(r.ok for r in results), [r.error for r in results]
    assert any(r.attempts > 1 for r in results), "removing the node should have interrupted an episode"
    experience = get_experience_kb(config)
    rows = {r.episode_id: ray.get(experience.count.remote(kind="trajectory", episode_id=r.episode_id))
            for r in results}
    assert rows == {r.episode_id: 1 for r in results}  # every episode exactly once
    assert release_experience_kb(config)
    next(databases, None)  # drops the test's database
