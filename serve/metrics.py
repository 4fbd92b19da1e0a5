"""Application metrics of the retrieval service, exported through Ray's metrics agent in Prometheus' format.

Ray's ``ray.serve.metrics`` add the ``deployment``, ``replica`` and ``application`` tags; each node's metrics agent
serves them (prefixed ``ray_``) on its metrics export port (``ray.nodes()[i]["MetricsExportPort"]``, or the port set
with ``ray start --metrics-export-port``), where Prometheus scrapes them:

* ``ray_knowmap_requests_total{route, method, status}``: every answered request, by route template (``/v1/envs/
  {env_id}/facts``, never an env id), method and status;
* ``ray_knowmap_request_latency_s{route}``: a histogram of the time to answer, in seconds;
* ``ray_knowmap_batch_size{model}``: requests per batch of the embedder and reranker, and of retrieves
  (``retrieve``);
* ``ray_knowmap_kb_size{kb}``: experiential rows (current version) and env-KB actors alive, set at each ``/readyz``.

Metrics are created on first use in each replica process (Ray's metrics are not picklable).
"""

from __future__ import annotations

import functools
from typing import Any

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@functools.cache
def _metrics() -> dict[str, Any]:
    from ray.serve import metrics

    return {
        "requests": metrics.Counter("knowmap_requests", description="answered requests by route template, method and "
                                    "status", tag_keys=("route", "method", "status")),
        "latency": metrics.Histogram("knowmap_request_latency_s", description="seconds to answer, by route template",
                                     boundaries=LATENCY_BOUNDARIES, tag_keys=("route",)),
        "batch": metrics.Histogram("knowmap_batch_size", description="requests per model call", tag_keys=("model",),
                                   boundaries=BATCH_BOUNDARIES),
        "kb": metrics.Gauge("knowmap_kb_size", description="experiential rows (current version) and env-KB actors "
                            "alive", tag_keys=("kb",)),
    }


def record_request(route: str, method: str, status: int, seconds: float) -> None:
    """Count one answered request and its latency."""
    found = _metrics()
    found["requests"].inc(tags={"route": route, "method": method, "status": str(status)})
    found["latency"].observe(seconds, tags={"route": route})


def record_batch(model: str, size: int) -> None:
    """One batch of ``size`` requests (``model``: ``embedder``, ``reranker`` or ``retrieve``)."""
    _metrics()["batch"].observe(size, tags={"model": model})


def record_kb_size(kb: str, size: int) -> None:
    """The size of a KB (``experience`` rows, ``env_actors`` alive)."""
    _metrics()["kb"].set(size, tags={"kb": kb})
