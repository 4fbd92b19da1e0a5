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

from pydantic import BaseModel, Field

SECTIONS = ("build", "training", "retrieval", "agents", "retrain", "throughput")
RETRIEVAL_METRICS = ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@10")


class RunReport(BaseModel):
    """What one ``knowmap run`` measured, section by section (each a JSON-able dict, None until it ran)."""

    protocol: dict[str, Any] = Field(default_factory=dict)
    stages: dict[str, float] = Field(default_factory=dict, description="seconds per stage, in order")
    build: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    retrieval: dict[str, Any] | None = None
    agents: dict[str, Any] | None = None
    retrain: dict[str, Any] | None = None
    throughput: dict[str, float] | None = None
    serve: dict[str, Any] | None = None
    errors: list[str] = Field(default_factory=list)

    @property
    def missing(self) -> list[str]:
        return [name for name in SECTIONS if getattr(self, name) is None]


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
                    lambda b: _table(["", "count"], [(k, _fmt(b[k])) for k in
                                                     ("episodes", "steps", "facts", "subgoals", "experience_rows")
                                                     if k in b]))
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
        rows.append(("expert episodes / steps", f"{report.build.get('episodes')} / {report.build.get('steps')}"))
    if report.retrieval:
        for kind, block in report.retrieval.get("kinds", {}).items():
            if not block.get("queries"):
                rows.append((f"nDCG@10 {kind}", "no held-out queries (add dev variations)"))
                continue
            systems = block["systems"]
            ndcg = {s: systems[s]["all"]["ndcg@10"] for s in ("bm25", "base", "finetuned") if s in systems}
            rows.append((f"nDCG@10 {kind} (bm25 / base / fine-tuned)", " / ".join(f"{v:.3f}" for v in ndcg.values())))
    if report.agents:
        for mode, block in report.agents.get("modes", {}).items():
            rows.append((f"agent mean score, {mode}", _score(block["mean_score"])))
    if report.retrain:
        rows.append(("retrain decision", "promoted" if report.retrain.get("promoted") else "kept serving model"))
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


def _training_rows(t: dict[str, Any]) -> list[str]:
    rows = [(f"pairs ({kind})", str(n)) for kind, n in t.get("pairs", {}).items()]
    history = t.get("embedder", {}).get("history", [])
    if history:
        rows.append(("embedder loss, first → last epoch", f"{history[0]['loss']:.4f} → {history[-1]['loss']:.4f}"))
    rows.append(("embedder", t.get("embedder", {}).get("model_dir", "")))
    if t.get("reranker"):
        rows.append(("reranker", t["reranker"].get("model_dir", "")))
    return _table(["", ""], rows)


def _retrieval_rows(r: dict[str, Any]) -> list[str]:
    rows = []
    for kind, block in r.get("kinds", {}).items():
        if not block.get("queries"):
            rows.append((kind, "no held-out queries", *([""] * len(RETRIEVAL_METRICS))))
            continue
        for system, metrics in block["systems"].items():
            rows.append((kind, system, *(f"{metrics['all'].get(m, float('nan')):.3f}" for m in RETRIEVAL_METRICS)))
    unseen = r.get("protocol", {}).get("unseen_tasks") or []
    note = [f"Tasks never seen in training: {', '.join(unseen)}."] if unseen else []
    return [*_table(["kb", "system", *RETRIEVAL_METRICS], rows), "", *note]


def _agent_rows(a: dict[str, Any]) -> list[str]:
    modes = a.get("modes", {})
    tasks = sorted({t for block in modes.values() for t in block.get("per_task", {})})
    rows = [(mode, *(_score(block.get("per_task", {}).get(t)) for t in tasks),
             _score(block["mean_score"]), str(block.get("episodes", "")), str(block.get("tokens", "")))
            for mode, block in modes.items()]
    return _table(["mode", *tasks, "mean", "episodes", "tokens"], rows)


def _retrain_rows(d: dict[str, Any]) -> list[str]:
    rows = [("trigger", d.get("trigger", "")), ("training episodes", str(d.get("train_episodes", ""))),
            ("candidate nDCG@10", _fmt(d.get("candidate_ndcg"))), ("serving nDCG@10", _fmt(d.get("serving_ndcg"))),
            ("decision", d.get("reason", "")), ("seconds", _fmt(d.get("seconds")))]
    return _table(["", ""], rows)


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
    history = (report.training or {}).get("embedder", {}).get("history")
    if history:
        from knowmap.train.embedder_trainer import plot_loss

        plot_loss(history, folder / "loss.png")
        plots["training"] = "loss.png"
    if report.retrieval:
        from knowmap.train.evaluate import plot_metrics

        plot_metrics(report.retrieval, folder / "retrieval.png")
        plots["retrieval"] = "retrieval.png"
    if report.agents and report.agents.get("modes"):
        modes = report.agents["modes"]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar(list(modes), [m["mean_score"] or 0.0 for m in modes.values()], color="#4c72b0")
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
