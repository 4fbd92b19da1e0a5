"""The exception hierarchy. Every message says what was wrong and what is allowed, or how to fix it."""

from __future__ import annotations


class KnowMapError(Exception):
    """Base class of every error KnowMap raises on purpose."""


class ConfigError(KnowMapError, ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


class ScienceWorldError(KnowMapError):
    """ScienceWorld could not do what was asked (JVM missing, task or variation invalid)."""


class UnknownTaskError(ScienceWorldError, ValueError):
    """A task name that ScienceWorld does not know; the message lists the valid tasks."""


class VariationOutOfRangeError(ScienceWorldError, ValueError):
    """A variation index outside a split's range; the message names the range."""


class SnapshotError(KnowMapError):
    """A knowledge-base snapshot is missing, truncated or corrupt. It is never loaded as an empty KB."""


class VectorStoreError(KnowMapError):
    """The vector store (Milvus) refused an operation; the message says how to fix it."""


class EmbedderError(KnowMapError):
    """The embedding model could not be loaded or used."""
