"""A typed Python client of the retrieval API, over the same schemas as the server (:mod:`knowmap.api_schemas`).

>>> client = KnowMapClient("http://127.0.0.1:8000", api_key)            # doctest: +SKIP
>>> client.retrieve("boil water", env_id="my-env-1", k=5).items           # doctest: +SKIP

Every call returns a pydantic model (or numpy array) and raises :class:`ServiceError` with the server's typed
error body on any non-2xx answer. One client keeps one HTTP connection pool; it is safe to share across threads.

An env or episode id goes into a URL path: the client refuses, before any request, an id the API would refuse
(:func:`path_id`: 1 to 128 characters of ``[A-Za-z0-9._-]``, not ``.`` or ``..``), and quotes it as one path
segment, so no id (``../trajectories/x``, ``%2e%2e``, a NUL) can reach another route.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np
import requests
from pydantic import BaseModel

from knowmap.api_schemas import (
    ENV_ID_PATTERN,
    DeletedResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    EnvsResponse,
    ErrorDetail,
    ErrorResponse,
    FactsRequest,
    FactsResponse,
    HealthResponse,
    KBKind,
    ModelsResponse,
    ObservationsRequest,
    ObservationsResponse,
    ReadyResponse,
    RerankRequest,
    RerankResponse,
    RetrieveRequest,
    RetrieveResponse,
    TrajectoriesResponse,
    TrajectoryInfo,
    TrajectoryRequest,
    TrajectoryResponse,
)
from knowmap.errors import InvalidEnvIdError, ServiceError
from knowmap.schemas import Fact, Observation, Split, Trajectory, TrajectorySource, Triple
from knowmap.tenancy import Owner

T = TypeVar("T", bound=BaseModel)
_PATH_ID = re.compile(ENV_ID_PATTERN)


def path_id(value: object, name: str = "env_id") -> str:
    """``value`` as one URL path segment, if the API accepts it as an env or episode id.

    Raises:
        InvalidEnvIdError: ``value`` is not 1 to 128 characters of ``[A-Za-z0-9._-]``, or is ``.`` or ``..``
            (the API answers 422 or 404 to those; they are refused here, before any request is sent).
    """
    if not isinstance(value, str) or not _PATH_ID.fullmatch(value) or value in (".", ".."):
        shown = repr(value)[:60] if isinstance(value, str) else type(value).__name__
        raise InvalidEnvIdError(f"{name} {shown} is not an id the API accepts: use 1 to 128 characters from "
                                "[A-Za-z0-9._-], not '.' or '..'")
    return quote(value, safe="")  # a no-op for the characters allowed; kept so no id ever spans two segments


def _fields(value: BaseModel | Mapping[str, Any]) -> Any:
    """A domain object or a mapping as the request models take it: a request refuses unknown fields, so a mapping
    with a misspelt key fails here (pydantic's ValidationError), before it is sent."""
    return value.model_dump() if isinstance(value, BaseModel) else value


class KnowMapClient:
    """Client of one retrieval service.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000`` (what ``knowmap serve`` prints), without ``/v1``.
        api_key: a bearer key the service accepts.
        timeout_s: per-request timeout.
    """

    def __init__(self, base_url: str, api_key: str, timeout_s: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {api_key}"

    # -- service ----------------------------------------------------------------------------------------------
    def health(self) -> HealthResponse:
        return self._call("GET", "/healthz", HealthResponse)

    def ready(self) -> ReadyResponse:
        """Readiness (``/readyz``): raises :class:`ServiceError` (503) naming the failing checks."""
        return self._call("GET", "/readyz", ReadyResponse)

    def check_key(self) -> None:
        """One cheap request that needs a key (the first env id of your tenant).

        Raises:
            ServiceError: 401 if the service does not accept the key; another status if it cannot answer.
        """
        self._call("GET", "/v1/envs", EnvsResponse, params={"limit": 1})

    def models(self) -> ModelsResponse:
        """The embedder and reranker versions serving now."""
        return self._call("GET", "/v1/models", ModelsResponse)

    # -- models -----------------------------------------------------------------------------------------------
    def embeddings(self, texts: str | Sequence[str], encoding_format: str = "float") -> EmbeddingResponse:
        """The raw OpenAI-format answer (``/v1/embeddings``)."""
        body = EmbeddingRequest(input=texts if isinstance(texts, str) else list(texts),
                                encoding_format=encoding_format)  # type: ignore[arg-type]
        return self._call("POST", "/v1/embeddings", EmbeddingResponse, body)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length embeddings as a float32 ``(len(texts), dim)`` array (sent as base64, the compact form)."""
        response = self.embeddings(list(texts), encoding_format="base64")
        rows = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in  # type: ignore[arg-type]
                sorted(response.data, key=lambda d: d.index)]
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), dtype=np.float32)

    def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None) -> RerankResponse:
        """Cross-encoder scores of ``documents`` for ``query``, best first."""
        return self._call("POST", "/v1/rerank", RerankResponse,
                          RerankRequest(query=query, documents=list(documents), top_n=top_n))

    # -- retrieval --------------------------------------------------------------------------------------------
    def retrieve(self, query: str, *, env_id: str | None = None, task: str | None = None, k: int = 5,
                 kbs: Sequence[KBKind] = ("env", "experience"), rerank: bool | None = None,
                 as_of_step: int | None = None, hybrid: bool | None = None, owner: Owner = "any",
                 source: TrajectorySource | None = None, split: Split | None = None) -> RetrieveResponse:
        """Env facts of ``env_id`` and experiential sub-goals for ``query``, ranked, with provenance; ``rerank``
        and ``hybrid`` None = the service's defaults; ``owner``, ``source``, ``split`` narrow the experience
        (another tenant's contributions are never returned)."""
        body = RetrieveRequest(query=query, env_id=env_id, task=task, k=k, kbs=list(kbs), rerank=rerank,
                               as_of_step=as_of_step, hybrid=hybrid, owner=owner, source=source, split=split)
        return self._call("POST", "/v1/retrieve", RetrieveResponse, body)

    # -- env KBs ----------------------------------------------------------------------------------------------
    def add_observations(self, env_id: str, observations: Sequence[Observation | Mapping[str, Any]],
                         ) -> ObservationsResponse:
        """Feed observations (in step order) into the env KB of ``env_id``."""
        body = ObservationsRequest(observations=[_fields(o) for o in observations])
        return self._call("POST", f"/v1/envs/{path_id(env_id)}/observations", ObservationsResponse, body)

    def add_facts(self, env_id: str, step: int, triples: Sequence[Triple | Mapping[str, Any]],
                  full_sets: Sequence[tuple[str, str]] = ()) -> ObservationsResponse:
        """Structured facts observed at ``step`` (relations of the declared vocabulary; ``full_sets``: (subject,
        set-valued relation) pairs seen in full, whose other objects are closed)."""
        body = FactsRequest(step=step, triples=[_fields(t) for t in triples],
                            full_sets=[tuple(p) for p in full_sets])  # type: ignore[misc]
        return self._call("POST", f"/v1/envs/{path_id(env_id)}/facts", ObservationsResponse, body)

    def facts(self, env_id: str, as_of_step: int | None = None) -> list[Fact]:
        """Every fact that holds now (or held at ``as_of_step``), all pages."""
        params = {} if as_of_step is None else {"as_of_step": as_of_step}
        return self._facts(f"/v1/envs/{path_id(env_id)}/facts", params)

    def history(self, env_id: str, subject: str | None = None, relation: str | None = None) -> list[Fact]:
        """Every fact ever recorded (optionally of one subject/relation), all pages."""
        params = {k: v for k, v in (("subject", subject), ("relation", relation)) if v is not None}
        return self._facts(f"/v1/envs/{path_id(env_id)}/facts/history", params)

    def _facts(self, path: str, params: dict[str, Any]) -> list[Fact]:
        facts: list[Fact] = []
        offset: int | None = 0
        while offset is not None:
            page = self._call("GET", path, FactsResponse, params={**params, "offset": offset})
            facts += page.facts
            offset = page.next_offset
        return facts

    def envs(self) -> list[str]:
        """Your tenant's env ids with a KB, all pages."""
        return self._pages("/v1/envs", EnvsResponse, "envs")

    def delete_env(self, env_id: str) -> DeletedResponse:
        """Delete the env KB and the facts it lent to your contributed trajectories' sub-goals."""
        return self._call("DELETE", f"/v1/envs/{path_id(env_id)}", DeletedResponse)

    # -- experience -------------------------------------------------------------------------------------------
    def add_trajectory(self, trajectory: Trajectory | Mapping[str, Any], env_id: str | None = None,
                       overwrite: bool = False) -> TrajectoryResponse:
        """Contribute a finished trajectory to the experiential KB (stored with source ``agent``, seen by your
        tenant only); ``overwrite`` replaces your own stored one of the same episode id."""
        body = TrajectoryRequest(trajectory=_fields(trajectory), env_id=env_id, overwrite=overwrite)
        return self._call("POST", "/v1/trajectories", TrajectoryResponse, body)

    def trajectories(self) -> list[TrajectoryInfo]:
        """Your tenant's contributed trajectories (who added what), all pages."""
        return self._pages("/v1/trajectories", TrajectoriesResponse, "trajectories")

    def delete_trajectory(self, episode_id: str) -> DeletedResponse:
        """Delete a trajectory you contributed, from every indexed version and the training store."""
        return self._call("DELETE", f"/v1/trajectories/{path_id(episode_id, 'episode_id')}", DeletedResponse)

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _pages(self, path: str, model: type[BaseModel], field: str) -> list[Any]:
        """Every item of a listing paged by ``after`` / ``next_after``."""
        found: list[Any] = []
        after: str | None = None
        while True:
            page = self._call("GET", path, model, params={} if after is None else {"after": after})
            found += getattr(page, field)
            if page.next_after is None:  # type: ignore[attr-defined]
                return found
            after = page.next_after  # type: ignore[attr-defined]

    def _call(self, method: str, path: str, model: type[T], body: BaseModel | None = None,
              params: Mapping[str, Any] | None = None) -> T:
        response = self._session.request(
            method, self.base_url + path, params=params, timeout=self.timeout_s,
            data=body.model_dump_json(exclude_none=True) if body is not None else None,
            headers={"Content-Type": "application/json"} if body is not None else None)
        if response.status_code >= 400:
            try:
                error = ErrorResponse.model_validate_json(response.content).error
            except ValueError:
                error = ErrorDetail(type="internal_error" if response.status_code >= 500 else "invalid_request",
                                    message=response.text[:500] or response.reason)
            raise ServiceError(response.status_code, error)
        return model.model_validate_json(response.content)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> KnowMapClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
