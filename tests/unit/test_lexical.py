"""Reciprocal-rank fusion and the BM25 ranker: pure functions."""

from __future__ import annotations

import pytest

from knowmap.models.lexical import BM25Retriever, fuse, rrf


def test_rrf_sums_reciprocal_ranks_and_missing_ids_get_nothing() -> None:
    scores = rrf([[3, 1, 2], [1, 4]], k=10)
    assert scores[1] == pytest.approx(1 / 12 + 1 / 11)
    assert scores[3] == pytest.approx(1 / 11) and scores[4] == pytest.approx(1 / 12) and set(scores) == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="k must be >= 1"):
        rrf([[1]], k=0)


def test_fuse_ties_keep_the_first_rankings_order() -> None:
    assert fuse([[0, 1, 2], [1, 0, 2]])[0] == [0, 1, 2]  # 0 and 1 tie: the first ranking decides
    assert fuse([[0, 1, 2], [2, 1, 0]])[0] == [0, 2, 1]  # 0 and 2 tie above 1 (1/61 + 1/63 > 2/62)
    assert fuse([[0, 1, 2, 3], [3, 2, 1, 0], [3, 1]])[0] == [3, 1, 0, 2]
    assert fuse([])[0] == []


def test_bm25_ranks_lexical_matches_first() -> None:
    bm25 = BM25Retriever(["heat the pot", "plant the seed", "read the thermometer"])
    assert bm25.rank("thermometer")[0] == 2 and bm25.rank("the seed", k=1) == [1]
