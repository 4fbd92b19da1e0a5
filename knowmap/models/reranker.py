"""The cross-encoder reranker at inference: scores (query, document) pairs, higher = more relevant.

Loaded by local path, like the embedder: a directory that ``CrossEncoder.save`` wrote (the one
:func:`knowmap.train.reranker_trainer.train_reranker` produces, or any sentence-transformers cross-encoder).
Importing this module does not import training code, so the serving layer can use it alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from knowmap.errors import RerankerError
from knowmap.models.embedder import model_fingerprint

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder


class Reranker:
    """Scores query-document pairs with a cross-encoder.

    Args:
        name_or_path: a local CrossEncoder directory, or a hub name (needs the hub or its cache).
        device: torch device, e.g. ``"cpu"`` or ``"cuda:0"``.
        batch_size: pairs per forward pass.
        max_length: tokens per (query, document) pair; None = the model's own limit.

    Raises:
        RerankerError: no path was given, or the model cannot be loaded.
        ValueError: ``batch_size`` is below 1.
    """

    def __init__(self, name_or_path: str, device: str = "cpu", batch_size: int = 64,
                 max_length: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not name_or_path:
            raise RerankerError("no reranker model given: train one with knowmap.train.reranker_trainer."
                                "train_reranker and set models.reranker to its output directory")
        self.name_or_path = str(name_or_path)
        self.device = device
        self.batch_size = batch_size
        self._model = _load(self.name_or_path, device, max_length)
        self.version: str = model_fingerprint(self.name_or_path)

    def predict(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Score ``(query, document)`` pairs.

        Returns:
            one score in [0, 1] per pair (the model's sigmoid of its relevance logit), in input order.

        Raises:
            TypeError: a pair is not a 2-tuple of strings.
            RerankerError: the model failed on the batch.
        """
        pairs = list(pairs)
        if any(not isinstance(p, tuple | list) or len(p) != 2 or not all(isinstance(t, str) for t in p)
               for p in pairs):
            raise TypeError("predict() takes a list of (query, document) string pairs")
        if not pairs:
            return []
        try:
            scores = self._model.predict([(q, d) for q, d in pairs], batch_size=self.batch_size,
                                         convert_to_numpy=True, show_progress_bar=False)
        except (RuntimeError, ValueError) as e:
            raise RerankerError(f"scoring {len(pairs)} pairs with {self.name_or_path} on {self.device} failed: "
                                f"{e}; lower models.batch_size or use another device") from e
        return np.asarray(scores, dtype=np.float64).reshape(len(pairs)).tolist()

    def score(self, query: str, docs: Sequence[str]) -> list[float]:
        """Score each document against one query; one score per document, in input order."""
        if not isinstance(query, str) or isinstance(docs, str):
            raise TypeError("score() takes a query string and a list of document strings")
        return self.predict([(query, d) for d in docs])

    def rerank(self, query: str, docs: Sequence[str], top_k: int | None = None) -> list[tuple[int, float]]:
        """``(index into docs, score)`` by descending score (ties keep input order), at most ``top_k``."""
        scores = self.score(query, docs)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [(i, scores[i]) for i in order[:top_k]]

    def __repr__(self) -> str:
        return f"Reranker(path={self.name_or_path!r}, version={self.version!r}, device={self.device!r})"


def _load(name_or_path: str, device: str, max_length: int | None) -> CrossEncoder:
    is_dir = os.path.isdir(name_or_path)
    if not is_dir and name_or_path.startswith((".", "/", "~")):
        raise RerankerError(f"no reranker directory at {name_or_path!r}; pass the directory train_reranker wrote")
    try:
        from sentence_transformers import CrossEncoder

        return CrossEncoder(name_or_path, device=device, max_length=max_length, local_files_only=is_dir)
    except Exception as e:  # noqa: BLE001 - loaders raise OSError, ValueError, RuntimeError, HF errors alike
        raise RerankerError(f"could not load the reranker {name_or_path!r} on device {device!r}: {e}. No model "
                            "hub is reachable here: pass a local CrossEncoder directory") from e
