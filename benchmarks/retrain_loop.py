"""The loop, closed: agents act through the retrieval API and contribute what they did; the retriever is retrained,
gated and hot-swapped; agents act again. Does the serving model ever get worse on data no cycle trains on?

Setup: gold replays of ``--tasks`` (``--train-variations`` train variations each) build both KBs, and the service
starts on the packaged MiniLM. Then ``--cycles`` cycles, each:

1. **rollouts**: one LLM-agent episode per task (the local SmolLM2 unless ``llm.base_url`` is set) on a dev
   variation the gate never judges on, played in this process as an external agent plays: knowledge through
   ``/v1/retrieve`` (joint experience queries), every step's observation to ``/v1/envs/{episode}/observations``,
   the finished trajectory to ``/v1/trajectories``;
2. **retrain**: the retrain controller trains a candidate on every stored trajectory (expert and contributed;
   sub-goals that did not raise the score are never positives), gates it on the dev replays against the serving
   model (decision support, judged by gold next actions), and promotes it (re-index, hot swap) if better; a client
   sends ``/v1/retrieve`` requests throughout, and any answer but 200 is a failed request;
3. **held-out**: decision support of the model that served before the cycle and of the candidate on test
   replays of the same tasks, which no cycle trains or selects on (mean of shortlist recall@12, experience
   support@3 and env support@5, the gate's metric).

Goals: a promoted model is never worse on the held-out set than the one it replaced, the serving model's held-out
metric never falls, and no request fails during a swap. Prints a table per cycle and writes
``benchmarks/results/retrain_loop.json`` and ``retrain_loop.png``.

With ``--warm-start`` the candidates fine-tune the serving model further (``retrain.warm_start``) and the result
goes to ``retrain_loop_warm.json``: the two files compare warm starts with training from the base model.

    .venv/bin/python benchmarks/retrain_loop.py [--cycles 3] [--tasks boil,melt,find-living-thing] [--warm-start]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
from lib.results import Check, write_result  # noqa: E402
from lib.service import free_port  # noqa: E402

from knowmap.config import KnowMapConfig  # noqa: E402
from knowmap.serve.client import KnowMapClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "retrain_loop.json"
WARM_OUT = ROOT / "benchmarks" / "results" / "retrain_loop_warm.json"


def held_out(config: KnowMapConfig, tasks: list[str], variations: int, models: dict[str, str]) -> dict[str, Any]:
    """Decision support of each model on test replays (the gate's three metrics and their mean)."""
    from knowmap.jobs.training import decision_support

    agent = config.agent
    wanted = (f"shortlist_recall@{agent.shortlist}", f"support@{agent.k_experience}_experience",
              f"support@{agent.k_env}_env")
    results = decision_support(config, split="test", tasks=tasks, variations=variations, train_tasks=tasks,
                               embedders=models)
    out = {}
    for name in models:
        scores = {m: float(results.modes[name][m]) for m in wanted}
        out[name] = {**scores, "mean": float(np.mean(list(scores.values())))}
    return out


def play(config: KnowMapConfig, client: KnowMapClient, llm: Any, tasks: list[str], cycle: int) -> list[dict[str, Any]]:
    """External-agent episodes, one per task on the cycle's own dev variation (after the gate's): retrieval over
    HTTP, observations and the trajectory contributed over HTTP."""
    from knowmap.agent.llm_policy import LLMPolicy
    from knowmap.agent.memory import ServiceKnowledge
    from knowmap.agent.rollout import EpisodeRunner, EpisodeSpec

    policy = LLMPolicy(llm, config.agent, mode="kb-finetuned",
                       knowledge=lambda context: ServiceKnowledge(client, context.episode_id, context.task))
    sw = config.scienceworld
    runner = EpisodeRunner(step_limit=sw.step_limit, simplifications=sw.simplifications, java_heap=sw.java_heap)
    played = []
    index = config.retrain.gate_variations + cycle - 1
    try:
        specs = [EpisodeSpec(task=t, variation=runner.env.variations(t, "dev")[index], split="dev",
                             policy="llm-kb-finetuned", seed=cycle) for t in tasks]
        for spec in specs:
            t0 = time.perf_counter()
            trajectory = runner.run(spec, policy=policy, on_step=lambda traj, step: client.add_observations(
                traj.episode_id, [step.as_observation().model_dump()]))
            added = client.add_trajectory(trajectory, env_id=trajectory.episode_id)
            played.append({"episode_id": trajectory.episode_id, "task": spec.task, "variation": spec.variation,
                           "steps": len(trajectory.steps) - 1, "final_score": trajectory.final_score,
                           "subgoals": added.subgoals, "seconds": time.perf_counter() - t0})
            print(f"  played {spec.label()}: {played[-1]['steps']} steps, score {trajectory.final_score:g}",
                  flush=True)
    finally:
        runner.close()
    return played


def under_load(url: str, key: str, env_id: str, work: Any) -> tuple[Any, dict[str, Any]]:
    """Run ``work()`` while a client sends /v1/retrieve requests; the result and the requests' outcomes."""
    stop, latencies, failures = threading.Event(), [], []

    def load() -> None:
        client = KnowMapClient(url, key, timeout_s=120)
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                client.retrieve("heat the substance and measure it", env_id=env_id, k=3)
                latencies.append((time.perf_counter() - t0) * 1000)
            except Exception as e:  # noqa: BLE001 - every failure is counted, whatever its kind
                failures.append(f"{type(e).__name__}: {str(e)[:200]}")
            time.sleep(0.2)
        client.close()

    thread = threading.Thread(target=load)
    thread.start()
    try:
        result = work()
    finally:
        stop.set()
        thread.join()
    return result, {"requests": len(latencies) + len(failures), "failed": len(failures), "failures": failures[:5],
                    "p50_ms": float(np.percentile(latencies, 50)) if latencies else None,
                    "p99_ms": float(np.percentile(latencies, 99)) if latencies else None}


def plot(cycles: list[dict[str, Any]], baseline: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [c["cycle"] for c in cycles]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([0, *xs], [baseline, *[c["serving_after"] for c in cycles]], marker="o", label="serving model")
    ax.plot(xs, [c["held_out"]["candidate"]["mean"] for c in cycles], marker="x", linestyle="--", label="candidate")
    for c in cycles:
        if c["promoted"]:
            ax.annotate("promoted", (c["cycle"], c["serving_after"]), textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=8)
    ax.set_xlabel("cycle")
    ax.set_ylabel("held-out decision support (mean)")
    ax.set_xticks([0, *xs])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--tasks", default="boil,melt,find-living-thing")
    parser.add_argument("--train-variations", type=int, default=2)
    parser.add_argument("--test-variations", type=int, default=1)
    parser.add_argument("--step-limit", type=int, default=15, help="agent steps per episode")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--warm-start", action="store_true", help="candidates fine-tune the serving model further "
                        "(retrain.warm_start) instead of starting from the base model; default out: "
                        "retrain_loop_warm.json")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.out = args.out or (WARM_OUT if args.warm_start else DEFAULT_OUT)

    import ray
    from ray import serve

    from knowmap.agent.llm import LLMClient
    from knowmap.agent.local_llm import llm_endpoint
    from knowmap.jobs.build import build_knowledge_bases
    from knowmap.jobs.retrain import RetrainController
    from knowmap.jobs.session import ray_session
    from knowmap.serve.app import start_service

    tasks = args.tasks.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="knowmap-loop-bench-"))
    config = KnowMapConfig(
        data_dir=tmp / "data", ray={"namespace": "retrain-loop-bench", "num_workers": 1},
        scienceworld={"tasks": tasks, "variations": args.train_variations, "step_limit": args.step_limit},
        training={"epochs": args.epochs, "select_variations": 0, "cpus_per_worker": 0.5},
        retrain={"gate_tasks": tasks, "gate_variations": 1, "reranker": False, "every": 1,
                 "warm_start": args.warm_start},
        serve={"port": free_port(), "ingress_num_cpus": 0.5, "reranker_num_cpus": 0.25})
    started = time.perf_counter()
    cycles: list[dict[str, Any]] = []
    try:
        with ray_session(config, serving=True), llm_endpoint(config.llm, log_path=str(tmp / "llm.log")) as llm_config:
            print("building the KBs from gold replays ...", flush=True)
            build = build_knowledge_bases(config, num_workers=1)
            info = start_service(config, embedder="", reranker="")
            client = KnowMapClient(info.url, info.api_key, timeout_s=300)
            llm = LLMClient(llm_config)
            controller = RetrainController(config)
            print("held-out decision support of the base model ...", flush=True)
            baseline = held_out(config, tasks, args.test_variations, {"serving": ""})["serving"]["mean"]
            serving_mean = baseline
            for cycle in range(1, args.cycles + 1):
                t0 = time.perf_counter()
                played = play(config, client, llm, tasks, cycle)
                before = controller.state.serving.embedder
                decision, load = under_load(info.url, info.api_key, played[0]["episode_id"],
                                            lambda c=cycle: controller.retrain(trigger=f"retrain_loop cycle {c}"))
                scores = held_out(config, tasks, args.test_variations,
                                  {"serving_before": before, "candidate": decision["candidate"]["embedder"]})
                after = scores["candidate"]["mean"] if decision["promoted"] else scores["serving_before"]["mean"]
                cycles.append({
                    "cycle": cycle, "rollouts": played, "promoted": decision["promoted"],
                    "reason": decision["reason"], "gate": {"candidate": decision["candidate_scores"],
                                                           "serving": decision["serving_scores"]},
                    "held_out": scores, "serving_before": serving_mean, "serving_after": after,
                    "requests_during_retrain": load, "retrain_seconds": decision["seconds"],
                    "train_episodes": decision["train_episodes"], "seconds": time.perf_counter() - t0})
                serving_mean = after
                print(f"cycle {cycle}: {decision['reason']}\n  held-out serving {cycles[-1]['serving_before']:.3f} "
                      f"-> {after:.3f} (candidate {scores['candidate']['mean']:.3f}); requests during retrain "
                      f"{load['requests']}, failed {load['failed']}", flush=True)
            client.close()
            serve.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    promoted = [c for c in cycles if c["promoted"]]
    not_worse = sum(c["held_out"]["candidate"]["mean"] >= c["held_out"]["serving_before"]["mean"] for c in promoted)
    failed = sum(c["requests_during_retrain"]["failed"] for c in cycles)
    checks = [
        Check("promoted_never_worse_on_held_out", value=len(promoted) - not_worse, goal=0, direction="<=",
              baseline=len(promoted), result=not_worse, note="promoted models worse than the one they replaced"),
        Check("serving_held_out_never_falls", value=sum(c["serving_after"] < c["serving_before"] - 1e-9
                                                        for c in cycles), goal=0, direction="<=",
              baseline=baseline, result=cycles[-1]["serving_after"], note="cycles that lowered it"),
        Check("requests_failed_during_retrain_and_swap", value=failed, goal=0, direction="<=", baseline=0,
              result=failed),
    ]
    print(f"\n{'cycle':<7}{'promoted':>10}{'gate cand/serv':>18}{'held-out before':>17}{'candidate':>11}"
          f"{'after':>8}{'failed req':>12}{'seconds':>9}")
    for c in cycles:
        gate = "/".join(f"{np.mean(list(c['gate'][k].values())):.3f}" for k in ("candidate", "serving"))
        print(f"{c['cycle']:<7}{str(c['promoted']):>10}{gate:>18}{c['serving_before']:>17.3f}"
              f"{c['held_out']['candidate']['mean']:>11.3f}{c['serving_after']:>8.3f}"
              f"{c['requests_during_retrain']['failed']:>12}{c['seconds']:>9.0f}")
    print(f"held-out serving model: baseline (base MiniLM) {baseline:.3f} -> {cycles[-1]['serving_after']:.3f} "
          f"(ratio {cycles[-1]['serving_after'] / baseline:.3f}); checks: "
          + ", ".join(f"{c.metric} {'met' if c.met else 'NOT met'}" for c in checks))
    result = {"metric": "serving_held_out_decision_support_ratio", "value": cycles[-1]["serving_after"] / baseline,
              "goal": "promoted never worse; serving never falls; 0 failed requests",
              "details": {"checks": checks, "baseline": baseline, "cycles": cycles, "build_episodes": build.episodes,
                          "tasks": tasks, "train_variations": args.train_variations,
                          "test_variations": args.test_variations, "step_limit": args.step_limit,
                          "epochs": args.epochs, "llm": llm_config.model, "warm_start": args.warm_start,
                          "pipeline": {"hybrid": config.retrieval.hybrid, "rerank": config.retrieval.rerank},
                          "seconds": time.perf_counter() - started,
                          "cpus": os.cpu_count()}}
    write_result(args.out, result)
    plot(cycles, baseline, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
