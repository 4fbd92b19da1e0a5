"""The shared experiential-KB actor: one named actor owns the ``ExperienceKB`` and its Milvus (Lite) file.

Milvus Lite allows one process per database file, so every writer and reader goes through this actor. Adds are
idempotent by episode id: a retried episode replaces its rows and never duplicates them.
"""

from __future__ import annotations

import contextlib
from typing import Any

import ray

from knowmap.config import KnowMapConfig
from knowmap.schemas import Subgoal, Trajectory, stable_id


class ExperienceKBActor:
    """Plain class around :class:`knowmap.experience_kb.ExperienceKB`; Ray is applied in :func:`get_experience_kb`."""

    def __init__(self, config: dict[str, Any]) -> None:
        from knowmap.build import open_experience_kb

        self._config = KnowMapConfig.model_validate(config)
        self._context = open_experience_kb(self._config)
        self._kb = self._context.__enter__()

    def add_trajectory(self, trajectory: dict[str, Any] | Trajectory,
                       subgoals: list[dict[str, Any] | Subgoal]) -> int:
        """Store a finished trajectory and its sub-goals (replacing any earlier rows of the same episode)."""
        traj = Trajectory.model_validate(trajectory)
        goals = [Subgoal.model_validate(g) for g in subgoals]
        return self._kb.add_trajectory(traj, goals)

    def search(self, query: str, k: int = 5, task: str | None = None, kind: str | None = "subgoal",
               source: str | None = None) -> list[dict[str, Any]]:
        return [h.model_dump() for h in self._kb.search(query, k, task=task, kind=kind, source=source)]

    def count(self, **filters: Any) -> int:
        return self._kb.count(**filters)

    def has_episode(self, episode_id: str) -> bool:
        return self._kb.has_episode(episode_id)

    def info(self) -> dict[str, Any]:
        return {"collection": self._kb.collection, "uri": self._config.store_uri, "rows": self._kb.count()}

    def close(self) -> None:
        self._context.__exit__(None, None, None)


def actor_name(config: KnowMapConfig) -> str:
    """``experience-<hash of the store URI>``: one actor per Milvus store, whichever job asks for it."""
    return f"experience-{stable_id(config.store_uri)[:12]}"


def get_experience_kb(config: KnowMapConfig) -> ray.actor.ActorHandle:
    """The experiential-KB actor of the config's store and namespace, created on first use (``get_if_exists``).

    It is detached (it serves every job and outlives the one that created it); end it with
    :func:`release_experience_kb`. ``max_restarts`` comes from config; a restarted actor reopens the same Milvus
    file, whose acknowledged inserts survive a killed process. Calls are retried after a restart: adds are
    idempotent by episode id.
    """
    options = dict(name=actor_name(config), namespace=config.ray.namespace, get_if_exists=True,
                   lifetime="detached", num_cpus=0, max_restarts=config.ray.max_restarts,
                   max_task_retries=config.ray.max_task_retries, max_concurrency=1)
    return ray.remote(ExperienceKBActor).options(**options).remote(config.model_dump(mode="json"))


def release_experience_kb(config: KnowMapConfig) -> bool:
    """Close the store (releasing the Milvus Lite file) and end the actor; False if none was running."""
    try:
        handle = ray.get_actor(actor_name(config), namespace=config.ray.namespace)
    except ValueError:
        return False
    with contextlib.suppress(Exception):  # a dying actor has nothing left to close
        ray.get(handle.close.remote(), timeout=60)
    ray.kill(handle, no_restart=True)
    return True
