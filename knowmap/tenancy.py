"""Tenants of the retrieval service: who owns which env KB, trajectory and sub-goal, and what a tenant may see.

Every API key belongs to one tenant and has one role (``read`` < ``write`` < ``admin``). A tenant's env ids and
episode ids are its own namespace: the service stores them as ``<tenant>@<id>`` (:func:`scoped`), and ``@`` can
appear in no id a client sends, so no name of one tenant can reach another's data. The tenant ``default`` is the
deployment's own namespace: its ids are stored as sent, so its keys read the env KBs and experience that the
deployment's own build and rollouts wrote (and an episode id of an expert is refused there).

Experiential rows carry their tenant in ``meta.tenant``: ``""`` for the deployment's own rows (expert replays and
its own rollouts, shared with every tenant), the tenant's name for contributions through the API. A tenant's
retrieve sees expert rows, the shared rows, and its own contributions, never another tenant's
(:func:`experience_filter`). Rows written before tenants existed have no ``meta.tenant``: their expert rows are
still shared; their agent rows are seen by nobody until the KB is rebuilt.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from knowmap.errors import KnowMapError

Role = Literal["read", "write", "admin"]
ROLES: tuple[Role, ...] = ("read", "write", "admin")
Owner = Literal["any", "mine", "shared"]
DEFAULT_TENANT = "default"
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
SCOPED_PATTERN = r"^(?:[a-z0-9][a-z0-9_-]{0,31}@)?[A-Za-z0-9._-]{1,128}$"  # an id as stored
_TENANT = re.compile(TENANT_PATTERN)
SEPARATOR = "@"


def check_tenant(name: object) -> str:
    """Return ``name`` if it can name a tenant.

    Raises:
        KnowMapError: it is not 1 to 32 characters of ``[a-z0-9_-]`` starting with a letter or digit.
    """
    if not isinstance(name, str) or not _TENANT.fullmatch(name):
        raise KnowMapError(f"invalid tenant name {name!r}: use 1 to 32 characters matching {TENANT_PATTERN}")
    return name


def allows(role: str, needed: Role) -> bool:
    """Whether ``role`` may do what ``needed`` may (``admin`` may everything, ``write`` also reads)."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)  # type: ignore[arg-type]


def scoped(tenant: str, name: str) -> str:
    """The stored form of a tenant's env or episode id: ``<tenant>@<name>``; the ``default`` tenant's as sent."""
    return name if tenant == DEFAULT_TENANT else f"{tenant}{SEPARATOR}{name}"


def unscoped(tenant: str, stored: str) -> str:
    """The id as its tenant sent it (the inverse of :func:`scoped`); ids of the shared namespace unchanged."""
    prefix = f"{tenant}{SEPARATOR}"
    return stored[len(prefix):] if tenant != DEFAULT_TENANT and stored.startswith(prefix) else stored


def owns(tenant: str, stored: str) -> bool:
    """Whether a stored env or episode id is in ``tenant``'s namespace."""
    if tenant == DEFAULT_TENANT:
        return SEPARATOR not in stored
    return stored.startswith(f"{tenant}{SEPARATOR}")


def normalise_episode_id(episode_id: str) -> str:
    """How an episode id is compared and stored: surrounding space removed, lower case (``Boil-1 `` = ``boil-1``)."""
    return episode_id.strip().lower()


def experience_filter(tenant: str, *, owner: Owner = "any", source: str | None = None,
                      split: str | None = None) -> dict[str, Any]:
    """The vector-store filter (:func:`knowmap.kb.store_rows.build_filter`) of the experience ``tenant`` may see.

    Args:
        tenant: the caller's tenant.
        owner: ``any`` = shared rows (expert, the deployment's own) and the tenant's own contributions; ``mine`` =
            only its own contributions; ``shared`` = only the shared rows. Another tenant's never.
        source: only ``expert`` or only ``agent`` rows; None = both.
        split: only rows of this ScienceWorld split (``train``, ``dev``, ``test``); None = all.
    """
    shared: list[dict[str, Any]] = [{"source": "expert"}, {"meta.tenant": ""}]
    mine: list[dict[str, Any]] = [{"source": "agent", "meta.tenant": tenant}]
    found: dict[str, Any] = {"$or": {"any": shared + mine, "mine": mine, "shared": shared}[owner]}
    if source is not None:
        found["source"] = source
    if split is not None:
        found["meta.split"] = split
    return found


# What the deployment's own agents read (in-process, on the rollout pool): they act for the default tenant.
DEPLOYMENT_VIEW = experience_filter(DEFAULT_TENANT)
