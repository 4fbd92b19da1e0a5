"""The real packaged MiniLM, loaded by local path: shapes, normalisation, similarity, versions, load errors."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from knowmap.errors import EmbedderError
from knowmap.models.embedder import TRACE_TOLERANCE, Embedder, default_embedder_path, model_fingerprint, trace_elsewhere

pytestmark = pytest.mark.integration


def test_packaged_model_loads_by_local_path(embedder: Embedder) -> None:
    assert embedder.name_or_path == default_embedder_path()
    assert isinstance(embedder.name_or_path, str) and Path(embedder.name_or_path, "modules.json").is_file()
    assert embedder.dim == 384
    assert re.fullmatch(r"[a-z0-9_]+", embedder.version) and embedder.version.startswith("all_minilm_l6_v2_")
    assert embedder.version.endswith(model_fingerprint(embedder.name_or_path))  # stable: same files, same version


def test_vectors_are_normalised_float32(embedder: Embedder) -> None:
    vectors = embedder.encode(["the metal pot is on the stove", "a frog", "x" * 5000])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="list of strings"):
        embedder.encode("a single string")  # type: ignore[arg-type]


def test_similar_sentences_score_higher_than_unrelated(embedder: Embedder) -> None:
    query, similar, unrelated = embedder.encode([
        "boil the water in the metal pot on the stove",
        "heat the pot of water on the stove until it boils",
        "plant the seed in the flower pot in the greenhouse",
    ])
    assert query @ similar > query @ unrelated + 0.2


def test_fingerprint_follows_weights_not_location(tmp_path: Path) -> None:
    source = Path(default_embedder_path())
    copy = Path(shutil.copytree(source, tmp_path / "copy"))
    (copy / "README.md").write_text("a model card edit does not change the model")
    assert model_fingerprint(str(copy)) == model_fingerprint(str(source))
    # A fine-tuning step changes every weight; overwrite the weight bytes to simulate one.
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
    weights.write_bytes(bytes(data))
    assert model_fingerprint(str(copy)) != model_fingerprint(str(source))


def test_bad_paths_give_embedder_errors_that_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(EmbedderError, match=re.escape(str(missing))):
        Embedder(str(missing))
    with pytest.raises(EmbedderError, match="holds no model"):
        Embedder(str(tmp_path))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(EmbedderError, match="broken.*local model directory"):
        Embedder(str(broken))
    with pytest.raises(ValueError, match="batch_size"):
        Embedder(batch_size=0)


def test_weight_interpolation_lands_between_the_fine_tuned_and_the_base_model(tmp_path: Path) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    from knowmap.train.embedder_trainer import interpolate_weights

    base = str(default_embedder_path())
    tuned = SentenceTransformer(base, device="cpu", local_files_only=True)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(0.01)
    tuned.save(str(tmp_path / "tuned"))
    interpolate_weights(str(tmp_path / "tuned"), base, 0.7)
    mixed = SentenceTransformer(str(tmp_path / "tuned"), device="cpu", local_files_only=True).state_dict()
    original = SentenceTransformer(base, device="cpu", local_files_only=True).state_dict()
    for name, value in mixed.items():
        if value.is_floating_point():
            assert torch.allclose(value, original[name] + 0.007, atol=1e-5), name
    with pytest.raises(ValueError, match=r"finetuned_weight must be in \(0, 1\]"):
        interpolate_weights(str(tmp_path / "tuned"), base, 0.0)


def test_texts_of_mixed_lengths_embed_as_each_alone_in_order(embedder: Embedder) -> None:
    texts = ["boil water", "the metal pot is on the stove, which is off, in the kitchen, beside the sink " * 4,
             "a frog", "the thermometer reads 20 degrees celsius in the hallway " * 3, "heat"]
    together = embedder.encode(texts)  # grouped into passes by length, then put back in order
    alone = np.concatenate([embedder.encode([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_traced_inference_gives_the_eager_vectors(embedder: Embedder) -> None:
    # The packaged MiniLM traces; its vectors must be the eager model's (the served collections were embedded by
    # either), on batches the trace never saw: other sizes, lengths, one truncated text.
    assert embedder.traced
    texts = ["boil water", "the metal pot is on the stove " * 3, "x" * 3000,
             *[f"step {i} of the task" for i in range(9)]]
    eager = embedder._model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    np.testing.assert_allclose(embedder.encode(texts), eager, atol=TRACE_TOLERANCE)


def test_a_model_that_does_not_trace_runs_eagerly(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                  embedder: Embedder) -> None:
    import torch

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("untraceable module")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    eager = Embedder(default_embedder_path())
    assert not eager.traced and "untraceable module" in caplog.text
    np.testing.assert_allclose(eager.encode(["boil water", "a frog"]), embedder.encode(["boil water", "a frog"]),
                               atol=TRACE_TOLERANCE)


def test_a_traced_graph_is_kept_and_loaded_by_the_next_process_without_tracing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, embedder: Embedder) -> None:
    import torch

    first = Embedder(default_embedder_path(), traced_dir=tmp_path)
    kept = list(tmp_path.glob("*.pt"))
    assert first.traced and len(kept) == 1 and first.version in kept[0].name

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("traced again although a graph was kept")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    second = Embedder(default_embedder_path(), traced_dir=tmp_path)
    assert second.traced
    texts = ["boil water", "the metal pot is on the stove " * 3]
    np.testing.assert_allclose(second.encode(texts), embedder.encode(texts), atol=TRACE_TOLERANCE)

    kept[0].write_bytes(b"half a file")  # a corrupt graph is traced again (here: refused, so eager), never used
    third = Embedder(default_embedder_path(), traced_dir=tmp_path)
    assert not third.traced and "ignoring the traced embedder" in caplog.text
    np.testing.assert_allclose(third.encode(texts), embedder.encode(texts), atol=TRACE_TOLERANCE)


def test_a_child_process_traces_the_graph_this_process_then_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, embedder: Embedder) -> None:
    import subprocess

    import torch

    assert trace_elsewhere(default_embedder_path(), "cpu", tmp_path)
    assert [p.name for p in tmp_path.glob("*.pt")] == [f"{embedder.version}-torch{torch.__version__}-cpu.pt"
                                                      .replace("+", "_")]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("traced or spawned again although a graph was kept")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)
    assert trace_elsewhere(default_embedder_path(), "cpu", tmp_path)  # kept: no child
    loaded = Embedder(default_embedder_path(), traced_dir=tmp_path)
    assert loaded.traced
    texts = ["boil water", "the metal pot is on the stove " * 3]
    np.testing.assert_allclose(loaded.encode(texts), embedder.encode(texts), atol=TRACE_TOLERANCE)
    monkeypatch.undo()

    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    assert not trace_elsewhere(str(not_a_model), "cpu", tmp_path / "other")  # the caller then loads (and fails) itself
    assert "in a child process failed" in caplog.text and "holds no model" in caplog.text
