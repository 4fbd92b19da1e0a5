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
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException

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
from knowmap.serve.auth import key_matches

logger = logging.getLogger("ray.serve")


_ERRORS = {401: "unauthorized", 404: "not_found", 405: "invalid_request", 409: "conflict", 413: "too_large",
           422: "invalid_request", 503: "unavailable"}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse, "description": d} for s, d in
    [(401, "missing or wrong API key"), (413, "over a configured limit"), (422, "invalid or malformed body")]}

bearer = HTTPBearer(auto_error=False, description="an API key from serve.api_keys or the key file")
app = FastAPI(title="KnowMap retrieval API", version=API_VERSION, docs_url=None, redoc_url=None,
              openapi_url=None, responses=_RESPONSES,
              description="Env facts and experiential sub-goals for LLM agents (KnowMap), OpenAI-compatible "
                          "embeddings, reranking. Every route but /healthz needs `Authorization: Bearer <key>`.")


def _error(status: int, detail: ErrorDetail, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=detail).model_dump(exclude_none=True), status_code=status,
                        headers=headers)


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    detail = ErrorDetail(type=exc.type, message=exc.message, code=exc.code, param=exc.param)  # type: ignore[arg-type]
    return _error(exc.status, detail, headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"]) or None
    code = "json_invalid" if any(e["type"] == "json_invalid" for e in errors) else "validation_error"
    return _error(422, ErrorDetail(type="invalid_request", message=f"{param or 'body'}: {first['msg']}",
                                   code=code, param=param, errors=errors))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, ErrorDetail(type=_ERRORS.get(exc.status_code, "invalid_request"),  # type: ignore[arg-type]
                                               message=str(exc.detail)))


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return _error(500, ErrorDetail(type="internal_error", message=f"internal error ({type(exc).__name__}); "
                                   "see the service log"))


_OPEN = {"/healthz"}
_DOCS = {"/docs", "/openapi.json"}


class Guard:
    """Before any routing or body parsing: 401 without an accepted bearer key (all but /healthz, and the docs
    when ``serve.public_docs``), then 413 if the body is over ``serve.max_body_bytes``: the declared length, and
    the bytes actually received (a chunked upload declares none), counted as they arrive; reading stops at the
    limit, so an oversized body is never held whole.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` runs every request in a
    task group with memory streams, a measurable share of the ingress's CPU per request on two cores.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            rejection = self._check(request)
            if rejection is None and request.url.path not in _OPEN:
                limit = request.app.state.config.serve.max_body_bytes
                body = await _read_body(receive, limit)
                if body is None:
                    rejection = _too_large(f"more than {limit}", limit)
                else:
                    receive = _replay(body, receive)
            if rejection is not None:
                await rejection(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _check(request: Request) -> JSONResponse | None:
        state, path = request.app.state, request.url.path
        if path in _OPEN or (path in _DOCS and state.config.serve.public_docs):
            return None
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key_matches(presented.strip(), state.key_digests):
            return _error(401, ErrorDetail(type="unauthorized", message="missing or wrong API key: send "
                                           "`Authorization: Bearer <key>` (serve.api_keys, or the key file that "
                                           "`knowmap serve` printed)"), {"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length", "").strip()
        if length.isdigit() and int(length) > state.config.serve.max_body_bytes:
            return _too_large(length, state.config.serve.max_body_bytes)
        return None


def _too_large(size: str, limit: int) -> JSONResponse:
    return _error(413, ErrorDetail(type="too_large", message=f"request body of {size} bytes is over "
                                   f"serve.max_body_bytes ({limit})", code="body_too_large"))


async def _read_body(receive: Any, limit: int) -> bytes | None:
    """The whole request body, or None as soon as more than ``limit`` bytes have arrived."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away: what came is what there is
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives the app the body already read, then whatever the connection says next."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


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


async def _call(response: Any) -> Any:
    """Await a deployment call, mapping KnowMap errors to HTTP ones."""
    try:
        return await response
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
        return get_swagger_ui_html(openapi_url="/openapi.json", title="KnowMap retrieval API")

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
        if body.rerank and not await self.reranker.info.remote():
            raise APIError(409, "conflict", "rerank was asked for but this service runs without a reranker; "
                           "send rerank=false, or start it with `knowmap serve --reranker PATH`", code="no_reranker",
                           param="rerank")
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
                                                       "description": "the episode id is an expert episode"}})
    async def trajectories(self, body: TrajectoryRequest) -> TrajectoryResponse:
        """Contribute a finished trajectory: segmented into sub-goals and added to the experiential KB."""
        steps = body.trajectory.steps
        if len(steps) > self.config.serve.max_trajectory_steps:
            raise APIError(413, "too_large", f"{len(steps)} steps; at most serve.max_trajectory_steps "
                           f"({self.config.serve.max_trajectory_steps})", code="too_many_steps",
                           param="trajectory.steps")
        for field in ("observation", "action"):
            _check_texts(self.config, [getattr(s, field) for s in steps], f"trajectory.steps.{field}", count=False)
        return await _call(self.retriever.add_trajectory.remote(body))


__all__ = ["APIError", "Ingress", "InvalidEnvIdError", "app", "require_key"]
