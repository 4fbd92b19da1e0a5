"""Retrieval metrics on hand-computed toy rankings, the BM25 baseline, and the evaluation report and plot."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from doubles import HashingEncoder  # tests/unit is on sys.path (pytest prepends it)

from knowmap.environment.episodes import load_episodes
from knowmap.evaluation.metrics import evaluate_rankings, ndcg_at_k, recall_at_k, reciprocal_rank
from knowmap.evaluation.retrieval import evaluate_retrieval, plot_metrics
from knowmap.models.lexical import BM25Retriever

FIXTURES = Path(__file__).parent.parent / "fixtures" / "trajectories"
RANKING = ["a", "b", "c", "d", "e"]
RELEVANT = {"a", "c"}  # relevant at ranks 1 and 3


class OverlapReranker:
    """A stand-in cross-encoder: the number of query words in the document."""

    def predict(self, pairs: list[tuple[str, str]]) -> list[float]:
        return [float(len(set(q.lower().split()) & set(d.lower().split()))) for q, d in pairs]


def test_recall_at_k_counts_relevant_in_top_k() -> None:
    assert recall_at_k(RANKING, RELEVANT, 1) == 0.5
    assert recall_at_k(RANKING, RELEVANT, 2) == 0.5
    assert recall_at_k(RANKING, RELEVANT, 3) == 1.0
    assert recall_at_k(RANKING, RELEVANT, 10) == 1.0
    assert recall_at_k(RANKING, {"z"}, 5) == 0.0


def test_reciprocal_rank_is_one_over_first_relevant_rank() -> None:
    assert reciprocal_rank(RANKING, RELEVANT) == 1.0
    assert reciprocal_rank(RANKING, {"c", "e"}) == pytest.approx(1 / 3)
    assert reciprocal_rank(RANKING, {"z"}) == 0.0


def test_ndcg_matches_hand_computation() -> None:
    # DCG = 1/log2(2) + 1/log2(4) = 1.5; ideal = 1/log2(2) + 1/log2(3).
    assert ndcg_at_k(RANKING, RELEVANT, 10) == pytest.approx(1.5 / (1 + 1 / math.log2(3)))
    assert ndcg_at_k(["a", "c", "b"], RELEVANT, 10) == pytest.approx(1.0)
    # Only the top k count, and the ideal has min(k, |relevant|) hits.
    assert ndcg_at_k(RANKING, RELEVANT, 1) == pytest.approx(1.0)
    assert ndcg_at_k(["b", "a"], {"a"}, 1) == 0.0


def test_evaluate_rankings_averages_over_queries() -> None:
    result = evaluate_rankings([RANKING, ["c", "a"]], [RELEVANT, {"a"}])
    assert result["recall@1"] == pytest.approx((0.5 + 0.0) / 2)
    assert result["recall@5"] == pytest.approx(1.0)
    assert result["mrr"] == pytest.approx((1.0 + 0.5) / 2)
    assert result["ndcg@10"] == pytest.approx((1.5 / (1 + 1 / math.log2(3)) + 1 / math.log2(3)) / 2)
    assert result["queries"] == 2


def test_metric_errors_say_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="k must be >= 1"):
        recall_at_k(RANKING, RELEVANT, 0)
    with pytest.raises(ValueError, match="at least one relevant"):
        ndcg_at_k(RANKING, set(), 10)
    with pytest.raises(ValueError, match="one set per query"):
        evaluate_rankings([RANKING], [])


def test_bm25_ranks_the_exact_term_match_first() -> None:
    corpus = ["metal pot is in the cupboard", "stove is deactivated", "sink is in the kitchen",
              "thermometer reads 10 degrees celsius"]
    bm25 = BM25Retriever(corpus)
    assert bm25.rank("where is the thermometer")[0] == 3
    assert bm25.rank("Stove", k=1) == [1]
    assert len(bm25.rank("stove")) == len(corpus)
    with pytest.raises(ValueError, match="non-empty corpus"):
        BM25Retriever([])


def test_evaluate_retrieval_reports_every_system_per_kind_and_plots(tmp_path: Path) -> None:
    episodes = load_episodes(FIXTURES, "train")  # any split evaluates; the fixtures are what is committed
    results = evaluate_retrieval(episodes, embedders={"hashing": HashingEncoder()}, reranker=OverlapReranker(),
                                 kinds=("env", "experience"), train_tasks=["boil"])
    assert results.protocol.unseen_tasks == ["find-living-thing"]
    for kind in ("env", "experience"):
        block = results.kinds[kind]
        assert block.queries > 0
        assert set(block.systems) == {"bm25", "bm25+rerank", "hashing", "hashing+rerank"}
        for system, report in block.systems.items():
            assert 0.0 <= results.ndcg(kind, system) <= 1.0
            assert report.seen is not None and report.unseen is not None
            assert set(report.per_task) <= {"boil", "find-living-thing"}
    png = plot_metrics(results, tmp_path / "plots" / "metrics.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
