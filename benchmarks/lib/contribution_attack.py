"""One tenant's maximum-size contributions against another tenant's small writes and reads (issue 40, item 3).

:func:`contribution_attack` runs against a service that is already running (a URL and two tenants' write keys):
tenant B (the attacker) sends ``parallel`` maximum-size trajectories at once (``serve.max_trajectory_steps`` steps
whose score rises at every step, observations filling the body up to ``serve.max_body_bytes``), and sends again
as each is answered (after ``Retry-After`` when refused), while tenant A (the innocent one) times its own small
contributions and ``/v1/retrieve`` requests. The baseline is measured first, in the same run: A's retrieves and
small contributions with nothing else running. Imported as ``lib.contribution_attack``.

    from lib.contribution_attack import contribution_attack
    row = contribution_attack(url, innocent_key, attacker_key, max_steps=cfg.max_trajectory_steps,
                              max_body_bytes=cfg.max_body_bytes, max_text_chars=cfg.max_text_chars)
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import requests

QUERIES = ["heat the water", "where is the thermometer", "focus on the substance", "boil water on the stove"]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class _Tenant:
    """One tenant's key, with a session per thread."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url.rstrip("/"), key
        self._local = threading.local()

    def post(self, path: str, body: Any, timeout: float) -> requests.Response:
        session = getattr(self._local, "session", None) or requests.Session()
        self._local.session = session
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return session.post(self.url + path, data=data, timeout=timeout,
                            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})

    def delete(self, path: str, timeout: float) -> requests.Response:
        return requests.delete(self.url + path, timeout=timeout, headers={"Authorization": f"Bearer {self.key}"})


def max_size_body(episode_id: str, steps: int, max_body_bytes: int, max_text_chars: int) -> bytes:
    """A contribution of ``steps`` steps, a sub-goal at every one, whose JSON fills about 90% of the body limit."""
    budget = max_body_bytes * 0.9 / steps - 120
    chars = int(min(max_text_chars, max(64, budget)))
    body = {"trajectory": {"episode_id": episode_id, "task": "boil", "variation": 0, "split": "train", "steps": [
        {"step": i, "action": f"look at the thing number {i}", "score": round(100 * i / steps, 3),
         "observation": (f"You see the thing number {i}. " * 400)[:chars]} for i in range(steps)]}}
    return json.dumps(body).encode()


def _small(episode_id: str) -> dict[str, Any]:
    return {"trajectory": {"episode_id": episode_id, "task": "boil", "variation": 0, "split": "train", "steps": [
        {"step": 0, "action": "look around", "observation": "You are in the kitchen.", "score": 0.0},
        {"step": 1, "action": "open the fridge", "observation": "The fridge is now open.", "score": 5.0}]}}


def contribution_attack(url: str, innocent_key: str, attacker_key: str, *, parallel: int = 8, max_steps: int = 2000,
                        max_body_bytes: int = 4 << 20, max_text_chars: int = 8192, steady_n: int = 30,
                        small_n: int = 5, window_s: float = 60.0, lead_s: float = 3.0, timeout_s: float = 600.0,
                        run_id: str | None = None,
                        alongside: contextlib.AbstractContextManager[Any] | None = None) -> dict[str, Any]:
    """Time tenant A's small contributions and retrieves, alone and while tenant B sends ``parallel`` maximum-size
    contributions at once (and again as each is answered).

    Args:
        url: the service's base URL.
        innocent_key, attacker_key: write keys of two different tenants (A, B).
        parallel: B's contributions in flight at once.
        max_steps, max_body_bytes, max_text_chars: the service's ``serve`` limits, for B's bodies.
        steady_n: A's retrieves in the baseline; small_n: A's 2-step contributions, in the baseline and during.
        window_s: during the attack, A retrieves for this long (and at least until its contributions are done).
        lead_s: how long B's first bodies go ahead before A starts measuring (they are read, parsed, segmented).
        timeout_s: a client's timeout per request.
        run_id: makes episode ids unique across runs against one service (default: the time).
        alongside: more attacks, entered when B's starts (after the baseline) and left when B's has ended, so A
            is timed under all of them at once (e.g. :class:`lib.slow_clients.SlowClients`).

    Returns:
        ``steady_*`` and ``attack_*`` latencies of A (ms: retrieve p50/p99, each small contribution), A's failures
        (any answer but 200, or a client timeout), the ratio ``attack_retrieve_p99 / steady_retrieve_p50``, and B's
        answers by status with its 429s' Retry-After values and its stored contributions' seconds.
    """
    run = run_id or str(int(time.time()))
    a, b = _Tenant(url, innocent_key), _Tenant(url, attacker_key)

    def retrieve(i: int) -> tuple[bool, float]:
        t0 = time.perf_counter()
        try:
            ok = a.post("/v1/retrieve", {"query": QUERIES[i % len(QUERIES)], "kbs": ["experience"], "k": 5},
                        timeout_s).status_code == 200
        except requests.RequestException:
            ok = False
        return ok, (time.perf_counter() - t0) * 1000

    def contribute_small(name: str) -> tuple[bool, float, int]:
        t0 = time.perf_counter()
        try:
            status = a.post("/v1/trajectories", _small(name), timeout_s).status_code
        except requests.RequestException:
            status = 0
        return status == 200, (time.perf_counter() - t0) * 1000, status

    for i in range(3):  # warm-up
        retrieve(i)
    steady = [retrieve(i) for i in range(steady_n)]
    steady_small = [contribute_small(f"steady-{run}-{i}") for i in range(small_n)]

    stop = threading.Event()
    answers: Counter[int] = Counter()
    retry_after: list[int] = []
    stored_s: list[float] = []
    lock = threading.Lock()
    bodies = [max_size_body(f"attack-{run}-{t}", max_steps, max_body_bytes, max_text_chars) for t in range(parallel)]

    def attack(t: int) -> None:
        sent = 0
        while not stop.is_set():
            body = bodies[t].replace(f"attack-{run}-{t}".encode(), f"attack-{run}-{t}-{sent}".encode(), 1)
            sent += 1
            t0 = time.perf_counter()
            try:
                r = b.post("/v1/trajectories", body, timeout_s)
                status, wait = r.status_code, float(r.headers.get("Retry-After", 0) or 0)
            except requests.RequestException:
                status, wait = 0, 0.0
            with lock:
                answers[status] += 1
                if status == 429:
                    retry_after.append(int(wait))
                elif status == 200:
                    stored_s.append(time.perf_counter() - t0)
            stop.wait(wait)

    started = time.perf_counter()
    with alongside or contextlib.nullcontext(), ThreadPoolExecutor(parallel) as pool:
        attackers = [pool.submit(attack, t) for t in range(parallel)]
        time.sleep(lead_s)
        during_small: list[tuple[bool, float, int]] = []
        small = threading.Thread(target=lambda: during_small.extend(
            contribute_small(f"during-{run}-{i}") for i in range(small_n)))
        small.start()
        during, i = [], 0
        while small.is_alive() or time.perf_counter() - started < lead_s + window_s:
            during.append(retrieve(i))
            i += 1
        small.join()
        stop.set()
        for future in attackers:
            future.result()

    steady_ms = [ms for ok, ms in steady if ok]
    during_ms = [ms for ok, ms in during if ok]
    steady_p50 = _pct(steady_ms, 50)
    failed = sum(not ok for ok, _ in during) + sum(not ok for ok, _, _ in during_small)
    return {
        "parallel": parallel, "attack_body_bytes": len(bodies[0]), "attack_steps": max_steps,
        "steady_retrieve_p50_ms": steady_p50, "steady_retrieve_p99_ms": _pct(steady_ms, 99),
        "steady_small_contribution_ms": [round(ms, 1) for _, ms, _ in steady_small],
        "steady_failed": sum(not ok for ok, _ in steady) + sum(not ok for ok, _, _ in steady_small),
        "attack_retrieve_p50_ms": _pct(during_ms, 50), "attack_retrieve_p99_ms": _pct(during_ms, 99),
        "attack_retrieves": len(during),
        "attack_small_contribution_ms": [round(ms, 1) for _, ms, _ in during_small],
        "attack_small_contribution_statuses": [status for _, _, status in during_small],
        "innocent_failed": failed,
        "retrieve_p99_over_steady_p50": _pct(during_ms, 99) / steady_p50 if steady_p50 else float("nan"),
        "attacker_answers": {str(k): v for k, v in sorted(answers.items())},
        "attacker_retry_after_s": sorted(set(retry_after)),
        "attacker_stored_s": [round(s, 1) for s in stored_s],
        "seconds": time.perf_counter() - started,
    }
