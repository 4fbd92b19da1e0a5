"""Promises of the service checked once each, from outside, against a running service (issue 40, items 4-5):

* :func:`deletion`: after ``DELETE /v1/trajectories/{id}`` returns, a unique marker that only the deleted
  trajectory held is in no file under the data dir (and, if it is, how long until it is gone, up to 60 s);
* :func:`mcp_door`: anonymous ``initialize`` requests to the MCP server over streamable HTTP (in this process,
  in front of the service, as ``knowmap mcp --transport streamable-http`` runs it) open no session, while the
  service's own key opens one;
* :func:`hostile_ids`: ids that would leave their path segment (``../trajectories/x``) never reach a URL of the
  typed client, which every MCP tool calls, and a trajectory they aim at survives.

Imported as ``lib.service_probes``; ``benchmarks/service_robustness.py`` turns them into rows.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from lib.service import FIXTURES, free_port

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}}
HOSTILE_IDS = ["../trajectories/{decoy}", "..", ".", "a/../../trajectories/{decoy}", "%2e%2e%2ftrajectories%2f{decoy}",
               "{decoy}?x=1", "{decoy}#x", "{decoy}/", " {decoy}", "{decoy}\n", "\u2024\u2024/{decoy}", "x" * 129]


def occurrences(root: Path, needle: bytes) -> dict[str, int]:
    """How often ``needle`` occurs in each file under ``root`` (raw bytes); files without it left out."""
    found = {}
    for path in root.rglob("*"):
        try:
            if path.is_file() and (n := path.read_bytes().count(needle)):
                found[str(path.relative_to(root))] = n
        except (FileNotFoundError, PermissionError):  # removed while we looked (a segment compacted)
            continue
    return found


def deletion(url: str, key: str, data_dir: Path, settle_s: float = 60.0) -> dict[str, Any]:
    """Contribute a trajectory that holds a unique marker (its task description and one action), DELETE it, and
    count the marker's bytes in every file under ``data_dir`` right after the DELETE returns and, while any is
    left, once a second for up to ``settle_s``."""
    marker = f"robustmark{uuid.uuid4().hex}"
    trajectory = json.loads((FIXTURES / "trajectories" / "boil-0.json").read_text())
    trajectory["episode_id"] = episode = f"bench-forget-{marker[-8:]}"
    trajectory["task_description"] = f"Your task is to boil water ({marker})."
    trajectory["steps"][3]["action"] = f"look at {marker}"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    stored = requests.post(f"{url}/v1/trajectories", data=json.dumps({"trajectory": trajectory}), headers=headers,
                           timeout=600).status_code
    before = occurrences(data_dir, marker.encode())
    started = time.perf_counter()
    answer = requests.delete(f"{url}/v1/trajectories/{episode}", headers=headers, timeout=600)
    delete_s = time.perf_counter() - started
    after = right_after = occurrences(data_dir, marker.encode())
    waited = 0.0
    while after and waited < settle_s:
        time.sleep(1.0)
        waited = time.perf_counter() - started - delete_s
        after = occurrences(data_dir, marker.encode())
    return {"stored_status": stored, "delete_status": answer.status_code, "delete_s": delete_s,
            "deleted": answer.json().get("deleted") if answer.ok else answer.text[:200],
            "files_before": before, "right_after_delete": sum(right_after.values()),
            "files_right_after": right_after, "left_after_wait": sum(after.values()),
            "gone_after_s": (0.0 if not right_after else waited if not after else None),
            "data_dir_bytes": sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file())}


def mcp_door(url: str, key: str, attempts: int = 300) -> dict[str, Any]:
    """``attempts`` anonymous ``initialize`` requests (no key, an empty one, a wrong one, HTTP Basic), 16 at once,
    to the MCP server's streamable HTTP transport with its default session limits; then one with ``key``."""
    import uvicorn

    from knowmap.serve.mcp_tools import build_mcp_server, http_app, key_checker

    server = build_mcp_server(url)
    port = free_port()
    runner = uvicorn.Server(uvicorn.Config(http_app(server, key_checker(url)), host="127.0.0.1", port=port,
                                           log_level="warning", limit_concurrency=2000))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not runner.started and time.monotonic() < deadline:
        time.sleep(0.05)
    endpoint = f"http://127.0.0.1:{port}/mcp"
    base = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    anonymous = [{}, {"Authorization": "Bearer "}, {"Authorization": "Basic a2V5OjE="}]

    def initialize(i: int) -> str:
        auth = anonymous[i % 4] if i % 4 < 3 else {"Authorization": f"Bearer wrong-key-{i}"}
        try:
            return str(requests.post(endpoint, json=INIT, headers={**base, **auth}, timeout=30).status_code)
        except requests.RequestException as e:
            return type(e).__name__

    try:
        with ThreadPoolExecutor(16) as pool:
            statuses = Counter(pool.map(initialize, range(attempts)))
        opened = len(server.session_manager._server_instances)  # the SDK's own count of open sessions
        accepted = requests.post(endpoint, json=INIT, headers={**base, "Authorization": f"Bearer {key}"}, timeout=30)
        return {"attempts": attempts, "statuses": dict(statuses), "sessions_opened": opened,
                "accepted_key_status": accepted.status_code,
                "accepted_key_session": "mcp-session-id" in accepted.headers}
    finally:
        runner.should_exit = True
        thread.join(timeout=20)


def hostile_ids(url: str, key: str, decoy: str) -> dict[str, Any]:
    """Each of :data:`HOSTILE_IDS` (aimed at the trajectory ``decoy``) given to the typed client's
    ``delete_env`` and ``delete_trajectory``: how many calls sent a request, and whether ``decoy`` survived."""
    from knowmap.errors import InvalidEnvIdError, ServiceError
    from knowmap.serve.client import KnowMapClient

    client = KnowMapClient(url, key, timeout_s=120)
    assert decoy in {t.episode_id for t in client.trajectories()}, f"the decoy {decoy} is not stored"
    refused = sent = 0
    answers: Counter[str] = Counter()
    for template in HOSTILE_IDS:
        for call in (client.delete_env, client.delete_trajectory):
            try:
                call(template.format(decoy=decoy))
                sent += 1
                answers["200"] += 1
            except InvalidEnvIdError:
                refused += 1
            except ServiceError as e:  # sent, and the service answered an error
                sent += 1
                answers[str(e.status)] += 1
    survived = decoy in {t.episode_id for t in client.trajectories()}
    return {"calls": 2 * len(HOSTILE_IDS), "refused_before_sending": refused, "sent": sent,
            "answers": dict(answers), "decoy_survived": survived}
