"""Deadlines and shares at the service's door, without Ray: the Guard's whole-body deadline, per-key concurrency
limit, UTF-8 check and closing refusals (driven as ASGI, bytes fed at the pace a slow client would), and the
HAProxy config that Ray 2.60 renders, as :mod:`knowmap.serve.proxy` hardens it (checked by HAProxy itself)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request

from knowmap.config import KnowMapConfig
from knowmap.serve.auth import Grant, digest
from knowmap.serve.guard import Guard

KEYS = {"key-a": "acme", "key-b": "beta"}


@pytest.fixture(autouse=True)
def _no_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's metrics (the service's, counted per answer) take seconds to load and are not what these measure."""
    monkeypatch.setattr("knowmap.serve.guard.record_request", lambda *args: None)


def _app(**serve: Any) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    app.add_middleware(Guard)
    app.state.config = KnowMapConfig(serve=serve)
    app.state.grants = [Grant(digest=digest(k), tenant=t, role="write") for k, t in KEYS.items()]
    return app


def _scope(key: str = "key-a", headers: dict[str, str] | None = None) -> dict[str, Any]:
    raw = [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json")]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/echo", "raw_path": b"/echo", "query_string": b"", "headers": raw, "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 8000)}


async def _call(app: FastAPI, scope: dict[str, Any], receive: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Status, headers and JSON body of one request."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}, json.loads(body)


def _whole(body: bytes) -> Any:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _trickle(every_s: float) -> Any:
    """A body that never ends: one byte every ``every_s`` (never idle as long as an idle timer would allow)."""
    async def receive() -> dict[str, Any]:
        await asyncio.sleep(every_s)
        return {"type": "http.request", "body": b" ", "more_body": True}

    return receive


def test_a_body_trickling_in_is_cut_at_the_whole_body_deadline_with_408_and_close() -> None:
    app = _app(body_timeout_s=0.4)
    started = time.monotonic()
    status, headers, body = asyncio.run(_call(app, _scope(headers={"content-length": "100000"}), _trickle(0.05)))
    held = time.monotonic() - started
    assert status == 408 and body["error"]["code"] == "body_timeout" and headers["connection"] == "close"
    assert 0.4 <= held < 0.9, held  # each byte came 0.05 s after the last: an idle timer would never fire


def test_one_key_cannot_hold_more_than_its_share_and_the_others_keep_working() -> None:
    app = _app(max_ongoing_per_key=2, body_timeout_s=5)
    release = asyncio.Event()

    async def stalled() -> dict[str, Any]:
        await release.wait()
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def run() -> list[tuple[int, dict[str, str], dict[str, Any]]]:
        held = [asyncio.create_task(_call(app, _scope("key-a", {"content-length": "2"}), stalled))
                for _ in range(2)]
        await asyncio.sleep(0.05)
        refused = await _call(app, _scope("key-a", {"content-length": "2"}), _whole(b"{}"))
        other = await _call(app, _scope("key-b"), _whole(b"{}"))
        release.set()
        done = await asyncio.gather(*held)
        again = await _call(app, _scope("key-a"), _whole(b"{}"))  # its requests finished: its share is free
        return [refused, other, *done, again]

    (status, headers, body), *rest = asyncio.run(run())
    assert status == 429 and headers["retry-after"] == "1" and body["error"]["type"] == "rate_limited"
    assert headers["connection"] == "close"  # its body is never read
    assert [r[0] for r in rest] == [200, 200, 200, 200]


@pytest.mark.parametrize("body, content_type", [
    ('{"input": ["x"]}'.encode("utf-16"), "application/json"),  # with its byte-order mark
    ('{"input": ["x"]}'.encode("utf-16-le"), "application/json"),  # without one: NUL bytes
    ('{"input": ["x"]}'.encode("utf-32"), "application/json"),
    (b'\xef\xbb\xbf{"input": ["x"]}', "application/json"),  # UTF-8's byte-order mark
    (b'{"input": ["x"]}', "application/json; charset=utf-16"),
])
def test_bodies_other_than_utf8_are_refused_with_415(body: bytes, content_type: str) -> None:
    scope = _scope()
    scope["headers"] = [h for h in scope["headers"] if h[0] != b"content-type"]
    scope["headers"].append((b"content-type", content_type.encode()))
    status, _, answer = asyncio.run(_call(_app(), scope, _whole(body)))
    assert status == 415 and answer["error"]["code"] == "utf8_required" and "UTF-8" in answer["error"]["message"]


def test_utf8_bodies_pass_and_refusals_with_unread_bodies_close_the_connection() -> None:
    app = _app(max_body_bytes=1024)
    scope = _scope(headers={"content-type": "application/json; charset=UTF-8"})
    assert asyncio.run(_call(app, scope, _whole('{"input": ["żółw ☃"]}'.encode())))[:1] == (200,)
    declared = asyncio.run(_call(app, _scope(headers={"content-length": str(1 << 28)}), _whole(b"")))
    assert declared[0] == 413 and declared[1]["connection"] == "close"

    async def endless() -> dict[str, Any]:  # chunked: no length declared
        return {"type": "http.request", "body": b"x" * 512, "more_body": True}

    streamed = asyncio.run(_call(app, _scope(headers={"transfer-encoding": "chunked"}), endless))
    assert streamed[0] == 413 and streamed[1]["connection"] == "close"
    unauthorized = asyncio.run(_call(app, _scope("wrong"), _whole(b"")))
    assert unauthorized[0] == 401 and "connection" not in unauthorized[1]  # nothing left unread: keep it alive


def _ray_haproxy_config(tmp_path: Path) -> str:
    """The config Ray 2.60 writes for HAProxy (its own template and code, no backends yet)."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    cfg = HAProxyConfig(http_options=HTTPOptions(host="0.0.0.0", port=8123), socket_path=str(tmp_path / "admin.sock"),
                        server_state_base=str(tmp_path), server_state_file=str(tmp_path / "state"),
                        metrics_socket_path=str(tmp_path / "metrics.sock"))
    HAProxyApi(cfg=cfg, config_file_path=str(tmp_path / "haproxy.cfg"))._generate_config_file_internal()
    return (tmp_path / "haproxy.cfg").read_text()


def test_rays_haproxy_config_gets_a_head_deadline_a_private_socket_and_local_stats(tmp_path: Path) -> None:
    from knowmap.serve.proxy import harden_haproxy_config, real_haproxy

    original = _ray_haproxy_config(tmp_path)
    hardened = harden_haproxy_config(original, 2.5)
    assert harden_haproxy_config(hardened, 2.5) == hardened  # idempotent
    lines = [line.strip() for line in hardened.splitlines()]
    defaults = lines[lines.index("defaults"):]
    assert "timeout http-request 2500ms" in defaults[:defaults.index("frontend prometheus")]
    assert any(line.startswith("stats socket") and " mode 600 level admin" in line for line in lines)
    stats, metrics = os.environ["RAY_SERVE_HAPROXY_STATS_PORT"], os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"]
    assert f"bind 127.0.0.1:{metrics}" in lines and f"bind 127.0.0.1:{stats}" in lines  # the suite's (conftest)
    assert "bind *:8123" in lines  # the port clients use keeps the configured host
    config = tmp_path / "hardened.cfg"
    config.write_text(hardened)
    check = subprocess.run([real_haproxy(), "-c", "-f", str(config)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "Configuration file is valid" in check.stdout, check.stderr
    with pytest.raises(ValueError, match="listen stats"):  # a template that changed stops HAProxy, loudly
        harden_haproxy_config(original.replace("listen stats", "listen statistics"), 2.5)


def test_ray_is_pointed_at_the_wrapper_that_runs_the_hardened_haproxy(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from knowmap.serve.proxy import TIMEOUT_VARIABLE, proxy_environment

    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    env = proxy_environment(KnowMapConfig(serve={"header_timeout_s": 3, "max_connections": 5000, "drain_s": 1}))
    assert env["RAY_SERVE_HAPROXY_MAXCONN"] == "5000" and env[TIMEOUT_VARIABLE] == "3.0"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "1.0"  # every stop of an ingress waits it out
    assert (env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"]) == ("8404", "9101")
    wrapper = Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"])
    config = tmp_path / "haproxy.cfg"
    config.write_text(_ray_haproxy_config(tmp_path))
    # Ray runs `<binary> -db -f <config> ...`; `-c` makes the real HAProxy only check the config it was given
    run = subprocess.run([str(wrapper), "-c", "-f", str(config)], capture_output=True, text=True, timeout=60,
                         env={**env, "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert "timeout http-request 3000ms" in config.read_text()
    config.write_text("global\n    maxconn 10\n")  # not Ray's: HAProxy must not start
    run = subprocess.run([str(wrapper), "-c", "-f", str(config)], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 1 and "not starting HAProxy" in run.stderr
    assert proxy_environment(KnowMapConfig(serve={"frontend": "serve-proxy"})).get(
        "RAY_SERVE_HAPROXY_BINARY_PATH") is None


def test_haproxy_ports_are_settings_and_a_busy_one_is_refused_before_ray_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import ray

    from knowmap.errors import ConfigError
    from knowmap.jobs.session import ray_session
    from knowmap.serve.proxy import check_ports_free, proxy_environment
    from tests.ports import free_port

    with socket.socket() as held:  # another service's HAProxy, listening on what this config asks for
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy, free = held.getsockname()[1], free_port()
        config = KnowMapConfig(serve={"haproxy_stats_port": free, "haproxy_metrics_port": busy})
        env = proxy_environment(config)
        assert (env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"]) == (str(free), str(busy))
        with pytest.raises(ConfigError, match=f"serve.haproxy_metrics_port {busy} is in use.*"
                                              "KNOWMAP_SERVE__HAPROXY_METRICS_PORT"):
            check_ports_free(config)
        monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `knowmap serve` process
        monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started although a port was taken"))
        with pytest.raises(ConfigError, match="haproxy_metrics_port"), ray_session(config, serving=True):
            pass
        check_ports_free(config.model_copy(update={"serve": config.serve.model_copy(
            update={"frontend": "serve-proxy"})}))  # no HAProxy, no ports of its own
    check_ports_free(config)  # free again once the other service is gone
    with pytest.raises(ValueError, match="must differ"):
        KnowMapConfig(serve={"haproxy_stats_port": 9000, "haproxy_metrics_port": 9000})
