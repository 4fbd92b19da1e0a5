"""The training store of trajectories: ``<data_dir>/trajectories/<episode_id>.json``, what training reads.

Expert replays (``knowmap build-kb``), this project's agent rollouts and trajectories contributed through
``POST /v1/trajectories`` all land here, each with its ``source`` and, for contributions, its ``contributor`` (the
caller's key, as the service names it). A stored episode id belongs to whoever stored it first: a contribution may
replace only its own contributor's file, never an expert's, a rollout's or another client's.
"""

from __future__ import annotations

import json
import os
import re

from knowmap.errors import EpisodeConflictError, KnowMapError
from knowmap.layout import DataLayout
from knowmap.schemas import ENV_ID_PATTERN, Trajectory

_FILE_NAME = re.compile(ENV_ID_PATTERN)


def save_trajectory(paths: DataLayout, trajectory: Trajectory) -> None:
    """Write ``trajectories/<episode_id>.json`` atomically (a retried episode replaces its file).

    Raises:
        KnowMapError: the episode id cannot name a file (``[A-Za-z0-9._-]{1,128}``, not ``.``/``..``).
    """
    episode = trajectory.episode_id
    if not _FILE_NAME.fullmatch(episode) or episode in (".", ".."):
        raise KnowMapError(f"episode id {episode[:40]!r} cannot name a stored trajectory: use 1 to 128 characters "
                           "from [A-Za-z0-9._-]")
    path = paths.trajectory(episode)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(trajectory.model_dump_json())
    os.replace(tmp, path)


def check_contribution(paths: DataLayout, trajectory: Trajectory) -> None:
    """Refuse a contribution whose episode id is already stored by someone else.

    Raises:
        EpisodeConflictError: the stored episode is an expert's, this project's own, or another contributor's.
    """
    path = paths.trajectory(trajectory.episode_id)
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # being replaced right now, or damaged: treat as taken rather than overwrite
        stored = {}
    if stored.get("source") == "expert":
        raise EpisodeConflictError(f"episode id {trajectory.episode_id!r} is an expert episode; contribute under "
                                   "another id")
    if stored.get("contributor", "") != trajectory.contributor:
        raise EpisodeConflictError(f"episode id {trajectory.episode_id!r} was stored by another contributor; "
                                   "contribute under another id")
