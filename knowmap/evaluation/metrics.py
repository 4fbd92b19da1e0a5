"""Retrieval metrics as pure functions over rankings and relevance sets.

A ranking is a sequence of document ids, best first; relevance is binary (a set of ids). Recall@k is
``|relevant in top k| / |relevant|``, MRR the mean of ``1 / rank of the first relevant`` (0 if none is ranked),
nDCG@k the binary-gain DCG of the top k over the DCG of an ideal ranking (``log2(rank + 1)`` discount).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

DEFAULT_KS = (1, 5, 10)


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def recall_at_k(ranking: Sequence[Hashable], relevant: set, k: int) -> float:
    """The fraction of the relevant ids found in the top ``k`` of ``ranking``.

    Raises:
        ValueError: ``k`` below 1, or ``relevant`` is empty (recall is undefined without a relevant id).
    """
    _check_k(k)
    if not relevant:
        raise ValueError("recall needs at least one relevant id; leave queries without relevant ids out")
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def reciprocal_rank(ranking: Sequence[Hashable], relevant: set) -> float:
    """``1 / rank`` of the first relevant id in ``ranking`` (ranks start at 1); 0.0 if none is ranked."""
    for rank, doc in enumerate(ranking, start=1):
        if doc in relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranking: Sequence[Hashable], relevant: set, k: int = 10) -> float:
    """Binary-gain nDCG of the top ``k``: DCG over the DCG of ``min(k, |relevant|)`` relevant ids at the top.

    Raises:
        ValueError: ``k`` below 1, or ``relevant`` is empty.
    """
    _check_k(k)
    if not relevant:
        raise ValueError("nDCG needs at least one relevant id; leave queries without relevant ids out")
    dcg = sum(1.0 / math.log2(rank + 1) for rank, doc in enumerate(ranking[:k], start=1) if doc in relevant)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(k, len(relevant)) + 1))
    return dcg / ideal


def evaluate_rankings(
    rankings: Sequence[Sequence[Hashable]],
    qrels: Sequence[set],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ndcg_k: int = 10,
) -> dict[str, float]:
    """Mean Recall@k for each k, MRR and nDCG@``ndcg_k`` over queries.

    Args:
        rankings: one ranking per query, best first.
        qrels: the relevant ids of each query, aligned with ``rankings``; every set must be non-empty.

    Returns:
        ``{"recall@1": ..., "recall@5": ..., "recall@10": ..., "mrr": ..., "ndcg@10": ..., "queries": n}``
        (all 0.0 for no queries).

    Raises:
        ValueError: ``rankings`` and ``qrels`` differ in length, a relevance set is empty, or a k is below 1.
    """
    if len(rankings) != len(qrels):
        raise ValueError(f"{len(rankings)} rankings but {len(qrels)} relevance sets; pass one set per query")
    n = len(rankings)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = _mean([recall_at_k(r, q, k) for r, q in zip(rankings, qrels, strict=True)])
    out["mrr"] = _mean([reciprocal_rank(r, q) for r, q in zip(rankings, qrels, strict=True)])
    out[f"ndcg@{ndcg_k}"] = _mean([ndcg_at_k(r, q, ndcg_k) for r, q in zip(rankings, qrels, strict=True)])
    out["queries"] = n
    return out


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0
