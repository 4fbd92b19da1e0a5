"""API keys of the retrieval service: where they come from, and how a request's bearer key is checked.

Keys are on by default. Accepted keys are ``serve.api_keys`` plus those in the key file (``serve.api_key_file``,
default ``<data_dir>/serve/api_key``, one a line). If there are none, a key is generated and written to the key
file with mode 0600, so a service started with defaults is never open. Only SHA-256 digests of the keys reach the
deployments (and so Serve's stored config); a request's key is hashed and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from knowmap.config import KnowMapConfig
from knowmap.errors import ConfigError

KEY_PREFIX = "km-"


def key_file(config: KnowMapConfig) -> Path:
    """The key file in force: ``serve.api_key_file`` or ``<data_dir>/serve/api_key``."""
    return Path(config.serve.api_key_file).expanduser() if config.serve.api_key_file else (
        config.paths.api_key)


def load_api_keys(config: KnowMapConfig, *, generate: bool = True) -> tuple[list[str], Path | None]:
    """The accepted API keys, generating one if none is configured.

    Args:
        config: ``serve.api_keys`` and ``serve.api_key_file``.
        generate: write a new key to the key file if no key is configured anywhere.

    Returns:
        the keys, and the key file if keys were read from (or written to) it, else None.

    Raises:
        ConfigError: the key file is readable by others (it must be 0600), or holds no key and ``generate`` is
            False while no key is configured.
    """
    keys = [k.strip() for k in config.serve.api_keys if k.strip()]
    path = key_file(config)
    if path.is_file():
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"API key file {path} is readable by other users; run `chmod 600 {path}`")
        from_file = [line.strip() for line in path.read_text().splitlines() if line.strip()
                     and not line.startswith("#")]
        return keys + from_file, path
    if keys:
        return keys, None
    if not generate:
        raise ConfigError("no API key configured: set serve.api_keys or write keys to " + str(path))
    return [write_new_key(path)], path


def write_new_key(path: Path) -> str:
    """Generate a key and write it to ``path`` (created with mode 0600, never overwritten); returns the key."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def digest(key: str) -> str:
    """The SHA-256 hex digest of a key (what deployments hold instead of the key)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_matches(presented: str | None, digests: Iterable[str]) -> bool:
    """Whether a presented key is one of the accepted ones, compared in constant time against each digest."""
    if not presented:
        return False
    candidate = digest(presented)
    found = False
    for accepted in digests:  # no early exit: the time does not tell which key matched
        found |= hmac.compare_digest(candidate, accepted)
    return found
