"""The training tasks build the real packaged MiniLM with the token-embedding matrix frozen or not, as configured."""

from __future__ import annotations

import pytest
import torch

from knowmap.config import TrainingConfig
from knowmap.models.embedder import default_embedder_path
from knowmap.train.embedder_trainer import EmbedderTask
from knowmap.train.reranker_trainer import RerankerTask

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("task", [EmbedderTask(), RerankerTask()], ids=["embedder", "reranker"])
@pytest.mark.parametrize("freeze", [True, False])
def test_build_freezes_the_token_matrix_as_configured(task: EmbedderTask | RerankerTask, freeze: bool) -> None:
    model, loss = task.build(default_embedder_path(), TrainingConfig(freeze_word_embeddings=freeze),
                             torch.device("cpu"))
    frozen = [name for name, p in loss.named_parameters() if not p.requires_grad]
    word = [name for name in frozen if name.endswith("embeddings.word_embeddings.weight")]
    assert len(word) == (1 if freeze else 0)
    assert not any("position_embeddings" in name or "encoder.layer" in name for name in frozen)
