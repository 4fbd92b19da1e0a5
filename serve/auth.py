"""API keys of the retrieval service: where they come from, whose tenant each reaches, and how a request's bearer key
is checked.

Keys are on by default. Accepted keys are ``serve.api_keys`` (the ``default`` tenant, role ``admin``), ``serve.keys``
(each with its tenant and role, the key or its SHA-256 digest) and the lines of the key file (``serve.api_key_file``,
default ``<data_dir>/serve/api_key``): ``KEY [TENANT [ROLE]]``, the tenant ``default`` and the role ``admin`` when
left out. If there is no key anywhere, one is generated and written to the key file with mode 0600, so a service
started with defaults is never open. Only SHA-256 digests of the keys reach the deployments (and so Serve's stored
config); a request's key is hashed and compared in constant time (:func:`match_key`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, Field

from knowmap.config import KnowMapConfig
from knowmap.errors import ConfigError, KnowMapError
from knowmap.tenancy import DEFAULT_TENANT, ROLES, Role, check_tenant

KEY_PREFIX = "km-"


def key_file(config: KnowMapConfig) -> Path:
    """The key file in force: ``serve.api_key_file`` or ``<data_dir>/serve/api_key``."""
    return Path(config.serve.api_key_file).expanduser() if config.serve.api_key_file else (
        config.paths.api_key)


class Grant(BaseModel):
    """What one accepted key may reach: its digest (never the key), its tenant and its role."""

    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    tenant: str = DEFAULT_TENANT
    role: Role = "admin"


def load_keys(config: KnowMapConfig, *, generate: bool = True) -> tuple[list[Grant], list[str], Path | None]:
    """The accepted keys with their tenants and roles, generating one if none is configured anywhere.

    Args:
        config: ``serve.api_keys``, ``serve.keys`` and ``serve.api_key_file``.
        generate: write a new key to the key file if no key is configured anywhere.

    Returns:
        the grants; the keys known in plain text, admin keys of the ``default`` tenant first (the first is what
        ``knowmap serve`` hands its own client); the key file if keys were read from (or written to) it, else None.

    Raises:
        ConfigError: the key file is readable by others (it must be 0600), a line of it names an invalid tenant or
            role, a key is given twice with different grants, or there is no key while ``generate`` is False.
    """
    s = config.serve
    entries = [(k.strip(), DEFAULT_TENANT, "admin") for k in s.api_keys if k.strip()]
    entries += [(k.key.strip(), k.tenant, k.role) for k in s.keys if k.key.strip()]
    grants = [Grant(digest=k.sha256, tenant=k.tenant, role=k.role) for k in s.keys if k.sha256]
    path: Path | None = key_file(config)
    if path.is_file():
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"API key file {path} is readable by other users; run `chmod 600 {path}`")
        entries += [_key_line(line, path, n) for n, line in enumerate(path.read_text().splitlines(), 1)
                    if line.strip() and not line.lstrip().startswith("#")]
    elif entries or grants:
        path = None
    elif not generate:
        raise ConfigError("no API key configured: set serve.api_keys or serve.keys, or write keys to " + str(path))
    else:
        entries = [(write_new_key(path), DEFAULT_TENANT, "admin")]
    grants += [Grant(digest=digest(key), tenant=tenant, role=role) for key, tenant, role in entries]  # type: ignore[arg-type]
    seen: dict[str, Grant] = {}
    for grant in grants:
        if seen.setdefault(grant.digest, grant) != grant:
            raise ConfigError(f"a key (sha256 {grant.digest[:12]}...) is configured twice with different tenants or "
                              "roles; give each key one tenant and one role")
    admins = [key for key, tenant, role in entries if (tenant, role) == (DEFAULT_TENANT, "admin")]
    plain = list(dict.fromkeys(admins + [key for key, _, _ in entries]))
    if not seen:
        raise ConfigError(f"no API key in {path}: write one `KEY [TENANT [ROLE]]` a line")
    return list(seen.values()), plain, path


def _key_line(line: str, path: Path, number: int) -> tuple[str, str, str]:
    parts = line.split()
    if len(parts) > 3:
        raise ConfigError(f"{path}:{number}: expected `KEY [TENANT [ROLE]]`, got {len(parts)} fields")
    key, tenant, role = (parts + [DEFAULT_TENANT, "admin"][len(parts) - 1:])[:3]
    try:
        check_tenant(tenant)
    except KnowMapError as e:
        raise ConfigError(f"{path}:{number}: {e}") from None
    if role not in ROLES:
        raise ConfigError(f"{path}:{number}: role {role!r} is not one of {', '.join(ROLES)}")
    return key, tenant, role


def add_key(config: KnowMapConfig, tenant: str, role: Role) -> tuple[str, Path]:
    """Generate a key for ``tenant`` with ``role`` and append it to the key file (created with mode 0600, holding
    first the deployment's own admin key unless ``serve.api_keys`` has one); returns the key and the file. A running
    service reads it when restarted or redeployed."""
    check_tenant(tenant)
    if role not in ROLES:
        raise KnowMapError(f"role {role!r} is not one of {', '.join(ROLES)}")
    path = key_file(config)
    if not path.exists() and not config.serve.api_keys:
        write_new_key(path)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{key} {tenant} {role}\n")
    return key, path


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


def match_key(presented: str | None, grants: Iterable[Grant]) -> Grant | None:
    """The grant of a presented key, or None; compared in constant time against every accepted digest."""
    if not presented:
        return None
    candidate, found = digest(presented), None
    for grant in grants:  # no early exit: the time does not tell which key matched
        if hmac.compare_digest(candidate, grant.digest):
            found = grant
    return found
