"""The MCP server's streamable HTTP transport (the SDK's session manager behind :class:`KeyGate`) over real HTTP on
a local port: no session without an accepted key, sessions bounded per key and in all, bound to the key that opened
them, and closed after ``idle_s`` without a request (issue 40: the SDK's defaults let anonymous clients open 10,000
sessions that lived 30 minutes). Which keys the service accepts is a set here: the check against the real service
is tests/serve/test_service.py's MCP test."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import uvicorn

from knowmap.serve.mcp_tools import SessionLimits, build_mcp_server, http_app

GOOD = {f"key-{i}" for i in range(30)}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


class Running:
    def __init__(self, limits: SessionLimits) -> None:
        self.server = build_mcp_server("http://127.0.0.1:1")  # tools are not called here
        self.checked: list[str] = []

        def accepted(key: str) -> bool:
            self.checked.append(key)
            return key in GOOD

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/mcp"
        config = uvicorn.Config(http_app(self.server, accepted, limits), host="127.0.0.1", port=port,
                                log_level="warning", limit_concurrency=2000)
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.uvicorn.started and time.monotonic() < deadline:
            time.sleep(0.05)

    def open_sessions(self) -> int:
        return len(self.server.session_manager._server_instances)  # the SDK's own count

    def initialize(self, key: str | None) -> requests.Response:
        headers = {**HEADERS, **({"Authorization": f"Bearer {key}"} if key is not None else {})}
        return requests.post(self.url, json=INIT, headers=headers, timeout=30)

    def ping(self, key: str, session: str) -> requests.Response:
        headers = {**HEADERS, "Authorization": f"Bearer {key}", "Mcp-Session-Id": session,
                   "Mcp-Protocol-Version": "2025-06-18"}
        return requests.post(self.url, json={"jsonrpc": "2.0", "id": 2, "method": "ping"}, headers=headers,
                             timeout=30)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture
def running(request: pytest.FixtureRequest) -> Iterator[Running]:
    server = Running(getattr(request, "param", SessionLimits()))
    yield server
    server.stop()


def test_no_session_opens_without_an_accepted_key(running: Running) -> None:
    for key in (None, "", "wrong-key"):
        r = running.initialize(key)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "mcp-session-id" not in r.headers
    basic = requests.post(running.url, json=INIT, headers={**HEADERS, "Authorization": "Basic a2V5LTE6"}, timeout=30)
    assert basic.status_code == 401
    assert running.checked == ["wrong-key"]  # a request without a bearer key never reaches the service
    with ThreadPoolExecutor(16) as pool:  # an anonymous flood opens nothing
        statuses = list(pool.map(lambda i: running.initialize(None if i % 2 else f"nobody-{i}").status_code,
                                 range(300)))
    assert set(statuses) == {401} and running.open_sessions() == 0


def test_a_session_answers_only_the_key_that_opened_it(running: Running) -> None:
    r = running.initialize("key-1")
    assert r.status_code == 200
    session = r.headers["mcp-session-id"]
    assert running.ping("key-1", session).status_code == 200
    assert running.ping("key-2", session).status_code == 404  # another key: as if the session did not exist
    assert running.ping("key-1", session).status_code == 200
    assert running.checked == ["key-1"]  # a session's own requests and a trusted key do not ask again


@pytest.mark.parametrize("running", [SessionLimits()], indirect=True)
def test_the_defaults_hold_at_most_100_sessions_and_10_per_key(running: Running) -> None:
    one = [running.initialize("key-0").status_code for _ in range(12)]
    assert one == [200] * 10 + [503] * 2  # one key: at most sessions_per_key
    with ThreadPoolExecutor(16) as pool:  # 29 more keys x 8 = 232 asked; 90 places left
        statuses = list(pool.map(lambda i: running.initialize(f"key-{1 + i % 29}").status_code, range(29 * 8)))
    assert statuses.count(200) == 90 and set(statuses) == {200, 503}
    assert running.open_sessions() == 100


@pytest.mark.parametrize("running", [SessionLimits(idle_s=1.0, sessions_per_key=3)], indirect=True)
def test_idle_sessions_close_and_free_their_place(running: Running) -> None:
    sessions = [running.initialize("key-1").headers["mcp-session-id"] for _ in range(3)]
    assert running.initialize("key-1").status_code == 503 and running.open_sessions() == 3
    started = time.monotonic()
    while running.open_sessions() and time.monotonic() - started < 10:
        time.sleep(0.05)
    closed_after = time.monotonic() - started
    assert running.open_sessions() == 0 and closed_after < 2.0, closed_after  # idle_s 1 s: closed within 1 s of it
    assert all(running.ping("key-1", s).status_code == 404 for s in sessions)  # the client initializes again
    assert running.initialize("key-1").status_code == 200


def test_limits_are_validated() -> None:
    for bad in ({"max_sessions": 0}, {"idle_s": 0}, {"sessions_per_key": -1}, {"key_check_ttl_s": -1}):
        with pytest.raises(ValueError):
            SessionLimits(**bad)  # type: ignore[arg-type]


