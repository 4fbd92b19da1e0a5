"""Retriever training on Ray Train with 2 CPU workers: the embedder (InfoNCE) and the reranker (listwise).

Tiny data (24 pairs, 32 tokens), so each run is a few steps; most of the time is starting workers and loading
MiniLM. One module-scoped embedder run is shared by the tests that only read its output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from knowmap.config import TrainingConfig
from knowmap.errors import TrainingError
from knowmap.models.embedder import Embedder, default_embedder_path, model_fingerprint
from knowmap.models.reranker import Reranker
from knowmap.schemas import TrainingPair
from knowmap.train.embedder_trainer import infonce_examples, plot_loss, train_embedder
from knowmap.train.loop import DistinctBatchSampler, seed_everything
from knowmap.train.ray_run import METADATA_FILE, pairs_hash
from knowmap.train.reranker_trainer import RerankerTask, train_reranker

pytestmark = [pytest.mark.ray, pytest.mark.training, pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

OBJECTS = ["metal pot", "thermometer", "orange", "dove", "stove", "sink", "cupboard", "chair", "table", "lighter",
           "glass cup", "axe"]
PLACES = ["kitchen", "hallway", "outside", "greenhouse", "bedroom", "workshop"]


def make_pairs(n: int = 24) -> list[TrainingPair]:
    pairs = []
    for i in range(n):
        thing, other = OBJECTS[i % len(OBJECTS)], OBJECTS[(i + 5) % len(OBJECTS)]
        place = PLACES[(i * 5) % len(PLACES)]
        pairs.append(TrainingPair(kind="env", query=f"where is the {thing}? step {i // len(OBJECTS)}",
                                  positive=f"{thing} is in the {place}", negatives=[f"{other} is in the {place}"],
                                  task="boil", episode_id=f"ep{i % 3}"))
    return pairs


def small_config(**overrides: object) -> TrainingConfig:
    values = {"epochs": 1, "batch_size": 8, "max_seq_length": 32, "lr": 1e-4, "warmup_ratio": 0.0,
              "max_failures": 0, "checkpoints_to_keep": 3}
    return TrainingConfig(**(values | overrides))


@pytest.fixture(scope="module")
def first_epoch(tmp_path_factory, ray_local) -> tuple[Path, object]:
    """One epoch of the embedder on 2 workers (module-scoped: several tests read its output)."""
    out = tmp_path_factory.mktemp("embedder") / "model"
    return out, train_embedder(make_pairs(), base_model=default_embedder_path(), output_dir=str(out),
                               config=small_config())


def test_embedder_trains_into_a_loadable_model_that_differs_from_the_base(first_epoch, embedder) -> None:
    out, result = first_epoch
    assert result.model_dir == str(out) and result.epochs_run == 1
    assert [h["epoch"] for h in result.history] == [1]
    first = result.history[0]
    # Batches never repeat a query or a positive (make_pairs repeats some positives), so the 24 pairs take more
    # than 24 // 8 steps; the sampler says exactly how many, and how many examples, over both workers.
    config = small_config()
    examples = infonce_examples(make_pairs(), num_negatives=config.max_negatives, seed=config.seed)
    shares = [DistinctBatchSampler(examples, batch_size=4, columns=(0, 1), seed=config.seed, rank=r, world_size=2)
              for r in range(2)]
    assert first["workers"] == 2 and first["steps"] == len(shares[0]) > 24 // 8
    assert first["samples"] == sum(len(b) for share in shares for b in share) >= 24
    assert math.isfinite(first["loss"]) and first["samples_per_s"] > 0

    tuned = Embedder(str(out))
    texts = ["where is the orange?", "orange is in the outside", "the stove is deactivated"]
    before, after = embedder.encode(texts), tuned.encode(texts)
    assert after.shape == before.shape and np.allclose(np.linalg.norm(after, axis=1), 1.0, atol=1e-5)
    assert float(np.abs(after - before).max()) > 1e-4  # the weights moved
    assert tuned.version != embedder.version


def test_metadata_names_the_data_the_base_and_the_weights(first_epoch) -> None:
    out, result = first_epoch
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert metadata == result.metadata
    assert metadata["kind"] == "embedder" and metadata["epochs"] == 1 and metadata["num_pairs"] == 24
    assert metadata["data_hash"] == pairs_hash(make_pairs())
    assert metadata["base_model"] == default_embedder_path()
    assert metadata["base_model_version"] == model_fingerprint(default_embedder_path())
    assert len(metadata["version"]) == 10 and metadata["metrics"]["epoch"] == 1 and metadata["created_at"]
    plot = plot_loss(result.history, out.parent / "loss.png")
    assert plot.stat().st_size > 1000


def test_a_second_call_resumes_after_the_last_checkpoint(first_epoch) -> None:
    out, first = first_epoch
    checkpoints = Path(first.checkpoint_path)
    assert (checkpoints / "epoch_0001" / "model" / "model.safetensors").is_file()
    seen: list[dict] = []
    second = train_embedder(make_pairs(), base_model=default_embedder_path(), output_dir=str(out),
                            config=small_config(epochs=2), on_epoch=seen.append)
    assert second.epochs_run == 1 and [m["epoch"] for m in seen] == [2]  # only the missing epoch ran
    assert [h["epoch"] for h in second.history] == [1, 2]
    assert second.history[0]["run_id"] != second.history[1]["run_id"]
    assert (checkpoints / "epoch_0002").is_dir() and second.metadata["epochs"] == 2
    assert second.metadata["version"] != first.metadata["version"]

    # Every epoch asked for is done: the model is exported again without training.
    again = train_embedder(make_pairs(), base_model=default_embedder_path(), output_dir=str(out),
                           config=small_config(epochs=2))
    assert again.epochs_run == 0 and again.metadata["version"] == second.metadata["version"]

    # Checkpoints made from other pairs are not silently continued.
    with pytest.raises(TrainingError, match="data_hash.*resume=False"):
        train_embedder(make_pairs(12), base_model=default_embedder_path(), output_dir=str(out),
                       config=small_config(epochs=3))


def test_output_dir_with_foreign_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="new or empty directory"):
        train_embedder(make_pairs(), base_model=default_embedder_path(), output_dir=str(tmp_path),
                       config=small_config())


def test_reranker_trains_and_scores_pairs(tmp_path: Path) -> None:
    config = small_config(lr=2e-4)
    pairs = make_pairs()
    probe = [(p.query, p.positive) for p in pairs[:4]] + [(p.query, p.negatives[0]) for p in pairs[:4]]
    seed_everything(config.seed)  # the same new head the training run starts from
    untrained, _ = RerankerTask().build(default_embedder_path(), config, torch.device("cpu"))
    before = untrained.predict(probe, show_progress_bar=False)

    result = train_reranker(pairs, base_model=default_embedder_path(), output_dir=str(tmp_path / "reranker"),
                            config=config)
    assert result.epochs_run == 1 and result.metadata["kind"] == "reranker"
    assert result.metadata["data_hash"] == pairs_hash(pairs)
    assert result.history[0]["samples"] == 24  # one listwise example per pair: its positive and 3 hard negatives

    reranker = Reranker(result.model_dir)
    scores = reranker.predict(probe)
    assert len(scores) == len(probe) and all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores)
    assert not np.allclose(scores, before, atol=1e-6)  # training moved the scores
    assert reranker.score(probe[0][0], [probe[0][1], probe[4][1]]) == pytest.approx([scores[0], scores[4]], abs=1e-5)
    assert [i for i, _ in reranker.rerank(probe[0][0], [probe[4][1], probe[0][1]])] in ([0, 1], [1, 0])
    with pytest.raises(TypeError, match=r"\(query, document\) string pairs"):
        reranker.predict([("only a query",)])
