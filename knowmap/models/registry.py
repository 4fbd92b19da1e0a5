"""The model registry: ``<data_dir>/models/latest.json`` names the newest fine-tuned embedder and reranker.

``knowmap train`` and the retrain controller's promotions write it (:func:`record_latest`); the retrieval
service, the agents' ``kb-finetuned`` mode, evaluation and the retrain controller's first state read it
(:func:`read_latest`). The write is atomic: a reader sees the old pair or the new one, never half of each.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from pydantic import BaseModel, Field, ValidationError

from knowmap.errors import KnowMapError
from knowmap.layout import DataLayout


class LatestModels(BaseModel):
    """The newest models: directories (empty = none) and the tasks the embedder was trained on."""

    embedder: str = ""
    reranker: str = ""
    train_tasks: list[str] = Field(default_factory=list)


def read_latest(paths: DataLayout) -> LatestModels:
    """What ``models/latest.json`` names; empty fields when no model was trained yet.

    Raises:
        KnowMapError: the file exists but is not a valid record (the message names it).
    """
    path = paths.latest_models
    if not path.is_file():
        return LatestModels()
    try:
        return LatestModels.model_validate_json(path.read_text())
    except ValidationError as e:
        raise KnowMapError(f"{path} is not a valid model record ({e.error_count()} errors: "
                           f"{e.errors()[0]['msg']}); delete it or run `knowmap train` again") from e


def record_latest(paths: DataLayout, embedder: str, reranker: str, train_tasks: Sequence[str]) -> LatestModels:
    """Point ``models/latest.json`` (what Serve, the agents and evaluation use by default) at these models."""
    latest = LatestModels(embedder=embedder, reranker=reranker, train_tasks=sorted(train_tasks))
    paths.models.mkdir(parents=True, exist_ok=True)
    tmp = paths.latest_models.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(latest.model_dump(), indent=2))
    tmp.replace(paths.latest_models)
    return latest
