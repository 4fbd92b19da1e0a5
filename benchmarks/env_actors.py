"""Bounded env-KB actors: many env ids in a row through the HTTP API, memory held to the configured cap.

Every env id the API is sent has its own env-KB actor (a worker process). ``serve.max_env_actors`` caps how many
stay alive; beyond it the least recently used is snapshotted and ended, and revived from disk on its next request.
This sends observations for ``--envs`` new env ids in a row (three steps of the boil fixture each), then:

- samples the env-KB actors alive and their memory (PSS from ``/proc/<pid>/smaps_rollup``, so shared pages are
  counted once) every ``--sample-every`` env ids; the baseline is what the same env ids would hold uncapped
  (one actor each, at the measured MB per actor), the result the peak measured;
- times each request: the first ``cap`` (a new actor, no eviction) against the rest (an eviction, then a new
  actor): the difference of their medians is the eviction's cost to the request that triggers it;
- asks ``--verify`` evicted env ids (seeded sample) for their whole history: every acknowledged fact must be back.

Everything runs on 127.0.0.1 in a local Ray (data in a temporary directory). Prints a table and writes
``benchmarks/results/env_actors.json``.

    .venv/bin/python benchmarks/env_actors.py [--envs 1000] [--cap 32] [--verify 100] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from lib.results import Check, write_result
from lib.service import FIXTURES, local_service, pct

from knowmap.serve.client import KnowMapClient

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "env_actors.json"


def env_actor_memory_mb() -> list[float]:
    """PSS (MB) of every env-KB actor process on this machine (Ray titles them ``ray::EnvKBActor``)."""
    sizes = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if not (proc / "cmdline").read_bytes().startswith(b"ray::EnvKBActor"):
                continue
            rollup = (proc / "smaps_rollup").read_text()
        except OSError:
            continue
        pss = next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
        sizes.append(pss / 1024)
    return sizes


def alive_env_actors(namespace: str) -> int:
    return sum(1 for a in ray.util.list_named_actors(all_namespaces=True)
               if a["namespace"] == namespace and a["name"].startswith("envkb:"))


def records() -> list[dict[str, Any]]:
    rows = json.loads((FIXTURES / "observations.json").read_text())["records"]
    return [{k: r[k] for k in ("step", "action", "text", "look", "inventory")} for r in rows
            if r["task"] == "boil" and r["variation"] == 0][:3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", type=int, default=1000, help="env ids created in a row")
    parser.add_argument("--cap", type=int, default=32, help="serve.max_env_actors")
    parser.add_argument("--verify", type=int, default=100, help="evicted env ids asked for their facts afterwards")
    parser.add_argument("--sample-every", type=int, default=20, help="env ids between memory samples")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    namespace = "env-actors-bench"
    observations = records()
    latencies: list[float] = []
    acknowledged: dict[str, int] = {}
    samples: list[dict[str, Any]] = []
    started = time.perf_counter()
    with local_service(namespace, max_env_actors=args.cap) as (_, info):
        client = KnowMapClient(info.url, info.api_key, timeout_s=120)
        for i in range(args.envs):
            env_id = f"bench-env-{i:05d}"
            t0 = time.perf_counter()
            ack = client.add_observations(env_id, observations)
            latencies.append(time.perf_counter() - t0)
            acknowledged[env_id] = ack.facts
            if (i + 1) % args.sample_every == 0 or i + 1 == args.envs:
                sizes = env_actor_memory_mb()
                samples.append({"envs": i + 1, "alive": alive_env_actors(namespace), "processes": len(sizes),
                                "total_mb": sum(sizes), "mean_mb": float(np.mean(sizes)) if sizes else 0.0})
                print(f"{i + 1:>5} env ids: {samples[-1]['alive']:>3} actors alive, "
                      f"{samples[-1]['total_mb']:7.0f} MB, request {latencies[-1]:.2f} s", flush=True)
        created_s = time.perf_counter() - started
        evicted = list(acknowledged)[: max(0, args.envs - args.cap)]
        sample = random.Random(0).sample(evicted, min(args.verify, len(evicted)))
        lost, revive = [], []
        for env_id in sample:
            t0 = time.perf_counter()
            held = len(client.history(env_id))
            revive.append(time.perf_counter() - t0)
            if held != acknowledged[env_id]:
                lost.append({"env_id": env_id, "acknowledged": acknowledged[env_id], "held": held})
        client.close()

    per_actor = float(np.mean([s["mean_mb"] for s in samples if s["processes"]]))
    peak_mb = max(s["total_mb"] for s in samples)
    peak_alive = max(s["alive"] for s in samples)
    uncapped_mb = args.envs * per_actor
    fresh, evicting = latencies[: args.cap], latencies[args.cap:]
    eviction_s = pct(evicting, 50) - pct(fresh, 50)
    checks = [
        Check("peak_env_actor_mb", value=peak_mb / uncapped_mb, goal=1.1 * args.cap / args.envs, direction="<=",
              baseline=uncapped_mb, result=peak_mb,
              note=f"cap x MB per actor: {args.cap} x {per_actor:.0f} = {args.cap * per_actor:.0f} MB, +10%",
              conditions={f"at most {args.cap} actors alive": peak_alive <= args.cap}),
        Check("lost_facts_after_eviction", value=len(lost), goal=0, direction="<=",
              baseline=sum(acknowledged[e] for e in sample), result=sum(x["acknowledged"] - x["held"] for x in lost),
              note="env ids with a fact missing"),
    ]
    print(f"\n{'measurement':<52}{'baseline':>12}{'result':>12}{'ratio':>9}  goal")
    print(f"{'env-actor memory MB (uncapped, projected -> peak)':<52}{uncapped_mb:>12.0f}{peak_mb:>12.0f}"
          f"{peak_mb / uncapped_mb:>9.3f}  <= {args.cap} x {per_actor:.0f} MB")
    print(f"{'actors alive (uncapped -> peak)':<52}{args.envs:>12}{peak_alive:>12}{peak_alive / args.envs:>9.3f}"
          f"  <= {args.cap}")
    print(f"{'request s, p50 (new actor -> eviction + new actor)':<52}{pct(fresh, 50):>12.2f}"
          f"{pct(evicting, 50):>12.2f}{pct(evicting, 50) / pct(fresh, 50):>9.2f}")
    print(f"eviction latency (difference of medians): {eviction_s:.2f} s; revival (first request of an evicted env) "
          f"p50 {pct(revive, 50):.2f} s, p95 {pct(revive, 95):.2f} s")
    print(f"evicted env ids checked: {len(sample)}, with a fact missing: {len(lost)}; "
          f"{args.envs} env ids in {created_s:.0f} s; MB per actor (PSS) {per_actor:.1f}")
    result = {"metric": "peak_env_actor_mb_vs_uncapped", "value": peak_mb / uncapped_mb, "goal": checks[0].goal_text,
              "details": {"checks": checks, "envs": args.envs, "cap": args.cap, "mb_per_actor": per_actor,
                          "peak_alive": peak_alive, "peak_mb": peak_mb, "uncapped_mb_projected": uncapped_mb,
                          "request_s": {"new_actor_p50": pct(fresh, 50), "new_actor_p95": pct(fresh, 95),
                                        "with_eviction_p50": pct(evicting, 50),
                                        "with_eviction_p95": pct(evicting, 95)},
                          "eviction_s": eviction_s, "revive_s": {"p50": pct(revive, 50), "p95": pct(revive, 95)},
                          "verified": len(sample), "lost": lost, "seconds": created_s, "samples": samples,
                          "load_average": os.getloadavg(), "cpus": os.cpu_count()}}
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
