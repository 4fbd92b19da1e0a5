"""Fixtures for the Ray tier: one small local Ray, started on first use and shut down at the session's end.

A module may stop it to start a multi-node ``ray.cluster_utils.Cluster`` of its own; the next test that asks for
``ray_local`` starts a local Ray again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest


@pytest.fixture
def ray_local() -> Iterator[None]:
    """A local Ray with 2 CPUs and no dashboard (started once, reused by every later test).

    Tests that use it isolate their named actors with their own namespace (see ``make_config``).
    """
    import ray

    if not ray.is_initialized():
        try:
            ray.init(num_cpus=2, include_dashboard=False)
        except Exception as e:  # noqa: BLE001 - Ray's own startup deadline, nothing of ours
            # Ray waits a fixed 30 s for the raylet to register; right after a multi-node Cluster is torn down on
            # 2 busy cores that was seen to run out once in a whole-suite run. Start again, once.
            if "timed out during startup" not in str(e):
                raise
            ray.shutdown()
            time.sleep(5)
            ray.init(num_cpus=2, include_dashboard=False)
    yield


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_end() -> Iterator[None]:
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
