"""Fixtures for the Ray tier: one small local Ray, started on first use and shut down at the session's end.

A module may stop it to start a multi-node ``ray.cluster_utils.Cluster`` of its own; the next test that asks for
``ray_local`` starts a local Ray again.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def ray_local() -> Iterator[None]:
    """A local Ray with 2 CPUs and no dashboard (started once, reused by every later test).

    Tests that use it isolate their named actors with their own namespace (see ``make_config``).
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    yield


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_end() -> Iterator[None]:
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
