"""Retrieval evaluation on held-out episodes: BM25 and each embedder, each with and without a reranker.

Queries, corpora and relevance come from :func:`~knowmap.evaluation.moments.eval_queries`, built by the same rules
as the training pairs. Every ranking is made by the served pipeline, :class:`~knowmap.models.retrieval.Retriever`
over each query's whole corpus with the ``retrieval`` settings: BM25 alone, each embedder, and each of them
``+rerank`` (the reranker, anything with ``predict(list[(query, doc)])`` like sentence-transformers'
``CrossEncoder``, re-orders the first ``rerank_candidates``, its order fused with the first stage's).
Results are reported per kind, overall, per task, and split into tasks seen in training and unseen tasks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from knowmap.config import RetrievalConfig
from knowmap.environment.episodes import Episode
from knowmap.evaluation.decision import memoized_pair_scores
from knowmap.evaluation.metrics import DEFAULT_KS, evaluate_rankings
from knowmap.evaluation.moments import DEFAULT_THETA, Encoder, EvalQuery, eval_queries
from knowmap.models.retrieval import Retriever
from knowmap.results import SUBSETS, KindEvaluation, RetrievalEvaluation, RetrievalProtocol, SystemMetrics

PLOT_METRICS = ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@10")


class PairScorer(Protocol):
    """Scores (query, document) pairs; higher is more relevant."""

    def predict(self, pairs: list[tuple[str, str]]) -> Sequence[float]: ...


def evaluate_retrieval(
    episodes: Sequence[Episode],
    *,
    embedders: Mapping[str, Encoder],
    reranker: PairScorer | None = None,
    kinds: Sequence[str] = ("env", "experience"),
    train_tasks: Iterable[str] = (),
    relevance_embedder: Encoder | None = None,
    theta: float = DEFAULT_THETA,
    settings: RetrievalConfig | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> RetrievalEvaluation:
    """Recall@k, MRR and nDCG@10 of every retrieval system on ``episodes`` (a dev or test split).

    Args:
        episodes: held-out episodes; their split is recorded in the results.
        embedders: name -> embedder (e.g. ``{"base": ..., "finetuned": ...}``); each is a system.
        reranker: if given, every system is also evaluated re-ranked (``"<system>+rerank"``).
        kinds: ``"env"``, ``"experience"`` and/or ``"joint"``.
        train_tasks: the tasks the evaluated models were trained on; results split into seen and unseen tasks.
        relevance_embedder: defines experience relevance (similarity above ``theta``); default the first of
            ``embedders``, which should be the base embedder so that every model is judged the same way.
        settings: the pipeline's ``retrieval`` settings (``rerank_candidates``: the first-stage results the
            reranker re-orders); None = the defaults. Systems are ranked without the hybrid stage.

    Returns:
        a :class:`~knowmap.results.RetrievalEvaluation`: the protocol and, per kind, the query count and every
        system's metrics over all queries, the seen and the unseen tasks' queries (None where there are none) and
        per task.

    Raises:
        ValueError: no embedder while experience relevance needs one, or an unknown kind.
    """
    settings = settings if settings is not None else RetrievalConfig()
    judge = relevance_embedder if relevance_embedder is not None else next(iter(embedders.values()), None)
    seen_tasks = sorted(set(train_tasks))
    tasks = sorted({e.task for e in episodes})
    results = RetrievalEvaluation(protocol=RetrievalProtocol(
        splits=sorted({e.split for e in episodes}), episodes=sorted(e.episode_id for e in episodes),
        tasks=tasks, train_tasks=seen_tasks, unseen_tasks=[t for t in tasks if t not in seen_tasks],
        theta=theta, rerank_top=settings.rerank_candidates if reranker is not None else None,
        relevance_embedder=getattr(judge, "version", type(judge).__name__) if judge is not None else None,
        systems=["bm25", *embedders],
    ))
    rerank = None if reranker is None else memoized_pair_scores(reranker)
    retrievers = {name: Retriever(encoder, rerank=rerank, settings=settings)
                  for name, encoder in {"bm25": None, **{n: e.encode for n, e in embedders.items()}}.items()}
    for kind in kinds:
        queries, corpora, qrels = eval_queries(episodes, kind, embedder=judge, theta=theta)
        requests = [(q.text, corpus) for q, corpus in zip(queries, corpora, strict=True)]
        rankings = {name: r.rank(requests, hybrid=False, rerank=False) for name, r in retrievers.items()}
        if reranker is not None:
            rankings.update({f"{name}+rerank": r.rank(requests, hybrid=False, rerank=True)
                             for name, r in retrievers.items()})
        results.kinds[kind] = KindEvaluation(
            queries=len(queries),
            systems={name: _report(queries, ranked, qrels, seen_tasks, ks) for name, ranked in rankings.items()},
        )
    return results


def _report(queries: list[EvalQuery], rankings: list[list[int]], qrels: list[set[int]], seen: list[str],
            ks: Sequence[int]) -> SystemMetrics:
    def subset(keep: list[int]) -> dict[str, float] | None:
        if not keep:
            return None
        return evaluate_rankings([rankings[i] for i in keep], [qrels[i] for i in keep], ks=ks)

    every = list(range(len(queries)))
    return SystemMetrics(
        all=subset(every) or evaluate_rankings([], [], ks=ks),
        seen=subset([i for i in every if queries[i].task in seen]),
        unseen=subset([i for i in every if queries[i].task not in seen]),
        per_task={task: subset([i for i in every if queries[i].task == task])  # never None: the task has queries
                  for task in sorted({q.task for q in queries})},
    )


def plot_metrics(results: RetrievalEvaluation, path: str | Path, *, metrics: Sequence[str] = PLOT_METRICS,
                 subset: str = "all") -> Path:
    """A grouped bar chart of ``results`` (from :func:`evaluate_retrieval`): one panel per kind, one group per
    metric, one bar per system. Written as a PNG with the Agg backend (no display needed).

    Args:
        subset: ``"all"``, ``"seen"`` or ``"unseen"`` queries.

    Returns:
        the path written.

    Raises:
        ValueError: an unknown subset, or results without kinds.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; allowed: {', '.join(SUBSETS)}")
    kinds = list(results.kinds)
    if not kinds:
        raise ValueError("results hold no kinds to plot; pass the output of evaluate_retrieval")
    fig = Figure(figsize=(max(6.0, 1.6 * len(metrics)) * len(kinds), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds, strict=True):
        block = results.kinds[kind]
        systems = list(block.systems)
        width = 0.8 / max(len(systems), 1)
        x = np.arange(len(metrics))
        for n, system in enumerate(systems):
            values = block.systems[system].subset(subset) or {}
            ax.bar(x + (n - (len(systems) - 1) / 2) * width, [values.get(m, 0.0) for m in metrics], width,
                   label=system)
        ax.set_xticks(x, list(metrics))
        ax.set_ylim(0, 1)
        ax.set_title(f"{kind} ({subset}, {block.queries} queries)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("score")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
