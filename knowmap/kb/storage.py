"""The on-disk format of durable env KBs: env ids as directory names, the write-ahead log's records, file locks.

An env id names a directory, so :func:`validate_env_id` admits only ``[A-Za-z0-9._-]{1,128}`` (not ``.``/``..``).

A record is one JSON line with its CRC-32 last (:func:`encode_record`, :func:`decode_record`); a write resent
after a crash is recognised by :func:`record_digest`, its content without the sequence number. Inputs are
validated into KnowMap's own errors here (pydantic's do not cross Ray calls reliably). :func:`lock_file` gives the
one process that opens a KB its exclusive ``flock``; :func:`fsync_dir` makes a rename durable.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from knowmap.errors import InvalidEnvIdError, KnowMapError
from knowmap.schemas import CARDINALITY, ENV_ID_PATTERN, Cardinality, Relation
from knowmap.tenancy import SCOPED_PATTERN

_ENV_ID = re.compile(SCOPED_PATTERN)  # a client's env id, or a tenant's as stored (<tenant>@<env id>)
SNAPSHOT_NAME = re.compile(r"snapshot-(\d{12})\.json")
LOG_NAME = "log.jsonl"
PREVIOUS_LOG_NAME = "log.prev.jsonl"


def validate_env_id(env_id: object) -> str:
    """Return ``env_id`` if it can name a KB directory: a client's env id, or a tenant's as stored
    (``<tenant>@<env id>``, :mod:`knowmap.tenancy`).

    Raises:
        InvalidEnvIdError: it is not a string of 1 to 128 characters from ``[A-Za-z0-9._-]`` (after an optional
            ``<tenant>@``), or is ``.``/``..``.
    """
    if not isinstance(env_id, str) or not _ENV_ID.fullmatch(env_id) or env_id in {".", ".."}:
        raise InvalidEnvIdError(f"invalid env id {env_id!r}: use 1 to 128 characters matching {ENV_ID_PATTERN} "
                                "(letters, digits, '.', '_', '-'), other than '.' and '..'")
    return env_id


def list_env_kbs(directory: str | Path) -> list[str]:
    """The env ids with a durable KB stored under ``directory`` (a log or a snapshot), sorted."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.is_dir() and _ENV_ID.fullmatch(child.name) and (
                (child / LOG_NAME).exists() or any(SNAPSHOT_NAME.fullmatch(p.name) for p in child.iterdir())):
            found.append(child.name)
    return sorted(found)


def encode_record(record: dict[str, Any]) -> bytes:
    body = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    crc = f"{zlib.crc32(body.encode()):08x}"
    # The checksum goes last; decode_record pops it and re-serialises the rest sorted, so key order does not matter.
    return (body[:-1] + f',"crc":"{crc}"}}\n').encode()


def decode_record(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """A log record and ``""``, or None and what is wrong with the line."""
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"not JSON ({e})"
    if not isinstance(record, dict) or not isinstance(record.get("seq"), int) or "op" not in record:
        return None, "not a log record (needs seq, op, crc)"
    crc = record.pop("crc", None)
    body = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if crc != f"{zlib.crc32(body.encode()):08x}":
        return None, "checksum mismatch"
    return record, ""


def record_digest(record: dict[str, Any]) -> str:
    """What a write says, without its sequence number: equal for a retried call."""
    content = {k: v for k, v in record.items() if k not in {"seq", "crc"}}
    return hashlib.sha1(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def validated(model: type, value: object, what: str) -> Any:
    if isinstance(value, model):
        return value
    if not isinstance(value, Mapping):
        raise KnowMapError(f"{what} must be a {model.__name__} or a dict of its fields, got {type(value).__name__}")
    try:
        return model.model_validate(dict(value))
    except ValidationError as e:  # re-raised as our error: pydantic's does not cross Ray calls reliably
        raise KnowMapError(f"invalid {what}: {e}") from None


def check_step_value(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise KnowMapError(f"step must be an integer >= 0, got {step!r}")
    return step


def relation_of(relation: object) -> Relation:
    try:
        return Relation(relation)
    except ValueError:
        raise KnowMapError(f"unknown relation {relation!r}; allowed: {[r.value for r in Relation]}") from None


def full_set_pairs(full_sets: Iterable[Sequence[str]]) -> list[tuple[str, str]]:
    """Normalised ``(subject, relation)`` pairs; the relation must be set-valued."""
    if isinstance(full_sets, (str, bytes)):
        raise KnowMapError("full_sets must be a list of (subject, relation) pairs, not a string")
    allowed = [r.value for r in Relation if CARDINALITY[r] is Cardinality.SET]
    pairs = []
    for item in full_sets:
        if isinstance(item, (str, bytes)) or len(item) != 2 or not isinstance(item[0], str) or not item[0].strip():
            raise KnowMapError(f"a full set must be a (subject, relation) pair with a non-blank subject, got {item!r}")
        relation = relation_of(item[1])
        if CARDINALITY[relation] is not Cardinality.SET:
            raise KnowMapError(f"full set given for single-valued relation {relation.value!r}; "
                               f"set-valued relations: {allowed}")
        pairs.append((" ".join(item[0].split()).lower(), relation.value))
    return pairs


def lock_file(path: Path, *, timeout_s: float, env_id: str) -> BinaryIO:
    """An exclusive ``flock`` on ``path``, waited for up to ``timeout_s`` (a restarted actor's predecessor may
    still be exiting); the OS releases it when the holding process dies."""
    fh = open(path, "ab", buffering=0)  # noqa: SIM115 - the lock lives as long as this file is open
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fh
        except BlockingIOError:
            if time.monotonic() >= deadline:
                fh.close()
                raise KnowMapError(f"env KB {env_id!r} is open elsewhere ({path} is locked); close it there, or "
                                   "retire its actor, before opening it again") from None
            time.sleep(0.05)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
