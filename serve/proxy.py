"""A request-head timeout for Ray Serve's HTTP proxy, which has none.

Serve's proxy runs uvicorn, whose only connection timer is keep-alive, armed after a response: a client that
connects and sends nothing, or half a request head, holds its connection (and a file descriptor) for good, before
any application code or authentication can see it. :func:`install` adds the missing timer: a connection must
finish its request head within ``serve.header_timeout_s`` of connecting, or of starting a new request on a
kept-alive connection, or it is closed. Body and whole-request deadlines are the ingress's
(:class:`knowmap.serve.guard.Guard`); idle kept-alive connections close after ``serve.keep_alive_s`` (Serve's
``keep_alive_timeout_s``).

Serve calls :func:`install` in its proxy process when ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names it, which
must be in the environment of the Ray node when it starts: :func:`proxy_environment` gives the variables, and
:func:`knowmap.jobs.session.ray_session` sets them before it starts a local Ray. On a cluster, the nodes' start
commands set them (``cluster/README.md``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from knowmap.config import KnowMapConfig

CALLBACK = "knowmap.serve.proxy:install"
TIMEOUT_VARIABLE = "KNOWMAP_PROXY_HEADER_TIMEOUT_S"
logger = logging.getLogger("ray.serve")


def proxy_environment(config: KnowMapConfig) -> dict[str, str]:
    """The environment variables a Ray node needs for its Serve proxy to time out request heads."""
    return {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK,
            TIMEOUT_VARIABLE: str(config.serve.header_timeout_s)}


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
