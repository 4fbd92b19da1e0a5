"""Retrieval service latency and throughput: HTTP through Ray Serve against the same pipeline in-process.

Six measurements, each against a baseline taken in the same run (absolute times on a shared machine are noise):

1. ``/v1/retrieve`` p50/p99 over HTTP (the typed client, one request at a time) against the same pipeline called
   in-process: the monolith's pipeline (``monolith_service.pipeline``: its own embedder, hybrid as configured, the
   default tenant's filter) in this process, on the same KB actors. Goal: HTTP p50 <= 1.25 x in-process p50.
2. ``/v1/embeddings`` throughput (one short text per request, 16 concurrent clients) with ``@serve.batch``
   (``serve.max_batch_size``) against the same service with batching off (``max_batch_size`` 1). Goal >= 2x.
3. ``/v1/retrieve`` p99 while the embedder is hot-swapped to a model of other weights (re-index + in-place
   reconfigure) against steady state, same load (2 concurrent clients). Goal: p99 during <= 2 x steady, 0 failures.
4. Steady ``/v1/retrieve`` tails at 2 and 8 concurrent clients. Goal: p99 <= 2 x p50.
5. Against what a user would write instead (``benchmarks/monolith_service.py``: the same pipeline in one
   FastAPI/uvicorn process with torch on every core, its default, on the same KB actors): p50 at concurrency 1
   (goal: Serve <= 1.25 x the monolith) and retrieve throughput at concurrency 16 (goal: Serve >= 1.5 x the
   monolith).
6. The same two against Serve scaled out on the same cores: two ingress replicas of one model thread each (no goal
   of its own; what a replica count buys here).

Serve runs as configured by default: HAProxy in front of the ingress (``serve.frontend``), retrieves batched across
concurrent requests. Everything runs on 127.0.0.1 in a local Ray (data in a temporary directory); loops are bounded
by request counts.
Prints a table and writes ``benchmarks/results/serve_latency.json`` (``metric``, ``value``, ``goal``, ``details``).

    .venv/bin/python benchmarks/serve_latency.py [--requests 200] [--throughput-requests 40] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import ray  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from lib.results import Check, write_result  # noqa: E402
from lib.service import FIXTURES, free_port, local_service, pct  # noqa: E402
from monolith_service import pipeline  # noqa: E402
from ray import serve  # noqa: E402

from knowmap.config import KnowMapConfig  # noqa: E402
from knowmap.models.embedder import default_embedder_path  # noqa: E402
from knowmap.models.retrieval import Retriever  # noqa: E402
from knowmap.serve.app import APP_NAME, ServeAppArgs, build_app, public_config, swap_models  # noqa: E402
from knowmap.serve.auth import Grant, digest  # noqa: E402
from knowmap.serve.client import KnowMapClient  # noqa: E402
from knowmap.tenancy import DEPLOYMENT_VIEW  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "serve_latency.json"
ENV_ID = "bench-boil-0"
QUERIES = ["focus on the water", "heat the water on the stove", "where is the metal pot", "boil water",
           "move the pot to the stove", "activate the stove", "what is in the kitchen", "use the thermometer"]
GOALS = {"retrieve_p50_ratio": 1.25, "batching_throughput_ratio": 2.0, "swap_p99_ratio": 2.0,
         "monolith_p50_ratio": 1.25, "monolith_throughput_ratio": 1.5, "tail_ratio": 2.0}


def second_embedder(root: Path) -> str:
    """The packaged MiniLM with different weights (every parameter perturbed by 1% of its mean magnitude, seeded):
    a swap loads and re-embeds with a model of its own, as after a retrain."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(default_embedder_path(), device="cpu", local_files_only=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(noise * 0.01 * parameter.abs().mean())
    target = root / "minilm_b"
    model.save(str(target))
    return str(target)


@contextlib.contextmanager
def monolith(config: KnowMapConfig, key: str) -> Iterator[str]:
    """``benchmarks/monolith_service.py`` on a free port, on this Ray cluster's KB actors; yields its URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("monolith_service.py")), "--port", str(port),
         "--address", ray.get_runtime_context().gcs_address, "--namespace", config.ray.namespace,
         "--config-json", config.model_dump_json(), "--key", key])
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(1)
        else:
            raise RuntimeError("the monolith did not answer within 180 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=60)


def populate(client: KnowMapClient) -> None:
    records = json.loads((FIXTURES / "observations.json").read_text())["records"]
    observations = [{k: r[k] for k in ("step", "action", "text", "look", "inventory")} for r in records
                    if r["task"] == "boil" and r["variation"] == 0]
    client.add_observations(ENV_ID, observations)
    for path in sorted((FIXTURES / "trajectories").glob("*.json")):
        trajectory = json.loads(path.read_text())
        trajectory["episode_id"] = "bench-" + trajectory["episode_id"]
        client.add_trajectory(trajectory)


def interleaved(first: Any, second: Any, n: int) -> tuple[list[float], list[float]]:
    """Latencies (ms) of ``n`` calls of each, alternating (so both sides see the same load on a shared machine),
    after 5 warm-up calls of each."""
    for i in range(5):
        first(i)
        second(i)
    a, b = [], []
    for i in range(n):
        for fn, out in ((first, a), (second, b)) if i % 2 == 0 else ((second, b), (first, a)):
            start = time.perf_counter()
            fn(i)
            out.append((time.perf_counter() - start) * 1000)
    return a, b


def in_process_retriever(config: KnowMapConfig) -> Retriever:
    """The same pipeline without HTTP or Serve: the monolith's (:func:`monolith_service.pipeline`), in this
    process; retrieve with ``where=DEPLOYMENT_VIEW``, the service's filter for its default tenant."""
    return pipeline(config)[0]


def embed_one(client: KnowMapClient, i: int) -> None:
    client.embed([f"{QUERIES[i % len(QUERIES)]} #{i}"])


def retrieve_one(client: KnowMapClient, i: int) -> None:
    client.retrieve(QUERIES[i % len(QUERIES)], env_id=ENV_ID, k=5)


def throughput(client_factory: Any, requests_per_client: int, concurrency: int = 16,
               call: Any = embed_one, stats: bool = True) -> dict[str, float]:
    """Requests/s with ``concurrency`` clients, each sending ``requests_per_client`` requests ``call(client, i)``
    (default: one-text embeddings); ``stats``: with the embedder's batch statistics (one ingress replica)."""
    clients = [client_factory() for _ in range(concurrency)]
    for c in clients:
        call(c, 0)
    barrier = threading.Barrier(concurrency)

    def run(i: int) -> int:
        barrier.wait()
        for j in range(requests_per_client):
            call(clients[i], i * requests_per_client + j)
        return requests_per_client

    try:
        return timed_load(run, concurrency, stats)
    finally:
        for c in clients:
            c.close()


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) every process on this machine has used, by a short name of its command line."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {"ServeReplica:knowmap:Ingress": "serve ingress", "ProxyActor": "serve proxy", "bin/haproxy": "haproxy",
             "ExperienceKBActor": "experiential-KB actor", "EnvKBActor": "env-KB actor",
             "monolith_service.py": "monolith", "serve_latency.py": "load generator"}
    used: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        name = next((short for key, short in names.items() if key in command), "other (Ray, Milvus Lite, ...)")
        used[name] = used.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return used


def timed_load(run: Any, concurrency: int, stats: bool = True) -> dict[str, float]:
    """Run ``run(i)`` on ``concurrency`` threads; requests/s and (``stats``) the embedder's batch statistics
    meanwhile."""
    handle = serve.get_deployment_handle("Ingress", app_name=APP_NAME)
    before = handle.info.remote().result()["stats"] if stats else {}
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        total = sum(pool.map(run, range(concurrency)))
    seconds = time.perf_counter() - start
    cpu_after = cpu_seconds()
    after = handle.info.remote().result()["stats"] if stats else {}
    cpu_ms = {name: round(1000 * (used - cpu_before.get(name, 0.0)) / total, 1) for name, used in cpu_after.items()}
    return {"requests": total, "seconds": seconds, "requests_per_s": total / seconds,
            "cpu_ms_per_request": {k: v for k, v in sorted(cpu_ms.items(), key=lambda kv: -kv[1]) if v > 0},
            **(batch_stats(before, after) if stats else {})}


def batch_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean requests per embedding batch and per retrieve batch, and the time the embedder spent in the model."""
    delta = {k: after[k] - before[k] for k in before}
    return {"mean_batch_requests": delta["requests"] / max(delta["batches"], 1),
            "mean_retrieve_batch_requests": delta["retrieve_requests"] / max(delta["retrieve_batches"], 1),
            "model_seconds": delta["model_seconds"]}


def load_during(client_factory: Any, action: Any, clients: int = 2, min_requests: int = 100) -> dict[str, Any]:
    """Retrieve latencies (ms) from ``clients`` concurrent loops while ``action()`` runs (at least
    ``min_requests`` in all, and until it has returned); failures are counted, not raised."""
    latencies: list[float] = []
    failures: list[str] = []
    done = threading.Event()
    lock = threading.Lock()

    def loop(i: int) -> None:
        with client_factory() as c:
            j = 0
            while not done.is_set() or len(latencies) < min_requests:
                start = time.perf_counter()
                try:
                    c.retrieve(QUERIES[(i + j) % len(QUERIES)], env_id=ENV_ID, k=5)
                    with lock:
                        latencies.append((time.perf_counter() - start) * 1000)
                except Exception as e:  # noqa: BLE001 - every failed request counts
                    failures.append(repr(e))
                j += 1
                if len(latencies) > 20 * min_requests:  # bounded even if action() hangs
                    break

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    result = action()
    action_s = time.perf_counter() - start
    done.set()
    for t in threads:
        t.join(timeout=300)
    return {"latencies": latencies, "failures": failures, "action_s": action_s, "result": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="timed retrieve requests per side")
    parser.add_argument("--throughput-requests", type=int, default=40, help="embedding requests per client")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    with local_service("serve-bench") as (config, info):
        tmp = config.data_dir.parent
        client = KnowMapClient(info.url, info.api_key)
        populate(client)

        def new_client() -> KnowMapClient:
            return KnowMapClient(info.url, info.api_key)

        # 1. retrieve over HTTP vs in-process
        retriever = in_process_retriever(config)
        local, http = interleaved(
            lambda i: retriever.retrieve(QUERIES[i % len(QUERIES)], env_id=ENV_ID, k=5, where=DEPLOYMENT_VIEW),
            lambda i: client.retrieve(QUERIES[i % len(QUERIES)], env_id=ENV_ID, k=5), args.requests)
        retrieve = {"in_process_p50_ms": pct(local, 50), "in_process_p99_ms": pct(local, 99),
                    "http_p50_ms": pct(http, 50), "http_p99_ms": pct(http, 99), "requests": args.requests}
        retrieve["ratio"] = retrieve["http_p50_ms"] / retrieve["in_process_p50_ms"]

        # 2. embeddings throughput at concurrency 16, batching on vs off (the same service, redeployed)
        batched = throughput(new_client, args.throughput_requests)
        unbatched_config = config.model_copy(deep=True)
        unbatched_config.serve.max_batch_size = 1
        keys = [Grant(digest=digest(info.api_key))]
        serve.run(build_app(ServeAppArgs(config=public_config(unbatched_config), grants=keys)),
                  name=APP_NAME, route_prefix="/")
        unbatched = throughput(new_client, args.throughput_requests)
        serve.run(build_app(ServeAppArgs(config=public_config(config), grants=keys)),
                  name=APP_NAME, route_prefix="/")
        batching = {"batched": batched, "unbatched": unbatched, "max_batch_size": config.serve.max_batch_size,
                    "concurrency": 16, "ratio": batched["requests_per_s"] / unbatched["requests_per_s"]}

        # 3. p99 during a hot swap vs steady, same load
        steady = load_during(new_client, lambda: time.sleep(8.0))
        embedder_b = second_embedder(tmp)
        swap = load_during(new_client, lambda: swap_models(config, embedder=embedder_b))
        swap_stats = {"steady_p50_ms": pct(steady["latencies"], 50), "steady_p99_ms": pct(steady["latencies"], 99),
                      "swap_p50_ms": pct(swap["latencies"], 50), "swap_p99_ms": pct(swap["latencies"], 99),
                      "steady_requests": len(steady["latencies"]), "swap_requests": len(swap["latencies"]),
                      "failed_requests": len(steady["failures"]) + len(swap["failures"]),
                      "failures": (steady["failures"] + swap["failures"])[:5], "swap_seconds": swap["action_s"],
                      "reindexed_rows": swap["result"]["index"]["copied"]}
        swap_stats["ratio"] = swap_stats["swap_p99_ms"] / swap_stats["steady_p99_ms"]

        # 4. steady tails at 2 and 8 concurrent clients (on the swapped-in model, as a service runs after a retrain)
        tails = {}
        for clients in (2, 8):
            run = load_during(new_client, lambda: time.sleep(0), clients=clients, min_requests=25 * clients)
            tails[clients] = {"p50_ms": pct(run["latencies"], 50), "p99_ms": pct(run["latencies"], 99),
                              "requests": len(run["latencies"]), "failed": len(run["failures"])}
            tails[clients]["ratio"] = tails[clients]["p99_ms"] / tails[clients]["p50_ms"]

        # 5. the same pipeline behind one plain FastAPI/uvicorn process, what a user would run instead
        with monolith(config, info.api_key) as url:
            mono = KnowMapClient(url, info.api_key)
            alone, served = interleaved(lambda i: retrieve_one(mono, i), lambda i: retrieve_one(client, i),
                                        args.requests)
            mono_load = throughput(lambda: KnowMapClient(url, info.api_key), args.throughput_requests // 2,
                                   call=retrieve_one)
            serve_load = throughput(new_client, args.throughput_requests // 2, call=retrieve_one)

            # 6. Serve scaled out on the same two cores: two ingress replicas of one model thread each
            scaled_config = config.model_copy(deep=True)
            scaled_config.serve.ingress_replicas, scaled_config.serve.model_threads = 2, 1
            serve.run(build_app(ServeAppArgs(config=public_config(scaled_config), embedder=embedder_b, grants=keys)),
                      name=APP_NAME, route_prefix="/")
            scaled_alone, scaled_served = interleaved(lambda i: retrieve_one(mono, i),
                                                      lambda i: retrieve_one(client, i), args.requests // 2)
            scaled_mono = throughput(lambda: KnowMapClient(url, info.api_key), args.throughput_requests // 2,
                                     call=retrieve_one, stats=False)
            scaled_load = throughput(new_client, args.throughput_requests // 2, call=retrieve_one, stats=False)
            mono.close()
        scaled = {"ingress_replicas": 2, "model_threads": 1, "monolith_p50_ms": pct(scaled_alone, 50),
                  "serve_p50_ms": pct(scaled_served, 50), "monolith_requests_per_s_16": scaled_mono["requests_per_s"],
                  "serve_requests_per_s_16": scaled_load["requests_per_s"]}
        scaled["p50_ratio"] = scaled["serve_p50_ms"] / scaled["monolith_p50_ms"]
        scaled["throughput_ratio"] = scaled["serve_requests_per_s_16"] / scaled["monolith_requests_per_s_16"]
        versus = {"monolith_p50_ms": pct(alone, 50), "monolith_p99_ms": pct(alone, 99),
                  "serve_p50_ms": pct(served, 50), "serve_p99_ms": pct(served, 99),
                  "monolith_requests_per_s_16": mono_load["requests_per_s"],
                  "serve_requests_per_s_16": serve_load["requests_per_s"],
                  "serve_mean_batch_requests_16": serve_load["mean_retrieve_batch_requests"],
                  "monolith_cpu_ms_per_request_16": mono_load["cpu_ms_per_request"],
                  "serve_cpu_ms_per_request_16": serve_load["cpu_ms_per_request"]}
        versus["p50_ratio"] = versus["serve_p50_ms"] / versus["monolith_p50_ms"]
        versus["throughput_ratio"] = versus["serve_requests_per_s_16"] / versus["monolith_requests_per_s_16"]
        client.close()

    checks = [
        Check("retrieve_p50_ratio", value=retrieve["ratio"], goal=GOALS["retrieve_p50_ratio"], direction="<=",
              baseline=retrieve["in_process_p50_ms"], result=retrieve["http_p50_ms"]),
        Check("batching_throughput_ratio", value=batching["ratio"], goal=GOALS["batching_throughput_ratio"],
              baseline=unbatched["requests_per_s"], result=batched["requests_per_s"]),
        Check("swap_p99_ratio", value=swap_stats["ratio"], goal=GOALS["swap_p99_ratio"], direction="<=",
              baseline=swap_stats["steady_p99_ms"], result=swap_stats["swap_p99_ms"],
              conditions={"0 failures": swap_stats["failed_requests"] == 0}),
        Check("monolith_p50_ratio", value=versus["p50_ratio"], goal=GOALS["monolith_p50_ratio"], direction="<=",
              baseline=versus["monolith_p50_ms"], result=versus["serve_p50_ms"]),
        Check("monolith_throughput_ratio", value=versus["throughput_ratio"], goal=GOALS["monolith_throughput_ratio"],
              baseline=versus["monolith_requests_per_s_16"], result=versus["serve_requests_per_s_16"]),
        *(Check(f"tail_ratio_c{c}", value=t["ratio"], goal=GOALS["tail_ratio"], direction="<=", baseline=t["p50_ms"],
                result=t["p99_ms"], conditions={"0 failures": not t["failed"]}) for c, t in tails.items()),
    ]
    print(f"\n{'measurement':<44}{'baseline':>12}{'result':>12}{'ratio':>9}  goal")
    print(f"{'retrieve p50 ms (in-process -> HTTP)':<44}{retrieve['in_process_p50_ms']:>12.1f}"
          f"{retrieve['http_p50_ms']:>12.1f}{retrieve['ratio']:>9.2f}  <= 1.25")
    print(f"{'retrieve p99 ms (in-process -> HTTP)':<44}{retrieve['in_process_p99_ms']:>12.1f}"
          f"{retrieve['http_p99_ms']:>12.1f}{retrieve['http_p99_ms'] / retrieve['in_process_p99_ms']:>9.2f}")
    print(f"{'embeddings req/s at 16 (unbatched -> batched)':<44}{unbatched['requests_per_s']:>12.1f}"
          f"{batched['requests_per_s']:>12.1f}{batching['ratio']:>9.2f}  >= 2.0")
    print(f"mean requests per embedder batch: {unbatched['mean_batch_requests']:.1f} -> "
          f"{batched['mean_batch_requests']:.1f}; time inside the model per HTTP request: "
          f"{1000 * unbatched['model_seconds'] / unbatched['requests']:.1f} -> "
          f"{1000 * batched['model_seconds'] / batched['requests']:.1f} ms, of "
          f"{1000 * unbatched['seconds'] / unbatched['requests'] * 16:.0f} -> "
          f"{1000 * batched['seconds'] / batched['requests'] * 16:.0f} ms per request end to end")
    print(f"{'retrieve p99 ms (steady -> during swap)':<44}{swap_stats['steady_p99_ms']:>12.1f}"
          f"{swap_stats['swap_p99_ms']:>12.1f}{swap_stats['ratio']:>9.2f}  <= 2.0")
    print(f"failed requests during the swap: {swap_stats['failed_requests']} of "
          f"{swap_stats['swap_requests'] + swap_stats['failed_requests']} "
          f"(swap took {swap_stats['swap_seconds']:.1f} s, "
          f"{swap_stats['reindexed_rows']} rows re-embedded)")
    print(f"{'retrieve p50 ms at 1 (monolith -> Serve)':<44}{versus['monolith_p50_ms']:>12.1f}"
          f"{versus['serve_p50_ms']:>12.1f}{versus['p50_ratio']:>9.2f}  <= 1.25")
    print(f"{'retrieve req/s at 16 (monolith -> Serve)':<44}{versus['monolith_requests_per_s_16']:>12.1f}"
          f"{versus['serve_requests_per_s_16']:>12.1f}{versus['throughput_ratio']:>9.2f}  >= 1.5")
    print(f"{'  2 replicas x 1 thread: p50 at 1':<44}{scaled['monolith_p50_ms']:>12.1f}"
          f"{scaled['serve_p50_ms']:>12.1f}{scaled['p50_ratio']:>9.2f}")
    print(f"{'  2 replicas x 1 thread: req/s at 16':<44}{scaled['monolith_requests_per_s_16']:>12.1f}"
          f"{scaled['serve_requests_per_s_16']:>12.1f}{scaled['throughput_ratio']:>9.2f}")
    for side in ("monolith", "serve"):
        spent = versus[f"{side}_cpu_ms_per_request_16"]
        print(f"  CPU ms per request at 16, {side}: {sum(spent.values()):.1f} = "
              + ", ".join(f"{name} {ms}" for name, ms in spent.items()))
    for c, t in tails.items():
        print(f"{f'retrieve p50 -> p99 ms at {c} clients':<44}{t['p50_ms']:>12.1f}{t['p99_ms']:>12.1f}"
              f"{t['ratio']:>9.2f}  <= 2.0")
    result = {"metric": "retrieve_p50_ratio_http_vs_in_process", "value": retrieve["ratio"],
              "goal": GOALS["retrieve_p50_ratio"],
              "details": {"checks": checks, "retrieve": retrieve, "batching": batching, "hot_swap": swap_stats,
                          "monolith": versus, "scaled_out": scaled, "tails": tails,
                          "load_average": os.getloadavg(), "cpus": os.cpu_count(), "frontend": config.serve.frontend,
                          "note": f"p99 of {args.requests} samples sits between the 2nd and 3rd slowest"}}
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
