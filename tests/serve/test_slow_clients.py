"""Slow clients against the real service (its default frontend, HAProxy, with the head deadline of tests/conftest:
2 s; the body deadline of tests/serve/conftest: 2 s): a head and a body that trickle in are cut at their
deadlines, not kept alive by each byte, while a normal request is answered. The numbers at scale (5,000 slow heads,
200 slow bodies) are the benchmark's: ``benchmarks/lib/slow_clients.py``."""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlparse

import pytest
import requests

pytestmark = [pytest.mark.ray, pytest.mark.integration]
HEAD_S = BODY_S = 2.0  # tests/conftest.py (header_timeout_s), tests/serve/conftest.py (body_timeout_s)


def _trickle(url: str, first: bytes, then: bytes, every_s: float, out: dict) -> None:
    """Send ``first``, then ``then`` a byte every ``every_s``; how long until the server closed, and its answer."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=60) as sock:
        started, answer = time.monotonic(), b""
        sock.sendall(first)
        sock.settimeout(every_s)
        for i in range(len(then)):
            try:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
            except TimeoutError:
                try:
                    sock.sendall(then[i:i + 1])
                except OSError:
                    break
            except OSError:
                break
        sock.settimeout(10)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
        out.update(seconds=time.monotonic() - started, answer=answer)


def test_a_trickling_head_and_body_are_cut_at_their_deadlines_while_others_are_served(service: dict) -> None:
    url = service["url"]
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100 + b"\r\n\r\n"
    body_head = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\nAuthorization: Bearer " + service["key"].encode() + b"\r\n\r\n")
    slow_head, slow_body = {}, {}
    threads = [threading.Thread(target=_trickle, args=(url, head[:1], head[1:], 0.25, slow_head)),
               threading.Thread(target=_trickle, args=(url, body_head + b'{"input": ["', b"a" * 200, 0.25,
                                                       slow_body))]
    for t in threads:
        t.start()
    time.sleep(0.5)
    normal = requests.post(url + "/v1/embeddings", json={"input": ["a red apple"]}, timeout=30,
                           headers={"Authorization": f"Bearer {service['other_key']}"})
    for t in threads:
        t.join(timeout=60)
    assert normal.status_code == 200 and len(normal.json()["data"]) == 1
    # Each would have gone on for 25 s or more at a byte every 0.25 s: no idle timer ever fires on them
    assert slow_head["seconds"] < HEAD_S + 2 and slow_head["answer"].startswith(b"HTTP/1.1 408"), slow_head
    assert slow_body["seconds"] < BODY_S + 2 and slow_body["answer"].startswith(b"HTTP/1.1 408"), slow_body
    assert b'"code":"body_timeout"' in slow_body["answer"]


def test_one_key_gets_429_past_its_share_and_utf16_bodies_get_415(service: dict) -> None:
    url, share = service["url"], service["config"].serve.max_ongoing_per_key
    parsed = urlparse(url)
    head = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
            b"Authorization: Bearer " + service["key"].encode() + b"\r\n\r\n")
    held = [socket.create_connection((parsed.hostname, parsed.port), timeout=30) for _ in range(share)]
    try:
        for sock in held:  # each holds one of the key's requests: the body never comes (until the 2 s deadline)
            sock.sendall(head)
        time.sleep(0.5)
        auth = {"Authorization": f"Bearer {service['key']}"}
        refused = requests.post(url + "/v1/embeddings", json={"input": ["x"]}, headers=auth, timeout=30)
        other = requests.post(url + "/v1/embeddings", json={"input": ["x"]}, timeout=30,
                              headers={"Authorization": f"Bearer {service['other_key']}"})
    finally:
        for sock in held:
            sock.close()
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1", refused.text
    assert refused.json()["error"]["code"] == "too_many_requests" and other.status_code == 200
    # The other key: the held requests keep the first key's share until the server sees them go (at worst the
    # body deadline), so a request on that key right after the close may still, rightly, be 429
    utf16 = requests.post(url + "/v1/embeddings", data='{"input": ["x"]}'.encode("utf-16"), timeout=30,
                          headers={"Authorization": f"Bearer {service['other_key']}",
                                   "Content-Type": "application/json"})
    assert utf16.status_code == 415 and utf16.json()["error"]["code"] == "utf8_required"
