"""The one way a job starts or joins Ray, and releases what it opened.

:func:`ray_session` starts a local Ray (``ray.address`` empty) or joins a cluster (``"auto"``, ``ray://...``), in
the project namespace, so named actors (env KBs, the experiential KB) are found across jobs. On leaving, it
releases what the session opened: with a local Ray it started, the experiential-KB actor (closing its Milvus Lite
file, which admits one process) and then Ray itself; on a cluster, nothing (the detached KB actors serve the next
job). Inside a session that is already open (a job called by another job), it does nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import ray

from knowmap.actors.experience import release_experience_kb
from knowmap.config import KnowMapConfig
from knowmap.serve.proxy import check_ports_free, proxy_environment


@contextlib.contextmanager
def ray_session(config: KnowMapConfig, *, serving: bool = False, **init_kwargs: object) -> Iterator[None]:
    """Ray for the block: started or joined on entry, released on exit if this call started it.

    Args:
        config: ``ray.address`` and ``ray.namespace`` say where and under which namespace.
        serving: the block starts the service; a local Ray is then refused if HAProxy's ports are taken
            (:func:`knowmap.serve.proxy.check_ports_free`).
        **init_kwargs: passed to ``ray.init`` (``num_cpus`` for benchmarks).

    Raises:
        ConfigError: ``serving`` and another service on this machine holds HAProxy's statistics or metrics port.
    """
    started = not ray.is_initialized()
    if started:
        if not config.ray.address:  # the processes of a Ray started here inherit it (serve.proxy: head timeout)
            if serving:
                check_ports_free(config)
            os.environ.update(proxy_environment(config))
        # The dashboard stays on: it serves the state API that Ray Train's controller polls (without it, the log
        # fills with "State API may be temporarily unavailable"), and users watch jobs there.
        # An empty address starts a Ray of our own: ``"local"``, since ``None`` joins whatever cluster
        # ``ray start`` last registered on this machine (/tmp/ray/ray_current_cluster), another user's included.
        ray.init(address=config.ray.address or "local", namespace=config.ray.namespace, log_to_driver=True,
                 **init_kwargs)  # type: ignore[arg-type]
    try:
        yield
    finally:
        if started and not config.ray.address:
            release_experience_kb(config)  # the Milvus Lite file, before the processes holding it go
            ray.shutdown()
