"""Issue 40, items 5 and 6, against a running service without a reranker: `knowmap mcp` over streamable HTTP opens no
session without a key the service accepts and bounds its sessions; a hostile id, sent by a raw client, the typed
client or an MCP tool, never reaches another route; unknown fields of nested request objects are 422; X-Request-ID
is validated; the 409 of a missing reranker names no internal class; /readyz says the reranker is not deployed.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from knowmap.config import KnowMapConfig
from knowmap.errors import InvalidEnvIdError
from knowmap.serve.client import KnowMapClient
from tests.ports import free_port, wait_for_port

pytestmark = [pytest.mark.ray, pytest.mark.integration]
WRITER, READER, OTHER = "km-acme-write", "km-acme-read", "km-beta-write"
KEYS = [{"key": WRITER, "tenant": "acme", "role": "write"}, {"key": READER, "tenant": "acme", "role": "read"},
        {"key": OTHER, "tenant": "beta", "role": "write"}]
TRAJECTORY = {"episode_id": "victim", "task": "boil", "variation": 0, "split": "train", "steps": [
    {"step": 0, "action": "look around", "observation": "You are in the kitchen.", "score": 0},
    {"step": 1, "action": "open fridge", "observation": "The fridge is now open.", "score": 10}]}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
HOSTILE = ["../x", "..", ".", "%2e%2e/x", "x/../../y", "", "a" * 129, "x\x00y", "x y", "\u2024\u2024/x",
           "\uff0e\uff0e", "../trajectories/victim", "%2F", "acme@victim-env"]


@pytest.fixture(scope="module")
def service(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from ray import serve

    from knowmap.actors.experience import release_experience_kb
    from knowmap.serve.app import start_service

    data_dir = tmp_path_factory.mktemp("mcp-data")
    namespace = f"serve-test-{data_dir.name}"
    config = KnowMapConfig(data_dir=data_dir, ray={"namespace": namespace},
                           serve={"port": free_port(), "ingress_num_cpus": 0.5, "reranker_num_cpus": 0.25,
                                  "keys": KEYS})
    info = start_service(config, embedder="", reranker="")
    writer = KnowMapClient(info.url, WRITER)
    writer.add_observations("victim-env", [{"step": 0, "text": "You are in the kitchen. A fridge is here."}])
    writer.add_trajectory(TRAJECTORY)
    yield {"url": info.url, "config": config, "writer": writer}
    serve.shutdown()
    release_experience_kb(config)


def _request(service: dict, method: str, path: str, key: str = WRITER, **kw: object) -> requests.Response:
    return requests.request(method, service["url"] + path, timeout=60,
                            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}, **kw)


def _victims_intact(service: dict) -> bool:
    writer = service["writer"]
    return "victim" in [t.episode_id for t in writer.trajectories()] and "victim-env" in writer.envs()


def test_a_hostile_id_never_reaches_another_route(service: dict) -> None:
    writer: KnowMapClient = service["writer"]
    for hostile in HOSTILE:  # the typed client refuses before sending
        for call in (writer.delete_env, writer.delete_trajectory, writer.facts):
            with pytest.raises(InvalidEnvIdError):
                call(hostile)
    # Sent as they are (http.client does not resolve dot segments, as requests and browsers do before sending: that
    # is how `../trajectories/x` reached the trajectory route), quoted or not: none reaches the trajectory.
    raw = ["../trajectories/victim", "..%2Ftrajectories%2Fvictim", "%2e%2e/trajectories/victim",
           "x/../../trajectories/victim", "x%2F..%2F..%2Ftrajectories%2Fvictim", "%2E%2E%2Ftrajectories%2Fvictim",
           "..%5Ctrajectories%5Cvictim", "..;/trajectories/victim"]
    host, port = service["url"].removeprefix("http://").split(":")
    for path in raw:
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        connection.request("DELETE", "/v1/envs/" + path, headers={"Authorization": f"Bearer {WRITER}"})
        status = connection.getresponse().status
        connection.close()
        assert status in (404, 405, 422), (path, status)
    assert _victims_intact(service)


def test_unknown_fields_of_nested_request_objects_are_422(service: dict) -> None:
    cases = [("/v1/envs/victim-env/observations", {"observations": [{"step": 1, "text": "x", "lok": "y"}]},
              ["body", "observations", 0, "lok"]),
             ("/v1/envs/victim-env/facts", {"step": 1, "triples": [{"subject": "a", "relation": "location",
                                                                     "object": "b", "extra": 1}]},
              ["body", "triples", 0, "extra"]),
             ("/v1/trajectories", {"trajectory": {**TRAJECTORY, "episode_id": "typo", "steps": [
                 {**TRAJECTORY["steps"][0], "scroe": 1}]}}, ["body", "trajectory", "steps", 0, "scroe"])]
    for path, body, loc in cases:
        r = _request(service, "POST", path, data=json.dumps(body))
        assert r.status_code == 422 and r.json()["error"]["errors"][0]["loc"] == loc, r.text[:300]
    assert "typo" not in [t.episode_id for t in service["writer"].trajectories()]


def test_request_ids_are_validated_and_messages_name_no_internal_class(service: dict) -> None:
    hostile = "<script>" + "x" * 3000 + "</script>"
    r = requests.get(service["url"] + "/healthz", headers={"X-Request-ID": hostile}, timeout=30)
    echoed = r.headers.get("x-request-id", "")
    assert r.status_code == 200 and echoed and len(echoed) <= 128 and "<" not in echoed
    r = requests.get(service["url"] + "/healthz", headers={"X-Request-ID": "trace-42.a_b"}, timeout=30)
    assert r.headers.get("x-request-id") == "trace-42.a_b"
    r = _request(service, "POST", "/v1/rerank", data=json.dumps({"query": "q", "documents": ["d"]}))
    message = r.json()["error"]["message"]
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_reranker", r.text
    assert "without a reranker" in message and "knowmap." not in message and "Error" not in message, message


def test_readiness_reports_an_absent_reranker_as_not_deployed(service: dict) -> None:
    r = requests.get(service["url"] + "/readyz", timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "ready", r.text
    assert r.json()["checks"]["reranker"] == "not deployed"


def test_mcp_over_http_needs_an_accepted_key_and_bounds_sessions(service: dict, tmp_path: Path) -> None:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    knowmap = str(Path(sys.executable).with_name("knowmap"))
    server = subprocess.Popen([knowmap, "mcp", "--url", service["url"], "--data-dir", str(tmp_path), "--transport",
                               "streamable-http", "--port", str(port), "--sessions-per-key", "3",
                               "--max-sessions", "5", "--session-idle-s", "3"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def initialize(key: str | None) -> requests.Response:
        headers = {**MCP_HEADERS, **({"Authorization": f"Bearer {key}"} if key else {})}
        return requests.post(url, json=INIT, headers=headers, timeout=60)

    async def tool_calls(key: str) -> list[tuple[bool, str]]:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60) as http, Client(
                streamable_http_client(url, http_client=http), cache=None) as client:
            results = [await client.call_tool("delete_env", {"env_id": "../trajectories/victim"}),
                       await client.call_tool("delete_trajectory", {"episode_id": "%2e%2e/envs/victim-env"}),
                       await client.call_tool("add_observations", {"env_id": "victim-env", "observations": [
                           {"step": 2, "text": "x", "lok": "kitchen"}]})]
            return [(r.is_error, " ".join(getattr(c, "text", "") for c in r.content)) for r in results]

    try:
        wait_for_port(port)
        for key in (None, "km-not-a-key"):  # refused at initialize, the key judged by the service
            r = initialize(key)
            assert r.status_code == 401 and "mcp-session-id" not in r.headers, r.text
        # Sessions: at most 3 for one key, 5 in all; closed 3 s after their last request.
        opened = [initialize(WRITER) for _ in range(4)]
        assert [r.status_code for r in opened] == [200, 200, 200, 503]
        assert [initialize(k).status_code for k in (READER, READER, OTHER)] == [200, 200, 503]
        time.sleep(3 + 1.5)
        session = opened[0].headers["mcp-session-id"]
        ping = requests.post(url, json={"jsonrpc": "2.0", "id": 2, "method": "ping"}, timeout=60, headers={
            **MCP_HEADERS, "Authorization": f"Bearer {WRITER}", "Mcp-Session-Id": session,
            "Mcp-Protocol-Version": "2025-06-18"})
        assert ping.status_code == 404  # expired: the client initializes again
        # Every hostile id is refused as a tool error; the trajectory and the env KB are still there.
        (deleted_env, env_text), (deleted_episode, episode_text), (fed, fed_text) = asyncio.run(tool_calls(WRITER))
        assert deleted_env and "422: env_id '../trajectories/victim' is not an id" in env_text, env_text
        assert deleted_episode and "422: episode_id" in episode_text, episode_text
        assert fed and "lok" in fed_text, fed_text
        assert _victims_intact(service)
    finally:
        server.terminate()
        server.wait(timeout=30)
