"""The retrieval API's FastAPI app without its routes: the error shapes, the key and role dependencies, the limit
checks, and how a deployment's answer becomes an HTTP one (:func:`call`). The routes are :mod:`knowmap.serve.api`.

No ``from __future__ import annotations`` here: FastAPI resolves the dependencies' annotations at import.
"""

import logging
import re
import uuid
from pathlib import PurePath
from typing import Annotated, Any, NamedTuple

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException

from knowmap.api_schemas import API_VERSION, ENV_ID_PATTERN, ErrorDetail, ErrorResponse
from knowmap.config import KnowMapConfig
from knowmap.errors import (
    APIError,
    EnvNotFoundError,
    EpisodeConflictError,
    EpisodeNotFoundError,
    ForbiddenError,
    KnowMapError,
    RerankerUnavailableError,
)
from knowmap.schemas import ServingModels
from knowmap.serve.guard import Guard, error_response
from knowmap.tenancy import SEPARATOR, allows

logger = logging.getLogger("ray.serve")


_ERRORS = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "invalid_request", 408: "timeout",
           409: "conflict",
           413: "too_large", 422: "invalid_request", 503: "unavailable", 504: "timeout"}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse, "description": d} for s, d in
    [(401, "missing or wrong API key"), (403, "the key's role may not do this, or the data is another key's"),
     (413, "over a configured limit"), (422, "invalid or malformed body")]}

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
    return error_response(500, ErrorDetail(type="internal_error", message="internal error; the service log has "
                                           "its cause"))


app.add_middleware(Guard)


async def require_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """Declares bearer auth in the OpenAPI schema; the check itself is :class:`Guard` (it runs first)."""


async def require_write(request: Request) -> None:
    """403 unless the caller's key has the write or admin role."""
    if not allows(getattr(request.state, "role", ""), "write"):
        raise APIError(403, "forbidden", "this key has the read role; adding or deleting data needs a key with the "
                       "write or admin role (serve.keys, or `knowmap keys add`)", code="read_only_key")


class Caller(NamedTuple):
    """Who sent a request, as the Guard found its key."""

    tenant: str
    admin: bool
    client: str


def caller(request: Request) -> Caller:
    state = request.state
    return Caller(state.tenant, state.role == "admin", state.client)


Authorized = [Depends(require_key)]
Writer = [Depends(require_key), Depends(require_write)]
Page = Annotated[int, Query(ge=1, le=10_000, description="items per page")]
EnvId = Annotated[str, Path(pattern=ENV_ID_PATTERN, description="the environment instance")]


def check_texts(config: KnowMapConfig, texts: list[str], param: str, count: bool = True) -> None:
    limits = config.serve
    if count and len(texts) > limits.max_texts:
        raise APIError(413, "too_large", f"{len(texts)} texts in {param}; at most serve.max_texts "
                       f"({limits.max_texts}) per request", code="too_many_texts", param=param)
    for i, text in enumerate(texts):
        if len(text) > limits.max_text_chars:
            raise APIError(413, "too_large", f"{param}[{i}] has {len(text)} characters; at most "
                           f"serve.max_text_chars ({limits.max_text_chars})", code="text_too_long",
                           param=f"{param}[{i}]")


def check_steps(config: KnowMapConfig, steps: list[int], param: str) -> None:
    for i, step in enumerate(steps):
        check_step(config, step, f"{param}[{i}].step")


def check_step(config: KnowMapConfig, step: int, param: str) -> None:
    if step > config.serve.max_step:
        raise APIError(422, "invalid_request", f"{param} is {step}; at most serve.max_step "
                       f"({config.serve.max_step})", code="step_too_large", param=param)


async def call(response: Any, tenant: str | None = None) -> Any:
    """Await a deployment call, mapping KnowMap errors (raised, or returned by the retriever) to HTTP ones; with
    ``tenant``, ids in messages read as the tenant sent them (``acme@env-1`` -> ``env-1``)."""
    def message(error: Exception) -> str:
        # The original exception's own text: a RayTaskError carries it as .cause, and its own text ends in the
        # exception's module and class name, which are no business of a client.
        cause = getattr(error, "cause", None) or error
        text = str(cause).strip().splitlines()[-1] if str(cause).strip() else "the request cannot be done"
        return text.replace(f"{tenant}{SEPARATOR}", "") if tenant else text

    try:
        result = await response
        if isinstance(result, KnowMapError):
            raise result
        return result
    except RerankerUnavailableError as e:
        raise APIError(409, "conflict", message(e), code="no_reranker") from e
    except EnvNotFoundError as e:
        raise APIError(404, "not_found", message(e), code="unknown_env") from e
    except EpisodeNotFoundError as e:
        raise APIError(404, "not_found", message(e), code="unknown_episode") from e
    except ForbiddenError as e:
        raise APIError(403, "forbidden", message(e), code="not_owner") from e
    except EpisodeConflictError as e:
        raise APIError(409, "conflict", message(e), code="episode_taken") from e
    except (KnowMapError, ValueError) as e:
        raise APIError(422, "invalid_request", message(e)) from e
    except RayActorError as e:  # e.g. the env KB is held open by a running episode's own actor
        raise APIError(503, "unavailable", "a knowledge-base actor is unavailable (an env KB held by a running "
                       "episode, or an actor restarting); retry shortly", code="kb_unavailable") from e


def public_name(path: str) -> str:
    """A model's name for clients: its directory's last part (or its hub name), never the server's file layout."""
    return PurePath(path).name if path else ""


def named(models: ServingModels) -> ServingModels:
    return models.model_copy(update={"embedder": public_name(models.embedder),
                                     "reranker": public_name(models.reranker)})


REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")  # what a client's X-Request-ID may be; others are replaced


class RequestIdCheck:
    """Every uvicorn server Serve starts echoes a request's ``X-Request-ID`` back and logs it (Serve's own
    ``RequestIdMiddleware``, outside the app): measured before this, 3 kB with markup came back as sent. This
    middleware, put outside Serve's by :func:`proxy_callback`, replaces an id that is longer than 128 characters,
    holds any but ``[A-Za-z0-9._-]``, or comes twice, by a generated one (a UUID, as Serve makes for a request
    without one); a valid id passes unchanged."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            sent = [v for k, v in scope["headers"] if k == b"x-request-id"]
            if sent and (len(sent) > 1 or not REQUEST_ID.fullmatch(sent[0].decode("latin-1"))):
                headers = [(k, v) for k, v in scope["headers"] if k != b"x-request-id"]
                scope = {**scope, "headers": [*headers, (b"x-request-id", str(uuid.uuid4()).encode("ascii"))]}
        await self.app(scope, receive, send)


def proxy_callback() -> list[Any]:
    """Serve's proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, set by
    :func:`knowmap.serve.proxy.proxy_environment`): :func:`knowmap.serve.proxy.install`'s request-head timer, and
    :class:`RequestIdCheck` around Serve's own middlewares (Serve wraps the ones a callback returns outside its
    own)."""
    from starlette.middleware import Middleware

    from knowmap.serve.proxy import install

    return [*install(), Middleware(RequestIdCheck)]
