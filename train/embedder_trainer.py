"""Fine-tune the retrieval embedder with InfoNCE on Ray Train (KnowMap, arXiv 2506.19527).

The loss is sentence-transformers' ``MultipleNegativesRankingLoss``: for each query, its positive must score above
every other document in the batch (the other queries' positives, all hard negatives) under cosine similarity
scaled by ``1 / temperature``. With ``gather_across_workers`` the documents of every worker's share take part, so
two workers with half a batch each compute the loss of one process with the whole batch.

One change, :class:`MaskedRankingLoss`: a document of the batch that is a known positive of the query (another
pair of the same query has it as positive) is left out of that query's negatives. A sub-goal has similar
sub-goals in every variation of its task, so in a random batch of 32 pairs the other pairs' documents hold, on
average, 4.2 that are relevant to an experience query (3.4 to an env query; measured on the 6-task x
3-variation train pairs); plain InfoNCE pushes them away. The mask catches all but 0.5 of them (those beyond the
``max_positives`` that a query's pairs name).

Every example has the same number of columns, ``(query, positive, negative_1 .. negative_k)`` with
``k = training.max_negatives``: a pair's own hard negatives come first, and a pair with fewer is filled with
positives of other pairs (random negatives), drawn with the seed. The task appends the ids of the query's known
positives (:func:`known_positive_ids`) for the mask.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from knowmap.config import TrainingConfig
from knowmap.schemas import TrainingPair
from knowmap.train.loop import Batch, Example, freeze_input_embeddings, positives_by_query
from knowmap.train.ray_run import EpochCallback, TrainResult, fit

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

# Parameters that the embedding never reaches: BERT's pooler feeds only the (unused) pooled output. DDP fails on
# parameters without a gradient, so they are frozen rather than searched for at every step.
UNUSED_PARAMETER_MARKERS = (".pooler.",)


@dataclass(frozen=True)
class EmbedderTask:
    """The bi-encoder with in-batch + hard-negative InfoNCE (see :class:`~knowmap.train.loop.TrainingTask`)."""

    kind: str = "embedder"
    # No two examples of a batch share a query or a positive: they would be each other's false negatives.
    distinct_columns: tuple[int, ...] = (0, 1)

    def examples(self, pairs: Sequence[TrainingPair], config: TrainingConfig) -> list[Example]:
        """``(query, positive, negatives..., known_positive_ids)`` per pair."""
        known = known_positive_ids(pairs)
        texts = infonce_examples(pairs, num_negatives=config.max_negatives, seed=config.seed)
        return [(*example, known[example[0]]) for example in texts]

    def build(self, model_path: str, config: TrainingConfig, device: torch.device) -> tuple[nn.Module, nn.Module]:
        import torch.distributed as dist
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(model_path, device=str(device), local_files_only=os.path.isdir(model_path))
        model.max_seq_length = config.max_seq_length
        freeze_unused_parameters(model)
        if config.freeze_word_embeddings:
            freeze_input_embeddings(model)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        loss = MaskedRankingLoss(model, scale=1.0 / config.temperature,
                                 gather_across_devices=config.gather_across_workers and distributed)
        return model, loss

    def collate(self, model: nn.Module, config: TrainingConfig) -> Callable[[list[Example]], Batch]:
        return ColumnTokenizer(model)

    def save(self, model: nn.Module, path: str) -> None:
        model.save(path, create_model_card=False)

    def finish(self, model_dir: str, base_model: str, config: TrainingConfig) -> None:
        interpolate_weights(model_dir, base_model, config.finetuned_weight)


def interpolate_weights(model_dir: str, base_model: str, weight: float) -> None:
    """Replace the fine-tuned model in ``model_dir`` by ``weight * fine-tuned + (1 - weight) * base``.

    Weight-space ensembling (WiSE-FT, Wortsman et al. 2022): the mix keeps most of what fine-tuning gained on the
    trained tasks and loses less of the base model's generality on tasks it never saw. ``weight=1`` leaves the
    model as trained.

    Raises:
        ValueError: ``weight`` is not in (0, 1], or the two models do not have the same parameters.
    """
    if not 0 < weight <= 1:
        raise ValueError(f"finetuned_weight must be in (0, 1], got {weight}")
    if weight == 1:
        return
    from sentence_transformers import SentenceTransformer

    tuned = SentenceTransformer(model_dir, device="cpu", local_files_only=True)
    base = SentenceTransformer(base_model, device="cpu", local_files_only=os.path.isdir(base_model)).state_dict()
    state = tuned.state_dict()
    if state.keys() != base.keys() or any(state[k].shape != base[k].shape for k in state):
        raise ValueError(f"cannot mix {model_dir} with {base_model}: their parameters differ; set "
                         "training.finetuned_weight=1 to keep the fine-tuned model as it is")
    tuned.load_state_dict({k: torch.lerp(base[k], v, weight) if v.is_floating_point() else v
                           for k, v in state.items()})
    tuned.save(model_dir, create_model_card=False)


class ColumnTokenizer:
    """Collates examples ``(query, positive, negatives..., known_positive_ids)`` into one tokenised feature dict
    per text column, and the labels :class:`MaskedRankingLoss` reads: ``doc_ids`` (batch, documents per example),
    the ids of each example's documents, and ``known`` (batch, width), each query's known-positive ids padded
    with -1."""

    def __init__(self, model: SentenceTransformer) -> None:
        self.model = model

    def __call__(self, examples: list[Example]) -> Batch:
        texts = [example[:-1] for example in examples]
        columns = [list(column) for column in zip(*texts, strict=True)]  # (columns, batch)
        doc_ids = torch.tensor([[text_id(t) for t in example[1:]] for example in texts], dtype=torch.long)
        known = torch.full((len(examples), max(1, *(len(e[-1]) for e in examples))), -1, dtype=torch.long)
        for row, example in enumerate(examples):
            known[row, : len(example[-1])] = torch.tensor(example[-1], dtype=torch.long)
        return [self.model.preprocess(column) for column in columns], {"doc_ids": doc_ids, "known": known}


class MaskedRankingLoss(nn.Module):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` (query-to-document, one softmax) that leaves a
    query's known positives out of its negatives.

    With ``labels=None`` it is exactly that loss (a unit test compares the two). With labels from
    :class:`ColumnTokenizer`, every document of the (gathered) batch whose id is among the query's known
    positives, other than the query's own positive, gets a logit of -inf.

    Args:
        model: the SentenceTransformer being trained.
        scale: 1 / temperature.
        gather_across_devices: score each worker's queries against the documents of all workers (with gradients),
            as one process with the whole batch would.
    """

    def __init__(self, model: nn.Module, scale: float = 20.0, gather_across_devices: bool = False) -> None:
        super().__init__()
        self.model = model
        self.scale = scale
        self.gather_across_devices = gather_across_devices

    def forward(self, sentence_features: Iterable[dict[str, torch.Tensor]],
                labels: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        from sentence_transformers.base.losses.merged_forward import embed_columns
        from sentence_transformers.util import all_gather, all_gather_with_grad, cos_sim, get_rank

        queries, *docs = embed_columns(self.model, sentence_features)
        batch = queries.size(0)
        doc_ids = labels["doc_ids"] if labels is not None else None  # (batch, documents per example)
        offset = 0
        if self.gather_across_devices:
            queries = all_gather_with_grad(queries)
            docs = [all_gather_with_grad(d) for d in docs]
            doc_ids = all_gather(doc_ids) if doc_ids is not None else None
            offset = get_rank() * batch
        rows = torch.arange(batch, device=queries.device)
        own = rows + offset  # each local query's own positive: column 0 of the documents, gathered order
        scores = cos_sim(queries[own], torch.cat(docs, dim=0)) * self.scale  # (batch, world batch * documents)
        if labels is not None:
            ids = doc_ids.T.reshape(-1)  # the order of torch.cat(docs): document column by column
            known = labels["known"]  # (batch, width), -1 = padding; text ids are >= 0
            mask = (ids[None, :, None] == known[:, None, :]).any(dim=-1)  # (batch, world batch * documents)
            mask[rows, own] = False
            scores = scores.masked_fill(mask, float("-inf"))
        return -(scores[rows, own] - torch.logsumexp(scores, dim=1)).mean()


def text_id(text: str) -> int:
    """A 63-bit id of ``text``, the same in every process (``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def known_positive_ids(pairs: Sequence[TrainingPair]) -> dict[str, tuple[int, ...]]:
    """Per query text, the sorted :func:`text_id` of every positive that some pair of that query has."""
    return {query: tuple(sorted(map(text_id, texts))) for query, texts in positives_by_query(pairs).items()}


def infonce_examples(pairs: Sequence[TrainingPair], *, num_negatives: int, seed: int) -> list[Example]:
    """One ``(query, positive, negative_1 .. negative_k)`` tuple per pair, ``k = num_negatives``.

    A pair's own negatives come first (duplicates and copies of its query or positive dropped); missing ones are
    filled with other pairs' positives (never one of the same query's), drawn with ``seed`` so the same pairs
    always give the same examples.

    Raises:
        ValueError: ``num_negatives`` is negative, or negatives are needed but all pairs share one positive.
    """
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
    rng = random.Random(seed)
    pool = sorted({p.positive for p in pairs})
    positives_of = positives_by_query(pairs)
    examples = []
    for pair in pairs:
        own = [t for t in dict.fromkeys(pair.negatives) if t not in (pair.positive, pair.query)][:num_negatives]
        missing = num_negatives - len(own)
        if missing:
            taken = positives_of[pair.query] | {pair.query, *own}
            candidates = [t for t in pool if t not in taken]
            if not candidates:
                raise ValueError("cannot fill hard negatives: every pair has the same positive; "
                                 "set training.max_negatives=0 or add pairs with other positives")
            own += [candidates[rng.randrange(len(candidates))] for _ in range(missing)]
        examples.append((pair.query, pair.positive, *own))
    return examples


def freeze_unused_parameters(model: nn.Module, markers: Sequence[str] = UNUSED_PARAMETER_MARKERS) -> list[str]:
    """Stop gradients for parameters whose name contains a marker; returns their names."""
    frozen = []
    for name, param in model.named_parameters():
        if any(m in f".{name}" for m in markers):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def train_embedder(pairs: list[TrainingPair], *, base_model: str, output_dir: str, config: TrainingConfig,
                   resume: bool = True, on_epoch: EpochCallback | None = None) -> TrainResult:
    """Fine-tune a sentence-transformers embedder on ``pairs`` with InfoNCE, data-parallel on Ray Train.

    Ray must be reachable (``ray.init`` was called, or Ray Train starts a local one). Checkpoints go to
    ``<storage_path or parent of output_dir>/<output dir name>.ray-train/epoch_NNNN``.

    Args:
        pairs: training pairs from train-split trajectories.
        base_model: a local sentence-transformers model directory (e.g. :func:`~knowmap.models.embedder.
            default_embedder_path`), as ``str``.
        output_dir: where the fine-tuned model is saved (``SentenceTransformer.save`` format plus
            ``knowmap_model.json``: version, base model, data hash, epochs, metrics, created-at).
        config: the ``training`` config section (epochs, global batch size, lr, temperature, workers...).
        resume: continue after the last completed epoch of an earlier call with the same ``output_dir``; asking
            for more epochs than it ran trains only the missing ones. False starts over.
        on_epoch: called in this process with each epoch's metrics (``epoch``, ``loss``, ``samples_per_s``...).

    Returns:
        a :class:`~knowmap.train.ray_run.TrainResult`; load the model with ``Embedder(result.model_dir)``.

    Raises:
        ValueError: ``pairs`` is empty, or hard negatives cannot be filled (see :func:`infonce_examples`).
        TrainingError: ``output_dir`` holds something else, the checkpoint to resume came from other pairs or
            another base model, or training failed on the workers.
    """
    return fit(EmbedderTask(), pairs, base_model=base_model, output_dir=output_dir, config=config, resume=resume,
               on_epoch=on_epoch)


def plot_loss(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Draw the training loss per epoch (and per step where recorded) into a PNG.

    Args:
        history: per-epoch metrics as in ``TrainResult.history`` (``epoch``, ``loss``, optional ``step_losses``).
        path: the PNG to write; its folder is created.

    Returns:
        the path written.

    Raises:
        ValueError: ``history`` is empty or has no ``loss``.
    """
    if not history or any("loss" not in h for h in history):
        raise ValueError("plot_loss needs a non-empty history whose entries have 'epoch' and 'loss'")
    import matplotlib

    matplotlib.use("Agg")  # no display on workers and CI
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs, ys = [], []
    for h in history:
        steps = h.get("step_losses") or []
        for i, value in enumerate(steps):
            xs.append(h["epoch"] - 1 + (i + 1) / len(steps))
            ys.append(value)
    if xs:
        ax.plot(xs, ys, color="tab:blue", alpha=0.4, linewidth=1, label="step (rank 0)")
    ax.plot([h["epoch"] for h in history], [h["loss"] for h in history], "o-", color="tab:blue",
            label="epoch mean (all workers)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
