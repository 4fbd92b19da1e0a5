"""The retrieval service's plain parts, without Ray: batch splitting, API keys, wire schemas, model defaults."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from ray import serve

from knowmap.api_schemas import EmbeddingRequest, ObservationsRequest, RetrieveRequest
from knowmap.config import KnowMapConfig
from knowmap.errors import ConfigError, KnowMapError
from knowmap.serve.app import resolve_models
from knowmap.serve.auth import Grant, add_key, digest, load_keys, match_key
from knowmap.serve.deployments import IdleGate, encode_requests, score_requests


def fake_encode(texts: list[str]) -> np.ndarray:
    return np.array([[len(t), i] for i, t in enumerate(texts)], dtype=np.float32)


def test_encode_requests_embeds_once_and_gives_each_request_its_rows() -> None:
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        return fake_encode(texts)

    out = encode_requests(encode, [["a", "bb"], [], ["ccc"]])
    assert calls == [["a", "bb", "ccc"]]
    assert [o.shape[0] for o in out] == [2, 0, 1]
    np.testing.assert_array_equal(out[0], fake_encode(["a", "bb"]))
    assert out[2][0, 0] == 3 and out[2][0, 1] == 2  # the third text of the flat batch


def test_score_requests_splits_scores_back_per_request() -> None:
    out = score_requests(lambda pairs: [len(q) + len(d) for q, d in pairs], [("q", ["a", "bb"]), ("qq", ["c"])])
    assert out == [[2.0, 3.0], [3.0]]
    assert score_requests(lambda pairs: [], []) == []


def test_one_requests_bad_text_fails_only_that_request() -> None:
    """The tokenizer refuses a lone surrogate; the batch is retried request by request, so the other requests
    in it still get their vectors and only the bad one gets the error."""
    def encode(texts: list[str]) -> np.ndarray:
        for text in texts:
            text.encode("utf-8")  # raises UnicodeEncodeError on "\ud800", as the tokenizer does
        return fake_encode(texts)

    out = encode_requests(encode, [["a"], ["\ud800", "b"], ["cc"]])
    assert isinstance(out[1], UnicodeEncodeError)
    np.testing.assert_array_equal(out[0], fake_encode(["a"]))
    np.testing.assert_array_equal(out[2], fake_encode(["cc"]))

    def predict(pairs: list[tuple[str, str]]) -> list[float]:
        if any(d == "boom" for _, d in pairs):
            raise ValueError("bad document")
        return [1.0] * len(pairs)

    scored = score_requests(predict, [("q", ["a"]), ("q", ["boom"]), ("q", ["b", "c"])])
    assert scored[0] == [1.0] and isinstance(scored[1], ValueError) and scored[2] == [1.0, 1.0]


@pytest.fixture
def outside_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """``@serve.batch`` reads only ``max_ongoing_requests`` from the replica context (for a warning): give it one."""
    context = type("Context", (), {"_deployment_config": type("Config", (), {"max_ongoing_requests": 64})})
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)


def gated_model() -> Any:
    """A model that takes 50 ms a batch behind the gate, as the embedder deployment uses it. A new class each time:
    a ``@serve.batch`` queue belongs to the event loop of its first call."""

    class GatedModel:
        def __init__(self) -> None:
            self.gate, self.batches = IdleGate(), []

        async def call(self, x: int) -> int:
            return await self.gate.call(self._batch, x)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
        async def _batch(self, xs: list[int]) -> list[int]:
            try:
                self.batches.append(len(xs))
                await asyncio.sleep(0.05)
                return [2 * x for x in xs]
            finally:
                self.gate.release()

    return GatedModel()


@pytest.mark.usefixtures("outside_serve")
def test_the_gate_batches_what_arrives_while_the_model_runs() -> None:
    async def run() -> tuple[list[int], list[int]]:
        model = gated_model()
        first = asyncio.ensure_future(model.call(0))  # runs alone; the next 15 arrive 2 ms apart while it does

        async def later(i: int) -> int:
            await asyncio.sleep(0.002 * i)
            return await model.call(i)

        rest = await asyncio.gather(*(later(i) for i in range(1, 16)))
        return [await first, *rest], model.batches

    results, batches = asyncio.run(run())
    assert results == [2 * i for i in range(16)]
    assert batches == [1, 15]  # without the gate, a 0 s batch wait gives each of the 15 a batch of its own


@pytest.mark.usefixtures("outside_serve")
@pytest.mark.parametrize("entered", [True, False], ids=["in-the-batch-queue", "held-by-the-gate"])
def test_a_cancelled_request_leaves_the_gate_open(entered: bool) -> None:
    async def run() -> list[int]:
        model = gated_model()
        busy = None if entered else asyncio.ensure_future(model.call(1))
        await asyncio.sleep(0.01)
        cancelled = asyncio.ensure_future(model.call(2))
        await asyncio.sleep(0)  # on an idle model it enters the gate and the batch queue at once
        cancelled.cancel()  # Serve drops a cancelled request from its batch: no batch may be left to open the gate
        done = [] if busy is None else [await busy]
        return [*done, await asyncio.wait_for(model.call(3), timeout=2)]

    assert asyncio.run(run()) == ([6] if entered else [2, 6])


def test_a_key_is_generated_once_with_0600_and_checked_in_constant_time(tmp_path: Path) -> None:
    config = KnowMapConfig(data_dir=tmp_path)
    grants, keys, path = load_keys(config)
    assert path == tmp_path / "serve" / "api_key" and len(keys) == 1 and keys[0].startswith("km-")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_keys(config) == (grants, keys, path)  # read back, not regenerated
    assert match_key(keys[0], grants) == Grant(digest=digest(keys[0]), tenant="default", role="admin")
    assert match_key(keys[0] + "x", grants) is None and match_key(None, grants) is None
    assert match_key("", grants) is None


def test_configured_keys_need_no_file_and_a_readable_key_file_is_refused(tmp_path: Path) -> None:
    config = KnowMapConfig(data_dir=tmp_path, serve={"api_keys": ["secret-1"]})
    assert load_keys(config) == ([Grant(digest=digest("secret-1"))], ["secret-1"], None)
    path = tmp_path / "keys"
    path.write_text("k1\n# comment\nk2 acme read\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_keys(KnowMapConfig(data_dir=tmp_path, serve={"api_key_file": str(path)}))
    path.chmod(0o600)
    grants, keys, _ = load_keys(KnowMapConfig(data_dir=tmp_path, serve={"api_key_file": str(path)}))
    assert keys == ["k1", "k2"] and [(g.tenant, g.role) for g in grants] == [("default", "admin"), ("acme", "read")]
    with pytest.raises(ConfigError, match="no API key"):
        load_keys(KnowMapConfig(data_dir=tmp_path / "other"), generate=False)


def test_tenant_keys_come_from_config_digests_and_the_key_file(tmp_path: Path) -> None:
    hidden = digest("only-the-digest-is-configured")
    config = KnowMapConfig(data_dir=tmp_path, serve={"keys": [
        {"key": "km-a", "tenant": "acme", "role": "write"}, {"sha256": hidden, "tenant": "beta", "role": "read"}]})
    grants, keys, path = load_keys(config)
    assert path is None and keys == ["km-a"]
    assert match_key("only-the-digest-is-configured", grants) == Grant(digest=hidden, tenant="beta", role="read")
    key, path = add_key(config, "gamma", "admin")  # appended to the key file, which now counts too
    own, *added = path.read_text().split()  # the deployment's own admin key first: `knowmap serve` hands it out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and added == [key, "gamma", "admin"]
    grants, keys, _ = load_keys(config)
    assert keys[0] == own and match_key(own, grants) == Grant(digest=digest(own))
    assert match_key(key, grants) == Grant(digest=digest(key), tenant="gamma", role="admin") and len(grants) == 4
    for bad in ({"key": "k", "sha256": hidden}, {}, {"key": "k", "tenant": "Not A Tenant"},
                {"key": "k", "role": "root"}):
        with pytest.raises(ValidationError):
            KnowMapConfig(data_dir=tmp_path, serve={"keys": [bad]})
    path.write_text("k1 acme write extra\n")
    with pytest.raises(ConfigError, match="KEY \\[TENANT \\[ROLE\\]\\]"):
        load_keys(config)
    path.write_text("k1 acme superuser\n")
    with pytest.raises(ConfigError, match="role 'superuser'"):
        load_keys(config)
    path.write_text("km-a beta write\n")  # the same key as in serve.keys, with another tenant
    with pytest.raises(ConfigError, match="configured twice"):
        load_keys(config)


def test_wire_schemas_accept_openai_shapes_and_refuse_the_rest() -> None:
    assert EmbeddingRequest.model_validate({"input": "x", "model": "m", "user": "u", "future": 1}).input == "x"
    assert EmbeddingRequest.model_validate({"input": ["a"], "encoding_format": "base64"}).encoding_format == "base64"
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"input": ["a"], "encoding_format": "int8"})
    with pytest.raises(ValidationError):
        RetrieveRequest.model_validate({"query": "q", "env_id": "../x"})
    with pytest.raises(ValidationError):
        RetrieveRequest.model_validate({"query": "q", "kbs": []})
    with pytest.raises(ValidationError):
        ObservationsRequest.model_validate({"observations": []})


def test_models_default_to_the_newest_trained_ones(tmp_path: Path) -> None:
    config = KnowMapConfig(data_dir=tmp_path)
    assert resolve_models(config) == ("", "")  # packaged MiniLM, no reranker
    trained = tmp_path / "models" / "e1"
    trained.mkdir(parents=True)
    (tmp_path / "models" / "latest.json").write_text(json.dumps({"embedder": str(trained), "reranker": ""}))
    assert resolve_models(config) == (str(trained), "")
    assert resolve_models(config, embedder="", reranker="") == ("", "")
    with pytest.raises(KnowMapError, match="not a directory"):
        resolve_models(config, embedder=str(tmp_path / "missing"))


def _unbounded(schema: dict[str, Any], defs: dict[str, Any], where: str, seen: set[str]) -> list[str]:
    """Fields of a JSON schema that take strings, lists or integers without an upper bound."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return [] if name in seen else _unbounded(defs[name], defs, where, seen | {name})
    found = []
    for key in ("anyOf", "oneOf", "allOf"):
        for option in schema.get(key, []):
            found += _unbounded(option, defs, where, seen)
    kind = schema.get("type")
    if kind == "string" and "maxLength" not in schema and "enum" not in schema and "const" not in schema:
        found.append(where)
    if kind == "integer" and "maximum" not in schema:
        found.append(where)
    if kind == "array":
        found += [where] if "maxItems" not in schema else []
        found += _unbounded(schema.get("items", {}), defs, f"{where}[]", seen)
    for name, sub in schema.get("properties", {}).items():
        found += _unbounded(sub, defs, f"{where}.{name}", seen)
    return found


def test_every_field_of_every_request_body_has_an_upper_bound() -> None:
    """No request field is unbounded: a client can never make the service hold a text, list or number of any size
    (deployment limits in ``serve`` may only lower these)."""
    from knowmap import api_schemas

    requests = [m for m in vars(api_schemas).values() if isinstance(m, type) and issubclass(m, api_schemas._Request)
                and m is not api_schemas._Request]
    assert len(requests) == 6
    for model in requests:
        schema = model.model_json_schema()
        assert _unbounded(schema, schema.get("$defs", {}), model.__name__, set()) == []


def test_a_request_past_its_deadline_is_cancelled_and_answered_504() -> None:
    from knowmap.serve.guard import _read_body, _within

    cancelled: list[bool] = []

    async def slow_app(scope: dict, receive: Any, send: Any) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def run() -> None:
        await _within(0.1, slow_app, {"type": "http"}, None, send)

    asyncio.run(run())
    assert cancelled == [True] and sent[0]["status"] == 504
    assert json.loads(sent[1]["body"])["error"]["code"] == "deadline_exceeded"

    async def stalled() -> dict:  # a declared body that never comes
        await asyncio.sleep(30)
        return {}

    with pytest.raises(TimeoutError):
        asyncio.run(_read_body(stalled, 1024, 0.1))


def test_a_stored_episode_id_belongs_to_whoever_stored_it(tmp_path: Path) -> None:
    from knowmap.errors import EpisodeConflictError, EpisodeNotFoundError, ForbiddenError
    from knowmap.kb.trajectory_store import (
        check_contribution,
        check_deletion,
        contributions,
        delete_trajectory,
        save_trajectory,
    )
    from knowmap.layout import DataLayout
    from knowmap.schemas import Trajectory

    paths = DataLayout(root=tmp_path)
    mine = Trajectory(episode_id="acme@ep-1", task="boil", variation=0, split="train", source="agent",
                      contributor="key:a", tenant="acme")
    check_contribution(paths, mine)  # nothing stored yet
    save_trajectory(paths, mine)
    check_contribution(paths, mine)  # exactly the same again: a retry
    changed = mine.model_copy(update={"task_description": "again"})
    with pytest.raises(EpisodeConflictError, match="send overwrite=true"):
        check_contribution(paths, changed)
    check_contribution(paths, changed, overwrite=True)  # its contributor may replace it
    with pytest.raises(ForbiddenError, match="another key"):
        check_contribution(paths, changed.model_copy(update={"contributor": "key:b"}), overwrite=True)
    check_contribution(paths, changed.model_copy(update={"contributor": "key:b"}), overwrite=True, admin=True)
    save_trajectory(paths, mine.model_copy(update={"episode_id": "ep-2", "source": "expert", "contributor": "",
                                                   "tenant": ""}))
    with pytest.raises(EpisodeConflictError, match="expert episode"):
        check_contribution(paths, mine.model_copy(update={"episode_id": "ep-2", "tenant": "default"}), overwrite=True)
    with pytest.raises(KnowMapError, match="cannot name a stored trajectory"):
        save_trajectory(paths, mine.model_copy(update={"episode_id": "../escape"}))
    assert [t.episode_id for t in contributions(paths, "acme")] == ["acme@ep-1"]
    assert contributions(paths, "beta") == [] and contributions(paths, "default") == []  # ep-2 is an expert's
    with pytest.raises(EpisodeNotFoundError):
        check_deletion(paths, "beta", "acme@ep-1", "key:a", admin=True)  # another tenant's reads as absent
    with pytest.raises(EpisodeNotFoundError):
        check_deletion(paths, "default", "ep-2", "key:a", admin=True)  # an expert's cannot be deleted
    with pytest.raises(ForbiddenError):
        check_deletion(paths, "acme", "acme@ep-1", "key:b", admin=False)
    assert check_deletion(paths, "acme", "acme@ep-1", "key:a", admin=False).episode_id == "acme@ep-1"
    assert sorted(p.name for p in (tmp_path / "trajectories").iterdir()) == ["acme@ep-1.json", "ep-2.json"]
    assert delete_trajectory(paths, "acme@ep-1") and not delete_trajectory(paths, "acme@ep-1")


def test_length_chunks_keep_short_texts_out_of_long_passes() -> None:
    from knowmap.models.embedder import length_chunks

    lengths = [200, 30, 210, 28, 32, 205]
    chunks = length_chunks(lengths, limit=64)
    assert sorted(i for c in chunks for i in c) == list(range(6))  # every text once
    assert chunks == [[3, 1, 4], [0, 5, 2]]  # short queries in one pass, the long ones in another
    assert length_chunks([30, 200], limit=64) == [[0, 1]]  # one short beside a long: padding is cheaper than a pass
    assert length_chunks([10] * 5, limit=2) == [[0, 1], [2, 3], [4]]  # never more than limit per pass
    assert length_chunks([], limit=4) == []


def test_small_embedder_calls_run_on_one_torch_thread_and_large_ones_on_all() -> None:
    import torch

    from knowmap.serve.deployments import PARALLEL_MIN_TEXTS, EmbedderModels

    models = EmbedderModels(threads=2)
    seen = [models._model_thread.submit(models._sized, lambda texts: torch.get_num_threads(), ["t"] * n).result()
            for n in (1, PARALLEL_MIN_TEXTS - 1, PARALLEL_MIN_TEXTS, 32, 2)]
    assert seen == [1, 1, 2, 2, 1]


def test_low_priority_runs_at_nice_19_in_its_own_thread_and_hands_back_result_and_errors() -> None:
    import os
    import threading

    from knowmap.models.embedder import low_priority

    def where() -> tuple[int, int]:
        return threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    thread, nice = low_priority(where)
    assert thread != threading.get_native_id() and nice == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19  # the caller keeps its priority
    assert low_priority(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ValueError, match="no weights"):
        low_priority(lambda: (_ for _ in ()).throw(ValueError("no weights")))


def test_a_new_embedder_loads_in_the_background_and_a_failed_load_keeps_the_old_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import threading

    import torch

    import knowmap.serve.deployments as deployments

    release = threading.Event()
    loads: list[tuple[str, int, int]] = []  # path, thread priority, torch threads

    def here() -> tuple[int, int]:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), torch.get_num_threads()

    class FakeEmbedder:
        def __init__(self, path: str, *args: object, **kwargs: object) -> None:
            loads.append((path, *here()))
            if path == "/models/broken":
                raise ValueError("no weights in /models/broken")
            if path == "/models/b":
                release.wait(10)  # a slow load
            self.version, self.dim = path.rsplit("/", 1)[-1], 3

    monkeypatch.setattr(deployments, "Embedder", FakeEmbedder)
    warmed: list[str] = []

    async def scenario() -> None:
        models = deployments.EmbedderModels(threads=1)
        await models.reconfigure({"model": "/models/a"})  # the first model loads before the replica serves
        assert (await models.info())["version"] == "a"
        warm = lambda p, e: warmed.append((p, *here()))  # noqa: E731
        await asyncio.wait_for(models.reconfigure({"model": "/models/b"}, warm=warm), 1)
        assert (await models.info())["version"] == "a"  # returned at once; a still serves while b loads
        release.set()
        await asyncio.wait_for(models._loading, 10)  # type: ignore[arg-type]
        assert (await models.info())["version"] == "b" and warmed == [("/models/b", 19, 1)]
        assert loads[1] == ("/models/b", 19, 1)  # a swap's load: nice 19, one torch thread; serving first
        assert loads[0][0] == "/models/a" and loads[0][1] != 19  # the first load: nothing serves yet
        await models.reconfigure({"model": "/models/broken"})
        await asyncio.wait_for(models._loading, 10)  # type: ignore[arg-type]
        info = await models.info()
        assert info["version"] == "b" and info["load_error"]["path"] == "/models/broken"
        assert "no weights" in info["load_error"]["error"]

    asyncio.run(scenario())
