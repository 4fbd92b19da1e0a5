"""Shared fixtures and the test tiers. Models load once per test session: loading MiniLM takes seconds, encoding a
sentence ms; Ray starts once per session (``ray_local``).

Tiers: a test's markers say what it needs (``ray``, ``jvm``, ``training``, ``slow``, ``milvus_server``; see
pyproject.toml). ``pytest --fast`` (``make test-fast``) runs every test that needs none of them, and refuses to let
one of them start Ray or a ScienceWorld JVM all the same: the markers must match what the tests do. Tests under
tests/ray and tests/serve (but :data:`RAY_FREE`) or using the ``ray_local`` or ``service`` fixture are marked ``ray``
here. The tests that stop the session's Ray (the main job, the multi-node cluster) run last, so that no Ray has to
start again after them.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from knowmap.models.embedder import Embedder

# No model hub is reachable here: never let a loader try (and wait on retries).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Whichever test starts Ray, its Serve frontend is the default one (knowmap.serve.proxy) and times out request
# heads after 2 s here (HAProxy: stalled clients after 3 s, past the Serve tier's 2 s body timeout). A stopping
# ingress replica drains for 1 s instead of Ray's 30 s: every Serve shutdown waited the whole 30 s. HAProxy's
# statistics and metrics take free ports, so that the suite runs beside a service on the default ones.
def _frontend_environment() -> dict[str, str]:
    from knowmap.config import KnowMapConfig
    from knowmap.serve.proxy import proxy_environment
    from tests.ports import free_port

    stats = free_port()
    metrics = next(port for port in iter(free_port, None) if port != stats)
    return proxy_environment(KnowMapConfig(serve={"header_timeout_s": 2, "body_timeout_s": 2, "drain_s": 1,
                                                  "haproxy_stats_port": stats, "haproxy_metrics_port": metrics}))


os.environ.update(_frontend_environment())
# Ray Train's controller checks its workers every 2 s and its preemption watcher every 5 s: each of the suite's ten
# short training runs waited out those polls after its last epoch (about 3 s a run measured here).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")

# What `--fast` leaves out: a marker per thing a fast test must not need.
HEAVY_MARKERS = ("ray", "jvm", "training", "slow", "milvus_server")
_RAY_FIXTURES = {"ray_local", "service"}  # fixtures that start the session's Ray (or need it running)
_RAY_FOLDERS = ("tests/ray/", "tests/serve/")
RAY_FREE = {"tests/serve/test_experience_versions.py"}  # the experiential-KB actor's plain class, in this process
# Modules that stop the session's Ray to start their own (a user's `knowmap run`, a multi-node cluster), in the order
# they run, after every other test.
RUN_LAST = ("tests/integration/test_main_job.py", "tests/ray/test_multinode.py")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fast", action="store_true",
                     help=f"the fast tier: only tests marked none of {', '.join(HEAVY_MARKERS)} (`make test-fast`)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(str(config.rootpath))

    def where(item: pytest.Item) -> str:
        path = Path(str(item.path))
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else ""

    for item in items:
        path = where(item)
        if (_RAY_FIXTURES & set(getattr(item, "fixturenames", ()))
                or (path.startswith(_RAY_FOLDERS) and path not in RAY_FREE)):
            item.add_marker(pytest.mark.ray)

    def last(item: pytest.Item) -> int:
        return RUN_LAST.index(where(item)) + 1 if where(item) in RUN_LAST else 0

    items.sort(key=last)  # stable: everything else keeps its order
    if config.getoption("fast"):
        heavy = [item for item in items if any(item.get_closest_marker(m) for m in HEAVY_MARKERS)]
        if heavy:
            config.hook.pytest_deselected(items=heavy)
            items[:] = [item for item in items if not any(item.get_closest_marker(m) for m in HEAVY_MARKERS)]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """In the fast tier, a test that starts Ray or a JVM fails with the marker it lacks (setup, call, teardown)."""
    if not item.config.getoption("fast"):
        yield
        return
    with ExitStack() as stack:
        if "ray" in sys.modules:
            stack.enter_context(_refusing(sys.modules["ray"], "init", item, "starts Ray", "ray"))
        from knowmap.environment.sciworld import ScienceWorld

        stack.enter_context(_refusing(ScienceWorld, "__init__", item, "starts a ScienceWorld JVM", "jvm"))
        yield


def _refusing(owner: Any, name: str, item: pytest.Item, what: str, marker: str) -> Any:
    from unittest import mock

    def refuse(*args: Any, **kwargs: Any) -> None:
        pytest.fail(f"{item.nodeid} {what} but is not marked `{marker}`: mark it (pytest.mark.{marker}), "
                    "or give it a double", pytrace=False)

    return mock.patch.object(owner, name, refuse)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the whole session (2 CPUs, no dashboard), shared by the Ray and Serve tiers.

    Tests that use it isolate their named actors with their own namespace (see ``make_config``). The modules that
    stop it run last (:data:`RUN_LAST`).
    """
    import ray

    if not ray.is_initialized():
        # "local": a Ray of this session's own, never one that another user's `ray start` left registered here.
        _start_ray(lambda: ray.init(address="local", num_cpus=2, include_dashboard=False))
    yield
    if ray.is_initialized():
        ray.shutdown()


def _start_ray(start: Callable[[], object], attempts: int = 3) -> None:
    """Start Ray, again if its raylet misses the fixed 30 s that Ray waits for it to register (seen on 2 busy
    cores), after clearing what this process half started."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            start()
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for its own startup deadline
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            ray.shutdown()
            time.sleep(5 * attempt)


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
