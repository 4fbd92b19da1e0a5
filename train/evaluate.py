"""Retrieval evaluation on held-out episodes: BM25 and each embedder, each with and without a reranker.

Queries, corpora and relevance come from :func:`eval_queries`, built by the same rules as the training pairs. A
first-stage retriever ranks a query's whole corpus; the reranker (anything with ``predict(list[(query, doc)])``,
like sentence-transformers' ``CrossEncoder``) re-orders the first ``rerank_top``, its order fused with the first
stage's by reciprocal rank, and leaves the rest in place.
Results are reported per kind, overall, per task, and split into tasks seen in training and unseen tasks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from knowmap.models.lexical import BM25Retriever, rerank_head
from knowmap.results import SUBSETS, KindEvaluation, RetrievalEvaluation, RetrievalProtocol, SystemMetrics
from knowmap.train.data import Episode
from knowmap.train.metrics import DEFAULT_KS, evaluate_rankings
from knowmap.train.pairs import DEFAULT_THETA, Encoder, EvalQuery, eval_queries

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
    rerank_top: int = 20,
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
        rerank_top: how many first-stage results the reranker re-orders.

    Returns:
        a :class:`~knowmap.results.RetrievalEvaluation`: the protocol and, per kind, the query count and every
        system's metrics over all queries, the seen and the unseen tasks' queries (None where there are none) and
        per task.

    Raises:
        ValueError: no embedder while experience relevance needs one, ``rerank_top`` below 1, or an unknown kind.
    """
    if rerank_top < 1:
        raise ValueError(f"rerank_top must be >= 1, got {rerank_top}")
    judge = relevance_embedder if relevance_embedder is not None else next(iter(embedders.values()), None)
    seen_tasks = sorted(set(train_tasks))
    tasks = sorted({e.task for e in episodes})
    results = RetrievalEvaluation(protocol=RetrievalProtocol(
        splits=sorted({e.split for e in episodes}), episodes=sorted(e.episode_id for e in episodes),
        tasks=tasks, train_tasks=seen_tasks, unseen_tasks=[t for t in tasks if t not in seen_tasks],
        theta=theta, rerank_top=rerank_top if reranker is not None else None,
        relevance_embedder=getattr(judge, "version", type(judge).__name__) if judge is not None else None,
        systems=["bm25", *embedders],
    ))
    for kind in kinds:
        queries, corpora, qrels = eval_queries(episodes, kind, embedder=judge, theta=theta)
        rankings: dict[str, list[list[int]]] = {"bm25": _bm25_rankings(queries, corpora)}
        for name, embedder in embedders.items():
            rankings[name] = _dense_rankings(queries, corpora, embedder)
        if reranker is not None:
            scores = _rerank_scores(queries, corpora, rankings, reranker, rerank_top)
            for name in list(rankings):
                rankings[f"{name}+rerank"] = [_rerank(q.text, corpus, ranking, scores, rerank_top)
                                              for q, corpus, ranking in zip(queries, corpora, rankings[name],
                                                                            strict=True)]
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


def _bm25_rankings(queries: list[EvalQuery], corpora: list[list[str]]) -> list[list[int]]:
    cache: dict[tuple[str, ...], BM25Retriever] = {}  # queries of one step share a corpus
    out = []
    for query, corpus in zip(queries, corpora, strict=True):
        key = tuple(corpus)
        if key not in cache:
            cache[key] = BM25Retriever(corpus)
        out.append(cache[key].rank(query.text))
    return out


def _dense_rankings(queries: list[EvalQuery], corpora: list[list[str]], embedder: Encoder) -> list[list[int]]:
    texts = list(dict.fromkeys([q.text for q in queries] + [t for corpus in corpora for t in corpus]))
    row = {t: i for i, t in enumerate(texts)}
    vectors = np.asarray(embedder.encode(texts), dtype=np.float32) if texts else np.zeros((0, 1), np.float32)
    out = []
    for query, corpus in zip(queries, corpora, strict=True):
        scores = vectors[[row[t] for t in corpus]] @ vectors[row[query.text]]  # (len(corpus),)
        out.append([int(i) for i in np.argsort(-scores, kind="stable")])
    return out


def _rerank_scores(queries: list[EvalQuery], corpora: list[list[str]], rankings: dict[str, list[list[int]]],
                   reranker: PairScorer, top: int) -> dict[tuple[str, str], float]:
    """The reranker's score of every (query, doc) any system puts in its top ``top``, each pair scored once."""
    wanted: dict[tuple[str, str], None] = {}
    for ranked in rankings.values():
        for query, corpus, ranking in zip(queries, corpora, ranked, strict=True):
            for i in ranking[:top]:
                wanted[(query.text, corpus[i])] = None
    pairs = list(wanted)
    scores = np.asarray(reranker.predict(pairs), dtype=np.float64).reshape(-1) if pairs else np.zeros(0)
    if len(scores) != len(pairs):
        raise ValueError(f"the reranker returned {len(scores)} scores for {len(pairs)} pairs; it must return one "
                         "score per (query, document) pair")
    return dict(zip(pairs, scores.tolist(), strict=True))


def _rerank(query: str, corpus: list[str], ranking: list[int], scores: dict[tuple[str, str], float],
            top: int) -> list[int]:
    """The first stage's top ``top`` fused by reciprocal rank with the reranker's order of it (as the served
    pipeline does); the rest in place."""
    return rerank_head(ranking, lambda i: scores[(query, corpus[i])], top)


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
