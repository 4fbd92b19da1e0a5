"""Shared fixtures. Models load once per test session: loading MiniLM takes seconds, encoding a sentence ms."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from knowmap.models.embedder import Embedder

# No model hub is reachable here: never let a loader try (and wait on retries).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Whichever test starts Ray, its Serve frontend is the default one (knowmap.serve.proxy) and times out request
# heads after 2 s here (HAProxy: stalled clients after 3 s, past the Serve tier's 2 s body timeout).
def _frontend_environment() -> dict[str, str]:
    from knowmap.config import KnowMapConfig
    from knowmap.serve.proxy import proxy_environment

    return proxy_environment(KnowMapConfig(serve={"header_timeout_s": 2, "body_timeout_s": 2}))


os.environ.update(_frontend_environment())


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """The packaged all-MiniLM-L6-v2, loaded by local path once for the whole session."""
    from knowmap.models.embedder import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``{"embedder_b": dir, "reranker": dir}``: a second embedder version and a small cross-encoder."""
    import json

    import torch
    from sentence_transformers import CrossEncoder

    from knowmap.models.embedder import default_embedder_path

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


@pytest.fixture(scope="session")
def milvus_server_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Milvus server for the whole session, started as users start it: ``knowmap milvus serve`` (the `milvus`
    package's standalone binary, ~10 s to start), stopped with Ctrl-C at the end, which must exit cleanly."""
    import re
    import signal
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("milvus-server")
    knowmap = str(Path(sys.executable).with_name("knowmap"))  # the console script of this environment
    proc = subprocess.Popen([knowmap, "milvus", "serve", "--dir", str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # printed once the server answers
    match = re.search(r"Milvus server at (http://\S+) \(data in (\S+)\)", line)
    if match is None or match.group(2) != str(folder):
        proc.kill()
        pytest.fail(f"knowmap milvus serve did not start a server: {line!r} {proc.communicate()[1][-2000:]}")
    yield match.group(1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, proc.communicate()[1][-2000:]


@pytest.fixture(params=["lite", pytest.param("server", marks=pytest.mark.milvus_server)])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A vector-store URI: a fresh Milvus Lite file, or a fresh database on the session's Milvus server."""
    if request.param == "lite":
        yield str(tmp_path / "kb.db")
    else:
        from tests.stores import server_database

        yield from server_database(request.getfixturevalue("milvus_server_uri"))
