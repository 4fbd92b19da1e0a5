"""The final report of ``knowmap run``: Markdown and PNG plots, every number taken from what the run measured.

:class:`RunReport` collects the run's sections as they finish; :func:`write_report` writes ``report.md``,
``report.json`` and the plots beside them. A section the run did not reach is reported as missing (and named in
:attr:`RunReport.missing`), never filled with placeholders.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, FieldSerializationInfo, field_serializer

from knowmap.jobs.build import BuildSummary
from knowmap.results import AgentRounds, RetrievalEvaluation, TrainingReport
from knowmap.schemas import RetrainDecision

SECTIONS = ("build", "training", "retrieval", "agents", "retrain", "throughput")
RETRIEVAL_METRICS = ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@10")


class RunReport(BaseModel):
    """What one ``knowmap run`` measured, section by section (each None until its stage ran).

    The sections are the stages' own results; ``report.json`` is this model's ``model_dump(mode="json")``, with the
    build summary's counts but not its per-episode list. ``throughput`` (label -> rate) and ``serve`` (label ->
    value) are flat tables whose keys are the labels the report prints.
    """

    protocol: dict[str, Any] = Field(default_factory=dict)
    stages: dict[str, float] = Field(default_factory=dict, description="seconds per stage, in order")
    build: BuildSummary | None = None
    training: TrainingReport | None = None
    retrieval: RetrievalEvaluation | None = None
    agents: AgentRounds | None = None
    retrain: RetrainDecision | None = None
    throughput: dict[str, float] | None = None
    serve: dict[str, Any] | None = None
    errors: list[str] = Field(default_factory=list)

    @property
    def missing(self) -> list[str]:
        """The sections whose stage did not finish, in stage order."""
        return [name for name in SECTIONS if getattr(self, name) is None]

    @field_serializer("build")
    def _build_counts(self, build: BuildSummary | None, info: FieldSerializationInfo) -> dict[str, Any] | None:
        # The counts and where the KBs are; every episode is in build_summary.json already.
        return None if build is None else build.model_dump(mode=info.mode, exclude={"per_episode"})


def write_report(report: RunReport, folder: str | Path) -> Path:
    """Write ``report.md``, ``report.json`` and the PNG plots into ``folder``; returns the Markdown's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = _plots(report, folder)
    (folder / "report.json").write_text(json.dumps(report.model_dump(mode="json"), indent=2))
    path = folder / "report.md"
    path.write_text(render_markdown(report, plots))
    return path


def render_markdown(report: RunReport, plots: dict[str, str] | None = None) -> str:
    """The report as Markdown; ``plots`` maps a section to the file name of its PNG (relative to the report)."""
    plots = plots or {}
    out = ["# KnowMap run report", ""]
    out += ["## Summary", "", *_table(["", "value"], summary_rows(report)), ""]
    out += ["## Protocol", "", *_table(["setting", "value"], [(k, _fmt(v)) for k, v in report.protocol.items()]), ""]
    out += ["## Stages", "", *_table(["stage", "seconds"], [(k, f"{v:.1f}") for k, v in report.stages.items()]), ""]
    out += _section("Knowledge bases (expert trajectories, train split)", report.build, plots.get("build"),
                    lambda b: _table(["", "count"], [(k, _fmt(getattr(b, k))) for k in
                                                     ("episodes", "steps", "facts", "subgoals", "experience_rows")]))
    out += _section("Retriever training", report.training, plots.get("training"), _training_rows)
    out += _section("Retrieval quality (held-out dev episodes)", report.retrieval, plots.get("retrieval"),
                    _retrieval_rows)
    out += _section("Agent scores per knowledge mode", report.agents, plots.get("agents"), _agent_rows)
    out += _section("Retrain cycle", report.retrain, None, _retrain_rows)
    out += _section("Throughput", report.throughput, plots.get("throughput"),
                    lambda t: _table(["measure", "value"], [(k, f"{v:.3g}") for k, v in t.items()]))
    if report.serve:
        out += ["## Retrieval service", "", *_table(["", ""], [(k, _fmt(v)) for k, v in report.serve.items()]), ""]
    if report.errors:
        out += ["## Errors", "", *[f"- {e}" for e in report.errors], ""]
    return "\n".join(out)


def summary_rows(report: RunReport) -> list[tuple[str, str]]:
    """The headline numbers (also printed by ``knowmap run`` at the end)."""
    rows: list[tuple[str, str]] = []
    if report.build:
        rows.append(("expert episodes / steps", f"{report.build.episodes} / {report.build.steps}"))
    if report.retrieval:
        evaluation = report.retrieval
        for kind, block in evaluation.kinds.items():
            if not block.queries:
                rows.append((f"nDCG@10 {kind}", "no held-out queries (add dev variations)"))
                continue
            ndcg = [evaluation.ndcg(kind, s) for s in ("bm25", "base", "finetuned") if s in block.systems]
            rows.append((f"nDCG@10 {kind} (bm25 / base / fine-tuned)", " / ".join(f"{v:.3f}" for v in ndcg)))
        decision = evaluation.decision
        if decision is not None:
            name = next((k for m in decision.modes.values() for k in m if k.startswith("shortlist_recall")), "")
            values = [decision.metric(m, name) for m in ("none", "bm25", "kb-base", "kb-finetuned")]
            rows.append((f"{name.replace('_', ' ')} (none/bm25/base/tuned)",
                         " / ".join("-" if v is None else f"{v:.3f}" for v in values)))
    if report.agents:
        for mode, round_ in report.agents.modes.items():
            rows.append((f"agent mean score, {mode}", _score(round_.mean_score)))
    if report.retrain:
        rows.append(("retrain decision", "promoted" if report.retrain.promoted else "kept serving model"))
    rows.append(("total seconds", f"{sum(report.stages.values()):.0f}"))
    if report.missing:
        rows.append(("missing sections", ", ".join(report.missing)))
    return rows


def _section(title: str, data: Any, plot: str | None, body) -> list[str]:  # noqa: ANN001 - a row renderer
    lines = [f"## {title}", ""]
    if data is None:
        return lines + ["*Not reached in this run (see Errors).*", ""]
    lines += body(data)
    if plot:
        lines += ["", f"![{title}]({plot})"]
    return lines + [""]


def _training_rows(t: TrainingReport) -> list[str]:
    rows = [(f"pairs ({kind})", str(n)) for kind, n in t.pairs.items()]
    history = t.embedder.history
    if history:
        rows.append(("embedder loss, first → last epoch", f"{history[0]['loss']:.4f} → {history[-1]['loss']:.4f}"))
    rows.append(("embedder", t.embedder.model_dir))
    if t.reranker is not None:
        rows.append(("reranker", t.reranker.model_dir))
    return _table(["", ""], rows)


def _retrieval_rows(r: RetrievalEvaluation) -> list[str]:
    rows = []
    for kind, block in r.kinds.items():
        if not block.queries:
            rows.append((kind, "no held-out queries", *([""] * len(RETRIEVAL_METRICS))))
            continue
        for system, metrics in block.systems.items():
            rows.append((kind, system, *(f"{_or_nan(metrics.metric(m)):.3f}" for m in RETRIEVAL_METRICS)))
    unseen = r.protocol.unseen_tasks
    note = [f"Tasks never seen in training: {', '.join(unseen)}."] if unseen else []
    out = [*_table(["kb", "system", *RETRIEVAL_METRICS], rows), "", *note]
    if r.decision is not None:  # judged by gold next actions, not by an embedder
        names = sorted({k for m in r.decision.modes.values() for k in m if not k.startswith("steps")})
        table = [(mode, *("-" if n not in m else f"{m[n]:.3f}" for n in names), str(m.get("steps", 0)))
                 for mode, m in r.decision.modes.items()]
        out += ["", "Decision support, judged by the gold next action (shortlist: does the actuator's list hold it; "
                "support: does the top k hold a fact or sub-goal the gold actions need):", "",
                *_table(["mode", *names, "steps"], table)]
    return out


def _agent_rows(a: AgentRounds) -> list[str]:
    tasks = sorted({t for round_ in a.modes.values() for t in round_.per_task})
    rows = [(mode, *(_score(round_.per_task.get(t)) for t in tasks),
             _score(round_.mean_score), str(round_.episodes), str(round_.tokens))
            for mode, round_ in a.modes.items()]
    return _table(["mode", *tasks, "mean", "episodes", "tokens"], rows)


def _retrain_rows(d: RetrainDecision) -> list[str]:
    rows = [("trigger", d.trigger), ("training episodes", str(d.train_episodes)),
            ("candidate (gate metrics)", _fmt(d.candidate_scores)), ("serving (gate metrics)", _fmt(d.serving_scores)),
            ("decision", d.reason), ("seconds", _fmt(d.seconds))]
    return _table(["", ""], rows)


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"  # "-": no episode of it finished


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _plots(report: RunReport, folder: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, str] = {}
    history = report.training.embedder.history if report.training else []
    if history:
        from knowmap.train.embedder_trainer import plot_loss

        plot_loss(history, folder / "loss.png")
        plots["training"] = "loss.png"
    if report.retrieval:
        from knowmap.evaluation.retrieval import plot_metrics

        plot_metrics(report.retrieval, folder / "retrieval.png")
        plots["retrieval"] = "retrieval.png"
    if report.agents and report.agents.modes:
        modes = report.agents.modes
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar(list(modes), [m.mean_score or 0.0 for m in modes.values()], color="#4c72b0")
        ax.set_ylabel("mean score (0-100)")
        ax.set_title("agent score per knowledge mode")
        fig.tight_layout()
        fig.savefig(folder / "agents.png", dpi=110)
        plt.close(fig)
        plots["agents"] = "agents.png"
    if report.throughput:
        from matplotlib.ticker import NullFormatter

        fig, ax = plt.subplots(figsize=(8, 3.2))
        names = list(report.throughput)
        values = [report.throughput[n] for n in names]
        ax.barh(names, values, color="#55a868")
        ax.set_xscale("log")  # rates of different units and magnitudes: compare each against itself over runs
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(right=max(values) * 3)
        ax.set_title("throughput, log scale (units in each label)")
        fig.tight_layout()
        fig.savefig(folder / "throughput.png", dpi=110)
        plt.close(fig)
        plots["throughput"] = "throughput.png"
    return plots
