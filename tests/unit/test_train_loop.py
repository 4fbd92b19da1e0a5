"""The Ray-free parts of retriever training: examples from pairs, sharding, LR schedule, the epoch loop, plots."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from knowmap.config import TrainingConfig, load_config
from knowmap.errors import ConfigError
from knowmap.schemas import TrainingPair
from knowmap.train.embedder_trainer import (
    ColumnTokenizer,
    EmbedderTask,
    MaskedRankingLoss,
    freeze_unused_parameters,
    infonce_examples,
    plot_loss,
    text_id,
)
from knowmap.train.loop import (
    freeze_input_embeddings,
    load_state,
    make_loader,
    make_optimizer,
    run_epoch,
    save_state,
    set_epoch,
    to_device,
)
from knowmap.train.ray_run import pairs_hash, run_location
from knowmap.train.reranker_trainer import collate_columns, listwise_examples


def pair(i: int, negatives: list[str] | None = None, query: str | None = None) -> TrainingPair:
    return TrainingPair(kind="env", query=query or f"query {i}", positive=f"positive {i}",
                        negatives=negatives or [], task="boil", episode_id="ep")


def test_infonce_examples_have_fixed_columns_own_negatives_first() -> None:
    pairs = [pair(0, ["hard a", "hard a", "positive 0", "hard b"]), pair(1), pair(2)]
    examples = infonce_examples(pairs, num_negatives=2, seed=0)
    assert {len(e) for e in examples} == {4}
    assert examples[0] == ("query 0", "positive 0", "hard a", "hard b")  # duplicates and its positive dropped
    for (query, positive, *negatives), p in zip(examples[1:], pairs[1:], strict=True):
        assert (query, positive) == (p.query, p.positive)
        assert all(n.startswith("positive ") and n != positive for n in negatives)  # filled from other positives
    assert infonce_examples(pairs, num_negatives=2, seed=0) == examples  # deterministic under the seed
    assert infonce_examples(pairs, num_negatives=0, seed=0)[0] == ("query 0", "positive 0")


def test_random_negatives_are_never_a_positive_of_the_same_query() -> None:
    pairs = [pair(0, query="shared"), pair(1, query="shared"), pair(2), pair(3)]
    for seed in range(20):
        examples = infonce_examples(pairs, num_negatives=1, seed=seed)
        assert all(e[2] not in ("positive 0", "positive 1") for e in examples[:2])


class _Toy(nn.Module):
    """Embeds the rows of ``features["x"]`` linearly, the way a SentenceTransformer answers a loss."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"sentence_embedding": self.linear(features["x"])}


def test_masked_loss_without_labels_is_sentence_transformers_loss() -> None:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    torch.manual_seed(0)
    model = _Toy()
    columns = [{"x": torch.randn(5, 4)} for _ in range(3)]  # query, positive, one hard negative
    ours = MaskedRankingLoss(model, scale=20.0)(columns, None)
    theirs = MultipleNegativesRankingLoss(model, scale=20.0)(columns, None)
    assert torch.allclose(ours, theirs, atol=1e-6)
    ours.backward()
    assert model.linear.weight.grad is not None


def test_masked_loss_leaves_known_positives_out_of_the_negatives() -> None:
    from sentence_transformers.util import cos_sim

    torch.manual_seed(1)
    model = _Toy()
    q, p, n = ({"x": torch.randn(3, 4)} for _ in range(3))
    # documents in gathered order: p0 p1 p2 n0 n1 n2 with ids 10..15; query 0 also counts p1 (11) and n2 (15)
    labels = {"doc_ids": torch.tensor([[10, 13], [11, 14], [12, 15]]),
              "known": torch.tensor([[10, 11, 15], [11, -1, -1], [12, -1, -1]])}
    loss = MaskedRankingLoss(model, scale=20.0)([q, p, n], labels)
    emb = [model(c)["sentence_embedding"] for c in (q, p, n)]
    scores = cos_sim(emb[0], torch.cat(emb[1:])) * 20.0  # (3, 6)
    keep = [[0, 2, 3, 4], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    expected = torch.stack([-(scores[i, i] - torch.logsumexp(scores[i, keep[i]], 0)) for i in range(3)]).mean()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_embedder_examples_carry_the_known_positives_and_collate_into_labels() -> None:
    pairs = [pair(0, ["hard"], query="shared"), pair(1, query="shared"), pair(2)]
    examples = EmbedderTask().examples(pairs, TrainingConfig(max_negatives=1))
    shared = tuple(sorted([text_id("positive 0"), text_id("positive 1")]))
    assert examples[0] == ("shared", "positive 0", "hard", shared)
    assert examples[2][-1] == (text_id("positive 2"),)

    class _Model:
        def preprocess(self, texts):
            return {"texts": texts}

    inputs, labels = ColumnTokenizer(_Model())(examples)
    assert inputs[0] == {"texts": ["shared", "shared", "query 2"]}
    assert labels["doc_ids"][0].tolist() == [text_id("positive 0"), text_id("hard")]
    assert labels["known"].tolist()[2] == [text_id("positive 2"), -1]


def test_infonce_examples_explain_impossible_requests() -> None:
    same = [TrainingPair(kind="env", query=f"q{i}", positive="p", task="t", episode_id="e") for i in range(3)]
    with pytest.raises(ValueError, match="same positive; set training.max_negatives=0"):
        infonce_examples(same, num_negatives=1, seed=0)
    with pytest.raises(ValueError, match="num_negatives must be >= 0"):
        infonce_examples(same, num_negatives=-1, seed=0)


def test_listwise_examples_take_the_querys_hard_negatives_first_and_never_its_positives() -> None:
    pairs = [pair(0, ["hard a"], query="shared"), pair(1, ["hard b"], query="shared"), pair(2, ["hard c"])]
    rows = listwise_examples(pairs, negatives=3, seed=3)
    assert [len(r) for r in rows] == [5, 5, 5]
    for query, positive, *negatives in rows[:2]:
        assert query == "shared" and negatives[:2] == (["hard a", "hard b"] if positive == "positive 0"
                                                         else ["hard b", "hard a"])
        assert not {"positive 0", "positive 1"} & set(negatives) and len(set(negatives)) == 3
    assert rows[2][:3] == ("query 2", "positive 2", "hard c")
    assert listwise_examples(pairs, negatives=3, seed=3) == rows  # seeded
    inputs, labels = collate_columns(rows[:2])
    assert inputs[0] == ["shared", "shared"] and inputs[1] == ["positive 0", "positive 1"] and len(inputs) == 5
    assert labels.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="lower training.reranker_negatives"):
        listwise_examples(pairs, negatives=5, seed=0)
    with pytest.raises(ValueError, match="negatives must be >= 1"):
        listwise_examples(pairs, negatives=0, seed=0)


def test_loader_shards_are_disjoint_equal_and_reshuffled_per_epoch() -> None:
    examples = [(f"q{i}", f"p{i}") for i in range(10)]

    def collate(batch):
        return [[e[0] for e in batch]], None

    shards = [make_loader(examples, collate, batch_size=2, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = [[q for inputs, _ in loader for q in inputs[0]] for loader in shards]
    assert len(shards[0]) == len(shards[1]) == 3 and not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {e[0] for e in examples}
    shards[0].sampler.set_epoch(1)
    assert [q for inputs, _ in shards[0] for q in inputs[0]] != seen[0]
    with pytest.raises(ValueError, match="no training examples"):
        make_loader([], collate, batch_size=2, seed=0)


def test_schedule_warms_up_then_decays_to_zero() -> None:
    model = nn.Linear(2, 1)
    optimizer, scheduler = make_optimizer(model, TrainingConfig(lr=1.0, warmup_ratio=0.25), total_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < lrs[1] <= 1.0 and lrs[2] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False)) and scheduler.get_last_lr()[0] == 0.0
    groups = {g["weight_decay"]: len(g["params"]) for g in optimizer.param_groups}
    assert groups == {0.01: 1, 0.0: 1}  # the bias is not decayed


class _Regression(nn.Module):
    """A loss module holding its model, called as ``loss(inputs, labels)`` like the sentence-transformers ones."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Linear(3, 1)

    def forward(self, inputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.model(inputs[0]).squeeze(-1), labels)


def test_run_epoch_learns_and_times_all_but_the_first_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    xs = torch.randn(32, 3)
    examples = [(x, float(x.sum())) for x in xs]

    def collate(batch):
        return [torch.stack([b[0] for b in batch])], torch.tensor([b[1] for b in batch])

    loss = _Regression()
    loader = make_loader(examples, collate, batch_size=8, seed=0)
    config = TrainingConfig(lr=0.05, warmup_ratio=0.0, weight_decay=0.0)
    optimizer, scheduler = make_optimizer(loss, config, total_steps=len(loader) * 5)
    stats = [run_epoch(loss, loader, optimizer, scheduler, device=torch.device("cpu"), max_grad_norm=10.0)
             for _ in range(5)]
    assert stats[-1].loss < stats[0].loss / 2
    assert stats[0].steps == 4 and stats[0].samples == 32 and stats[0].timed_samples == 24
    assert len(stats[0].step_losses) == 4 and stats[0].timed_seconds <= stats[0].seconds

    save_state(tmp_path, optimizer=optimizer, scheduler=scheduler, state={"epoch": 5})
    state, tensors = load_state(tmp_path)
    assert state == {"epoch": 5} and tensors["scheduler"]["last_epoch"] == 20


def test_to_device_walks_nested_batches() -> None:
    from transformers import BatchEncoding

    batch = [BatchEncoding({"input_ids": torch.ones(2, 3)}), ["text"], None]
    moved = to_device(batch, torch.device("cpu"))
    assert isinstance(moved[0], dict) and moved[0]["input_ids"].shape == (2, 3) and moved[1:] == [["text"], None]


def test_freeze_unused_parameters_by_name() -> None:
    model = nn.ModuleDict({"encoder": nn.Linear(2, 2), "pooler": nn.Linear(2, 2)})
    assert freeze_unused_parameters(model) == ["pooler.weight", "pooler.bias"]
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, False]


def test_freeze_input_embeddings_stops_only_the_token_embedding_matrix() -> None:
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=8))
    model = nn.ModuleDict({"encoder": bert, "head": nn.Linear(8, 1)})
    assert freeze_input_embeddings(model) == ["encoder.embeddings.word_embeddings.weight"]
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"encoder.embeddings.word_embeddings.weight"}  # position embeddings and the rest still train
    with pytest.raises(ValueError, match="freeze_word_embeddings"):
        freeze_input_embeddings(nn.Linear(2, 2))


def test_pairs_hash_is_stable_and_order_sensitive() -> None:
    pairs = [pair(0, ["n"]), pair(1)]
    assert pairs_hash(pairs) == pairs_hash([pair(0, ["n"]), pair(1)])
    assert pairs_hash(pairs) != pairs_hash(pairs[::-1]) and len(pairs_hash(pairs)) == 64


def test_run_location_is_beside_the_output_dir_unless_configured(tmp_path: Path) -> None:
    assert run_location(tmp_path / "models" / "emb", TrainingConfig()) == (str(tmp_path / "models"), "emb.ray-train")
    configured = TrainingConfig(storage_path="s3://bucket/runs")
    assert run_location(tmp_path / "emb", configured) == ("s3://bucket/runs", "emb.ray-train")


def test_plot_loss_writes_a_png(tmp_path: Path) -> None:
    history = [{"epoch": 1, "loss": 2.0, "step_losses": [2.5, 1.5]}, {"epoch": 2, "loss": 1.0}]
    path = plot_loss(history, tmp_path / "plots" / "loss.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="non-empty history"):
        plot_loss([], tmp_path / "x.png")


def test_training_config_explains_inconsistent_values() -> None:
    with pytest.raises(ConfigError, match=r"batch_size \(10\) must be a multiple of num_workers \(4\)"):
        load_config(training={"batch_size": 10, "num_workers": 4})
    with pytest.raises(ConfigError, match="backend 'nccl' needs use_gpu=true"):
        load_config(training={"backend": "nccl"})
    assert load_config(training={"backend": "nccl", "use_gpu": True}).training.backend == "nccl"


def test_distinct_batches_never_pair_two_positives_of_one_query_across_workers() -> None:
    # Query i has 3 positives (3 pairs): in one global batch they would be each other's false negatives.
    examples = [(f"q{i}", f"p{i}-{j}", f"n{i}") for i in range(9) for j in range(3)]

    def collate(batch):
        return [[e[0] for e in batch], [e[1] for e in batch]], None

    for epoch in (0, 1):
        shards = [make_loader(examples, collate, batch_size=2, seed=3, rank=r, world_size=2,
                              distinct_columns=(0, 1)) for r in range(2)]
        for shard in shards:
            set_epoch(shard, epoch)
        assert len(shards[0]) == len(shards[1])
        seen = []
        for (a, _), (b, _) in zip(shards[0], shards[1], strict=True):
            queries = a[0] + b[0]  # the global batch the gathered loss sees
            assert len(a[0]) == len(b[0]) and len(set(queries)) == len(queries)
            seen += [(q, p) for q, p in zip(a[0] + b[0], a[1] + b[1], strict=True)]
        assert {(e[0], e[1]) for e in examples} <= set(seen)  # every pair is trained on each epoch
