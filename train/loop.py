"""The plain torch side of retriever training: batches, optimiser, one epoch, training state on disk.

Nothing here imports Ray. :mod:`knowmap.train.ray_run` calls these functions inside each Ray Train worker; the
throughput benchmark calls the same ones in one process, so both measure the same work.

A :class:`TrainingTask` says what is trained (the bi-encoder with InfoNCE, the cross-encoder with BCE): how to
build the model and its loss, how pairs become examples and examples become a batch, and how the model is saved.
The loss module contains the model (the sentence-transformers way), so wrapping the loss for DDP wraps the model.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from knowmap.config import TrainingConfig
from knowmap.schemas import TrainingPair

Example = tuple[Any, ...]
Batch = tuple[Any, Any]  # (inputs, labels): what the loss module's forward takes
STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.pt"
MODEL_DIR = "model"


class TrainingTask(Protocol):
    """What is trained and how; an instance crosses to Ray workers, so it must pickle (plain attributes only)."""

    kind: str  # "embedder" or "reranker": written into metadata and checked on resume

    def examples(self, pairs: Sequence[TrainingPair], config: TrainingConfig) -> list[Example]:
        """Turn pairs into training examples (tuples of strings, maybe a label), deterministically."""
        ...

    def build(self, model_path: str, config: TrainingConfig, device: torch.device) -> tuple[nn.Module, nn.Module]:
        """Load the model from ``model_path`` and wrap it in its loss; returns ``(model, loss_module)``."""
        ...

    def collate(self, model: nn.Module, config: TrainingConfig) -> Callable[[list[Example]], Batch]:
        """The DataLoader ``collate_fn``: a list of examples to the loss's ``(inputs, labels)``."""
        ...

    def save(self, model: nn.Module, path: str) -> None:
        """Save the model in its library's own format (loadable by path)."""
        ...

    # Optional: ``finish(model_dir, base_model, config)`` post-processes the exported final model on the driver
    # (the embedder's weight-space ensembling); checkpoints are never touched.


@dataclass
class EpochStats:
    """What one epoch on one worker measured."""

    loss: float  # mean training loss over the epoch's steps
    steps: int
    samples: int  # examples this worker processed
    seconds: float  # the whole epoch
    timed_seconds: float  # steps after the first (warm-up excluded)
    timed_samples: int
    step_losses: list[float]


def positives_by_query(pairs: Sequence[TrainingPair]) -> dict[str, set[str]]:
    """Every positive that some pair of a query has, per query text: none of them may serve as its negative."""
    positives: dict[str, set[str]] = {}
    for pair in pairs:
        positives.setdefault(pair.query, set()).add(pair.positive)
    return positives


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class DistinctBatchSampler(Sampler[list[int]]):
    """Seeded global batches in which no two examples share a text in ``columns``, cut into one equal share per
    worker (the batch sampler that sentence-transformers' ``NoDuplicatesBatchSampler`` is for one process).

    Why: a query has several positives, one pair each. Two pairs of the same query in one InfoNCE batch make each
    one's positive an in-batch *negative* of the other, and the model learns to push true positives away. With
    ``gather_across_workers`` the batch is global, so the rule holds across workers too.

    A global batch that conflicts leave short is topped up with non-conflicting examples from the rest of the
    epoch's order (as ``DistributedSampler`` pads by repeating), then cut to a multiple of ``world_size``; every
    worker computes the same batches from the same seed, so all take the same number of steps.
    """

    def __init__(self, examples: Sequence[Example], *, batch_size: int, columns: Sequence[int], seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.keys = [frozenset(str(e[c]) for c in columns if c < len(e)) for e in examples]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch = 0
        self._batches = self._global_batches()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._batches = self._global_batches()

    def _global_batches(self) -> list[list[int]]:
        size = self.batch_size * self.world_size
        order = list(range(len(self.keys)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        batches, remaining = [], order
        while remaining:
            batch, used, rest = [], set(), []
            for i in remaining:
                if len(batch) < size and not (self.keys[i] & used):
                    batch.append(i)
                    used |= self.keys[i]
                else:
                    rest.append(i)
            for i in order:  # top up a short batch with examples that do not conflict
                if len(batch) >= size:
                    break
                if i not in batch and not (self.keys[i] & used):
                    batch.append(i)
                    used |= self.keys[i]
            batch = batch[: len(batch) - len(batch) % self.world_size]
            if batch:
                batches.append(batch)
            remaining = rest
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches:
            share = len(batch) // self.world_size
            yield batch[self.rank * share:(self.rank + 1) * share]

    def __len__(self) -> int:
        return len(self._batches)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle ``loader`` for ``epoch`` (whichever of the two samplers :func:`make_loader` gave it)."""
    sampler = loader.batch_sampler if isinstance(loader.batch_sampler, DistinctBatchSampler) else loader.sampler
    sampler.set_epoch(epoch)  # type: ignore[union-attr]


def make_loader(examples: Sequence[Example], collate: Callable[[list[Example]], Batch], *, batch_size: int,
                seed: int, rank: int = 0, world_size: int = 1, distinct_columns: Sequence[int] = ()) -> DataLoader:
    """A DataLoader whose DistributedSampler gives each worker a disjoint, seeded share of the examples.

    Every worker gets the same number of batches (the sampler pads by repeating a few examples), which DDP needs:
    a worker with one step fewer would leave the others waiting in an all-reduce. Call
    ``loader.sampler.set_epoch(epoch)`` before each epoch for a new, reproducible order.

    Args:
        examples: the training examples (all workers pass the same list).
        collate: turns a list of examples into the loss's ``(inputs, labels)``.
        batch_size: examples per step on this worker.
        seed: the shuffle seed, the same on every worker.
        rank, world_size: this worker's place in the group (0 and 1 in one process).
        distinct_columns: example columns (e.g. query and positive) that no two examples of one global batch may
            share (:class:`DistinctBatchSampler`); empty = plain seeded shuffling.

    Raises:
        ValueError: there are no examples, or ``batch_size`` is below 1.
    """
    if not examples:
        raise ValueError("no training examples: pass at least one TrainingPair")
    if batch_size < 1:
        raise ValueError(f"batch_size per worker must be >= 1, got {batch_size}")
    # num_workers=0: tokenising a batch of short texts costs milliseconds, and extra processes would contend
    # for the same few cores that the forward pass uses.
    if distinct_columns:
        batches = DistinctBatchSampler(examples, batch_size=batch_size, columns=distinct_columns, seed=seed,
                                       rank=rank, world_size=world_size)
        return DataLoader(list(examples), batch_sampler=batches, collate_fn=collate, num_workers=0)
    sampler = DistributedSampler(list(examples), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=False)
    return DataLoader(list(examples), batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=0)


def freeze_input_embeddings(model: nn.Module) -> list[str]:
    """Stop gradients for the token-embedding matrix of every Hugging Face transformer in ``model``.

    Returns the frozen parameters' names. Works for any architecture that implements ``get_input_embeddings``
    (BERT's ``word_embeddings``, XLM-R's, ...), in a ``SentenceTransformer`` as well as in a ``CrossEncoder``.

    Raises:
        ValueError: ``model`` holds no transformer with an input-embedding matrix.
    """
    from transformers import PreTrainedModel

    tables = {id(m.get_input_embeddings().weight) for m in model.modules()
              if isinstance(m, PreTrainedModel) and m.get_input_embeddings() is not None}
    frozen = []
    for name, param in model.named_parameters():
        if id(param) in tables:
            param.requires_grad_(False)
            frozen.append(name)
    if not frozen:
        raise ValueError(f"{type(model).__name__} holds no transformer with an input-embedding matrix; set "
                         "training.freeze_word_embeddings to false for this model")
    return frozen


def make_optimizer(loss_module: nn.Module, config: TrainingConfig,
                   total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW without weight decay on biases and norms, and a linear warm-up then linear decay of the LR.

    The fused AdamW kernel is the same update as the default per-tensor loop, several times faster on CPU (for
    MiniLM's 22.7M parameters: 28 ms vs 132 ms on one thread). Every DDP worker steps the whole model, so on a
    machine whose cores are shared out among workers this step is where data-parallel runs lost the most time.

    Args:
        loss_module: the (possibly DDP-wrapped) loss; only parameters that require grad are optimised.
        config: lr, weight_decay and warmup_ratio.
        total_steps: optimiser steps of the whole run (all epochs).
    """
    decay, no_decay = [], []
    for name, param in loss_module.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, fused=True)
    total = max(1, total_steps)
    warmup = int(math.ceil(config.warmup_ratio * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a nested list/tuple/dict to ``device``; other values (texts) pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):  # dicts, and the tokenizers' BatchEncoding (a UserDict)
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def run_epoch(loss_module: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, *, device: torch.device,
              max_grad_norm: float) -> EpochStats:
    """One pass over this worker's share of the data: forward, backward (DDP all-reduces here), clip, step.

    Returns:
        the epoch's :class:`EpochStats`; the first step is excluded from ``timed_*`` (it pays for lazy
        initialisation and, under DDP, for building the gradient buckets).
    """
    loss_module.train()
    params = [p for p in loss_module.parameters() if p.requires_grad]
    losses: list[float] = []
    samples = 0
    timed_seconds, timed_samples = 0.0, 0
    start = time.perf_counter()
    for inputs, labels in loader:
        step_start = time.perf_counter()
        size = _batch_size(inputs)
        loss = loss_module(to_device(inputs, device), to_device(labels, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())  # syncs the device, so the step time below is the real one
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {len(losses)}; lower training.lr")
        if losses:
            timed_seconds += time.perf_counter() - step_start
            timed_samples += size
        losses.append(value)
        samples += size
    return EpochStats(loss=sum(losses) / max(1, len(losses)), steps=len(losses), samples=samples,
                      seconds=time.perf_counter() - start, timed_seconds=timed_seconds, timed_samples=timed_samples,
                      step_losses=losses)


def _batch_size(inputs: Any) -> int:
    first = inputs[0]  # a column: tokenised features (a mapping of tensors) or a list of texts
    if isinstance(first, Mapping):
        return int(first["input_ids"].shape[0])
    return len(first)


def save_state(path: str | Path, *, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any]) -> None:
    """Write the optimiser and scheduler (``optimizer.pt``) and the JSON training state next to the model."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path / OPTIMIZER_FILE)
    (path / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))


def load_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read what :func:`save_state` wrote: ``(json_state, {"optimizer": ..., "scheduler": ...})``.

    Raises:
        FileNotFoundError: the directory is not a training checkpoint.
    """
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    tensors = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    return state, tensors


def read_state(path: str | Path) -> dict[str, Any]:
    """Only the JSON training state of a checkpoint directory (epoch, history, run identity)."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def set_threads(cpus: float) -> None:
    """Use as many intra-op threads as CPUs reserved, so workers on one machine do not oversubscribe it."""
    torch.set_num_threads(max(1, int(cpus)))
