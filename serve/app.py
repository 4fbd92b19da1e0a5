"""The retrieval service's application: a typed app builder, starting the service, and swapping its models.

:func:`build_app` wires the FastAPI ingress (which holds the embedder and the retrieval backend over the KB
actors) and the Reranker deployment, with replica counts and resources from ``config.serve``. Models travel as
each deployment's ``user_config``; :func:`swap_models` (what ``knowmap serve --embedder/--reranker`` and the
retrain controller call) re-indexes the experiential KB for a new embedder, then redeploys the same app with the
new ``user_config``: Serve reconfigures the running replicas in place, and no request fails (see
:mod:`knowmap.serve.retriever` for how requests stay on one model).

Serve gives every ``serve.run`` a random code version unless one is set, and a new code version restarts every
replica; only a change that keeps it (a ``user_config`` change) is the documented lightweight in-place update.
So each deployment gets a version derived from its code (every module of ``knowmap``, ``knowmap.actors`` and
``knowmap.serve``, subpackages included: :func:`source_digest`) and its constructor arguments: redeploying the same
code and config with other models reconfigures, while changed code or config still restarts replicas.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import ray
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from knowmap.config import KnowMapConfig
from knowmap.errors import EmbedderError, KnowMapError
from knowmap.models.registry import read_latest
from knowmap.serve.auth import Grant

APP_NAME = "knowmap"


class ServeAppArgs(BaseModel):
    """What :func:`build_app` needs: the config, the models, and the accepted keys' digests, tenants and roles."""

    config: dict[str, Any] = Field(description="KnowMapConfig.model_dump(mode='json'), keys removed "
                                   "(:func:`public_config`)")
    embedder: str = Field(default="", description="sentence-transformers model dir; '' = the packaged MiniLM")
    reranker: str = Field(default="", description="CrossEncoder dir; '' = no reranker")
    grants: list[Grant] = Field(min_length=1, description="the accepted keys (digests only)")


def public_config(config: KnowMapConfig) -> dict[str, Any]:
    """The config as the deployments (and Serve's stored config) get it: without any key in plain text."""
    return config.model_copy(update={"serve": config.serve.model_copy(update={"api_keys": [], "keys": []})}
                             ).model_dump(mode="json")


class ServiceInfo(BaseModel):
    """Where a started service answers, and with which models."""

    url: str
    docs_url: str
    key_file: str | None
    api_key: str = Field(repr=False, description="one accepted key, an admin key of the default tenant if one is "
                         "known in plain text (for the caller's own client); '' if only digests are configured")
    embedder: str
    reranker: str


def resolve_models(config: KnowMapConfig, embedder: str | None = None, reranker: str | None = None,
                   ) -> tuple[str, str]:
    """The models to serve: explicit paths, else ``models.embedder``/``models.reranker``, else the newest trained
    ones (``<data_dir>/models/latest.json``), else the packaged MiniLM and no reranker.

    Raises:
        KnowMapError: an explicit path is not a directory.
    """
    latest = read_latest(config.paths).model_dump()
    chosen = []
    for given, configured, key in ((embedder, config.models.embedder, "embedder"),
                                   (reranker, config.models.reranker, "reranker")):
        value = given if given is not None else (configured or latest.get(key) or "")
        if value and given is not None and not Path(value).is_dir():
            raise KnowMapError(f"--{key} {value!r} is not a directory; pass a model directory `knowmap train` wrote")
        chosen.append(str(Path(value).resolve()) if value and Path(value).is_dir() else value)
    return chosen[0], chosen[1]


def build_app(args: ServeAppArgs) -> Any:
    """The Serve application: ``Ingress(Reranker)``; the ingress holds the embedder and the retrieval backend.

    Returns:
        a bound application for ``serve.run``.
    """
    from knowmap.serve.api import Ingress
    from knowmap.serve.deployments import RerankerDeployment

    config = KnowMapConfig.model_validate(args.config)
    s, device = config.serve, config.models.device
    batching = {"max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s}

    def options(deployment: Any, replicas: int, cpus: float, init: Any, models: str) -> Any:
        version = _code_version(deployment.name, init, replicas, cpus, s.num_gpus)
        return deployment.options(num_replicas=replicas, max_ongoing_requests=s.max_ongoing_requests,
                                  ray_actor_options={"num_cpus": cpus, "num_gpus": s.num_gpus},
                                  user_config={"model": models, **batching}, version=version, _internal=True)

    model_init = (device, config.models.batch_size, s.model_threads)
    reranker = options(RerankerDeployment, s.reranker_replicas, s.reranker_num_cpus, model_init,
                       args.reranker).bind(*model_init)
    grants = [g.model_dump() for g in args.grants]
    return options(Ingress, s.ingress_replicas, s.ingress_num_cpus, [args.config, grants, *model_init],
                   args.embedder).bind(reranker, args.config, grants, *model_init)


def start_service(config: KnowMapConfig, *, embedder: str | None = None, reranker: str | None = None,
                  ) -> ServiceInfo:
    """Start (or update) the service on this Ray cluster: Ray, the experiential-KB index, Serve's HTTP proxy on
    ``serve.host:serve.port``, the app. Returns when it answers.

    Args:
        embedder, reranker: model dirs; None = :func:`resolve_models`' defaults; ``reranker=""`` = none.

    Raises:
        ConfigError: the API key file is readable by others.
        EmbedderError, RerankerError: a model cannot be loaded.
    """
    from knowmap.actors.experience import get_experience_kb
    from knowmap.serve.auth import load_keys

    grants, keys, key_file = load_keys(config)
    embedder, reranker = resolve_models(config, embedder, reranker)
    if not ray.is_initialized():
        raise KnowMapError("start_service needs Ray: run it inside knowmap.jobs.session.ray_session(config)")
    ray.get(get_experience_kb(config).ensure_index.remote(embedder))  # its collection exists before traffic
    s = config.serve  # the ingress answers 504 at request_timeout_s; the proxy's own timeout is a backstop behind it
    serve.start(http_options={"host": s.host, "port": s.port, "keep_alive_timeout_s": s.keep_alive_s,
                              "request_timeout_s": s.request_timeout_s + 30})
    args = ServeAppArgs(config=public_config(config), embedder=embedder, reranker=reranker, grants=grants)
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    url = f"http://{config.serve.host}:{config.serve.port}"
    return ServiceInfo(url=url, docs_url=f"{url}/docs", key_file=str(key_file) if key_file else None,
                       api_key=keys[0] if keys else "", embedder=embedder, reranker=reranker)


def swap_models(config: KnowMapConfig, *, embedder: str | None = None, reranker: str | None = None,
                timeout_s: float = 600.0) -> dict[str, Any]:
    """Hot-swap the running service's models without failing in-flight or new requests.

    Order: (1) the experiential-KB actor builds the new embedder's collection (re-embedding every row; adds made
    meanwhile reach both) and returns when it is complete; (2) the app is redeployed with the new models as
    ``user_config``, which Serve applies to the running replicas in place (each loads the new model beside the
    old one, then switches); (3) this waits until the embedder answers with the new model. The old collection
    and, in each embedder replica, the old model are kept, so swapping back is quick (rollback).

    Args:
        config: the config the service was started with (same ``serve`` section and keys).
        embedder: the new embedder dir; None = keep the current one.
        reranker: the new reranker dir; None = keep the current one; "" = no reranker.
        timeout_s: how long to wait for the replicas to switch.

    Returns:
        ``{"embedder": {"path", "version"}, "reranker": {...} | None, "index": {...}, "seconds": s}``.

    Raises:
        KnowMapError: the service is not running, a path is not a model directory, or the switch did not
            complete within ``timeout_s``.
        EmbedderError, RerankerError: a model cannot be loaded.
    """
    from knowmap.actors.experience import get_experience_kb
    from knowmap.serve.auth import load_keys

    started = time.perf_counter()
    embed_handle, rerank_handle = _handle("Ingress"), _handle("Reranker")
    current_embedder = embed_handle.info.remote().result()["path"]
    current_reranker = (rerank_handle.info.remote().result() or {}).get("path", "")
    new_embedder, new_reranker = resolve_models(config, embedder, reranker)
    new_embedder = new_embedder if embedder is not None else current_embedder
    new_reranker = new_reranker if reranker is not None else current_reranker
    index = ray.get(get_experience_kb(config).ensure_index.remote(new_embedder), timeout=timeout_s)
    grants, _, _ = load_keys(config, generate=False)
    args = ServeAppArgs(config=public_config(config), embedder=new_embedder, reranker=new_reranker, grants=grants)
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    deadline = time.monotonic() + timeout_s
    replicas = config.serve.ingress_replicas
    while True:  # every replica answers with the new model (routing spreads these probes over replicas)
        infos = [embed_handle.info.remote().result() for _ in range(4 * replicas)]
        if all(i["version"] == index["version"] for i in infos):
            break
        failed = [i["load_error"] for i in infos if (i.get("load_error") or {}).get("path") == new_embedder]
        if failed:  # the replicas keep serving the model they had
            raise EmbedderError(f"the embedder replicas could not load {new_embedder}: {failed[0]['error']}")
        if time.monotonic() > deadline:
            raise KnowMapError(f"the embedder replicas did not switch to {new_embedder} within {timeout_s} s")
        time.sleep(0.2)
    return {"embedder": {"path": new_embedder, "version": index["version"]},
            "reranker": rerank_handle.info.remote().result(), "index": index,
            "seconds": time.perf_counter() - started}


def stop_service() -> None:
    """Delete the app and stop Serve (Ray keeps running; the KB actors are detached and stay)."""
    serve.shutdown()


def _handle(deployment: str) -> DeploymentHandle:
    try:
        return serve.get_deployment_handle(deployment, app_name=APP_NAME)
    except Exception as e:  # noqa: BLE001 - Serve raises several kinds when no app or controller exists
        raise KnowMapError(f"the retrieval service is not running on this Ray cluster ({e}); start it with "
                           "`knowmap serve`") from e


# The packages whose code runs in the deployments' replicas, with every subpackage: ``knowmap`` (models, kb, agent,
# evaluation, ...), the actors the replicas call, and the service itself.
CODE_PACKAGES = ("knowmap", "knowmap.actors", "knowmap.serve")


def _code_version(name: str, *parts: Any) -> str:
    """A deployment version from the service's source files and the deployment's arguments (see module doc)."""
    import importlib

    roots = {package: Path(importlib.import_module(package).__file__).parent for package in CODE_PACKAGES}
    digest = hashlib.sha256(name.encode())
    digest.update(source_digest(roots).encode())
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def source_digest(roots: dict[str, Path]) -> str:
    """A sha256 of every ``*.py`` file under each root folder, recursively: each file's name (the root's key and
    the path below it) and bytes, in sorted order, so that a change to any module of any subpackage, a new module
    or a renamed one changes it.

    Args:
        roots: a name per folder (a package and its folder). A file under two roots (an installed ``knowmap/``
            also holds ``actors/`` and ``serve/``) counts once, under the first name in sorted order.

    Returns:
        the hex digest.
    """
    files: dict[Path, str] = {}
    for name, root in sorted(roots.items()):
        for path in root.rglob("*.py"):
            files.setdefault(path.resolve(), f"{name}/{path.relative_to(root).as_posix()}")
    digest = hashlib.sha256()
    for path, key in sorted(files.items(), key=lambda item: item[1]):
        data = path.read_bytes()
        digest.update(f"{key}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
