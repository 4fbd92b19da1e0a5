"""Fine-tune the retrieval embedder with InfoNCE on Ray Train (KnowMap, arXiv 2506.19527).

The loss is sentence-transformers' ``MultipleNegativesRankingLoss``: for each query, its positive must score above
every other document in the batch (the other queries' positives, all hard negatives) under cosine similarity
scaled by ``1 / temperature``. With ``gather_across_workers`` the documents of every worker's share take part, so
two workers with half a batch each compute the loss of one process with the whole batch.

Every example has the same number of columns, ``(query, positive, negative_1 .. negative_k)`` with
``k = training.max_negatives``: a pair's own hard negatives come first, and a pair with fewer is filled with
positives of other pairs (random negatives), drawn with the seed.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from knowmap.config import TrainingConfig
from knowmap.schemas import TrainingPair
from knowmap.train.loop import Batch, Example
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
        return infonce_examples(pairs, num_negatives=config.max_negatives, seed=config.seed)

    def build(self, model_path: str, config: TrainingConfig, device: torch.device) -> tuple[nn.Module, nn.Module]:
        import torch.distributed as dist
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        model = SentenceTransformer(model_path, device=str(device), local_files_only=os.path.isdir(model_path))
        model.max_seq_length = config.max_seq_length
        freeze_unused_parameters(model)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        loss = MultipleNegativesRankingLoss(model, scale=1.0 / config.temperature,
                                            gather_across_devices=config.gather_across_workers and distributed)
        return model, loss

    def collate(self, model: nn.Module, config: TrainingConfig) -> Callable[[list[Example]], Batch]:
        return ColumnTokenizer(model)

    def save(self, model: nn.Module, path: str) -> None:
        model.save(path, create_model_card=False)


class ColumnTokenizer:
    """Collates examples ``(query, positive, negatives...)`` into one tokenised feature dict per column."""

    def __init__(self, model: SentenceTransformer) -> None:
        self.model = model

    def __call__(self, examples: list[Example]) -> Batch:
        columns = [list(column) for column in zip(*examples, strict=True)]  # (columns, batch)
        return [self.model.preprocess(column) for column in columns], None


def infonce_examples(pairs: Sequence[TrainingPair], *, num_negatives: int, seed: int) -> list[Example]:
    """One ``(query, positive, negative_1 .. negative_k)`` tuple per pair, ``k = num_negatives``.

    A pair's own negatives come first (duplicates and copies of its query or positive dropped); missing ones are
    filled with other pairs' positives, drawn with ``seed`` so the same pairs always give the same examples.

    Raises:
        ValueError: ``num_negatives`` is negative, or negatives are needed but all pairs share one positive.
    """
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
    rng = random.Random(seed)
    pool = sorted({p.positive for p in pairs})
    examples = []
    for pair in pairs:
        own = [t for t in dict.fromkeys(pair.negatives) if t not in (pair.positive, pair.query)][:num_negatives]
        missing = num_negatives - len(own)
        if missing:
            candidates = [t for t in pool if t not in (pair.positive, pair.query) and t not in own]
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
        base_model: a local sentence-transformers model directory (e.g. :func:`~knowmap.embedder.
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
