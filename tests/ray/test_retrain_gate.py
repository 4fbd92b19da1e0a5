"""The promotion gate on real models: real training on Ray Train (2 workers), real evaluation on a dev episode.

Judged by decision support on the gate's annotated dev replay (gold next actions, no embedder's labels): a
candidate trained with a learning rate far too high for a transformer (1e-2) collapses and is rejected; when that
ruined model is what serves, a sanely trained candidate replaces it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from knowmap.config import load_config
from knowmap.jobs.retrain import RetrainController

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow, pytest.mark.training, pytest.mark.jvm,
              pytest.mark.usefixtures("ray_local")]
FIXTURES = Path(__file__).parents[1] / "fixtures" / "trajectories"


def test_gate_rejects_a_worse_model_and_promotes_a_better_one(tmp_path: Path) -> None:
    (tmp_path / "trajectories").mkdir()
    for path in FIXTURES.glob("*.json"):
        shutil.copy(path, tmp_path / "trajectories" / path.name)
    # The gate judges on find-living-thing's first dev variation (a short task) with the train sub-goals of one
    # variation per task as the experiential KB: small, and enough to tell a collapsed model from a sane one.
    base = dict(data_dir=tmp_path, scienceworld={"variations": 1},
                retrain={"every": 1, "gate_tasks": ["find-living-thing"], "gate_variations": 1, "reranker": False})
    swaps: list[str] = []

    def controller(lr: float) -> RetrainController:
        config = load_config(**base, training={"epochs": 1, "batch_size": 8, "max_seq_length": 48, "lr": lr,
                                               "warmup_ratio": 0.0, "max_failures": 0})
        return RetrainController(config, count_trajectories=lambda: 2, reindex=lambda path: None,
                                 swap=lambda models: swaps.append(models.embedder))

    ruined = controller(lr=1e-2).retrain()
    # lr 1e-2 collapses the embedder: every vector points the same way, its order is float noise, and the scores of
    # that noise fused with BM25 beat the base model's in some runs and not in others. The gate's collapse check
    # refuses it whatever those scores are.
    assert not ruined["promoted"] and "collapsed" in ruined["reason"], ruined["reason"]
    assert ruined["candidate_scores"]["mean_cosine"] > 0.99 > ruined["serving_scores"]["mean_cosine"]
    assert "shortlist_recall@12" in ruined["candidate_scores"]
    assert ruined["gate_episodes"] and all("-dev-" in e for e in ruined["gate_episodes"])
    assert swaps == []

    # Now the ruined model serves (as if an earlier, ungated deployment had put it there).
    sane = controller(lr=2e-5)
    sane.state.serving = sane.state.serving.model_copy(update={"embedder": ruined["candidate"]["embedder"]})
    decision = sane.retrain()
    assert decision["promoted"] and "serving embedder has collapsed" in decision["reason"], decision["reason"]
    assert decision["candidate_scores"]["mean_cosine"] < 0.99
    assert swaps == [decision["candidate"]["embedder"]]
    status = RetrainController(sane.config, count_trajectories=lambda: 2).status()  # reloaded from disk
    assert status["serving"]["embedder"] == decision["candidate"]["embedder"]
    assert status["previous"]["embedder"] == ruined["candidate"]["embedder"]
    assert [d["promoted"] for d in status["history"]] == [False, True]

