"""Rollout scaling: env steps/s of one env in-process vs the Ray rollout pool with N agent actors (gold replay, and
agent-like episodes).

Baseline, measured in the same run: one :class:`EpisodeRunner` in this process replaying the workload. Each
pool size N then replays the same workload through :class:`RolloutPool`, twice: rollout alone (``feed_kbs=False``)
and feeding both KBs (every observation to a durable env-KB actor, every trajectory segmented into the
experiential KB). Every JVM (each actor's, and the baseline's) replays the whole workload once untimed first: a
fresh JVM runs 2-3x slower for its first pass (JIT warm-up), which would otherwise count against the pool.

Reported: ``ratio = pool steps/s / (N_eff x single steps/s)`` with ``N_eff = min(N, cores)`` (goal >= 0.90 at
N = cores), and the ingest time as a fraction of env step time (goal <= 0.05): the env-KB actor's extraction and
write-ahead log, segmentation (as the agent waits for it) and the experiential KB's embedding and storing.

Agent-like episodes (``details.agent_like``): a random policy over the valid-action list ScienceWorld builds at
every step (what an agent pays, ~53 ms a step), at N = cores, each run sized to last at least ``--agent-seconds``
and repeated ``--agent-reps`` times (medians, with the spread): one env, N plain processes pulling from one shared
queue (the same dynamic scheduling as the pool), the pool alone and the pool feeding both KBs.
``details.embedding_batching``: the same episodes' rows embedded one episode per call (what the experiential KB does)
against one call for all (what a cross-episode batcher would do). Run from the repo root:

    .venv/bin/python benchmarks/rollout_scaling.py [--sizes 1,2,4] [--agent-reps 3] [--out PATH] [--batching-only]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from lib.results import write_result

from knowmap.actors.pool import RolloutPool
from knowmap.agent.knowledge import LocalEnvKBSlot
from knowmap.agent.rollout import EpisodeRunner, EpisodeSpec
from knowmap.config import KnowMapConfig
from knowmap.jobs.session import ray_session
from knowmap.kb.experience_kb import episode_rows
from knowmap.models.embedder import Embedder

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "rollout_scaling.json"
TASKS = ["boil", "melt", "use-thermometer", "find-living-thing", "test-conductivity", "chemistry-mix"]
GOAL_RATIO, GOAL_INGEST = 0.90, 0.05


def workload(variations: int) -> list[EpisodeSpec]:
    return [EpisodeSpec(task=t, variation=v) for t in TASKS for v in range(variations)]


def single_env(specs: list[EpisodeSpec]) -> dict[str, Any]:
    runner = EpisodeRunner()
    try:
        for spec in specs:  # warm-up pass
            runner.run(spec)
        started = time.perf_counter()
        steps = sum(len(runner.run(spec).steps) - 1 for spec in specs)
        seconds = time.perf_counter() - started
    finally:
        runner.close()
    return {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds}


def timed_run(pool: RolloutPool, specs: list[EpisodeSpec], feed_kbs: bool) -> dict[str, Any]:
    started = time.perf_counter()
    results = pool.run(specs, feed_kbs=feed_kbs)
    seconds = time.perf_counter() - started
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise SystemExit(f"{len(failed)} episodes failed: {failed[:3]}")
    steps = sum(r.steps for r in results)
    out = {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds}
    if feed_kbs:
        env_s = sum(r.env_seconds for r in results)
        parts = {"extraction_and_log": sum(r.ingest_seconds for r in results),
                 "segmentation": sum(r.segment_seconds for r in results),
                 "embedding_and_store": sum(r.embed_seconds for r in results)}
        ingest_s = sum(parts.values())
        out.update(env_seconds=env_s, ingest_seconds=ingest_s, ingest_parts=parts, ingest_fraction=ingest_s / env_s,
                   facts=sum(r.facts for r in results), subgoals=sum(r.subgoals for r in results))
    return out


def _process_worker(queue: Any, barrier: Any, specs: list[EpisodeSpec], part: list[EpisodeSpec]) -> None:
    runner = EpisodeRunner()
    try:
        for spec in specs:  # the same warm-up as everywhere else
            runner.run(spec)
        barrier.wait()
        started = time.perf_counter()
        steps = sum(len(runner.run(spec).steps) - 1 for spec in part)
        queue.put((steps, time.perf_counter() - started))
    finally:
        runner.close()


def plain_processes(n: int, specs: list[EpisodeSpec]) -> dict[str, Any]:
    """The machine's ceiling: n plain processes (no Ray), each with its own env, splitting the workload."""
    ctx = multiprocessing.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(n)
    procs = [ctx.Process(target=_process_worker, args=(queue, barrier, specs, specs[i::n])) for i in range(n)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    steps, seconds = sum(r[0] for r in results), max(r[1] for r in results)
    return {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds}


def pool_runs(config: KnowMapConfig, n: int, specs: list[EpisodeSpec]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rollout alone, then feeding the KBs, on the same N actors after an untimed warm-up pass."""
    pool = RolloutPool(config, num_workers=n)
    try:
        # Warm-up: every actor's JVM replays the whole workload once, as the single env did.
        ray.get([actor.run_episode.remote(spec.model_dump(), False) for actor in pool.actors for spec in specs])
        return timed_run(pool, specs, feed_kbs=False), timed_run(pool, specs, feed_kbs=True)
    finally:
        pool.shutdown()


# -- agent-like episodes: every step builds the valid-action list and a random policy picks from it --------------
AGENT_STEPS = 40  # step limit of an agent-like episode


def agent_specs(episodes: int, offset: int = 0) -> list[EpisodeSpec]:
    return [EpisodeSpec(task=TASKS[i % len(TASKS)], variation=(i // len(TASKS)) % 5, policy="random", seed=offset + i)
            for i in range(episodes)]


def _queue_worker(tasks: Any, results: Any, barrier: Any, warm: list[EpisodeSpec]) -> None:
    runner = EpisodeRunner(step_limit=AGENT_STEPS)
    try:
        for spec in warm:
            runner.run(spec)
        barrier.wait()
        steps, started = 0, time.perf_counter()
        while (item := tasks.get()) is not None:
            steps += len(runner.run(EpisodeSpec.model_validate(item)).steps) - 1
        results.put((steps, started, time.perf_counter()))
    finally:
        runner.close()


def plain_dynamic(n: int, specs: list[EpisodeSpec], warm: list[EpisodeSpec]) -> dict[str, Any]:
    """n plain processes (no Ray) pulling episodes from one shared queue, as the pool's actors do."""
    ctx = multiprocessing.get_context("spawn")
    tasks, results, barrier = ctx.Queue(), ctx.Queue(), ctx.Barrier(n)
    for spec in specs:
        tasks.put(spec.model_dump())
    for _ in range(n):
        tasks.put(None)
    procs = [ctx.Process(target=_queue_worker, args=(tasks, results, barrier, warm)) for _ in range(n)]
    for p in procs:
        p.start()
    done = [results.get() for _ in procs]
    for p in procs:
        p.join()
    steps, seconds = sum(d[0] for d in done), max(d[2] for d in done) - min(d[1] for d in done)
    return {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds}


def embedding_batches(config: KnowMapConfig, episodes: int = 24) -> dict[str, Any]:
    """What batching sub-goal embedding across episodes buys on this machine: the rows of ``episodes`` agent-like
    episodes (segmented against their env KBs), embedded one episode per call (what the experiential KB does) and
    all in one call (what a cross-episode batcher would do), best of three each."""
    runner = EpisodeRunner(step_limit=AGENT_STEPS)
    try:
        trajectories = [runner.run(spec) for spec in agent_specs(episodes, offset=30_000)]
    finally:
        runner.close()
    slot, texts = LocalEnvKBSlot(config), []
    for trajectory in trajectories:
        slot.open(trajectory.episode_id)
        for record in trajectory.steps:
            slot.ingest(record.as_observation())
        texts.append([row["text"] for row in episode_rows(trajectory, slot.segment(trajectory))])
        slot.close()
    embedder = Embedder(config.models.embedder, batch_size=config.models.batch_size)
    embedder.encode(texts[0])  # warm-up

    def best(fn: Any) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    per_episode = best(lambda: [embedder.encode(t) for t in texts])
    one_batch = best(lambda: embedder.encode([t for ts in texts for t in ts]))
    rows = sum(map(len, texts))
    print(f"embedding {rows} rows of {episodes} episodes: one call per episode {per_episode:.2f} s (baseline), "
          f"one call for all {one_batch:.2f} s, ratio {per_episode / one_batch:.2f}")
    return {"episodes": episodes, "rows": rows, "per_episode_calls_s": per_episode, "one_batch_s": one_batch,
            "speedup": per_episode / one_batch}


def agent_like(config: KnowMapConfig, cores: int, reps: int, min_seconds: float,
               checkpoint: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Single env, n = cores plain processes on a dynamic queue, and the pool with and without KB feeding, each
    run ``reps`` times on a workload sized so that the n-way runs last at least ``min_seconds``; ``checkpoint``
    gets the summary after every repetition (a run cut short keeps what it measured)."""
    warm = agent_specs(len(TASKS), offset=10_000)
    runner = EpisodeRunner(step_limit=AGENT_STEPS)
    try:
        for spec in warm:
            runner.run(spec)
        sample = agent_specs(5 * len(TASKS), offset=20_000)[::5]  # every task once, every variation the work uses
        started = time.perf_counter()
        probe = sum(len(runner.run(s).steps) - 1 for s in sample)
        rate, per_episode = probe / (time.perf_counter() - started), probe / len(sample)
    finally:
        runner.close()
    # n processes reach up to ~(n + 1) x one env here (one env alone leaves its core idle between JVM calls).
    episodes = int(min_seconds * (cores + 1) * rate / per_episode) + 1
    specs = agent_specs(episodes)
    print(f"agent-like: {episodes} random-policy episodes of <= {AGENT_STEPS} steps (~{rate:.1f} steps/s in one env)")
    runs: dict[str, list[dict[str, Any]]] = {"single": [], "plain": [], "pool": [], "pool_feeding": []}
    pool = RolloutPool(config.model_copy(update={"scienceworld": config.scienceworld.model_copy(
        update={"step_limit": AGENT_STEPS})}), num_workers=cores)
    try:
        ray.get([actor.run_episode.remote(spec.model_dump(), False) for actor in pool.actors for spec in warm])
        for rep in range(reps):
            runner = EpisodeRunner(step_limit=AGENT_STEPS)
            try:
                for spec in warm:
                    runner.run(spec)
                started = time.perf_counter()
                steps = sum(len(runner.run(s).steps) - 1 for s in specs)
                seconds = time.perf_counter() - started
                runs["single"].append({"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds})
            finally:
                runner.close()
            runs["plain"].append(plain_dynamic(cores, specs, warm))
            runs["pool"].append(timed_run(pool, specs, feed_kbs=False))
            runs["pool_feeding"].append(timed_run(pool, specs, feed_kbs=True))
            print(f"  rep {rep + 1}: " + ", ".join(f"{k} {v[-1]['steps_per_s']:.1f}" for k, v in runs.items()))
            checkpoint(_summary(runs, cores, episodes))
    finally:
        pool.shutdown()
    return _summary(runs, cores, episodes)


def _summary(runs: dict[str, list[dict[str, Any]]], cores: int, episodes: int) -> dict[str, Any]:
    """Medians over the repetitions so far, the spread, and each repetition's own ratios."""
    def median(name: str, key: str = "steps_per_s") -> float:
        return float(statistics.median(r[key] for r in runs[name]))

    def spread(name: str) -> list[float]:
        return [min(r["steps_per_s"] for r in runs[name]), max(r["steps_per_s"] for r in runs[name])]

    single, plain, alone, fed = (median(k) for k in runs)
    per_rep = [{"pool_vs_plain": p["steps_per_s"] / q["steps_per_s"],
                "ratio_vs_n_single": p["steps_per_s"] / (cores * s["steps_per_s"]),
                "feeding_vs_rollout_only": f["steps_per_s"] / p["steps_per_s"], "ingest_fraction": f["ingest_fraction"]}
               for s, q, p, f in zip(*runs.values(), strict=True)]
    return {"single_steps_per_s": single, "plain_steps_per_s": plain, "pool_steps_per_s": alone,
            "pool_feeding_steps_per_s": fed, "ratio_vs_n_single": alone / (cores * single),
            "plain_vs_n_single": plain / (cores * single), "pool_vs_plain": alone / plain,
            "feeding_vs_rollout_only": fed / alone, "ingest_fraction": median("pool_feeding", "ingest_fraction"),
            "per_repetition": per_rep, "spread_steps_per_s": {k: spread(k) for k in runs}, "runs": runs,
            "episodes": episodes, "step_limit": AGENT_STEPS, "reps": len(runs["single"]), "n": cores,
            "policy": "random over the valid actions"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,2,4", help="pool sizes N, comma-separated")
    parser.add_argument("--variations", type=int, default=2, help="train variations per task in the workload")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--agent-reps", type=int, default=3, help="repetitions of the agent-like runs (0: skip)")
    parser.add_argument("--agent-seconds", type=float, default=60.0, help="least length of an agent-like n-way run")
    parser.add_argument("--batching-only", action="store_true", help="measure only the embedding batching and "
                        "add it to the results already in --out")
    args = parser.parse_args()
    if args.batching_only:
        result = json.loads(args.out.read_text())
        with tempfile.TemporaryDirectory(prefix="knowmap-bench-") as data_dir:
            result["details"]["embedding_batching"] = embedding_batches(KnowMapConfig(data_dir=data_dir))
        write_result(args.out, result)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    cores = os.cpu_count() or 1
    specs = workload(args.variations)

    print(f"workload: {len(specs)} gold episodes ({', '.join(TASKS)}; train variations 0-{args.variations - 1}); "
          f"cores: {cores}")
    single = single_env(specs)
    print(f"baseline  single env in-process: {single['steps_per_s']:.1f} steps/s "
          f"({single['steps']} steps in {single['seconds']:.1f} s)")
    ceiling = plain_processes(cores, specs)
    ceiling["ratio"] = ceiling["steps_per_s"] / (cores * single["steps_per_s"])
    print(f"ceiling   {cores} plain processes, no Ray: {ceiling['steps_per_s']:.1f} steps/s "
          f"(ratio {ceiling['ratio']:.2f}: what this machine gives {cores} JVMs at all)")

    data_dir = Path(tempfile.mkdtemp(prefix="knowmap-bench-"))
    config = KnowMapConfig(data_dir=data_dir, ray={"namespace": f"bench-{uuid.uuid4().hex[:8]}",
                                                   "num_cpus_per_agent": 1})
    rows = []
    with ray_session(config, num_cpus=max(sizes)):  # N actors of 1 CPU each fit; N_eff is bounded by real cores
        for n in sizes:
            n_eff = min(n, cores)
            alone, fed = pool_runs(config, n, specs)
            row = {"n": n, "n_eff": n_eff, "rollout_only": alone, "feeding_kbs": fed,
                   "ratio_rollout_only": alone["steps_per_s"] / (n_eff * single["steps_per_s"]),
                   "ratio_feeding_kbs": fed["steps_per_s"] / (n_eff * single["steps_per_s"])}
            rows.append(row)
            print(f"pool N={n} (N_eff={n_eff}): rollout only {alone['steps_per_s']:.1f} steps/s "
                  f"(ratio {row['ratio_rollout_only']:.2f}); feeding KBs {fed['steps_per_s']:.1f} steps/s "
                  f"(ratio {row['ratio_feeding_kbs']:.2f}); ingest/env time {fed['ingest_fraction']:.3f}")

    at_cores = next((r for r in rows if r["n"] == cores), rows[-1])
    ingest = max(r["feeding_kbs"]["ingest_fraction"] for r in rows)
    print()
    print(f"{'N':>3} {'N_eff':>5} {'rollout steps/s':>16} {'ratio':>6} {'with KBs steps/s':>17} {'ratio':>6} "
          f"{'ingest/env':>10}")
    for r in rows:
        print(f"{r['n']:>3} {r['n_eff']:>5} {r['rollout_only']['steps_per_s']:>16.1f} "
              f"{r['ratio_rollout_only']:>6.2f} {r['feeding_kbs']['steps_per_s']:>17.1f} "
              f"{r['ratio_feeding_kbs']:>6.2f} {r['feeding_kbs']['ingest_fraction']:>10.3f}")
    print(f"\nat N = cores = {at_cores['n']}: ratio {at_cores['ratio_feeding_kbs']:.2f} with KBs, "
          f"{at_cores['ratio_rollout_only']:.2f} rollout only (goal >= {GOAL_RATIO}; {cores} plain processes "
          f"without Ray reach {ceiling['ratio']:.2f}); "
          f"ingest/env time {ingest:.3f} (goal <= {GOAL_INGEST})")
    result = {
        "metric": "rollout_scaling_ratio_at_cores",
        "value": at_cores["ratio_feeding_kbs"],
        "goal": GOAL_RATIO,
        "details": {
            "baseline_single_env": single, "ceiling_plain_processes": ceiling, "pool": rows, "cores": cores,
            "pool_vs_ceiling_at_cores": at_cores["rollout_only"]["steps_per_s"] / ceiling["steps_per_s"],
            "ratio_rollout_only_at_cores": at_cores["ratio_rollout_only"],
            "ingest_fraction": {"value": ingest, "goal": GOAL_INGEST},
            "agent_like": None,
            "embedding_batching": None,
            "protocol": {"tasks": TASKS, "split": "train", "variations": list(range(args.variations)),
                         "policy": "expert (gold replay)", "look_every_step": True, "warm_up": "one untimed pass"},
        },
    }
    def save(agent_so_far: dict[str, Any] | None = None) -> None:
        if agent_so_far is not None:
            result["details"]["agent_like"] = agent_so_far
        write_result(args.out, result)

    save()
    agent = None
    if args.agent_reps:
        with ray_session(config, num_cpus=max(*sizes, cores)):
            agent = agent_like(config, cores, args.agent_reps, args.agent_seconds, save)
    result["details"]["embedding_batching"] = embedding_batches(config)
    save(agent)
    if agent:
        print(f"agent-like (medians of {agent['reps']}, N = {cores}): single {agent['single_steps_per_s']:.1f}, "
              f"plain {agent['plain_steps_per_s']:.1f}, pool {agent['pool_steps_per_s']:.1f}, pool feeding "
              f"{agent['pool_feeding_steps_per_s']:.1f} steps/s; pool / plain {agent['pool_vs_plain']:.2f} (goal >= "
              f"0.95), pool / N x single {agent['ratio_vs_n_single']:.2f} (goal >= 0.90 where plain reaches it: "
              f"{agent['plain_vs_n_single']:.2f}), feeding / rollout only {agent['feeding_vs_rollout_only']:.2f} "
              f"(goal >= 0.85), ingest {agent['ingest_fraction']:.3f} (goal <= 0.05)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
