"""The shared experiential-KB actor: one named actor per store owns the :class:`VersionedExperienceKB`.

Milvus Lite allows one process per database file, so every writer and reader goes through this actor (see
:mod:`knowmap.kb.experience_versions` for what it holds and why adds survive a re-index). Re-indexing runs in its
own thread (concurrency group ``reindex``) so searches and adds go on meanwhile; so does adding a trajectory
(``contribute``, ``serve.contribution_workers`` threads: embedding a 2,000-step trajectory's sub-goals takes
seconds, and neither readers nor another tenant's write must wait on it).
"""

from __future__ import annotations

import contextlib
from typing import Any

import ray

from knowmap.config import KnowMapConfig
from knowmap.kb.experience_versions import VersionedExperienceKB
from knowmap.models.embedder import low_priority
from knowmap.schemas import stable_id


class ExperienceKBActor(VersionedExperienceKB):
    """The Ray actor's class: :class:`VersionedExperienceKB` with re-indexing in its own concurrency group."""

    @ray.method(concurrency_group="reindex")
    def ensure_index(self, embedder_path: str, make_current: bool = False) -> dict[str, Any]:
        """At the lowest CPU priority (:func:`low_priority`): a swap re-indexes while the service searches."""
        return low_priority(super().ensure_index, embedder_path, make_current)

    @ray.method(concurrency_group="contribute")
    def add_trajectory(self, trajectory: dict[str, Any], subgoals: list[dict[str, Any]]) -> int:
        """Embedding a long trajectory's sub-goals takes seconds: in its own thread, searches go on meanwhile."""
        return super().add_trajectory(trajectory, subgoals)

    @ray.method(concurrency_group="contribute")
    def add_trajectory_timed(self, trajectory: dict[str, Any], subgoals: list[dict[str, Any]]) -> dict[str, Any]:
        """The rollout pool's pipelined add: the agent moves on, the pool awaits this acknowledgement."""
        return super().add_trajectory_timed(trajectory, subgoals)

    @ray.method(concurrency_group="contribute")
    def delete_episode(self, episode_id: str) -> int:
        """In the write group with adds; the service runs one write per tenant at a time (episode ids are scoped by
        tenant), so a delete and an add (or overwrite) of one episode never interleave."""
        return super().delete_episode(episode_id)

    @ray.method(concurrency_group="contribute")
    def purge(self, replaced: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
        """In the write group with adds and deletes; an add waits while the vector store rewrites a collection, so
        none lands in the copy being replaced."""
        return super().purge(replaced)


def experience_actor_name(config: KnowMapConfig) -> str:
    """``experience-<hash of the store URI>``: one actor per Milvus store, whichever job asks for it."""
    return f"experience-{stable_id(config.store_uri)[:12]}"


def get_experience_kb(config: KnowMapConfig) -> ray.actor.ActorHandle:
    """The experiential-KB actor of the config's store and namespace, created on first use (``get_if_exists``).

    It is detached (it serves every job and outlives the one that created it); end it with
    :func:`release_experience_kb`. ``max_restarts`` comes from config; a restarted actor reopens the same Milvus
    file, whose acknowledged inserts survive a killed process. Calls are retried after a restart: adds are
    idempotent by episode id. A restarted actor holds only ``models.embedder``'s version again: callers that
    serve another one call :meth:`ExperienceKBActor.ensure_index` (the retrieval service does, when it starts).
    """
    options = dict(name=experience_actor_name(config), namespace=config.ray.namespace, get_if_exists=True,
                   lifetime="detached", num_cpus=0, max_restarts=config.ray.max_restarts,
                   max_task_retries=config.ray.max_task_retries, max_concurrency=1)
    # One write thread per service write worker: the service runs a tenant's writes one at a time, so an add and a
    # delete of one episode still never interleave, and another tenant's write is not queued behind them.
    writers = config.serve.contribution_workers
    actor = ray.remote(concurrency_groups={"reindex": 1, "contribute": writers})(ExperienceKBActor)
    return actor.options(**options).remote(config.model_dump(mode="json"))


def release_experience_kb(config: KnowMapConfig) -> bool:
    """Close the store (releasing the Milvus Lite file) and end the actor; False if none was running."""
    try:
        handle = ray.get_actor(experience_actor_name(config), namespace=config.ray.namespace)
    except ValueError:
        return False
    with contextlib.suppress(Exception):  # a dying actor has nothing left to close
        ray.get(handle.close.remote(), timeout=60)
    ray.kill(handle, no_restart=True)
    return True
