"""Evaluating the LLM agent on ScienceWorld: the same protocol against any OpenAI-compatible endpoint.

:func:`evaluate_agent` plays the first ``variations`` variations of each task in a held-out split once per
knowledge mode (``none`` = few-shot baseline, ``kb-base``, ``kb-finetuned``) through the rollout pool, and
reports per-task and mean scores with the exact protocol (tasks, variations, step limit, simplifications,
ScienceWorld version, model, endpoint, constraint style), tokens used, a JSON file and a bar chart.

Scores are ScienceWorld's 0-100 scores at the episode's end, with ScienceWorld's -100 for a failed task counted
as 0 (as the paper's table does); the raw score is kept per episode. An episode that errored is not scored: it
is listed, and counted in ``failed``.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from knowmap.agent.llm_policy import KNOWLEDGE_MODES, embedder_path
from knowmap.agent.rollout import EpisodeSpec
from knowmap.config import KnowMapConfig
from knowmap.environment.sciworld import ScienceWorld, check_tasks
from knowmap.errors import KnowMapError
from knowmap.jobs.session import ray_session
from knowmap.results import AgentEpisodeScore, AgentEvalProtocol, AgentEvaluation, AgentModeSummary, ModeTokens


def agent_specs(env: ScienceWorld, tasks: Sequence[str], split: str, variations: int, modes: Sequence[str],
                seed: int = 0) -> list[EpisodeSpec]:
    """One spec per (mode, task, variation): the first ``variations`` variations of ``split`` for each task.

    Raises:
        UnknownTaskError: a task ScienceWorld does not know.
        KnowMapError: an unknown mode.
    """
    unknown = [m for m in modes if m not in KNOWLEDGE_MODES]
    if unknown:
        raise KnowMapError(f"unknown mode(s) {unknown}; allowed: {', '.join(KNOWLEDGE_MODES)}")
    specs = []
    for mode in modes:
        for task in check_tasks(list(tasks)):
            for variation in env.variations(task, split)[:variations]:  # type: ignore[arg-type]
                specs.append(EpisodeSpec(task=task, variation=variation, split=split, policy=f"llm-{mode}",
                                         seed=seed))
    return specs


def evaluate_agent(config: KnowMapConfig, *, split: str = "test", tasks: Sequence[str], variations: int = 1,
                   step_limit: int | None = None, modes: Sequence[str] = KNOWLEDGE_MODES,
                   num_workers: int | None = None, out: Path = Path("agent_eval.json"),
                   on_result: Callable[[Any], None] | None = None) -> AgentEvaluation:
    """Play and score every (mode, task, variation); write ``out`` (JSON) and ``out.with_suffix('.png')``.

    Args:
        split: ``test`` (reporting) or ``dev`` (model selection).
        step_limit: moves per episode; default ``scienceworld.step_limit``.
        num_workers: agent actors in the pool; default ``ray.num_workers`` or the cores.

    Returns:
        the :class:`~knowmap.results.AgentEvaluation` written to ``out``: the protocol, per-mode scores (mean and
        per task), failures and tokens, and every episode.

    Raises:
        KnowMapError: split ``train``, an unknown mode, or kb-finetuned without a trained embedder.
        LLMUnavailableError: no LLM answers and none could be started.
    """
    from scienceworld.version import __version__ as version

    from knowmap.jobs.agent_runs import agent_config, run_agent_episodes

    if split not in ("dev", "test"):
        raise KnowMapError(f"evaluate on held-out variations: --split test (reporting) or dev, not {split!r}")
    sw = config.scienceworld
    if step_limit is not None:
        config = config.model_copy(update={"scienceworld": sw.model_copy(update={"step_limit": step_limit})})
        sw = config.scienceworld
    embedders = {m: embedder_path(config, m) or "packaged all-MiniLM-L6-v2" for m in modes if m != "none"}
    with ScienceWorld(step_limit=sw.step_limit, simplifications=sw.simplifications, java_heap=sw.java_heap) as env:
        specs = agent_specs(env, tasks, split, variations, modes)
    started = time.perf_counter()
    local = not config.llm.base_url
    log = str(config.paths.llm_log)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    with ray_session(config), agent_config(config, log) as cfg:
        results = run_agent_episodes(cfg, specs, num_workers=num_workers, on_result=on_result)
        endpoint = cfg.llm.base_url
        model = cfg.llm.model
    protocol = AgentEvalProtocol(
        split=split, tasks=sorted({s.task for s in specs}), variations_per_task=variations,
        variations={t: sorted({s.variation for s in specs if s.task == t}) for t in sorted({s.task for s in specs})},
        step_limit=sw.step_limit, simplifications=sw.simplifications or "none",
        scienceworld_version=version, model=model,
        endpoint=f"{endpoint} (local llama.cpp server, SmolLM2-135M-Instruct Q4_1)" if local else endpoint,
        constraint_style=config.llm.constraint_style, temperature=config.llm.temperature,
        modes=list(modes), embedders=embedders, agent=config.agent.model_dump(mode="json"),
        score="ScienceWorld's final score, 0-100; a failed task's -100 counts as 0",
        workers=num_workers or config.ray.num_workers or "cores", seconds=round(time.perf_counter() - started, 1),
    )
    report = summarise(results, modes, protocol)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.model_dump(mode="json"), indent=2))
    plot_results(report, out.with_suffix(".png"))
    return report


def summarise(results: Sequence[Any], modes: Sequence[str],
              protocol: AgentEvalProtocol | None = None) -> AgentEvaluation:
    """Per-mode mean and per-task scores, tokens and failures from the pool's ``EpisodeResult``s.

    Args:
        protocol: recorded with the scores (``knowmap eval`` writes it); None where the caller keeps its own.
    """
    episodes = []
    by_mode: dict[str, AgentModeSummary] = {}
    for mode in modes:
        rows = [r for r in results if r.spec.policy == f"llm-{mode}"]
        scored = [r for r in rows if r.ok]
        per_task: dict[str, list[float]] = defaultdict(list)
        for r in scored:
            per_task[r.spec.task].append(max(0.0, r.final_score))
        scores = [s for values in per_task.values() for s in values]
        by_mode[mode] = AgentModeSummary(
            mean=round(sum(scores) / len(scores), 2) if scores else None,
            per_task={t: round(sum(v) / len(v), 2) for t, v in sorted(per_task.items())},
            episodes=len(rows), failed=len(rows) - len(scored),
            tokens=ModeTokens(prompt=sum(r.prompt_tokens for r in rows),
                              completion=sum(r.completion_tokens for r in rows), calls=sum(r.llm_calls for r in rows)),
            steps=sum(r.steps for r in scored), invalid_answers=sum(r.invalid_answers for r in scored),
            replans=sum(r.replans for r in scored), seconds=round(sum(r.seconds for r in rows), 1),
        )
        for r in rows:
            episodes.append(AgentEpisodeScore(
                mode=mode, task=r.spec.task, variation=r.spec.variation, ok=r.ok,
                score=max(0.0, r.final_score) if r.ok else None, raw_score=r.final_score,
                steps=r.steps, episode_id=r.episode_id, prompt_tokens=r.prompt_tokens,
                completion_tokens=r.completion_tokens, llm_calls=r.llm_calls,
                replans=r.replans, invalid_answers=r.invalid_answers, plan=r.plan,
                facts_retrieved=getattr(r, "facts_retrieved", 0),
                experience_retrieved=getattr(r, "experience_retrieved", 0),
                seconds=round(r.seconds, 1), error=r.error.splitlines()[0] if r.error else ""))
    return AgentEvaluation(protocol=protocol, modes=by_mode, episodes=episodes)


def agent_table(report: AgentEvaluation) -> str:
    """Per-task scores (rows) by mode (columns), the mean, and tokens, as plain text."""
    modes = report.modes
    lines = [f"{'task':<28}" + "".join(f"{m:>14}" for m in modes)]
    for task in report.tasks:
        cells = [block.per_task.get(task) for block in modes.values()]
        lines.append(f"{task:<28}" + "".join(f"{'-' if c is None else f'{c:.2f}':>14}" for c in cells))
    means = [block.mean for block in modes.values()]
    lines.append(f"{'mean':<28}" + "".join(f"{'-' if c is None else f'{c:.2f}':>14}" for c in means))
    lines.append(f"{'tokens (prompt+completion)':<28}" + "".join(f"{block.tokens.total:>14}"
                                                                for block in modes.values()))
    lines.append(f"{'failed episodes':<28}" + "".join(f"{block.failed:>14}" for block in modes.values()))
    return "\n".join(lines)


def protocol_lines(report: AgentEvaluation) -> str:
    """The protocol as ``key: value`` lines (printed with every score); one line saying so where none was recorded."""
    if report.protocol is None:
        return "protocol: not recorded"
    p = report.protocol.model_dump(mode="json")
    keys = ("split", "tasks", "variations", "step_limit", "simplifications", "scienceworld_version", "model",
            "endpoint", "constraint_style", "temperature", "embedders", "score", "seconds")
    return "\n".join(f"{k}: {json.dumps(p[k]) if isinstance(p[k], dict | list) else p[k]}" for k in keys)


def plot_results(report: AgentEvaluation, path: Path) -> None:
    """Grouped bars: per-task score by mode, and the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = report.modes
    groups = [*report.tasks, "mean"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / max(1, len(modes))
    for i, (mode, block) in enumerate(modes.items()):
        values = [block.per_task.get(t) or 0.0 for t in groups[:-1]] + [block.mean or 0.0]
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=mode)
    ax.set_xticks([g + width * (len(modes) - 1) / 2 for g in range(len(groups))], groups, rotation=20, ha="right")
    ax.set_ylabel("ScienceWorld score (0-100)")
    p = report.protocol
    if p is not None:
        ax.set_title(f"{p.model} on {p.split}, {p.variations_per_task} variation(s)/task, "
                     f"step limit {p.step_limit}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
