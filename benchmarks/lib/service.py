"""What the service benchmarks share: a retrieval service on a free 127.0.0.1 port in a local Ray of their own,
with its data in a temporary directory, torn down afterwards; and percentiles. Imported as ``lib.service``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from knowmap.config import KnowMapConfig  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


@contextlib.contextmanager
def local_service(namespace: str, start: bool = True, **serve: Any) -> Iterator[tuple[KnowMapConfig, Any]]:
    """``(config, service info)``: the service on the packaged MiniLM without a reranker, in a 2-CPU local Ray
    whose Serve proxy times out request heads (``serve`` overrides the config's ``serve`` section). ``start``
    False: the info is None and the caller starts what it measures."""
    import ray
    from ray import serve as ray_serve

    from knowmap.actors.experience import release_experience_kb
    from knowmap.serve.app import start_service
    from knowmap.serve.proxy import proxy_environment

    tmp = Path(tempfile.mkdtemp(prefix=f"knowmap-{namespace}-"))
    config = KnowMapConfig(data_dir=tmp / "data", ray={"namespace": namespace},
                           serve={"port": free_port(), "ingress_num_cpus": 0.5, "reranker_num_cpus": 0.25, **serve})
    os.environ.update(proxy_environment(config))
    ray.init(num_cpus=2, include_dashboard=False, namespace=namespace, log_to_driver=False)
    try:
        yield config, start_service(config, embedder="", reranker="") if start else None
    finally:
        ray_serve.shutdown()
        release_experience_kb(config)
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
