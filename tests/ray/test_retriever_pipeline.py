"""`knowmap train` and `knowmap eval-retrieval` end to end on tiny real data: pairs from the committed gold
trajectories, both models trained on Ray Train (2 workers, one short epoch), the mix chosen on dev, evaluation on
real dev episodes.

Kept small on purpose: one train variation per task, 64-token reranker pairs (the cross-encoder reading 256-token
pairs at every step of every replay was most of this test's 6 minutes), and short tasks to evaluate on
(find-living-thing, seen; find-plant, an unseen task of the same family)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from knowmap.config import KnowMapConfig
from knowmap.errors import KnowMapError
from knowmap.jobs.training import evaluate_split, retrieval_table, train_retriever
from knowmap.models.registry import read_latest

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow, pytest.mark.training, pytest.mark.jvm,
              pytest.mark.usefixtures("ray_local")]
FIXTURES = Path(__file__).parents[1] / "fixtures" / "trajectories"


def test_train_then_evaluate_on_held_out_and_unseen_tasks(tmp_path: Path) -> None:
    trajectories = tmp_path / "trajectories"
    trajectories.mkdir()
    for path in FIXTURES.glob("*.json"):  # what build-kb stores: train-split gold trajectories
        shutil.copy(path, trajectories / path.name)
    config = KnowMapConfig(data_dir=tmp_path, scienceworld={"variations": 1},
                           training={"epochs": 1, "batch_size": 8, "max_seq_length": 48, "max_failures": 0,
                                     "reranker_negatives": 1, "reranker_max_length": 64})
    epochs: list[tuple[str, int]] = []
    report = train_retriever(config, on_epoch=lambda model, m: epochs.append((model, m["epoch"])))
    assert report.train_tasks == ["boil", "find-living-thing"]
    # Two trajectories of different tasks: env pairs, but no sub-goal of one is similar enough (theta) to the other's.
    assert report.pairs["env"] > 0 and report.pairs["experience"] == 0
    assert epochs == [("embedder", 1), ("reranker", 1)]
    assert (tmp_path / "training" / "loss_embedder.png").stat().st_size > 0
    latest = read_latest(config.paths)
    assert latest.embedder == report.embedder.model_dir and latest.reranker == report.reranker_dir
    selection = report.selection  # the mix with the base model, chosen on dev by decision support
    assert selection["split"] == "dev" and set(selection["dev"]) == {"w0.5", "w0.7", "w1"}
    assert report.embedder.model_dir == selection["candidates"][selection["chosen"]]
    assert Path(latest.embedder, "knowmap_model.json").is_file()
    assert Path(latest.reranker, "knowmap_model.json").is_file()

    out = tmp_path / "eval" / "dev.json"
    results = evaluate_split(config, split="dev", tasks=["find-living-thing", "find-plant"], variations=1, out=out)
    assert json.loads(out.read_text()) == results.model_dump(mode="json")  # what is returned is what is written
    assert results.protocol.unseen_tasks == ["find-plant"] and results.protocol.embedder == latest.embedder
    assert out.with_suffix(".png").stat().st_size > 0
    systems = results.kinds["env"].systems
    assert set(systems) == {"bm25", "base", "finetuned", "bm25+rerank", "base+rerank", "finetuned+rerank"}
    finetuned = results.system("env", "finetuned")
    assert finetuned.metric("queries", "unseen") > 0 and finetuned.metric("queries", "seen") > 0
    assert all(0.0 <= results.ndcg("env", s) <= 1.0 for s in systems)
    assert "finetuned+rerank" in retrieval_table(results)
    # Decision support, judged by gold next actions (annotated replays; the experiential KB: boil and
    # find-living-thing's train sub-goals). find-plant is Classification, as find-living-thing is: no family is
    # unseen.
    decision = results.decision
    assert decision is not None and decision.unseen_families == [] and decision.unseen is None
    assert set(decision.modes) == {"none", "bm25", "kb-base", "kb-finetuned", "kb-finetuned+bm25",
                                   "kb-finetuned+rerank"}
    assert decision.modes["none"]["steps"] > 0 and 0 <= decision.metric("kb-finetuned", "shortlist_recall@12") <= 1
    assert decision.protocol["train_tasks"] == ["boil", "find-living-thing"] and decision.protocol["split"] == "dev"
    assert json.loads(out.read_text())["decision"]["modes"] == decision.model_dump(mode="json")["modes"]
    with pytest.raises(KnowMapError, match="held-out"):
        evaluate_split(config, split="train", tasks=["boil"], variations=1, out=out)
