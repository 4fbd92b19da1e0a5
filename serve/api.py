"""The HTTP API (``/v1``) of the retrieval service: a FastAPI app as the Serve ingress.

Routes are thin: check the caller's key and the configured limits, call a deployment, and turn every error into
an :class:`~knowmap.api_schemas.ErrorResponse` with the right status: 401 without a valid key, 403 for a key whose
role may not do it (a read key writing) or another key's data (an overwrite or delete by a non-admin), 413 over a
limit (texts per request, characters per text, body size), 422 for an invalid or malformed body (never 500), 404 for
an env or episode id without data in the caller's tenant, 409 for a conflict (no reranker deployed, an episode id
already stored), 503 while a KB actor is unavailable. Writes of the experiential KB (contributions, deletions) are
queued per tenant (:mod:`knowmap.serve.contribution_queue`): 429 with ``Retry-After`` when the tenant's queue is
full, 504 ``contribution_timeout`` when one could not begin within ``serve.contribution_timeout_s`` (nothing
stored).

Tenants (:mod:`knowmap.tenancy`): every key belongs to a tenant, and every env id and episode id a route is sent is
read in the caller's tenant's namespace, so another tenant's data is never found (404, never 403: its existence is
not revealed). Retrieves see shared experience and the tenant's own contributions only.

Only ``/healthz`` and ``/readyz`` are open; ``/docs`` and ``/openapi.json`` need a key unless ``serve.public_docs``.
Every answer is counted in Prometheus metrics through Ray (:mod:`knowmap.serve.metrics`).
The key and body-size checks run in a middleware, before routing and parsing: an unauthenticated request learns
nothing about the API's validation.

No ``from __future__ import annotations`` here: FastAPI must resolve the route signatures' annotations at import,
and under ``@serve.ingress`` string annotations of module-level aliases (``EnvId``) fail to resolve.
"""

import asyncio
import base64
from collections.abc import Awaitable
from pathlib import PurePath
from typing import Annotated, Any

import numpy as np
from fastapi import Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse
from ray import serve
from swagger_ui_bundle import swagger_ui_path

from knowmap.api_schemas import (
    DeletedResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    EnvsResponse,
    ErrorDetail,
    ErrorResponse,
    FactsRequest,
    FactsResponse,
    HealthResponse,
    ModelInfo,
    ModelsResponse,
    ObservationsRequest,
    ObservationsResponse,
    ReadyResponse,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RetrieveRequest,
    RetrieveResponse,
    TrajectoriesResponse,
    TrajectoryInfo,
    TrajectoryRequest,
    TrajectoryResponse,
)
from knowmap.config import KnowMapConfig
from knowmap.errors import APIError, ContributionQueueFullError, ContributionTimeoutError, InvalidEnvIdError
from knowmap.schemas import KnowledgeItem, Relation, RetrainStatus
from knowmap.serve.auth import Grant
from knowmap.serve.deployments import EmbedderModels
from knowmap.serve.guard import error_response
from knowmap.serve.http import (
    Authorized,
    EnvId,
    Page,
    Writer,
    app,
    call,
    caller,
    check_step,
    check_steps,
    check_texts,
    named,
    public_name,
    require_key,
)
from knowmap.serve.retriever import RetrievalBackend
from knowmap.tenancy import experience_filter, normalise_episode_id, owns, scoped, unscoped


def _as_seen(item: KnowledgeItem, tenant: str) -> KnowledgeItem:
    """An item with the caller's own ids (env and episode ids as the tenant sent them, not as stored)."""
    provenance = dict(item.provenance)
    for key in ("env_id", "episode_id"):
        if isinstance(provenance.get(key), str):
            provenance[key] = unscoped(tenant, provenance[key])
    stored_env = item.provenance.get("env_id")
    item_id = item.id
    if item.kind == "env_fact" and isinstance(stored_env, str) and item_id.startswith(stored_env + ":"):
        item_id = provenance["env_id"] + item_id[len(stored_env):]
    return item.model_copy(update={"id": item_id, "provenance": provenance})


_SWAGGER_ASSETS = {"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"}
_WRITE_ANSWERS: dict[int | str, dict[str, Any]] = {
    429: {"model": ErrorResponse, "description": "your tenant's write queue is full (serve.contribution_queue_per_"
          "tenant) or the service's is: nothing was done; send it again after `Retry-After` seconds"},
    504: {"model": ErrorResponse, "description": "the write could not begin within serve.contribution_timeout_s: "
          "nothing was stored; send it again"}}


async def _written(work: Awaitable[Any], tenant: str) -> Any:
    """A write's answer (:meth:`RetrievalBackend._write`), mapped as :func:`call` maps any other; but a full write
    queue is 429 with ``Retry-After``, and a write that did not begin by its deadline 504 (nothing stored): both are
    returned as responses, for the route to return as they are."""
    result = await work
    if isinstance(result, ContributionQueueFullError):
        return error_response(429, ErrorDetail(type="rate_limited", code="write_queue_full", message=str(result)),
                              {"Retry-After": str(result.retry_after_s)})
    if isinstance(result, ContributionTimeoutError):
        return error_response(504, ErrorDetail(type="timeout", code="contribution_timeout", message=str(result)))

    async def answered() -> Any:
        return result

    return await call(answered(), tenant)


# Helpers the deployment calls are defined above it: Serve pickles the class when it is decorated.
@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """The FastAPI ingress: holds the embedder (:class:`~knowmap.serve.deployments.EmbedderModels`) and the
    retrieval backend (:class:`~knowmap.serve.retriever.RetrievalBackend`), and calls the reranker deployment.

    Its ``user_config`` is the embedder's (``{"model", "max_batch_size", "batch_wait_timeout_s"}``): a new model
    is a lightweight in-place update (:func:`knowmap.serve.app.swap_models`).

    Args:
        reranker: the reranker deployment's handle.
        config: ``KnowMapConfig.model_dump(mode="json")`` (limits under ``serve``).
        grants: the accepted keys (:class:`~knowmap.serve.auth.Grant` dumps: digest, tenant, role).
        device, batch_size, threads: the embedder's torch device, texts per forward pass and torch threads.
    """

    def __init__(self, reranker: Any, config: dict[str, Any], grants: list[dict[str, Any]], device: str = "cpu",
                 batch_size: int = 64, threads: int = 0) -> None:
        self.config = KnowMapConfig.model_validate(config)
        self.embedder = EmbedderModels(device, batch_size, threads, traced_dir=str(self.config.paths.traced_models))
        self.reranker = reranker
        self.retriever = RetrievalBackend(self.embedder, reranker, config)
        app.state.config, app.state.grants = self.config, [Grant.model_validate(g) for g in grants]

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's in-place update: load the embedder ``user_config`` names (in the background once a model
        serves), embed the env facts in use with it, then switch to it (:meth:`EmbedderModels.reconfigure`)."""
        await self.embedder.reconfigure(user_config, warm=self.retriever.warm)

    async def info(self) -> dict[str, Any]:
        """The embedder serving now and this replica's batching counters (:meth:`EmbedderModels.info`, with the
        retrieve batches' ``retrieve_batches`` and ``retrieve_requests``)."""
        info = await self.embedder.info()
        return {**info, "stats": {**info["stats"], **self.retriever.stats()}}

    # -- open -------------------------------------------------------------------------------------------------
    @app.get("/healthz", response_model=HealthResponse, tags=["service"])
    async def healthz(self) -> HealthResponse:
        """Liveness: answers without a key."""
        return HealthResponse()

    @app.get("/readyz", response_model=ReadyResponse, tags=["service"],
             responses={503: {"model": ReadyResponse, "description": "a check failed"}})
    async def readyz(self) -> JSONResponse:
        """Readiness, without a key: the embedder has a model, the reranker deployment answers, the experiential-KB
        actor and its vector store answer a count. 503 names the failing checks (a load balancer takes the service
        out)."""
        checks: dict[str, str] = {}
        for name, probe in (("embedder", self.embedder.info()), ("reranker", self.reranker.info.remote()),
                            ("retriever", self.retriever.ready())):
            try:
                answer = await asyncio.wait_for(probe, timeout=15)
                checks.update(answer if name == "retriever" else {name: "ok" if answer else "not deployed"
                                                                  if name == "reranker" else "failing: no model"})
            except Exception as e:  # noqa: BLE001 - readiness reports any failure as a failed check
                checks[name] = f"failing: {type(e).__name__}"
        ready = all(v in ("ok", "not deployed") for v in checks.values())  # the reranker is optional
        return JSONResponse(ReadyResponse(status="ready" if ready else "not_ready", checks=checks).model_dump(),
                            status_code=200 if ready else 503)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(self) -> Any:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="KnowMap retrieval API",
                                   swagger_js_url="/docs/swagger-ui-bundle.js", swagger_css_url="/docs/swagger-ui.css",
                                   swagger_favicon_url="/docs/favicon-32x32.png")

    @app.get("/docs/{asset}", include_in_schema=False)
    async def docs_asset(self, asset: str) -> Any:
        """Swagger UI's scripts and styles, from the ``swagger-ui-bundle`` package: /docs works offline."""
        if asset not in _SWAGGER_ASSETS:
            raise APIError(404, "not_found", f"no docs asset {asset!r}")
        return FileResponse(PurePath(swagger_ui_path) / asset, headers={"Cache-Control": "public, max-age=86400"})

    # -- models -----------------------------------------------------------------------------------------------
    @app.post("/v1/embeddings", response_model=EmbeddingResponse, dependencies=Authorized, tags=["models"])
    async def embeddings(self, body: EmbeddingRequest) -> EmbeddingResponse:
        """OpenAI-compatible embeddings: unit-length vectors of the deployed embedder."""
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise APIError(422, "invalid_request", "input must hold at least one text", param="input")
        check_texts(self.config, texts, "input")
        encoded = await call(self.embedder.encode(texts))
        vectors = np.asarray(encoded.vectors, dtype=np.float32)  # (n, dim)
        if body.dimensions is not None and body.dimensions != vectors.shape[1]:
            raise APIError(422, "invalid_request", f"dimensions must be {vectors.shape[1]} (the model's) or "
                           "omitted", param="dimensions")
        if body.encoding_format == "base64":
            data = [EmbeddingData(index=i, embedding=base64.b64encode(v.astype("<f4").tobytes()).decode("ascii"))
                    for i, v in enumerate(vectors)]
        else:
            data = [EmbeddingData(index=i, embedding=v.tolist()) for i, v in enumerate(vectors)]
        tokens = sum(len(t.split()) for t in texts)
        return EmbeddingResponse(data=data, model=encoded.version,
                                 usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

    @app.post("/v1/rerank", response_model=RerankResponse, dependencies=Authorized, tags=["models"],
              responses={409: {"model": ErrorResponse, "description": "no reranker deployed"}})
    async def rerank(self, body: RerankRequest) -> RerankResponse:
        """Cross-encoder relevance of each document to the query, best first."""
        check_texts(self.config, body.documents, "documents")
        check_texts(self.config, [body.query], "query")
        scored = await call(self.reranker.score.remote(body.query, body.documents))
        order = sorted(range(len(scored.scores)), key=lambda i: (-scored.scores[i], i))[:body.top_n]
        return RerankResponse(model=scored.version, results=[
            RerankResult(index=i, score=scored.scores[i], document=body.documents[i]) for i in order])

    @app.get("/v1/models", response_model=ModelsResponse, dependencies=Authorized, tags=["models"])
    async def models(self) -> ModelsResponse:
        """The embedder and reranker versions serving now, and the indexed experiential collections."""
        embedder = await self.embedder.info()
        reranker = await self.reranker.info.remote()
        versions = await self.retriever.experience_versions()
        data = [ModelInfo(id=embedder["version"], role="embedder", path=public_name(embedder["path"]),
                          dim=embedder["dim"])]
        if reranker:
            data.append(ModelInfo(id=reranker["version"], role="reranker", path=public_name(reranker["path"])))
        return ModelsResponse(data=data, experience_collections=sorted(versions["held"]), retrain=self._retrain())

    def _retrain(self) -> RetrainStatus | None:
        """The retrain controller's persisted state (it may run in another job), without the full history and with
        model names instead of the server's paths."""
        path = self.config.paths.retrain_state
        try:
            state = RetrainStatus.model_validate_json(path.read_text())
        except (OSError, ValueError):  # none yet, or being replaced: report none rather than fail the route
            return None
        decision = state.last_decision
        if decision is not None:
            decision = decision.model_copy(update={"candidate": named(decision.candidate),
                                                   "serving": named(decision.serving)})
        return state.model_copy(update={"history": [], "serving": named(state.serving), "last_decision": decision,
                                        "previous": named(state.previous) if state.previous else None})

    # -- retrieval --------------------------------------------------------------------------------------------
    @app.post("/v1/retrieve", response_model=RetrieveResponse, dependencies=Authorized, tags=["retrieval"],
              responses={409: {"model": ErrorResponse, "description": "rerank asked, no reranker deployed"}})
    async def retrieve(self, body: RetrieveRequest, request: Request) -> RetrieveResponse:
        """Ranked env facts (of your tenant's ``env_id`` only) and experiential sub-goals (shared, and your tenant's
        contributions; ``owner``, ``source``, ``split`` narrow them) for a query, with provenance."""
        check_texts(self.config, [body.query], "query")
        if body.k > self.config.serve.max_k:
            raise APIError(422, "invalid_request", f"k must be <= serve.max_k ({self.config.serve.max_k})",
                           param="k")
        defaults = self.config.retrieval
        rerank = defaults.rerank if body.rerank is None else body.rerank
        if rerank and not await self.reranker.info.remote():
            if body.rerank:  # asked for; a default only applies where a reranker is deployed
                raise APIError(409, "conflict", "rerank was asked for but this service runs without a reranker; "
                               "send rerank=false, or start it with `knowmap serve --reranker PATH`",
                               code="no_reranker", param="rerank")
            rerank = False
        tenant = caller(request).tenant
        env_id = scoped(tenant, body.env_id) if body.env_id else None
        where = experience_filter(tenant, owner=body.owner, source=body.source, split=body.split)
        scoped_body = body.model_copy(update={"rerank": rerank, "env_id": env_id,
                                              "hybrid": defaults.hybrid if body.hybrid is None else body.hybrid})
        response = await call(self.retriever.retrieve(scoped_body, where), tenant)
        return response.model_copy(update={"items": [_as_seen(i, tenant) for i in response.items]})

    # -- env KBs ----------------------------------------------------------------------------------------------
    @app.get("/v1/envs", response_model=EnvsResponse, dependencies=Authorized, tags=["env KB"])
    async def envs(self, request: Request, limit: Page = 1000,
                   after: Annotated[str | None, Query(max_length=128)] = None) -> EnvsResponse:
        """Your tenant's env ids with a KB, sorted, a page at a time (``after`` = the last id of the page before)."""
        tenant = caller(request).tenant
        names = sorted(unscoped(tenant, e) for e in await call(self.retriever.envs()) if owns(tenant, e))
        names = [n for n in names if after is None or n > after]
        return EnvsResponse(envs=names[:limit], next_after=names[limit - 1] if len(names) > limit else None)

    @app.delete("/v1/envs/{env_id}", response_model=DeletedResponse, dependencies=Writer, tags=["env KB"],
                responses={404: {"model": ErrorResponse, "description": "no KB for this env id"}, **_WRITE_ANSWERS})
    async def delete_env(self, env_id: EnvId, request: Request) -> DeletedResponse | JSONResponse:
        """Delete the env KB (its actor and files) and the facts it lent to your contributed trajectories' sub-goals
        (they are segmented again without them); queued with your tenant's other writes. When it answers 200, the
        env's facts are in no file under the data dir: the vector store is purged before the answer."""
        tenant = caller(request).tenant
        deleted = await _written(self.retriever.delete_env(scoped(tenant, env_id), tenant), tenant)
        return deleted if isinstance(deleted, JSONResponse) else DeletedResponse(id=env_id, deleted=deleted)

    @app.post("/v1/envs/{env_id}/observations", response_model=ObservationsResponse, dependencies=Writer,
              tags=["env KB"])
    async def observations(self, env_id: EnvId, body: ObservationsRequest, request: Request) -> ObservationsResponse:
        """Feed observations into the env KB of ``env_id`` (created on first use), in step order."""
        check_texts(self.config, [o.text for o in body.observations], "observations")
        for field in ("look", "inventory", "action"):
            check_texts(self.config, [getattr(o, field) or "" for o in body.observations],
                         f"observations.{field}", count=False)
        check_steps(self.config, [o.step for o in body.observations], "observations")
        tenant = caller(request).tenant
        answer = await call(self.retriever.add_observations(scoped(tenant, env_id), body), tenant)
        return answer.model_copy(update={"env_id": env_id})

    @app.post("/v1/envs/{env_id}/facts", response_model=ObservationsResponse, dependencies=Writer, tags=["env KB"])
    async def add_facts(self, env_id: EnvId, body: FactsRequest, request: Request) -> ObservationsResponse:
        """Structured facts observed at one step (for environments other than ScienceWorld), in the declared
        relation vocabulary; the same replacement rule, history and ``as_of_step`` reads as observations."""
        check_texts(self.config, [t.object for t in body.triples], "triples")
        check_step(self.config, body.step, "step")
        tenant = caller(request).tenant
        answer = await call(self.retriever.add_facts(scoped(tenant, env_id), body), tenant)
        return answer.model_copy(update={"env_id": env_id})

    @app.get("/v1/envs/{env_id}/facts", response_model=FactsResponse, dependencies=Authorized, tags=["env KB"],
             responses={404: {"model": ErrorResponse, "description": "no KB for this env id"}})
    async def facts(self, env_id: EnvId, request: Request, as_of_step: Annotated[int | None, Query(ge=0)] = None,
                    limit: Page = 1000, offset: Annotated[int, Query(ge=0)] = 0) -> FactsResponse:
        """The facts that hold now, or that held at ``as_of_step``, a page at a time."""
        tenant = caller(request).tenant
        facts = await call(self.retriever.facts(scoped(tenant, env_id), as_of_step), tenant)
        return FactsResponse(env_id=env_id, as_of_step=as_of_step, facts=facts[offset:offset + limit],
                             next_offset=offset + limit if len(facts) > offset + limit else None)

    @app.get("/v1/envs/{env_id}/facts/history", response_model=FactsResponse, dependencies=Authorized,
             tags=["env KB"], responses={404: {"model": ErrorResponse, "description": "no KB for this env id"}})
    async def history(self, env_id: EnvId, request: Request,
                      subject: Annotated[str | None, Query(max_length=256)] = None, relation: Relation | None = None,
                      limit: Page = 1000, offset: Annotated[int, Query(ge=0)] = 0) -> FactsResponse:
        """Every fact ever recorded, open and closed, with its step range, oldest first; optionally one
        subject/relation; a page at a time."""
        tenant = caller(request).tenant
        facts = await call(self.retriever.history(scoped(tenant, env_id), subject,
                                                  relation.value if relation else None), tenant)
        return FactsResponse(env_id=env_id, facts=facts[offset:offset + limit],
                             next_offset=offset + limit if len(facts) > offset + limit else None)

    # -- trajectories -----------------------------------------------------------------------------------------
    @app.post("/v1/trajectories", response_model=TrajectoryResponse, dependencies=Writer,
              tags=["experience KB"], responses={409: {"model": ErrorResponse,
                                                       "description": "the episode id is an expert's, another "
                                                       "owner's, or already stored (send overwrite)"},
                                                 **_WRITE_ANSWERS})
    async def trajectories(self, body: TrajectoryRequest, request: Request) -> TrajectoryResponse | JSONResponse:
        """Contribute a finished trajectory: segmented into sub-goals, added to the experiential KB (seen by your
        tenant only), and kept in the training store under the caller's key. Episode ids are trimmed and lower-cased;
        replacing a stored one needs ``overwrite`` and the key that contributed it (or an admin key).

        A 200 means stored. Your tenant's writes run one at a time, beside other tenants' (never behind them):
        429 with ``Retry-After`` if your tenant already has ``serve.contribution_queue_per_tenant`` writes queued
        or running, 504 if this one could not begin within ``serve.contribution_timeout_s`` (nothing stored)."""
        steps = body.trajectory.steps
        if len(steps) > self.config.serve.max_trajectory_steps:
            raise APIError(413, "too_large", f"{len(steps)} steps; at most serve.max_trajectory_steps "
                           f"({self.config.serve.max_trajectory_steps})", code="too_many_steps",
                           param="trajectory.steps")
        for field in ("observation", "action", "look", "inventory"):
            check_texts(self.config, [getattr(s, field) or "" for s in steps], f"trajectory.steps.{field}",
                         count=False)
        check_texts(self.config, [body.trajectory.task_description], "trajectory.task_description", count=False)
        check_steps(self.config, [s.step for s in steps], "trajectory.steps")
        who = caller(request)
        trajectory = body.trajectory.model_copy(update={
            "episode_id": scoped(who.tenant, body.trajectory.episode_id), "tenant": who.tenant,
            "contributor": who.client, "env_id": scoped(who.tenant, body.env_id) if body.env_id else ""})
        return await _written(self.retriever.add_trajectory(body.model_copy(update={"trajectory": trajectory}),
                                                            who.admin), who.tenant)

    @app.get("/v1/trajectories", response_model=TrajectoriesResponse, dependencies=Authorized,
             tags=["experience KB"])
    async def list_trajectories(self, request: Request, limit: Page = 1000,
                                after: Annotated[str | None, Query(max_length=128)] = None) -> TrajectoriesResponse:
        """Your tenant's contributed trajectories, by episode id, with the key that added each."""
        tenant = caller(request).tenant
        found = [TrajectoryInfo(episode_id=unscoped(tenant, t.episode_id), task=t.task, source=t.source,
                                contributor=t.contributor, steps=len(t.steps), final_score=t.final_score)
                 for t in await call(self.retriever.contributions(tenant))]
        found = [t for t in sorted(found, key=lambda t: t.episode_id) if after is None or t.episode_id > after]
        return TrajectoriesResponse(trajectories=found[:limit],
                                    next_after=found[limit - 1].episode_id if len(found) > limit else None)

    @app.delete("/v1/trajectories/{episode_id}", response_model=DeletedResponse, dependencies=Writer,
                tags=["experience KB"], responses={404: {"model": ErrorResponse, "description": "no contribution "
                                                         "of your tenant has this episode id"}, **_WRITE_ANSWERS})
    async def delete_trajectory(self, episode_id: EnvId, request: Request) -> DeletedResponse | JSONResponse:
        """Delete a contributed trajectory (only the key that contributed it, or an admin key): its sub-goals in
        every indexed embedder version, and its file in the training store, so no later retrain reads it. When it
        answers 200, its texts and vectors are in no file under the data dir: the vector store is purged first."""
        who, episode = caller(request), normalise_episode_id(episode_id)
        deleted = await _written(self.retriever.delete_trajectory(scoped(who.tenant, episode), who.tenant,
                                                                  who.client, who.admin), who.tenant)
        return deleted if isinstance(deleted, JSONResponse) else DeletedResponse(id=episode, deleted=deleted)


__all__ = ["APIError", "Ingress", "InvalidEnvIdError", "app", "require_key"]
