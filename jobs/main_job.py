"""``knowmap run``: the whole KnowMap loop on one Ray cluster (a local one on embedded defaults), with a report.

Stages, each timed, each feeding the report (:mod:`knowmap.jobs.report`):

1. **build**: expert trajectories of the train split replayed by the rollout pool; both KBs filled.
2. **train**: KnowMap pairs, the InfoNCE embedder and the reranker on Ray Train; the embedder's mix with the base
   model chosen on dev by decision support.
3. **evaluate**: retrieval on held-out dev episodes: BM25, base and fine-tuned embedder, with and without reranker;
   decision support per knowledge mode, judged by the gold next actions.
4. **serve**: the retrieval service (Ray Serve) with the fine-tuned models.
5. **agents**: LLM-agent rollouts on other dev variations, one round per knowledge mode, feeding both KBs.
6. **retrain**: one cycle of the retrain controller on everything stored so far (expert and agent trajectories).
7. **report**: ``<data_dir>/report/report.md`` with plots, and ``report.json``.

A stage that fails is recorded in the report's errors; the stages that need its output are skipped and named as
missing, and the run exits non-zero. Presets: ``quick`` (about 10 minutes on 2 cores: 2 short tasks, 1 epoch,
a 10-step agent budget) and ``full`` (the config as given; scale it with ``--tasks all`` and a cluster).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from knowmap.config import KnowMapConfig
from knowmap.jobs.build import BuildSummary
from knowmap.jobs.console import Console
from knowmap.jobs.report import RunReport, summary_rows, write_report
from knowmap.results import AgentRounds
from knowmap.schemas import RetrainDecision

QUICK_TASKS = ["find-living-thing", "use-thermometer"]  # gold paths of 9-22 steps: the shortest topics


class RunOptions(BaseModel):
    """What ``knowmap run`` does beyond the config."""

    preset: str = Field(default="full", pattern="^(quick|full)$")
    agent_variations: int = Field(default=1, ge=1, description="dev variations per task for agent rollouts, "
                                  "after the gate's held-out ones")
    modes: list[str] = Field(default_factory=lambda: ["none", "kb-base", "kb-finetuned"], min_length=1)
    workers: int | None = Field(default=None, ge=1)


def apply_preset(config: KnowMapConfig, preset: str) -> KnowMapConfig:
    """The config with the preset's settings (``quick``: small and fast; ``full``: unchanged).

    ``quick`` replaces the default tasks with two short ones (tasks the user named are kept), and always sets one
    epoch, short sequences, a reranker with one hard negative, a 10-step agent budget and two gate variations.
    """
    if preset != "quick":
        return config
    sw = config.scienceworld
    from knowmap.config import DEFAULT_TASKS

    tasks = QUICK_TASKS if sw.tasks == DEFAULT_TASKS else sw.tasks
    return config.model_copy(update={
        "scienceworld": sw.model_copy(update={"tasks": tasks, "step_limit": min(sw.step_limit, 10)}),
        # The listwise reranker reads 1 + reranker_negatives + 1 sequences per pair: one hard negative and 64
        # tokens keep the quick run's reranker to about a minute (3 negatives at 256 tokens took 5.4 minutes).
        "training": config.training.model_copy(update={"epochs": 1, "max_seq_length": 64, "batch_size": 16,
                                                       "reranker_negatives": 1, "reranker_max_length": 64}),
        # Two gate variations: the gate judges each model on every step of both dev replays.
        "retrain": config.retrain.model_copy(update={"gate_variations": 2, "reranker": False}),
    })


class _Stages:
    """Times each stage into the report and turns a failure into a recorded error."""

    def __init__(self, report: RunReport, echo: Callable[[str], None]) -> None:
        self.report, self.echo, self.failed = report, echo, set()

    @contextlib.contextmanager
    def __call__(self, name: str, needs: tuple[str, ...] = ()) -> Iterator[bool]:
        blocked = [n for n in needs if n in self.failed]
        if blocked:
            self.failed.add(name)
            self.report.errors.append(f"{name}: skipped, it needs {', '.join(blocked)}")
            yield False
            return
        self.echo(f"[{name}] ...")
        started = time.perf_counter()
        try:
            yield True
        except Exception as e:  # noqa: BLE001 - a failed stage is reported, the run goes on where it can
            self.failed.add(name)
            self.report.errors.append(f"{name}: {type(e).__name__}: {e}")
            self.echo(f"[{name}] failed: {type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}")
        finally:
            self.report.stages[name] = round(time.perf_counter() - started, 1)
            self.echo(f"[{name}] {self.report.stages[name]:.1f} s")


def run_main_job(config: KnowMapConfig, options: RunOptions,
                 console: Console | None = None) -> tuple[RunReport, Path]:
    """Run every stage and write the report; returns it and the Markdown's path.

    Args:
        console: where stage lines, progress bars and the final table go (default: the terminal as it is).

    Raises:
        UnknownTaskError, VariationOutOfRangeError: before anything starts, for a bad task or variation.
    """
    from knowmap.environment.sciworld import ScienceWorld, check_tasks
    from knowmap.jobs.build import build_knowledge_bases
    from knowmap.jobs.session import ray_session

    config = apply_preset(config, options.preset)
    sw = config.scienceworld
    gate = config.retrain.gate_variations
    agent_variations: dict[str, list[int]] = {}
    with ScienceWorld(step_limit=sw.step_limit, java_heap=sw.java_heap) as env:  # validate before any work
        tasks = check_tasks(sw.tasks)
        for task in tasks:
            dev = env.variations(task, "dev")
            if len(dev) < gate + options.agent_variations:
                from knowmap.errors import VariationOutOfRangeError

                raise VariationOutOfRangeError(
                    f"{task} has {len(dev)} dev variations; the gate and the agents need "
                    f"{gate + options.agent_variations} (retrain.gate_variations + agent variations)")
            agent_variations[task] = dev[gate:gate + options.agent_variations]  # never the gate's held-out ones
    update: dict[str, Any] = {"scienceworld": sw.model_copy(update={"tasks": tasks, "split": "train"}),
                              "retrain": config.retrain.model_copy(update={"gate_tasks": tasks})}
    if not config.ray.address:
        # On one machine the service's replicas reserve no CPU, so that the agent actors can still be scheduled
        # beside them (the cores are shared either way); on a cluster the serve section's reservations apply.
        update["serve"] = config.serve.model_copy(update={f"{d}_num_cpus": 0.0 for d in
                                                          ("embedder", "reranker", "retriever", "ingress")})
    config = config.model_copy(update=update)
    report = RunReport(protocol=_protocol(config, options))
    service_key = ""
    console = console or Console()
    echo = console.echo
    stage = _Stages(report, echo)
    started = time.perf_counter()
    with ray_session(config, serving=True):
        try:
            with stage("build") as go:
                if go:
                    bar = console.bar("build", unit="episode")
                    summary = build_knowledge_bases(config, options.workers, on_episode=console.episode_progress(bar))
                    bar.close()
                    report.build = summary
                    echo(f"  {summary.episodes} episodes, {summary.steps} steps, {summary.facts} facts, "
                         f"{summary.subgoals} sub-goals")
            with stage("train", needs=("build",)) as go:
                if go:
                    from knowmap.jobs.training import train_retriever

                    bar = console.bar("train", total=2 * config.training.epochs, unit="epoch")
                    report.training = train_retriever(
                        config, on_epoch=lambda model, m: (bar.set_postfix_str(model), bar.update(1)))
                    bar.close()
            with stage("evaluate", needs=("train",)) as go:
                if go:
                    from knowmap.jobs.training import evaluate_split

                    report.retrieval = evaluate_split(config, split="dev", tasks=tasks,
                                                      variations=config.retrain.gate_variations,
                                                      out=config.paths.report / "retrieval_dev.json")
            with stage("serve", needs=("train",)) as go:
                if go:
                    from knowmap.serve.app import start_service

                    info = start_service(config)
                    service_key = info.api_key  # kept out of the report
                    report.serve = {"url": info.url, "docs": info.docs_url, "embedder": info.embedder,
                                    "reranker": info.reranker or "(none)",
                                    "api key file": info.key_file or "(keys from config)",
                                    **_probe_service(info, report.build, tasks, console)}
            with stage("agents", needs=("train",)) as go:
                if go:
                    report.agents = _agent_rollouts(config, options, agent_variations, console)
            with stage("retrain", needs=("build",)) as go:
                if go:
                    from knowmap.jobs.retrain import RetrainController

                    decision = RetrainController(config).retrain(trigger="knowmap run")  # JSON: also an actor call
                    report.retrain = RetrainDecision.model_validate(decision)
            if report.serve and report.retrain:
                with contextlib.suppress(Exception):  # the service may have failed meanwhile; the report says so
                    report.serve["models after retrain"] = _served_models(report.serve["url"], service_key)
            report.throughput = _throughput(report)
        finally:
            report.protocol["total_seconds"] = round(time.perf_counter() - started, 1)
            path = write_report(report, config.paths.report)
            if not config.ray.address:
                with contextlib.suppress(Exception):
                    from ray import serve

                    serve.shutdown()
    for label, value in summary_rows(report):
        echo(f"{label:<48} {value}")
    echo(f"report  {path}")
    return report, path


def _agent_rollouts(config: KnowMapConfig, options: RunOptions, variations: dict[str, list[int]],
                    console: Console) -> AgentRounds:
    """LLM-agent rollouts on the dev variations after the gate's, one round per knowledge mode, through the pool;
    each episode feeds both KBs (the retrain stage then trains on them)."""
    from knowmap.agent.rollout import EpisodeSpec
    from knowmap.jobs.agent_eval import summarise
    from knowmap.jobs.agent_runs import run_agent_episodes

    specs = [EpisodeSpec(task=task, variation=v, split="dev", policy=f"llm-{mode}")
             for mode in options.modes for task, vs in variations.items() for v in vs]
    bar = console.bar("agents", total=len(specs), unit="episode")
    results = run_agent_episodes(config, specs, num_workers=options.workers, llm_log=str(config.paths.llm_log),
                                 on_result=lambda r: (bar.set_postfix_str(r.spec.label()), bar.update(1)))
    bar.close()
    summary = summarise(results, options.modes)
    failed = summary.failed_episodes()
    if len(failed) == len(specs):
        raise RuntimeError(f"every agent episode failed, e.g. {failed[0].error}")
    # mean_score None: every episode of that mode failed (reported as "-", never as a score of 0).
    return AgentRounds.from_evaluation(summary, variations, config.scienceworld.step_limit)


def _probe_service(info: Any, build: BuildSummary | None, tasks: list[str], console: Console,
                   requests: int = 20) -> dict[str, Any]:
    """Real requests through the typed client: ``/v1/retrieve`` latency (p50, p99) on an expert episode's env KB."""
    from knowmap.serve.client import KnowMapClient

    env_ids = sorted(Path(build.env_kb_dir).iterdir()) if build and build.env_kb_dir else []
    env_id = env_ids[0].name if env_ids else None
    timings = []
    bar = console.bar("serve probe", total=requests, unit="request")
    with KnowMapClient(info.url, info.api_key) as client:
        for i in range(requests):
            started = time.perf_counter()
            items = client.retrieve(f"Your task is to {tasks[i % len(tasks)].replace('-', ' ')}", env_id=env_id).items
            timings.append(1000 * (time.perf_counter() - started))
            bar.update(1)
    bar.close()
    timings.sort()
    return {"retrieve p50 ms": round(timings[len(timings) // 2], 1),
            "retrieve p99 ms": round(timings[min(len(timings) - 1, int(0.99 * len(timings)))], 1),
            "retrieve items (last)": len(items), "probe env id": env_id or "(none)"}


def _served_models(url: str, api_key: str) -> str:
    """``GET /v1/models`` after the retrain cycle: the versions serving, and the controller's last decision."""
    from knowmap.serve.client import KnowMapClient

    with KnowMapClient(url, api_key) as client:
        body = client.models()
    decision = body.retrain.last_decision if body.retrain else None
    served = ", ".join(f"{m.role} {m.id}" for m in body.data)
    return f"{served}; last decision: {'promoted' if decision and decision.promoted else 'kept'}"


def _throughput(report: RunReport) -> dict[str, float]:
    """Rates computed from what the stages measured (never from a constant)."""
    rates: dict[str, float] = {}
    if report.build and report.stages.get("build"):
        rates["expert replay steps/s (pool, incl. KB writes)"] = report.build.steps / report.stages["build"]
    if report.training and report.stages.get("train"):
        pairs = sum(report.training.pairs.values())
        epochs = report.training.embedder.epochs_run or 1
        rates["training pairs/s (embedder + reranker stage)"] = pairs * epochs / report.stages["train"]
    if report.serve and "retrieve p50 ms" in report.serve:
        rates["/v1/retrieve requests/s (1 client, HTTP)"] = 1000 / report.serve["retrieve p50 ms"]
    if report.agents and report.stages.get("agents"):
        steps = sum(m.steps for m in report.agents.modes.values())
        rates["agent steps/s (LLM + env + retrieval)"] = steps / report.stages["agents"]
    return rates


def _protocol(config: KnowMapConfig, options: RunOptions) -> dict[str, Any]:
    sw = config.scienceworld
    return {
        "preset": options.preset, "tasks": sw.tasks, "train variations per task": sw.variations,
        "gate/eval dev variations per task": config.retrain.gate_variations,
        "agent dev variations per task": options.agent_variations, "agent step limit": sw.step_limit,
        "simplifications": sw.simplifications or "(none)", "modes": options.modes,
        "scienceworld": importlib.metadata.version("scienceworld"),
        "llm": config.llm.base_url or f"local llama.cpp ({config.llm.model})",
        "embedder base": config.models.embedder or "all-MiniLM-L6-v2 (packaged)",
        "training": f"{config.training.epochs} epoch(s), {config.training.num_workers} Ray Train workers",
        "cpus": os.cpu_count(), "data dir": str(config.data_dir),
    }
