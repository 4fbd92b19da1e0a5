"""What takes the service's HTTP connections, set up through the Ray node's environment.

Two frontends (``serve.frontend``):

* ``haproxy`` (default): Ray Serve's high-throughput mode (``RAY_SERVE_ENABLE_HA_PROXY``,
  ``RAY_SERVE_THROUGHPUT_OPTIMIZED``): HAProxy, written in C, takes connections on ``serve.host:serve.port`` on
  every node and forwards each request over HTTP to an ingress replica, which serves it with its own uvicorn (no
  Python proxy actor, no actor call per request). Measured on 2 cores, HAProxy costs 0.1-0.2 core-ms a
  request (benchmarks/results/serve_latency.json), and the replica's request path got cheaper too
  (docs/service-and-api.md, "Measured").
  HAProxy cuts a client that sends nothing for longer than
  :func:`client_timeout` (head or body; 31 s by default). HAProxy also serves its statistics on port
  ``RAY_SERVE_HAPROXY_STATS_PORT`` (8404) and Prometheus metrics on ``RAY_SERVE_HAPROXY_METRICS_PORT`` (9101) of
  every interface: close them at the firewall where clients are untrusted.
* ``serve-proxy``: Serve's Python proxy actor (uvicorn), which hands each request to a replica as an actor call.

uvicorn (the Python proxy's, and the replicas' own in the HAProxy mode) has no request-head timer, only a
keep-alive one: a client that connects and sends nothing, or half a request head, holds its connection (and a
file descriptor) for good, before any application code or authentication can see it. :func:`install` adds the
missing timer: a connection must finish its request head within ``serve.header_timeout_s`` of connecting, or of
starting a new request on a kept-alive connection, or it is closed. Body and whole-request deadlines are the
ingress's (:class:`knowmap.serve.guard.Guard`); idle kept-alive connections close after ``serve.keep_alive_s``
(Serve's ``keep_alive_timeout_s``).

Serve calls :func:`install` where it starts a uvicorn server when ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
names it. All these variables must be in the environment of the Ray node when it starts: :func:`proxy_environment`
gives them, and :func:`knowmap.jobs.session.ray_session` sets them before it starts a local Ray. On a cluster, the
nodes' start commands set them (``cluster/README.md``).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from knowmap.config import KnowMapConfig

CALLBACK = "knowmap.serve.proxy:install"
TIMEOUT_VARIABLE = "KNOWMAP_PROXY_HEADER_TIMEOUT_S"
logger = logging.getLogger("ray.serve")


def proxy_environment(config: KnowMapConfig) -> dict[str, str]:
    """The environment variables a Ray node needs for the configured frontend (``serve.frontend``) and for every
    uvicorn server of Serve's to time out request heads."""
    env = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK, TIMEOUT_VARIABLE: str(config.serve.header_timeout_s)}
    haproxy = config.serve.frontend == "haproxy"
    env.update({"RAY_SERVE_ENABLE_HA_PROXY": str(int(haproxy)), "RAY_SERVE_THROUGHPUT_OPTIMIZED": str(int(haproxy))})
    if haproxy:
        # The throughput mode would also run handle routers on the caller's event loop, which leaves a handle
        # unusable from plain threads (the retrieval backend's worker threads call the reranker, the CLI waits
        # for swaps): keep routers on their own loop, Serve's default.
        env.update({"RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": str(client_timeout(config)),
                    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"})
    return env


def client_timeout(config: KnowMapConfig) -> int:
    """HAProxy's ``timeout client``: how long a client may send nothing, head or body. HAProxy has no separate
    head timer that Ray lets us set, so it is one second past both ``serve.header_timeout_s`` and
    ``serve.body_timeout_s``: a stalled body still gets the ingress's JSON 408 first."""
    return math.ceil(max(config.serve.header_timeout_s, config.serve.body_timeout_s)) + 1


def install() -> list[Any]:
    """Serve's proxy callback: arm a request-head timer on every HTTP connection. Returns no middlewares."""
    timeout = float(os.environ.get(TIMEOUT_VARIABLE, "10"))
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # uvicorn falls back to h11, whose parser this does not patch
        logger.warning("httptools is not installed: the proxy has no request-head timeout")
        return []
    if getattr(HttpToolsProtocol, "_knowmap_head_timeout", None) is not None:
        HttpToolsProtocol._knowmap_head_timeout = timeout
        return []
    made, begin, complete, lost = (HttpToolsProtocol.connection_made, HttpToolsProtocol.on_message_begin,
                                   HttpToolsProtocol.on_headers_complete, HttpToolsProtocol.connection_lost)

    def arm(self: Any) -> None:
        if getattr(self, "_knowmap_head_timer", None) is None:
            self._knowmap_head_timer = self.loop.call_later(HttpToolsProtocol._knowmap_head_timeout, expire, self)

    def disarm(self: Any) -> None:
        timer = getattr(self, "_knowmap_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._knowmap_head_timer = None

    def expire(self: Any) -> None:
        self._knowmap_head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self: Any, transport: Any) -> None:
        made(self, transport)
        arm(self)

    def on_message_begin(self: Any) -> None:
        begin(self)
        arm(self)

    def on_headers_complete(self: Any) -> None:
        disarm(self)
        complete(self)

    def connection_lost(self: Any, exc: Exception | None) -> None:
        disarm(self)
        lost(self, exc)

    HttpToolsProtocol._knowmap_head_timeout = timeout
    HttpToolsProtocol.connection_made = connection_made
    HttpToolsProtocol.on_message_begin = on_message_begin
    HttpToolsProtocol.on_headers_complete = on_headers_complete
    HttpToolsProtocol.connection_lost = connection_lost
    logger.info("request heads time out after %s s", timeout)
    return []
