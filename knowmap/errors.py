"""The exception hierarchy, in one place. Every message says what was wrong and what is allowed, or how to fix it.

Whether a failed episode is worth another attempt is a property of its error type (``retryable``), decided here
and read by the rollout pool through :func:`is_retryable`, never by matching class names or messages.
"""

from __future__ import annotations

from typing import Any


class KnowMapError(Exception):
    """Base class of every error KnowMap raises on purpose.

    ``retryable`` says whether the same call may succeed when tried again (a JVM or an actor that died); a
    mistake in the input (an unknown task, an invalid value) is not.
    """

    retryable = False


class ConfigError(KnowMapError, ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


class ScienceWorldError(KnowMapError):
    """ScienceWorld could not do what was asked (the JVM died or refused a call)."""

    retryable = True


class UnknownTaskError(ScienceWorldError, ValueError):
    """A task name that ScienceWorld does not know; the message lists the valid tasks."""

    retryable = False


class VariationOutOfRangeError(ScienceWorldError, ValueError):
    """A variation index outside a split's range; the message names the range."""

    retryable = False


class SplitError(KnowMapError, ValueError):
    """A split name that is not train/dev/test, or episodes of the wrong split for the operation."""


class SnapshotError(KnowMapError):
    """A knowledge-base snapshot is missing, truncated or corrupt. It is never loaded as an empty KB."""


class WriteAheadLogError(SnapshotError):
    """The write-ahead log of a durable KB is damaged before its last line, or a record in it cannot be replayed."""


class InvalidEnvIdError(KnowMapError, ValueError):
    """An env id that cannot name a KB directory."""


class EnvNotFoundError(KnowMapError):
    """No env KB exists for an env id."""


class EnvKBClosedError(KnowMapError):
    """A write reached an env KB that was closed (its actor retired meanwhile): reopen it and send again."""


class EpisodeConflictError(KnowMapError):
    """A contributed trajectory would overwrite an expert episode, another's, or (without ``overwrite``) one of its
    tenant's."""


class EpisodeNotFoundError(KnowMapError):
    """No contributed trajectory of the caller's tenant has this episode id."""


class ForbiddenError(KnowMapError):
    """The caller's key may not do this (its role is too low, or the data is another key's)."""


class VersionNotIndexedError(KnowMapError):
    """The experiential KB holds no collection for an embedder version (its actor restarted and holds only its
    configured version again, or the version was released): call ``ensure_index(<model path>)`` first."""


class VectorStoreError(KnowMapError):
    """The vector store (Milvus) refused an operation; the message says how to fix it."""


class EmbedderError(KnowMapError):
    """The embedding model could not be loaded or used."""


class RerankerError(KnowMapError):
    """The reranker could not be loaded or used; the message says what to pass instead."""


class RerankerUnavailableError(KnowMapError):
    """Reranking was asked for but the service runs without a reranker."""


class LLMError(KnowMapError):
    """The LLM endpoint refused a request or answered something unusable."""

    retryable = True


class ConstraintIgnoredError(LLMError):
    """The endpoint answered outside the constrained choices (it ignored the ``llm.constraint_style`` constraint);
    set ``llm.constraint_style`` to one the server supports, or 'none'. The actuator falls back to its
    best-ranked candidate."""


class LLMUnavailableError(LLMError):
    """No LLM answers at the configured endpoint."""

    retryable = False


class TrainingError(KnowMapError):
    """Training could not start or finish; the message says what to change."""


class APIError(Exception):
    """An HTTP error the retrieval API answers with: its status and the fields of its typed body
    (:class:`knowmap.api_schemas.ErrorDetail`: ``type``, ``message``, ``code``, ``param``)."""

    def __init__(self, status: int, type_: str, message: str, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.code, self.param = status, type_, message, code, param


class ServiceError(KnowMapError):
    """The retrieval service answered with an error: ``status`` (HTTP) and ``error`` (its typed body,
    :class:`knowmap.api_schemas.ErrorDetail`)."""

    def __init__(self, status: int, error: Any) -> None:
        super().__init__(f"HTTP {status} {error.type}: {error.message}")
        self.status, self.error = status, error

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        return self.status >= 500


def is_retryable(error: BaseException) -> bool:
    """Whether an episode that failed with ``error`` may succeed on another attempt.

    KnowMap's own errors say so themselves (``retryable``); invalid input (pydantic's ``ValidationError``,
    ``ValueError``, ``TypeError``) is never retried; anything else (a Ray actor or a JVM that died, a lost
    connection) is transient.
    """
    if isinstance(error, KnowMapError):
        return bool(error.retryable)
    return not isinstance(error, ValueError | TypeError)


class ContributionQueueFullError(KnowMapError):
    """The retrieval service holds as many queued or running writes (contributions, deletions) of this tenant, or
    in all, as ``serve.contribution_queue_per_tenant`` / ``serve.contribution_queue_total`` allow: nothing was
    done; send it again after ``retry_after_s`` seconds (the service answers 429 with ``Retry-After``)."""

    retryable = True

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ContributionTimeoutError(KnowMapError):
    """A write of the experiential KB was not begun before its deadline (``serve.contribution_timeout_s``) or its
    request was answered meanwhile: nothing was stored (the service answers 504); send it again."""

    retryable = True
