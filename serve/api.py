"""The HTTP API (``/v1``) of the retrieval service: a FastAPI app as the Serve ingress.

Routes are thin: check the caller's key and the configured limits, call a deployment, and turn every error into
an :class:`~knowmap.api_schemas.ErrorResponse` with the right status: 401 without a valid key, 413 over a limit
(texts per request, characters per text, body size), 422 for an invalid or malformed body (never 500), 404 for
an env id without a KB, 409 for a conflict (no reranker deployed, an expert episode id), 503 while a KB actor is
unavailable. Only ``/healthz`` is open; ``/docs`` and ``/openapi.json`` need a key unless ``serve.public_docs``.
The key and body-size checks run in a middleware, before routing and parsing: an unauthenticated request learns
nothing about the API's validation.

No ``from __future__ import annotations`` here: FastAPI must resolve the route signatures' annotations at import,
and under ``@serve.ingress`` string annotations of module-level aliases (``EnvId``) fail to resolve.
"""

import base64
import logging
from pathlib import PurePath
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException
from swagger_ui_bundle import swagger_ui_path

from knowmap.api_schemas import (
    API_VERSION,
    ENV_ID_PATTERN,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ErrorDetail,
    ErrorResponse,
    FactsResponse,
    HealthResponse,
    ModelInfo,
    ModelsResponse,
    ObservationsRequest,
    ObservationsResponse,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RetrieveRequest,
    RetrieveResponse,
    TrajectoryRequest,
    TrajectoryResponse,
)
from knowmap.config import KnowMapConfig
from knowmap.errors import (
    APIError,
    EnvNotFoundError,
    EpisodeConflictError,
    InvalidEnvIdError,
    KnowMapError,
    RerankerUnavailableError,
)
from knowmap.schemas import Relation, RetrainStatus, ServingModels
from knowmap.serve.guard import Guard, error_response

logger = logging.getLogger("ray.serve")


_ERRORS = {401: "unauthorized", 404: "not_found", 405: "invalid_request", 408: "timeout", 409: "conflict",
           413: "too_large", 422: "invalid_request", 503: "unavailable", 504: "timeout"}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse, "description": d} for s, d in
    [(401, "missing or wrong API key"), (413, "over a configured limit"), (422, "invalid or malformed body")]}

bearer = HTTPBearer(auto_error=False, description="an API key from serve.api_keys or the key file")
app = FastAPI(title="KnowMap retrieval API", version=API_VERSION, docs_url=None, redoc_url=None,
              openapi_url=None, responses=_RESPONSES,
              description="Env facts and experiential sub-goals for LLM agents (KnowMap), OpenAI-compatible "
                          "embeddings, reranking. Every route but /healthz needs `Authorization: Bearer <key>`.")


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    detail = ErrorDetail(type=exc.type, message=exc.message, code=exc.code, param=exc.param)  # type: ignore[arg-type]
    return error_response(exc.status, detail, headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"]) or None
    code = "json_invalid" if any(e["type"] == "json_invalid" for e in errors) else "validation_error"
    return error_response(422, ErrorDetail(type="invalid_request", message=f"{param or 'body'}: {first['msg']}",
                                           code=code, param=param, errors=errors))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400:  # FastAPI's answer to a body json.loads cannot read (not UTF-8, nested too deep)
        return error_response(422, ErrorDetail(type="invalid_request", code="json_invalid", param="body",
                                               message="the body is not JSON this API reads: send UTF-8 JSON "
                                               "nested at most a few hundred levels"))
    kind = _ERRORS.get(exc.status_code, "invalid_request")
    return error_response(exc.status_code, ErrorDetail(type=kind, message=str(exc.detail)))  # type: ignore[arg-type]


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, ErrorDetail(type="internal_error", message=f"internal error ({type(exc).__name__}); "
                                           "see the service log"))


app.add_middleware(Guard)


async def require_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """Declares bearer auth in the OpenAPI schema; the check itself is :class:`Guard` (it runs first)."""


Authorized = [Depends(require_key)]
EnvId = Annotated[str, Path(pattern=ENV_ID_PATTERN, description="the environment instance")]


def _check_texts(config: KnowMapConfig, texts: list[str], param: str, count: bool = True) -> None:
    limits = config.serve
    if count and len(texts) > limits.max_texts:
        raise APIError(413, "too_large", f"{len(texts)} texts in {param}; at most serve.max_texts "
                       f"({limits.max_texts}) per request", code="too_many_texts", param=param)
    for i, text in enumerate(texts):
        if len(text) > limits.max_text_chars:
            raise APIError(413, "too_large", f"{param}[{i}] has {len(text)} characters; at most "
                           f"serve.max_text_chars ({limits.max_text_chars})", code="text_too_long",
                           param=f"{param}[{i}]")


def _check_steps(config: KnowMapConfig, steps: list[int], param: str) -> None:
    for i, step in enumerate(steps):
        if step > config.serve.max_step:
            raise APIError(422, "invalid_request", f"{param}[{i}].step is {step}; at most serve.max_step "
                           f"({config.serve.max_step})", code="step_too_large", param=f"{param}[{i}].step")


async def _call(response: Any) -> Any:
    """Await a deployment call, mapping KnowMap errors (raised, or returned by the retriever) to HTTP ones."""
    try:
        result = await response
        if isinstance(result, KnowMapError):
            raise result
        return result
    except RerankerUnavailableError as e:
        raise APIError(409, "conflict", str(e).splitlines()[-1], code="no_reranker") from e
    except EnvNotFoundError as e:
        raise APIError(404, "not_found", _message(e), code="unknown_env") from e
    except EpisodeConflictError as e:
        raise APIError(409, "conflict", _message(e), code="expert_episode") from e
    except (KnowMapError, ValueError) as e:
        raise APIError(422, "invalid_request", _message(e)) from e
    except RayActorError as e:  # e.g. the env KB is held open by a running episode's own actor
        raise APIError(503, "unavailable", "a knowledge-base actor is unavailable (an env KB held by a running "
                       "episode, or an actor restarting); retry shortly", code="kb_unavailable") from e


def _message(error: Exception) -> str:
    cause = getattr(error, "cause", None) or error  # a RayTaskError carries the original exception as .cause
    return str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__


def _name(path: str) -> str:
    """A model's name for clients: its directory's last part (or its hub name), never the server's file layout."""
    return PurePath(path).name if path else ""


def _named(models: ServingModels) -> ServingModels:
    return models.model_copy(update={"embedder": _name(models.embedder), "reranker": _name(models.reranker)})


_SWAGGER_ASSETS = {"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"}


# Helpers the deployment calls are defined above it: Serve pickles the class when it is decorated.
@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """The FastAPI ingress: routes to the embedder, reranker and retriever deployments.

    Args:
        embedder, reranker, retriever: deployment handles.
        config: ``KnowMapConfig.model_dump(mode="json")`` (limits under ``serve``).
        key_digests: SHA-256 digests of the accepted API keys (:func:`knowmap.serve.auth.digest`).
    """

    def __init__(self, embedder: Any, reranker: Any, retriever: Any, config: dict[str, Any],
                 key_digests: list[str]) -> None:
        self.embedder, self.reranker, self.retriever = embedder, reranker, retriever
        self.config = KnowMapConfig.model_validate(config)
        app.state.config, app.state.key_digests = self.config, list(key_digests)

    # -- open -------------------------------------------------------------------------------------------------
    @app.get("/healthz", response_model=HealthResponse, tags=["service"])
    async def healthz(self) -> HealthResponse:
        """Liveness: answers without a key."""
        return HealthResponse()

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
        _check_texts(self.config, texts, "input")
        encoded = await _call(self.embedder.encode.remote(texts))
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
        _check_texts(self.config, body.documents, "documents")
        _check_texts(self.config, [body.query], "query")
        scored = await _call(self.reranker.score.remote(body.query, body.documents))
        order = sorted(range(len(scored.scores)), key=lambda i: (-scored.scores[i], i))[:body.top_n]
        return RerankResponse(model=scored.version, results=[
            RerankResult(index=i, score=scored.scores[i], document=body.documents[i]) for i in order])

    @app.get("/v1/models", response_model=ModelsResponse, dependencies=Authorized, tags=["models"])
    async def models(self) -> ModelsResponse:
        """The embedder and reranker versions serving now, and the indexed experiential collections."""
        embedder = await self.embedder.info.remote()
        reranker = await self.reranker.info.remote()
        versions = await self.retriever.experience_versions.remote()
        data = [ModelInfo(id=embedder["version"], role="embedder", path=_name(embedder["path"]),
                          dim=embedder["dim"])]
        if reranker:
            data.append(ModelInfo(id=reranker["version"], role="reranker", path=_name(reranker["path"])))
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
            decision = decision.model_copy(update={"candidate": _named(decision.candidate),
                                                   "serving": _named(decision.serving)})
        return state.model_copy(update={"history": [], "serving": _named(state.serving), "last_decision": decision,
                                        "previous": _named(state.previous) if state.previous else None})

    # -- retrieval --------------------------------------------------------------------------------------------
    @app.post("/v1/retrieve", response_model=RetrieveResponse, dependencies=Authorized, tags=["retrieval"],
              responses={409: {"model": ErrorResponse, "description": "rerank asked, no reranker deployed"}})
    async def retrieve(self, body: RetrieveRequest) -> RetrieveResponse:
        """Ranked env facts (of ``env_id`` only) and experiential sub-goals for a query, with provenance."""
        _check_texts(self.config, [body.query], "query")
        if body.k > self.config.serve.max_k:
            raise APIError(422, "invalid_request", f"k must be <= serve.max_k ({self.config.serve.max_k})",
                           param="k")
        defaults = self.config.serve
        rerank = defaults.rerank if body.rerank is None else body.rerank
        if rerank and not await self.reranker.info.remote():
            if body.rerank:  # asked for; a default only applies where a reranker is deployed
                raise APIError(409, "conflict", "rerank was asked for but this service runs without a reranker; "
                               "send rerank=false, or start it with `knowmap serve --reranker PATH`",
                               code="no_reranker", param="rerank")
            rerank = False
        body = body.model_copy(update={"rerank": rerank,
                                       "hybrid": defaults.hybrid if body.hybrid is None else body.hybrid})
        return await _call(self.retriever.retrieve.remote(body))

    # -- env KBs ----------------------------------------------------------------------------------------------
    @app.post("/v1/envs/{env_id}/observations", response_model=ObservationsResponse, dependencies=Authorized,
              tags=["env KB"])
    async def observations(self, env_id: EnvId, body: ObservationsRequest) -> ObservationsResponse:
        """Feed observations into the env KB of ``env_id`` (created on first use), in step order."""
        _check_texts(self.config, [o.text for o in body.observations], "observations")
        for field in ("look", "inventory", "action"):
            _check_texts(self.config, [getattr(o, field) or "" for o in body.observations],
                         f"observations.{field}", count=False)
        _check_steps(self.config, [o.step for o in body.observations], "observations")
        return await _call(self.retriever.add_observations.remote(env_id, body))

    @app.get("/v1/envs/{env_id}/facts", response_model=FactsResponse, dependencies=Authorized, tags=["env KB"],
             responses={404: {"model": ErrorResponse, "description": "no KB for this env id"}})
    async def facts(self, env_id: EnvId, as_of_step: Annotated[int | None, Query(ge=0)] = None) -> FactsResponse:
        """The facts that hold now, or that held at ``as_of_step``."""
        facts = await _call(self.retriever.facts.remote(env_id, as_of_step))
        return FactsResponse(env_id=env_id, as_of_step=as_of_step, facts=facts)

    @app.get("/v1/envs/{env_id}/facts/history", response_model=FactsResponse, dependencies=Authorized,
             tags=["env KB"], responses={404: {"model": ErrorResponse, "description": "no KB for this env id"}})
    async def history(self, env_id: EnvId, subject: Annotated[str | None, Query(max_length=256)] = None,
                      relation: Relation | None = None) -> FactsResponse:
        """Every fact ever recorded, open and closed, with its step range; optionally one subject/relation."""
        facts = await _call(self.retriever.history.remote(env_id, subject, relation.value if relation else None))
        return FactsResponse(env_id=env_id, facts=facts)

    # -- trajectories -----------------------------------------------------------------------------------------
    @app.post("/v1/trajectories", response_model=TrajectoryResponse, dependencies=Authorized,
              tags=["experience KB"], responses={409: {"model": ErrorResponse,
                                                       "description": "the episode id is an expert's, or another "
                                                       "contributor's"}})
    async def trajectories(self, body: TrajectoryRequest, request: Request) -> TrajectoryResponse:
        """Contribute a finished trajectory: segmented into sub-goals, added to the experiential KB, and kept in the
        training store under the caller's key (another caller cannot replace it)."""
        steps = body.trajectory.steps
        if len(steps) > self.config.serve.max_trajectory_steps:
            raise APIError(413, "too_large", f"{len(steps)} steps; at most serve.max_trajectory_steps "
                           f"({self.config.serve.max_trajectory_steps})", code="too_many_steps",
                           param="trajectory.steps")
        for field in ("observation", "action", "look", "inventory"):
            _check_texts(self.config, [getattr(s, field) or "" for s in steps], f"trajectory.steps.{field}",
                         count=False)
        _check_texts(self.config, [body.trajectory.task_description], "trajectory.task_description", count=False)
        _check_steps(self.config, [s.step for s in steps], "trajectory.steps")
        contributor = getattr(request.state, "client", "")
        body = body.model_copy(update={"trajectory": body.trajectory.model_copy(update={"contributor": contributor})})
        return await _call(self.retriever.add_trajectory.remote(body))


__all__ = ["APIError", "Ingress", "InvalidEnvIdError", "app", "require_key"]
