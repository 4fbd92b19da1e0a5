"""Train the cross-encoder reranker on the retriever's pairs, data-parallel on Ray Train.

The reranker starts from the same MiniLM weights as the embedder: sentence-transformers 6 turns a bi-encoder
checkpoint into a ``CrossEncoder`` (``BertForSequenceClassification``: the encoder and pooler are loaded, the
one-logit classification head is new and initialised from the seed). It learns ``(query, positive) -> 1`` and
``(query, negative) -> 0`` with binary cross-entropy on the logit; :class:`knowmap.models.reranker.Reranker` serves it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from knowmap.config import TrainingConfig
from knowmap.schemas import TrainingPair
from knowmap.train.loop import Batch, Example, freeze_input_embeddings, positives_by_query
from knowmap.train.ray_run import EpochCallback, TrainResult, fit


@dataclass(frozen=True)
class RerankerTask:
    """The cross-encoder with BCE on labelled pairs (see :class:`~knowmap.train.loop.TrainingTask`)."""

    kind: str = "reranker"

    def examples(self, pairs: Sequence[TrainingPair], config: TrainingConfig) -> list[Example]:
        return labelled_examples(pairs, negatives_per_positive=max(1, config.max_negatives), seed=config.seed)

    def build(self, model_path: str, config: TrainingConfig, device: torch.device) -> tuple[nn.Module, nn.Module]:
        from sentence_transformers import CrossEncoder
        from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

        model = CrossEncoder(model_path, num_labels=1, max_length=config.max_seq_length, device=str(device),
                             local_files_only=os.path.isdir(model_path))
        if config.freeze_word_embeddings:
            freeze_input_embeddings(model)
        return model, BinaryCrossEntropyLoss(model)

    def collate(self, model: nn.Module, config: TrainingConfig) -> Callable[[list[Example]], Batch]:
        return collate_labelled

    def save(self, model: nn.Module, path: str) -> None:
        model.save(path, create_model_card=False)


def collate_labelled(examples: list[Example]) -> Batch:
    """``[(query, doc, label)]`` to ``([queries, docs], labels)``; the loss tokenises the text pairs itself."""
    queries, docs, labels = zip(*examples, strict=True)
    return [list(queries), list(docs)], torch.tensor(labels, dtype=torch.float32)


def labelled_examples(pairs: Sequence[TrainingPair], *, negatives_per_positive: int, seed: int) -> list[Example]:
    """``(query, positive, 1.0)`` and ``(query, negative, 0.0)`` rows, up to ``negatives_per_positive`` per pair.

    A pair's own (hard) negatives come first; a pair without enough gets other pairs' positives, drawn with
    ``seed``. A query that occurs in several pairs never gets one of its own positives as a negative.

    Raises:
        ValueError: ``negatives_per_positive`` is below 1.
    """
    if negatives_per_positive < 1:
        raise ValueError(f"negatives_per_positive must be >= 1, got {negatives_per_positive}")
    rng = random.Random(seed)
    positives = positives_by_query(pairs)
    pool = sorted({p.positive for p in pairs})
    rows: list[Example] = []
    for pair in pairs:
        taken = positives[pair.query]
        negatives = [t for t in dict.fromkeys(pair.negatives) if t not in taken][:negatives_per_positive]
        candidates = [t for t in pool if t not in taken and t not in negatives]
        while len(negatives) < negatives_per_positive and candidates:
            negatives.append(candidates.pop(rng.randrange(len(candidates))))
        rows.append((pair.query, pair.positive, 1.0))
        rows.extend((pair.query, negative, 0.0) for negative in negatives)
    return rows


def train_reranker(pairs: list[TrainingPair], *, base_model: str, output_dir: str, config: TrainingConfig,
                   resume: bool = True, on_epoch: EpochCallback | None = None) -> TrainResult:
    """Train a cross-encoder reranker on ``pairs`` with BCE, data-parallel on Ray Train.

    Args:
        pairs: training pairs from train-split trajectories (the embedder's pairs).
        base_model: a local model directory: a sentence-transformers bi-encoder (e.g. the packaged MiniLM, whose
            encoder weights the cross-encoder starts from) or a CrossEncoder to fine-tune further; a ``str``.
        output_dir: where the reranker is saved (``CrossEncoder.save`` format plus ``knowmap_model.json``).
        config: the ``training`` section; ``max_negatives`` negatives per positive (at least 1).
        resume: continue after the last completed epoch of an earlier call with the same ``output_dir``.
        on_epoch: called in this process with each epoch's metrics.

    Returns:
        a :class:`~knowmap.train.ray_run.TrainResult`; serve it with
        ``knowmap.models.reranker.Reranker(result.model_dir)``.

    Raises:
        ValueError: ``pairs`` is empty.
        TrainingError: as for :func:`~knowmap.train.embedder_trainer.train_embedder`.
    """
    return fit(RerankerTask(), pairs, base_model=base_model, output_dir=output_dir, config=config, resume=resume,
               on_epoch=on_epoch)
