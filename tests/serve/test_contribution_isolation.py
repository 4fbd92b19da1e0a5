"""One tenant's large contributions never hold up another tenant's writes or anyone's reads (issue 40, item 3), over
real HTTP against a running service whose write queue allows 2 writes per tenant
(``serve.contribution_queue_per_tenant``): tenant beta's large contributions run one at a time, a third and fourth
are answered 429 with Retry-After at once, tenant acme's small contribution and its retrieves are answered while
beta's run, and a write that cannot begin before ``serve.contribution_timeout_s`` is answered 504 and leaves nothing
stored.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from knowmap.config import KnowMapConfig
from tests.ports import free_port

pytestmark = [pytest.mark.ray, pytest.mark.integration]
ACME, BETA = "km-acme-write", "km-beta-write"
KEYS = [{"key": ACME, "tenant": "acme", "role": "write"}, {"key": BETA, "tenant": "beta", "role": "write"}]
LARGE_STEPS = 1_200  # the score rises at every step: 1,199 sub-goals to segment and embed


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    import ray
    from ray import serve

    from knowmap.actors.experience import release_experience_kb
    from knowmap.serve.app import start_service

    data_dir = tmp_path_factory.mktemp("contribution-data")
    namespace = f"serve-test-{data_dir.name}"
    config = KnowMapConfig(data_dir=data_dir, ray={"namespace": namespace},
                           serve={"port": free_port(), "ingress_num_cpus": 0.5, "reranker_num_cpus": 0.25,
                                  "contribution_queue_per_tenant": 2, "contribution_timeout_s": 8,
                                  "keys": KEYS})
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, namespace=namespace)
    info = start_service(config, embedder="", reranker="")
    yield {"url": info.url, "config": config}
    serve.shutdown()
    release_experience_kb(config)


def _post(service: dict, path: str, body: object, key: str, timeout: float = 300) -> requests.Response:
    return requests.post(service["url"] + path, data=json.dumps(body), timeout=timeout,
                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def _trajectory(episode: str, steps: int) -> dict:
    return {"trajectory": {"episode_id": episode, "task": "boil", "variation": 0, "split": "train", "steps": [
        {"step": i, "action": f"look at the thing {i}", "observation": f"You see the thing {i} on the table.",
         "score": i / steps} for i in range(steps)]}}


def test_a_tenants_large_contributions_do_not_hold_up_another_tenants_write_or_reads(service: dict) -> None:
    assert _post(service, "/v1/trajectories", _trajectory("warm-up", 3), ACME).status_code == 200
    timings: dict[str, tuple[float, float, requests.Response]] = {}

    def contribute(name: str, key: str, steps: int) -> None:
        t0 = time.perf_counter()
        r = _post(service, "/v1/trajectories", _trajectory(name, steps), key)
        timings[name] = (t0, time.perf_counter(), r)

    with ThreadPoolExecutor(4) as pool:
        for i in range(4):
            pool.submit(contribute, f"beta-large-{i}", BETA, LARGE_STEPS)
        time.sleep(1.0)  # beta's first is being segmented or embedded now
        retrieves = []
        acme = threading.Thread(target=contribute, args=("acme-small", ACME, 2))
        acme.start()
        while acme.is_alive() or len(retrieves) < 3:
            t0 = time.perf_counter()
            r = _post(service, "/v1/retrieve", {"query": "look at the thing", "kbs": ["experience"], "k": 2}, ACME)
            retrieves.append((r.status_code, time.perf_counter() - t0))
        acme.join()
    statuses = {name: r.status_code for name, (_, _, r) in timings.items()}
    refused = [timings[n][2] for n, s in statuses.items() if s == 429]
    stored = sorted((end, n) for n, (_, end, r) in timings.items() if n.startswith("beta") and r.status_code == 200)
    assert stored, timings
    summary = {n: (s, round(timings[n][1] - timings[n][0], 2)) for n, s in statuses.items()}
    assert len(refused) == 2, summary  # two per tenant: the third and fourth are refused, not queued
    assert all(int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "write_queue_full"
               for r in refused)
    assert statuses["acme-small"] == 200, summary
    acme_started, acme_done, _ = timings["acme-small"]
    assert acme_done < stored[0][0], summary  # done before beta's first large one, though it came after it
    assert acme_done - acme_started < 10, summary
    assert all(status == 200 for status, _ in retrieves) and max(s for _, s in retrieves) < 10, retrieves
    # Beta's second waited for its first; past serve.contribution_timeout_s it was answered 504 unless the first
    # ended in time: either way, only what was answered 200 is stored.
    for name, status in statuses.items():
        assert status in (200, 429, 504), summary
        stored_as = f"{name.split('-')[0]}@{name}"  # the tenant's scoped episode id
        assert service["config"].paths.trajectory(stored_as).exists() == (status == 200), (name, summary)


def test_a_write_that_cannot_begin_before_its_deadline_is_504_and_stores_nothing(service: dict) -> None:
    timings: dict[str, requests.Response] = {}

    def contribute(name: str, steps: int) -> None:
        timings[name] = _post(service, "/v1/trajectories", _trajectory(name, steps), BETA)

    first = threading.Thread(target=contribute, args=("beta-slow", 2_000))
    first.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    contribute("beta-behind", 2)  # behind beta-slow in beta's lane
    waited = time.perf_counter() - t0
    first.join()
    if timings["beta-slow"].status_code == 200 and timings["beta-behind"].status_code == 200:
        pytest.skip(f"beta-slow ended within serve.contribution_timeout_s on this machine ({waited:.1f} s)")
    behind = timings["beta-behind"]
    assert behind.status_code == 504 and behind.json()["error"]["code"] == "contribution_timeout", behind.text
    assert waited < service["config"].serve.contribution_timeout_s + 3
    paths = service["config"].paths
    assert not paths.trajectory("beta@beta-behind").exists()
    listed = requests.get(service["url"] + "/v1/trajectories", timeout=30,
                          headers={"Authorization": f"Bearer {BETA}"}).json()["trajectories"]
    assert "beta-behind" not in [t["episode_id"] for t in listed]
