"""Wire schemas of the retrieval service's HTTP API, version 1 (``/v1``), shared by server, client and tests.

Why a module beside :mod:`knowmap.schemas`: that module holds the domain types every layer passes around (facts,
observations, trajectories, knowledge items); this one holds only the request and response bodies of the public
API, built from those types. Together they would pass 500 lines, and external agents read this one as the API's
contract. Limits that depend on the deployment (texts per request, characters per text) are checked by the
routes from ``config.serve``; the bounds here are the ones every deployment shares.

``/v1/embeddings`` follows OpenAI's wire format (``input`` a string or a list of strings, ``encoding_format``
``float`` or ``base64``: the ``openai`` Python client asks for base64 by default), so
``openai.OpenAI(base_url=.../v1).embeddings.create(...)`` works unchanged.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from knowmap.schemas import (
    ENV_ID_PATTERN,
    MAX_NAME,
    MAX_STEP,
    MAX_STEPS,
    MAX_TEXT,
    ActionType,
    Fact,
    KBKind,
    KnowledgeItem,
    Observation,
    RetrainStatus,
    Split,
    StepRecord,
    Trajectory,
    TrajectorySource,
    Triple,
)
from knowmap.tenancy import Owner, normalise_episode_id

API_VERSION = "v1"
MAX_TEXTS = 100_000  # texts of one request; ``serve.max_texts`` is the deployment's (lower) limit
Text = Annotated[str, Field(max_length=MAX_TEXT)]
SetRelation = Literal["contains", "connects_to", "property"]
Subject = Annotated[str, Field(min_length=1, max_length=256)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data: Any) -> Any:
        """Refuse text that is not Unicode (a lone surrogate such as ``"\\ud800"``, which JSON can escape but
        no tokenizer takes) here, per request, before it can reach a batch shared with other clients."""
        stack: list[tuple[Any, str]] = [(data, "body")]
        while stack:
            value, where = stack.pop()
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(f"{where} is not valid Unicode text (character {e.start} is a lone "
                                     "surrogate); send text that encodes as UTF-8") from None
            elif isinstance(value, dict):
                stack.extend((v, f"{where}.{k}") for k, v in value.items())
            elif isinstance(value, list):
                stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
        return data


# -- what a client sends inside a request: the domain types, refusing unknown fields ---------------------------
# The domain types (knowmap.schemas) ignore unknown fields, so files written by another version still load; in a
# request an unknown field is a client's mistake (an observation's misspelt ``lok``), answered 422, never dropped.
_CLOSED = ConfigDict(extra="forbid")


class SentObservation(Observation):
    """An :class:`~knowmap.schemas.Observation` as a request carries it."""

    model_config = _CLOSED


class SentTriple(Triple):
    """A :class:`~knowmap.schemas.Triple` as a request carries it."""

    model_config = _CLOSED


class SentActionType(ActionType):
    model_config = _CLOSED


class SentStep(StepRecord):
    """A :class:`~knowmap.schemas.StepRecord` as a request carries it."""

    model_config = _CLOSED
    action_type: SentActionType | None = None


class SentTrajectory(Trajectory):
    """A :class:`~knowmap.schemas.Trajectory` as a request carries it."""

    model_config = _CLOSED
    steps: list[SentStep] = Field(default_factory=list, max_length=MAX_STEPS)


_DOMAIN: dict[type[BaseModel], type[BaseModel]] = {SentObservation: Observation, SentTriple: Triple,
                                                   SentActionType: ActionType, SentStep: StepRecord,
                                                   SentTrajectory: Trajectory}


def _domain(value: Any) -> Any:
    """A validated ``Sent*`` value (or a list of them) as the domain type itself, without validating again: the
    routes and KBs compare what they get with what they hold, and pydantic's ``==`` compares types."""
    if isinstance(value, list):
        return [_domain(v) for v in value] if value and type(value[0]) in _DOMAIN else value
    base = _DOMAIN.get(type(value))
    if base is None:
        return value
    return base.model_construct(_fields_set=value.model_fields_set, **{k: _domain(v) for k, v in value})


# -- errors ----------------------------------------------------------------------------------------------------
ErrorType = Literal["unauthorized", "forbidden", "invalid_request", "too_large", "not_found", "conflict",
                    "unavailable", "timeout", "rate_limited", "internal_error"]


class ErrorDetail(BaseModel):
    type: ErrorType = Field(description="machine-readable kind of error")
    message: str = Field(description="what was wrong and how to fix it")
    code: str | None = Field(default=None, description="finer cause, e.g. 'too_many_texts', 'text_too_long'")
    param: str | None = Field(default=None, description="the offending field, e.g. 'input[3]' or 'body.k'")
    errors: list[dict[str, Any]] | None = Field(default=None, description="each validation error, for 422")


class ErrorResponse(BaseModel):
    """Every error, whatever its status: ``{"error": {"type", "message", "code", "param"}}`` (OpenAI's shape)."""

    error: ErrorDetail


# -- embeddings (OpenAI-compatible) ----------------------------------------------------------------------------
class EmbeddingRequest(_Request):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients may send fields a future API adds (e.g. user)

    input: Text | Annotated[list[Text], Field(max_length=MAX_TEXTS)] = Field(description="one text or a list of "
                                                                               "texts")
    model: str = Field(default="", max_length=512, description="ignored: the deployed embedder answers "
                       "(GET /v1/models names it); kept for OpenAI compatibility")
    encoding_format: Literal["float", "base64"] = Field(default="float", description="base64 = little-endian "
                                                        "float32 bytes, as OpenAI")
    dimensions: int | None = Field(default=None, ge=1, le=65_536, description="must equal the model's dimension "
                                   "if given")
    user: str | None = Field(default=None, max_length=512)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str = Field(description="the embedder version that produced the vectors")
    usage: EmbeddingUsage = Field(default_factory=EmbeddingUsage)


# -- rerank ----------------------------------------------------------------------------------------------------
class RerankRequest(_Request):
    query: str = Field(min_length=1, max_length=MAX_TEXT)
    documents: list[Text] = Field(min_length=1, max_length=MAX_TEXTS)
    top_n: int | None = Field(default=None, ge=1, le=MAX_TEXTS, description="return only the best top_n; "
                              "None = all")


class RerankResult(BaseModel):
    index: int = Field(description="position in the request's documents")
    score: float = Field(description="relevance in [0, 1], higher is better")
    document: str


class RerankResponse(BaseModel):
    model: str = Field(description="the reranker version")
    results: list[RerankResult] = Field(description="best first")


# -- retrieve --------------------------------------------------------------------------------------------------
class RetrieveRequest(_Request):
    query: str = Field(min_length=1, max_length=MAX_TEXT, description="the situation: task, current sub-goal, "
                       "recent observation")
    env_id: str | None = Field(default=None, pattern=ENV_ID_PATTERN, max_length=128, description="whose env "
                               "facts to search; without it only experience is searched")
    task: str | None = Field(default=None, max_length=MAX_NAME, description="restrict experience to this "
                             "ScienceWorld task; None = all tasks")
    k: int = Field(default=5, ge=1, le=10_000, description="items per KB (at most serve.max_k)")
    kbs: list[KBKind] = Field(default_factory=lambda: ["env", "experience"], min_length=1, max_length=2)
    rerank: bool | None = Field(default=None, description="fuse the cross-encoder's order of each KB's candidates "
                                "with the first stage's; None = the service's default (retrieval.rerank, when a "
                                "reranker is deployed)")
    hybrid: bool | None = Field(default=None, description="fuse BM25 with the embedder by reciprocal rank; None = "
                                "the service's default (retrieval.hybrid)")
    as_of_step: int | None = Field(default=None, ge=0, le=MAX_STEP, description="env facts as of this step; None = now")
    owner: Owner = Field(default="any", description="whose experience: 'any' = the shared (expert and the "
                         "deployment's own) and your tenant's contributions; 'mine' = only your tenant's; 'shared' = "
                         "only the shared. Another tenant's contributions are never returned")
    source: TrajectorySource | None = Field(default=None, description="only 'expert' or only 'agent' experience; "
                                            "None = both")
    split: Split | None = Field(default=None, description="only experience from this ScienceWorld split")


class RetrieveResponse(BaseModel):
    items: list[KnowledgeItem] = Field(description="env facts first, then sub-goals, each best first; "
                                       "provenance says where each came from and which ranker scored it")
    embedder: str = Field(description="the embedder version used for this request")
    reranker: str | None = Field(default=None, description="the reranker version, if reranking was done")


# -- env KBs ---------------------------------------------------------------------------------------------------
class ObservationsRequest(_Request):
    observations: list[SentObservation] = Field(min_length=1, max_length=MAX_TEXTS, description="in step order; a "
                                                "step may not go back; applied whole or not at all")

    @model_validator(mode="after")
    def _as_domain(self) -> ObservationsRequest:
        self.observations = _domain(self.observations)
        return self


class FactsRequest(_Request):
    """Structured facts observed at one step, for environments whose observations are not ScienceWorld text."""

    step: int = Field(ge=0, le=MAX_STEP, description="the env step they were observed at; never earlier than the last")
    triples: list[SentTriple] = Field(min_length=1, max_length=MAX_TEXTS, description="(subject, relation, object); "
                                      "the relation is one of the declared vocabulary: single-valued ones (location, "
                                      "open_state, power_state, reading, temperature, state_of_matter, focus) hold "
                                      "one object per subject, a new one closes the old; set-valued ones (contains, "
                                      "connects_to, property) hold many")
    full_sets: list[tuple[Subject, SetRelation]] = Field(default_factory=list, max_length=MAX_TEXTS, description=(
        "(subject, set-valued relation) pairs observed in full: their objects not in triples are closed"))

    @model_validator(mode="after")
    def _as_domain(self) -> FactsRequest:
        self.triples = _domain(self.triples)
        return self


class ObservationsResponse(BaseModel):
    env_id: str
    accepted: int = Field(description="observations applied")
    changes: int = Field(description="facts opened or closed by them")
    last_step: int
    facts: int = Field(description="facts the env KB holds, open and closed")


class FactsResponse(BaseModel):
    env_id: str
    as_of_step: int | None = None
    facts: list[Fact]
    next_offset: int | None = Field(default=None, description="pass as offset for the next page; null on the last")


class EnvsResponse(BaseModel):
    envs: list[str] = Field(description="your tenant's env ids with a KB, sorted")
    next_after: str | None = Field(default=None, description="pass as after for the next page; null on the last")


class DeletedResponse(BaseModel):
    id: str = Field(description="the env or episode id deleted")
    deleted: dict[str, int] = Field(description="what went, by kind: e.g. rows, files, facts, subgoals_rewritten")


# -- trajectories ----------------------------------------------------------------------------------------------
class TrajectoryRequest(_Request):
    trajectory: SentTrajectory = Field(description="the finished episode; stored with source 'agent', its contributor "
                                   "(the caller's key) and its episode id as a file name: `[A-Za-z0-9._-]{1,128}`")
    env_id: str | None = Field(default=None, pattern=ENV_ID_PATTERN, max_length=128, description="the env KB "
                               "the episode's observations went to: its facts are attached to the sub-goals")
    overwrite: bool = Field(default=False, description="replace your tenant's stored trajectory of this episode id "
                            "(only with the key that contributed it, or an admin key); a resend of exactly the "
                            "stored trajectory is accepted without it")

    @model_validator(mode="after")
    def _episode_id_names_a_file(self) -> TrajectoryRequest:
        episode = normalise_episode_id(self.trajectory.episode_id)
        if not re.fullmatch(ENV_ID_PATTERN, episode) or episode in (".", ".."):
            raise ValueError(f"trajectory.episode_id {episode[:40]!r} cannot name a stored trajectory: use 1 to 128 "
                             "characters from [A-Za-z0-9._-]")
        self.trajectory.episode_id = episode  # compared and stored trimmed and in lower case
        self.trajectory = _domain(self.trajectory)
        return self


class TrajectoryInfo(BaseModel):
    episode_id: str
    task: str
    source: TrajectorySource
    contributor: str = Field(description="the key that contributed it, as the service names keys")
    steps: int
    final_score: float


class TrajectoriesResponse(BaseModel):
    trajectories: list[TrajectoryInfo] = Field(description="your tenant's contributions: who added what")
    next_after: str | None = Field(default=None, description="pass as after for the next page; null on the last")


class TrajectoryResponse(BaseModel):
    episode_id: str
    subgoals: int
    rows: int = Field(description="rows written to each embedder version's collection")


# -- models and health -----------------------------------------------------------------------------------------
class ModelInfo(BaseModel):
    object: Literal["model"] = "model"
    id: str = Field(description="the version: name and a fingerprint of the weights")
    role: Literal["embedder", "reranker"]
    path: str = Field(description="the model's name: the last part of its directory or hub name (never a path on the "
                      "server)")
    dim: int | None = None
    owned_by: str = "knowmap"


class ModelsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]
    experience_collections: list[str] = Field(default_factory=list, description="embedder versions whose "
                                              "experiential collection is indexed")
    retrain: RetrainStatus | None = Field(default=None, description="the retrain controller's state: serving and "
                                          "previous models, gate metrics, the last decision and why (its full "
                                          "history: `knowmap retrain status`); null before the first cycle")


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    api_version: str = API_VERSION


class ReadyResponse(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str] = Field(description="each check: 'ok', 'failing: <why>', or 'not deployed' for an "
                                   "optional part the service runs without (the reranker); checks: embedder, "
                                   "reranker, the retriever's experience_kb, vector_store, env_kbs")


# -- between deployments (Ray calls inside the service, not HTTP) ----------------------------------------------
class EncodedTexts(BaseModel):
    """The embedder's answer: vectors and the version of the model that made them."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    vectors: Any = Field(description="numpy float32 (n, dim), unit rows")
    version: str


class ScoredDocuments(BaseModel):
    """The reranker deployment's answer: one score per document, in input order."""

    scores: list[float]
    version: str
