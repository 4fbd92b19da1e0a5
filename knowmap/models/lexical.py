"""Lexical retrieval and rank fusion, Ray-free: BM25 over a small corpus and reciprocal-rank fusion.

BM25 is the lexical baseline of every evaluation and the sparse half of the hybrid pipeline
(:class:`knowmap.models.retrieval.Retriever` with ``hybrid=True``); :func:`rrf` fuses rankings by reciprocal rank
(Cormack, Clarke and Buettcher, SIGIR 2009): ``sum 1 / (k + rank)``, with no score scale to calibrate, which is
also how the reranker's order is combined with the first stage's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

RRF_K = 60  # the constant of the RRF paper; larger = flatter weights over ranks
_TOKEN = re.compile(r"[a-z0-9]+")


def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> dict[int, float]:
    """Reciprocal-rank fusion: ``{id: sum over rankings of 1 / (k + rank)}`` (ranks start at 1).

    An id missing from a ranking gets nothing from it. Sort the result by descending score for the fused order;
    :func:`fuse` does, ties broken by the first ranking.

    Raises:
        ValueError: ``k`` below 1.
    """
    if k < 1:
        raise ValueError(f"the RRF constant k must be >= 1, got {k}")
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, start=1):
            scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
    return scores


def fuse(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> tuple[list[int], dict[int, float]]:
    """The ids of ``rankings`` by descending :func:`rrf` score (ties keep the first ranking's order), and the
    scores."""
    scores = rrf(rankings, k)
    first: dict[int, int] = {}
    for doc in (d for ranking in rankings for d in ranking):
        first.setdefault(doc, len(first))
    return sorted(scores, key=lambda doc: (-scores[doc], first[doc])), scores


def tokenize(text: str) -> list[str]:
    """Lower-cased alphanumeric tokens: the BM25 tokenizer (ScienceWorld text has no morphology to speak of)."""
    return _TOKEN.findall(text.lower())


class BM25Retriever:
    """Okapi BM25 over a fixed corpus (rank-bm25's ``BM25Okapi``).

    Args:
        corpus: the documents; their positions are their ids in :meth:`rank`.
        k1, b: BM25's term-frequency saturation and length normalisation.

    Raises:
        ValueError: the corpus is empty.
    """

    def __init__(self, corpus: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        from rank_bm25 import BM25Okapi

        if not corpus:
            raise ValueError("BM25 needs a non-empty corpus")
        self.corpus = list(corpus)
        # rank-bm25 divides by the mean document length; an all-empty corpus would divide by zero.
        tokens = [tokenize(doc) or ["\x00"] for doc in self.corpus]
        self._bm25 = BM25Okapi(tokens, k1=k1, b=b)

    def scores(self, query: str) -> np.ndarray:
        """The BM25 score of every document for ``query``, shape ``(len(corpus),)``."""
        return np.asarray(self._bm25.get_scores(tokenize(query)), dtype=np.float64)

    def rank(self, query: str, k: int | None = None) -> list[int]:
        """Document positions by descending score (ties by position), the top ``k`` (default all)."""
        order = np.argsort(-self.scores(query), kind="stable")
        return [int(i) for i in (order if k is None else order[:k])]
