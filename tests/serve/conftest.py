"""Fixtures for the Serve tier: one local Ray and one running service per test module, on a free port.

Models: the packaged MiniLM as embedder; a second embedder version (the same weights with a different maximum
sequence length, so its fingerprint and collection differ) for hot swaps; a cross-encoder initialised from MiniLM
(seeded, untrained head) as reranker. Built once per session under a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from knowmap.config import KnowMapConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``{"embedder_b": dir, "reranker": dir}``: a second embedder version and a small cross-encoder."""
    import json

    import torch
    from sentence_transformers import CrossEncoder

    from knowmap.embedder import default_embedder_path

    root = tmp_path_factory.mktemp("models")
    base = Path(default_embedder_path())
    embedder_b = root / "minilm_b"
    # Links to the same weights, except one small config file: a distinct fingerprint (version) without copying.
    shutil.copytree(base, embedder_b, ignore=shutil.ignore_patterns("openvino", "onnx"), copy_function=os.symlink)
    config = embedder_b / "sentence_bert_config.json"
    config.unlink()
    config.write_text((base / config.name).read_text())
    data = json.loads(config.read_text())
    data["max_seq_length"] = int(data.get("max_seq_length", 256)) - 1
    config.write_text(json.dumps(data))
    torch.manual_seed(0)
    reranker = root / "reranker"
    CrossEncoder(str(base), num_labels=1, local_files_only=True).save(str(reranker))
    return {"embedder_b": str(embedder_b), "reranker": str(reranker)}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, model_dirs: dict[str, str]) -> Iterator[dict]:
    """A running service: ``{"url", "key", "config", "info"}``; Serve is shut down after the module."""
    import ray
    from ray import serve

    from knowmap.actors.experience import release_experience_kb
    from knowmap.serve.app import start_service

    data_dir = tmp_path_factory.mktemp("serve-data")
    namespace = f"serve-test-{data_dir.name}"
    config = KnowMapConfig(data_dir=data_dir, ray={"namespace": namespace},
                           serve={"port": free_port(), "max_texts": 16, "max_text_chars": 2000,
                                  "embedder_num_cpus": 0.5, "reranker_num_cpus": 0.25})
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, namespace=namespace)
    info = start_service(config, embedder="", reranker=model_dirs["reranker"])
    yield {"url": info.url, "key": info.api_key, "config": config, "info": info}
    serve.shutdown()
    release_experience_kb(config)
