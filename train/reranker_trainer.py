"""Train the cross-encoder reranker on the retriever's pairs, data-parallel on Ray Train.

The reranker starts from the same MiniLM weights as the embedder: sentence-transformers 6 turns a bi-encoder
checkpoint into a ``CrossEncoder`` (``BertForSequenceClassification``: the encoder and pooler are loaded, the
one-logit classification head is new and initialised from the seed). It is trained as a ranking task, listwise:
each query's positive against ``training.reranker_negatives`` hard negatives (mined by the base embedder for that
query: its pair's own, then those of the query's other pairs) and one in-batch negative, with the softmax
cross-entropy of sentence-transformers' cross-encoder ``MultipleNegativesRankingLoss``. Each (query, document)
pair gets ``training.reranker_max_length`` tokens, cut longest-first, so a document up to half the budget is kept
whole and the (long) query is what gets cut. :class:`knowmap.models.reranker.Reranker` serves it, and the retriever
fuses its order with the first stage's instead of replacing it.
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
    """The cross-encoder, listwise over hard negatives (see :class:`~knowmap.train.loop.TrainingTask`)."""

    kind: str = "reranker"
    # A plain seeded shuffle, each pair once an epoch: the distinct-text batches the embedder needs (all of a
    # batch are its in-batch negatives) top short batches up with repeats, which tripled an epoch here; this loss
    # draws one in-batch negative, and its hard negatives never include the query's own positives.
    distinct_columns: tuple[int, ...] = ()

    def examples(self, pairs: Sequence[TrainingPair], config: TrainingConfig) -> list[Example]:
        return listwise_examples(pairs, negatives=config.reranker_negatives, seed=config.seed)

    def build(self, model_path: str, config: TrainingConfig, device: torch.device) -> tuple[nn.Module, nn.Module]:
        from sentence_transformers import CrossEncoder
        from sentence_transformers.cross_encoder.losses import MultipleNegativesRankingLoss

        model = CrossEncoder(model_path, num_labels=1, max_length=config.reranker_max_length, device=str(device),
                             local_files_only=os.path.isdir(model_path))
        if config.freeze_word_embeddings:
            freeze_input_embeddings(model)
        return model, MultipleNegativesRankingLoss(model, num_negatives=1)

    def collate(self, model: nn.Module, config: TrainingConfig) -> Callable[[list[Example]], Batch]:
        return collate_columns

    def save(self, model: nn.Module, path: str) -> None:
        model.save(path, create_model_card=False)


def collate_columns(examples: list[Example]) -> Batch:
    """``[(query, positive, negative_1, ..., negative_n)]`` to the loss's columns (no labels: the first document
    of each row is the positive); the loss tokenises the text pairs itself."""
    return [list(column) for column in zip(*examples, strict=True)], torch.zeros(len(examples))


def listwise_examples(pairs: Sequence[TrainingPair], *, negatives: int, seed: int) -> list[Example]:
    """``(query, positive, negative_1, ..., negative_n)`` per pair, exactly ``negatives`` negatives each.

    Hard negatives first: the pair's own (mined by the base embedder for its query), then those of the query's
    other pairs; a pair still short gets other pairs' positives, drawn with ``seed``. A query's own positives are
    never its negatives.

    Raises:
        ValueError: ``negatives`` is below 1, or the pairs hold too few distinct documents to give every query
            that many negatives.
    """
    if negatives < 1:
        raise ValueError(f"negatives must be >= 1, got {negatives}")
    rng = random.Random(seed)
    positives = positives_by_query(pairs)
    hard: dict[str, list[str]] = {}
    for pair in pairs:
        hard.setdefault(pair.query, []).extend(pair.negatives)
    pool = sorted({p.positive for p in pairs} | {n for p in pairs for n in p.negatives})
    rows: list[Example] = []
    for pair in pairs:
        taken = positives[pair.query]
        chosen = [t for t in dict.fromkeys([*pair.negatives, *hard[pair.query]]) if t not in taken][:negatives]
        candidates = [t for t in pool if t not in taken and t not in chosen]
        if len(chosen) + len(candidates) < negatives:
            raise ValueError(f"{len(pool)} distinct documents cannot give the query {pair.query[:60]!r} {negatives} "
                             "negatives; lower training.reranker_negatives")
        while len(chosen) < negatives:
            chosen.append(candidates.pop(rng.randrange(len(candidates))))
        rows.append((pair.query, pair.positive, *chosen))
    return rows


def train_reranker(pairs: list[TrainingPair], *, base_model: str, output_dir: str, config: TrainingConfig,
                   resume: bool = True, on_epoch: EpochCallback | None = None) -> TrainResult:
    """Train a cross-encoder reranker on ``pairs``, listwise over hard negatives, data-parallel on Ray Train.

    Args:
        pairs: training pairs from train-split trajectories (the embedder's pairs).
        base_model: a local model directory: a sentence-transformers bi-encoder (e.g. the packaged MiniLM, whose
            encoder weights the cross-encoder starts from) or a CrossEncoder to fine-tune further; a ``str``.
        output_dir: where the reranker is saved (``CrossEncoder.save`` format plus ``knowmap_model.json``).
        config: the ``training`` section; ``reranker_negatives`` hard negatives per positive,
            ``reranker_max_length`` tokens per (query, document) pair, ``reranker_epochs`` epochs (0: ``epochs``),
            ``reranker_batch_size`` pairs per step.
        resume: continue after the last completed epoch of an earlier call with the same ``output_dir``.
        on_epoch: called in this process with each epoch's metrics.

    Returns:
        a :class:`~knowmap.train.ray_run.TrainResult`; serve it with
        ``knowmap.models.reranker.Reranker(result.model_dir)``.

    Raises:
        ValueError: ``pairs`` is empty.
        TrainingError: as for :func:`~knowmap.train.embedder_trainer.train_embedder`.
    """
    config = config.model_copy(update={"epochs": config.reranker_epochs or config.epochs,
                                       "batch_size": config.reranker_batch_size})
    return fit(RerankerTask(), pairs, base_model=base_model, output_dir=output_dir, config=config, resume=resume,
               on_epoch=on_epoch)
