"""The rows of the vector store: their schema and limits, safe filter expressions, and search hits.

Every row has the same fields (``id``, ``vector``, ``text``, ``task``, ``kind``, ``episode_id``, ``source`` and
a JSON ``meta``); :func:`clean_row` checks one against the schema before it reaches pymilvus, and
:func:`build_filter` turns a dict into a Milvus boolean expression whose values cannot change its meaning.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from knowmap.errors import VectorStoreError

SCALAR_FIELDS = ("id", "task", "kind", "episode_id", "source")  # filterable, plus "meta.<key>" for JSON keys
OUTPUT_FIELDS = ["text", "task", "kind", "episode_id", "source", "meta"]
VARCHAR_LIMITS = {"id": 256, "text": 65535, "task": 256, "kind": 32, "episode_id": 256, "source": 32}  # bytes
ROW_FIELDS = frozenset(["vector", "meta", *VARCHAR_LIMITS])
_META_KEY = re.compile(r"^meta\.([A-Za-z_][A-Za-z0-9_]{0,63})$")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


@dataclass(frozen=True)
class Hit:
    """One search result: the row's id, its cosine similarity to the query (higher = closer) and its fields."""

    id: str
    score: float
    text: str = ""
    task: str = ""
    kind: str = ""
    episode_id: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row_id: Any, score: float, row: Mapping[str, Any]) -> Hit:
        fields = {name: row.get(name) or "" for name in OUTPUT_FIELDS if name != "meta"}
        return cls(id=str(row_id), score=float(score), meta=dict(row.get("meta") or {}), **fields)


def build_filter(filter: Mapping[str, Any] | None) -> str:
    """Turn ``{"task": "boil", "kind": ["subgoal", "trajectory"]}`` into a safe Milvus boolean expression.

    Keys are the scalar fields ``id, task, kind, episode_id, source`` or ``meta.<key>`` for a top-level key of the
    JSON ``meta`` field. A value is a string (``==``) or a list of them (``in``); ``meta.<key>`` also takes an int,
    float or bool. Strings are escaped, so no value can change the expression. Conditions are joined by ``and``;
    the key ``"$or"`` takes a list of such dicts, any of which may hold (``{"$or": [{"source": "expert"},
    {"meta.tenant": "a"}]}``).

    Returns:
        the expression; ``""`` for no filter.

    Raises:
        VectorStoreError: an unknown key (the message lists the allowed ones) or a value of the wrong type.
    """
    clauses = []
    for key, value in (filter or {}).items():
        if key == "$or":
            if not isinstance(value, list | tuple) or not value or not all(isinstance(v, Mapping) and v for v in value):
                raise VectorStoreError("filter '$or' takes a non-empty list of non-empty filter dicts")
            clauses.append("(" + " or ".join(f"({build_filter(v)})" for v in value) + ")")
            continue
        meta = _META_KEY.match(key)
        if key not in SCALAR_FIELDS and not meta:
            raise VectorStoreError(f"cannot filter on {key!r}; allowed keys: {', '.join(SCALAR_FIELDS)}, or "
                                   "meta.<key> for a key of the JSON meta field")
        target = f'meta["{meta.group(1)}"]' if meta else key
        if isinstance(value, list | tuple | set | frozenset):
            if not value:
                raise VectorStoreError(f"filter {key!r} has an empty list of values, which matches nothing; drop it")
            clauses.append(f"{target} in [{', '.join(_literal(key, v, bool(meta)) for v in value)}]")
        else:
            clauses.append(f"{target} == {_literal(key, value, bool(meta))}")
    return " and ".join(clauses)


def _literal(key: str, value: Any, meta: bool) -> str:
    if isinstance(value, str):
        if any(ord(c) < 32 and c not in "\n\r\t" for c in value):
            raise VectorStoreError(f"filter {key!r}: value {value!r} holds control characters; remove them")
        return '"' + "".join(_ESCAPES.get(c, c) for c in value) + '"'
    if meta and isinstance(value, bool):
        return "true" if value else "false"
    if meta and isinstance(value, int | float) and math.isfinite(value):
        return repr(value)
    allowed = "a string or list of strings" + (", an int, float or bool" if meta else "")
    raise VectorStoreError(f"filter {key!r}: value {value!r} ({type(value).__name__}) must be {allowed}")


def clean_row(row: Mapping[str, Any], dim: int) -> dict[str, Any]:
    """A row checked against the schema, with defaults filled in, ready for pymilvus."""
    unknown = set(row) - ROW_FIELDS
    if unknown or not {"id", "vector", "text"} <= set(row):
        raise VectorStoreError(f"row {row.get('id')!r}: needs id, vector and text; allowed fields are "
                               f"{sorted(ROW_FIELDS)}" + (f"; unknown: {sorted(unknown)}" if unknown else ""))
    clean: dict[str, Any] = {}
    for key, limit in VARCHAR_LIMITS.items():
        value = row.get(key, "")
        if not isinstance(value, str) or len(value.encode("utf-8")) > limit or (key == "id" and not value):
            raise VectorStoreError(f"row {row.get('id')!r}: {key} must be a {'non-empty ' if key == 'id' else ''}"
                                   f"string of at most {limit} UTF-8 bytes, got {str(value)[:80]!r}")
        clean[key] = value
    vector = np.asarray(row["vector"], dtype=np.float32)
    if vector.shape != (dim,) or not np.isfinite(vector).all():
        raise VectorStoreError(f"row {row['id']!r}: vector must be {dim} finite floats, got shape {vector.shape}")
    clean["vector"] = vector.tolist()
    try:
        clean["meta"] = json.loads(json.dumps(row.get("meta") or {}, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise VectorStoreError(f"row {row['id']!r}: meta must be a JSON-serialisable dict: {e}") from e
    if not isinstance(clean["meta"], dict):
        raise VectorStoreError(f"row {row['id']!r}: meta must be a dict, got {type(row['meta']).__name__}")
    return clean
