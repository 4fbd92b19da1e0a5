"""Slow clients, as an attacker would send them, measured against the service's head and body deadlines.

Each attack is a coroutine over raw sockets (asyncio, so one process holds thousands of connections; raise
``ulimit -n`` above the number of sockets) and returns what it measured:

* :func:`slow_header`: connections that send a request head one byte every ``every_s`` (no key needed);
* :func:`send_nothing`: connections that connect and send nothing;
* :func:`half_header`: connections that send half a request head at once, then nothing;
* :func:`slow_body`: requests with a whole head and key that declare a body and send it one byte every
  ``every_s``.

Each result holds ``connections`` (opened), ``held_peak`` (open at once), ``still_open`` (open ``deadline_s``
+ 1 s after their own start), ``closed_within_1s`` (closed no later than 1 s past their deadline; a connection
the server closed before its deadline counts too), ``close_after_deadline_s`` (p50/p99/max of the closing time
minus the deadline, negative when closed earlier), ``statuses`` (the HTTP status each got, ``none`` when closed
without an answer) and, when an :class:`InnocentProbe` runs beside it, ``innocent`` (requests, failures, latency
percentiles). :class:`SlowClients` keeps :func:`slow_header` and :func:`slow_body` up, round after round, in a
process of its own while other measurements run. Imported as ``lib.slow_clients``;
``benchmarks/service_robustness.py`` turns them into rows (:mod:`lib.attack_rows`).
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from typing import Any
from urllib.parse import urlparse

import numpy as np
import requests

SETTLE_S = 1.0  # the goal: closed within 1 s of the deadline


class InnocentProbe:
    """Normal requests, one after another on a thread, while an attack runs: ``GET /healthz`` and an
    authenticated ``POST /v1/embeddings``, each with ``timeout_s``; a failure is a timeout, a refused connection
    or any status other than 200."""

    def __init__(self, url: str, key: str, timeout_s: float = 30.0, pause_s: float = 0.2) -> None:
        self.url, self.key, self.timeout_s, self.pause_s = url, key, timeout_s, pause_s
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> InnocentProbe:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 5)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        body = json.dumps({"input": ["You are in the kitchen. In it, you see: a stove."]})
        while not self._stop.is_set():
            for method, path, data in (("GET", "/healthz", None), ("POST", "/v1/embeddings", body)):
                started = time.monotonic()
                try:  # a new connection each time: what a new client meets at the door
                    r = requests.request(method, self.url + path, data=data, headers=headers, timeout=self.timeout_s)
                    if r.status_code != 200:
                        self.failures.append(f"{path}: {r.status_code}")
                    else:
                        self.latencies.append(time.monotonic() - started)
                except requests.RequestException as e:
                    self.failures.append(f"{path}: {type(e).__name__}")
            self._stop.wait(self.pause_s)

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies)
        return {"requests": len(self.latencies) + len(self.failures), "failures": len(self.failures),
                "failure_kinds": dict(collections.Counter(self.failures)),
                "p50_s": float(np.percentile(lat, 50)) if lat.size else None,
                "p99_s": float(np.percentile(lat, 99)) if lat.size else None,
                "max_s": float(lat.max()) if lat.size else None}


def _address(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 80


async def _one(host: str, port: int, first: bytes, trickle: bytes, every_s: float, give_up_s: float,
               opened: asyncio.Semaphore, record: dict[str, Any]) -> None:
    """One connection: ``first`` at once, then ``trickle`` a byte every ``every_s``, until the server closes it
    (or ``give_up_s``). Fills ``record``: start (after connecting), end (when closed), status."""
    try:
        async with opened:  # connect in bounded waves: a SYN flood of our own would measure the kernel, not the server
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
    except (OSError, TimeoutError) as e:
        record["error"] = type(e).__name__
        return
    record["start"] = time.monotonic()
    answer = bytearray()

    async def feed() -> None:
        try:
            if first:
                writer.write(first)
                await writer.drain()
            for i in range(len(trickle)):
                await asyncio.sleep(every_s)
                writer.write(trickle[i:i + 1])
                await writer.drain()
            await asyncio.sleep(give_up_s)
        except (OSError, ConnectionError):
            pass  # the server closed it: what we measure

    sender = asyncio.create_task(feed())
    try:
        async with asyncio.timeout(give_up_s):
            while chunk := await reader.read(65536):
                answer += chunk
    except (OSError, ConnectionError, TimeoutError):
        pass
    record["end"] = time.monotonic()
    sender.cancel()
    writer.close()
    head = bytes(answer[:32]).split(b" ")
    record["status"] = head[1].decode() if len(head) > 1 and answer.startswith(b"HTTP/") else "none"


async def _attack_records(url: str, connections: int, first: bytes, trickle: bytes, every_s: float,
                          deadline_s: float, wave: int = 500) -> tuple[list[dict[str, Any]], int]:
    """One round of ``connections`` at once: each connection's record (:func:`_one`) and how many were open at
    once at most."""
    host, port = _address(url)
    records: list[dict[str, Any]] = [{} for _ in range(connections)]
    give_up_s = deadline_s + 30  # past it, a connection counts as held for good
    opened = asyncio.Semaphore(wave)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, sum(1 for r in records if "start" in r and "end" not in r))
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(_one(host, port, first, trickle, every_s, give_up_s, opened, r) for r in records))
    watcher.cancel()
    return records, peak


def _summary(records: list[dict[str, Any]], deadline_s: float, peak: int) -> dict[str, Any]:
    done = [r for r in records if "start" in r]
    lag = np.asarray([r["end"] - r["start"] - deadline_s for r in done])
    return {"connections": len(done), "connect_errors": dict(collections.Counter(r["error"] for r in records
                                                                                 if "error" in r)),
            "deadline_s": deadline_s, "held_peak": peak,
            "still_open": int((lag > SETTLE_S).sum()), "closed_within_1s": int((lag <= SETTLE_S).sum()),
            "close_after_deadline_s": {"p50": float(np.percentile(lag, 50)), "p99": float(np.percentile(lag, 99)),
                                       "max": float(lag.max())} if lag.size else None,
            "statuses": dict(collections.Counter(r["status"] for r in done))}


async def _attack(url: str, connections: int, first: bytes, trickle: bytes, every_s: float, deadline_s: float,
                  wave: int = 500) -> dict[str, Any]:
    records, peak = await _attack_records(url, connections, first, trickle, every_s, deadline_s, wave)
    return _summary(records, deadline_s, peak)


def _head(path: str = "/healthz", method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: knowmap\r\nUser-Agent: slow-client\r\n{extra}\r\n".encode()


def _slow_header_bytes() -> tuple[bytes, bytes]:
    head = _head(extra="X-Slow: " + "a" * 64 + "\r\n")
    return head[:1], head[1:]


def _slow_body_bytes(key: str, content_length: int) -> tuple[bytes, bytes]:
    head = _head("/v1/embeddings", "POST", f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {content_length}\r\n")
    trickle = b'{"input": ["' + b"a" * 1000
    return head + trickle[:1], trickle[1:]


async def slow_header(url: str, connections: int, deadline_s: float, every_s: float = 10.0) -> dict[str, Any]:
    """``connections`` request heads sent one byte every ``every_s`` (no key; a head never finished in time).
    Returns the measurements of the module docstring, with ``attack``."""
    first, trickle = _slow_header_bytes()
    return {"attack": "slow_header", "every_s": every_s, **await _attack(url, connections, first, trickle, every_s,
                                                                         deadline_s)}


async def send_nothing(url: str, connections: int, deadline_s: float) -> dict[str, Any]:
    """``connections`` that connect and send nothing."""
    return {"attack": "send_nothing", **await _attack(url, connections, b"", b"", 1.0, deadline_s)}


async def half_header(url: str, connections: int, deadline_s: float) -> dict[str, Any]:
    """``connections`` that send half a request head at once, then nothing."""
    head = _head("/v1/embeddings", "POST")
    return {"attack": "half_header", **await _attack(url, connections, head[:len(head) // 2], b"", 1.0,
                                                     deadline_s)}


async def slow_body(url: str, key: str, requests_: int, deadline_s: float, every_s: float = 8.0,
                    content_length: int = 100_000) -> dict[str, Any]:
    """``requests_`` ``POST /v1/embeddings`` with a whole head and ``key``, declaring ``content_length`` bytes and
    sending one every ``every_s``. ``statuses`` says how many got 408 at the deadline and how many 429 at once
    (the key's share of a replica, ``serve.max_ongoing_per_key``)."""
    first, trickle = _slow_body_bytes(key, content_length)
    result = await _attack(url, requests_, first, trickle, every_s, deadline_s)
    return {"attack": "slow_body", "every_s": every_s, "content_length": content_length, **result}


async def together(*attacks: Any) -> list[dict[str, Any]]:
    """Run attacks (coroutines) at the same time; their results in order."""
    return list(await asyncio.gather(*attacks))


class SlowClients:
    """:func:`slow_header` and :func:`slow_body` kept up while the ``with`` block runs: each attack starts a new
    round of its connections as soon as the server has closed the last round's (a server that closes them at
    its deadline meets them again at once, as it would a real attacker), until the block ends; the round in
    flight then finishes. They run in a process of their own, so the attacker's event loop does not share an
    interpreter (and its lock) with the innocent client the benchmark times.

    After the block, :attr:`results` holds ``{"slow_header": ..., "slow_body": ...}``: the measurements of the
    module docstring over every round's connections, with ``rounds``.

    Args:
        url: the service.
        key: the key of the slow bodies.
        headers, bodies: connections per round of each attack (0: that attack is not run).
        head_deadline_s, body_deadline_s: the deadlines the connections are measured against.
        header_every_s, body_every_s: a byte every this long.
    """

    def __init__(self, url: str, key: str, *, headers: int, bodies: int, head_deadline_s: float,
                 body_deadline_s: float, header_every_s: float = 10.0, body_every_s: float = 8.0,
                 content_length: int = 100_000) -> None:
        self.plan = {"url": url, "key": key, "headers": headers, "bodies": bodies, "head_deadline_s": head_deadline_s,
                     "body_deadline_s": body_deadline_s, "header_every_s": header_every_s,
                     "body_every_s": body_every_s, "content_length": content_length}
        self.results: dict[str, Any] = {}

    def __enter__(self) -> SlowClients:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # not fork: this process runs threads and Ray's client
        self._stop, self._queue, ready = context.Event(), context.Queue(), context.Event()
        self._process = context.Process(target=_keep_up, args=(self.plan, self._stop, self._queue, ready),
                                        daemon=True)
        self._process.start()
        if not ready.wait(120):  # a spawned interpreter imports this program again: seconds on a busy machine
            raise RuntimeError("the slow clients' process did not start within 120 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        wait_s = max(self.plan["head_deadline_s"], self.plan["body_deadline_s"]) + 120  # the last round, and a start
        self.results = self._queue.get(timeout=wait_s)
        self._process.join(timeout=30)


def _keep_up(plan: dict[str, Any], stop: Any, queue: Any, ready: Any) -> None:
    """:class:`SlowClients`' process: rounds of each attack until ``stop``, then their summaries on ``queue``."""
    async def rounds(count: int, first: bytes, trickle: bytes, every_s: float, deadline_s: float) -> dict[str, Any]:
        records: list[dict[str, Any]] = []
        peak = n = 0
        while count and (n == 0 or not stop.is_set()):
            found, most = await _attack_records(plan["url"], count, first, trickle, every_s, deadline_s)
            records += found
            peak, n = max(peak, most), n + 1
        return {"rounds": n, "every_s": every_s, **_summary(records, deadline_s, peak)}

    async def both() -> dict[str, Any]:
        header = rounds(plan["headers"], *_slow_header_bytes(), plan["header_every_s"], plan["head_deadline_s"])
        body = rounds(plan["bodies"], *_slow_body_bytes(plan["key"], plan["content_length"]), plan["body_every_s"],
                      plan["body_deadline_s"])
        found = await asyncio.gather(header, body)
        return {"slow_header": {"attack": "slow_header", **found[0]},
                "slow_body": {"attack": "slow_body", "content_length": plan["content_length"], **found[1]}}

    ready.set()
    queue.put(asyncio.run(both()))
