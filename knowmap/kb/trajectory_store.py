"""The training store of trajectories: ``<data_dir>/trajectories/<episode_id>.json``, what training reads.

Expert replays (``knowmap build-kb``), this project's agent rollouts and trajectories contributed through
``POST /v1/trajectories`` all land here, each with its ``source`` and, for contributions, its ``contributor`` (the
caller's key, as the service names it) and ``tenant``; a contribution's file is named by its stored episode id,
``<tenant>@<id>`` outside the default tenant (:mod:`knowmap.tenancy`). A stored episode belongs to whoever stored it
first: a contribution never replaces an expert's, a rollout's or another tenant's, and replaces its own tenant's only
when asked to (``overwrite``) with the key that contributed it or an admin key (:func:`check_contribution`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from knowmap.errors import EpisodeConflictError, EpisodeNotFoundError, ForbiddenError, KnowMapError
from knowmap.layout import DataLayout
from knowmap.schemas import Trajectory
from knowmap.tenancy import SCOPED_PATTERN, owns, unscoped

_FILE_NAME = re.compile(SCOPED_PATTERN)


def save_trajectory(paths: DataLayout, trajectory: Trajectory) -> None:
    """Write ``trajectories/<episode_id>.json`` atomically (a retried episode replaces its file).

    Raises:
        KnowMapError: the episode id cannot name a file (``[A-Za-z0-9._-]{1,128}``, not ``.``/``..``, optionally
            after ``<tenant>@``).
    """
    path = _path(paths, trajectory.episode_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(trajectory.model_dump_json())
    os.replace(tmp, path)


def stored_trajectory(paths: DataLayout, episode_id: str) -> dict[str, Any] | None:
    """The stored trajectory's JSON, or None if there is none (one being replaced right now reads as taken)."""
    path = _path(paths, episode_id)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"source": "agent", "tenant": "?", "contributor": "?"}


def check_contribution(paths: DataLayout, trajectory: Trajectory, *, overwrite: bool = False,
                       admin: bool = False) -> None:
    """Refuse a contribution whose episode id is already stored, unless it may replace it.

    A resend of exactly the stored trajectory (a retry) is accepted. Otherwise the stored episode may be replaced
    only if it is a contribution of the same tenant, ``overwrite`` is asked for, and the caller contributed it or
    is an admin of the tenant.

    Raises:
        EpisodeConflictError: the stored episode is an expert's, this deployment's own, another tenant's, or its
            tenant's while ``overwrite`` is not set.
        ForbiddenError: ``overwrite`` of a trajectory another key of the tenant contributed, by a non-admin key.
    """
    stored = stored_trajectory(paths, trajectory.episode_id)
    if stored is None:
        return
    episode = unscoped(trajectory.tenant, trajectory.episode_id)
    if stored.get("source") == "expert":
        raise EpisodeConflictError(f"episode id {episode!r} is an expert episode; contribute under another id")
    if not stored.get("contributor") or stored.get("tenant", "") != trajectory.tenant:
        raise EpisodeConflictError(f"episode id {episode!r} is taken by another owner; contribute under another id")
    if stored == json.loads(trajectory.model_dump_json()):
        return  # the same contribution again (a retry): nothing changes
    if not overwrite:
        raise EpisodeConflictError(f"episode id {episode!r} is already stored; send overwrite=true (with the key "
                                   "that contributed it, or an admin key) to replace it, or use another id")
    if stored.get("contributor") != trajectory.contributor and not admin:
        raise ForbiddenError(f"episode id {episode!r} was contributed by another key; only that key or an admin "
                             "key of the tenant may overwrite it")


def check_deletion(paths: DataLayout, tenant: str, episode_id: str, contributor: str, admin: bool) -> Trajectory:
    """The stored contribution that ``contributor`` may delete.

    Raises:
        EpisodeNotFoundError: no contribution of ``tenant`` has this (stored) id; an expert's, this deployment's
            own and other tenants' episodes read as absent.
        ForbiddenError: another key of the tenant contributed it and the caller is not an admin.
    """
    stored = stored_trajectory(paths, episode_id) if owns(tenant, episode_id) else None
    episode = unscoped(tenant, episode_id)
    if not stored or not stored.get("contributor") or stored.get("tenant", "") != tenant:
        raise EpisodeNotFoundError(f"no contributed trajectory {episode!r} in this tenant")
    if stored["contributor"] != contributor and not admin:
        raise ForbiddenError(f"episode {episode!r} was contributed by another key; only that key or an admin key "
                             "of the tenant may delete it")
    return Trajectory.model_validate(stored)


def delete_trajectory(paths: DataLayout, episode_id: str) -> bool:
    """Remove a stored trajectory's file (training never reads it again), and the temporary file of a save that a
    crash cut short: no copy of it stays under the data dir. False if there was no stored file."""
    path = _path(paths, episode_id)
    path.with_suffix(".json.tmp").unlink(missing_ok=True)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def contributions(paths: DataLayout, tenant: str) -> list[Trajectory]:
    """The trajectories ``tenant`` contributed through the API, by stored episode id."""
    found = []
    folder = paths.trajectories
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if not owns(tenant, path.stem):
            continue
        try:
            trajectory = Trajectory.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if trajectory.contributor and trajectory.tenant == tenant:
            found.append(trajectory)
    return found


def _path(paths: DataLayout, episode_id: str) -> Any:
    if not _FILE_NAME.fullmatch(episode_id) or episode_id.rpartition("@")[2] in (".", ".."):
        raise KnowMapError(f"episode id {episode_id[:40]!r} cannot name a stored trajectory: use 1 to 128 characters "
                           "from [A-Za-z0-9._-]")
    return paths.trajectory(episode_id)
