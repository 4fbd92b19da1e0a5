"""Fixtures for the Ray tier: one small local Ray for the whole session (starting one takes seconds)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray with 2 CPUs and no dashboard, started once per session and shut down at its end.

    Tests that use it isolate their named actors with their own namespace (see ``ray_config`` fixtures).
    """
    import ray

    if ray.is_initialized():  # started by the caller (e.g. a debugging session): leave it to them
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()
