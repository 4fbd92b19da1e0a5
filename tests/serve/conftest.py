"""Fixtures for the Serve tier: one running service per test module on the session's Ray, on a free port.

Models: the packaged MiniLM as embedder; ``model_dirs`` (tests/conftest.py) gives a second embedder version for hot
swaps and a cross-encoder as reranker.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from knowmap.config import KnowMapConfig
from tests.ports import free_port

TENANT_KEYS = {"km-acme-write": ("acme", "write"), "km-acme-write-2": ("acme", "write"),
               "km-acme-read": ("acme", "read"), "km-acme-admin": ("acme", "admin"), "km-beta-write": ("beta", "write")}


@pytest.fixture(scope="module")
def service(ray_local: None, tmp_path_factory: pytest.TempPathFactory, model_dirs: dict[str, str]) -> Iterator[dict]:
    """A running service on the session's Ray: ``{"url", "key", "config", "info"}``; Serve is shut down after the
    module."""
    from ray import serve

    from knowmap.actors.experience import release_experience_kb
    from knowmap.serve.app import start_service

    data_dir = tmp_path_factory.mktemp("serve-data")
    namespace = f"serve-test-{data_dir.name}"
    config = KnowMapConfig(data_dir=data_dir, ray={"namespace": namespace},
                           serve={"port": free_port(), "max_texts": 16, "max_text_chars": 2000,
                                  "ingress_num_cpus": 0.5, "reranker_num_cpus": 0.25,
                                  "body_timeout_s": 2, "max_env_actors": 4,
                                  "api_keys": ["km-test-key-a", "km-test-key-b"],
                                  "keys": [{"key": k, "tenant": t, "role": r} for k, (t, r) in TENANT_KEYS.items()]})
    info = start_service(config, embedder="", reranker=model_dirs["reranker"])
    yield {"url": info.url, "key": info.api_key, "other_key": "km-test-key-b", "config": config, "info": info}
    serve.shutdown()
    release_experience_kb(config)
