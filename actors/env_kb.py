"""Env-KB actors: one named Ray actor per environment instance, durable across crashes and retirement.

:class:`EnvKBActor` is a plain class around :class:`DurableEnvironmentKB` (plain data in and out, so it also runs
in-process); Ray is applied in :func:`get_or_create_env_kb` with options from config. The actor is named
``envkb:<env_id>`` in the config's namespace and is detached, so any process (an agent, the retrieval service)
finds the same KB. A crashed actor is restarted by Ray (``max_restarts``) and reloads its snapshot and log, so
every acknowledged write is still there. Reads in flight are retried (``max_task_retries``); writes are not,
because Ray 2.60 runs retries out of order, and a KB only moves forward: measured with 400 pipelined ingests and
a kill, retried writes landed as a scrambled subsequence and most were refused. A write in flight at a crash
fails with ``RayActorError`` instead, leaving the KB an exact prefix of the stream; the writer resends from its
first failed write, in order, and a resent write whose first attempt was logged is recognised and acknowledged
without being applied twice. :func:`retire_env_kb` snapshots and ends an actor; :func:`get_or_create_env_kb`
revives it from disk. On a cluster, ``data_dir`` must be storage that every node sees, since a restarted actor
may land on another node.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from knowmap.config import KnowMapConfig
from knowmap.errors import EnvNotFoundError, KnowMapError
from knowmap.kb.durable_kb import DurableEnvironmentKB
from knowmap.kb.storage import list_env_kbs, validate_env_id
from knowmap.schemas import Observation, Trajectory, Triple

SLOT_LOCK_TIMEOUT_S = 60.0  # a rollout slot waits this long for an episode's KB held by a dying slot

__all__ = ["SLOT_LOCK_TIMEOUT_S", "EnvKBActor", "env_kb_actor_name", "create_env_kb_slot", "env_kb_directory",
           "get_or_create_env_kb", "list_env_kbs", "reset_env_kb", "retire_env_kb"]


class EnvKBActor:
    """The env-KB actor's plain class: validates inputs, returns plain data (``model_dump`` dicts).

    Args:
        env_id: the environment instance; 1 to 128 characters from ``[A-Za-z0-9._-]``.
        directory: the root of all env KBs (``<data_dir>/env_kb``, absolute).
        snapshot_every: writes between snapshots.
        lock_timeout_s: how long opening a KB waits for another process to release it.
    """

    def __init__(self, env_id: str, directory: str, snapshot_every: int = 200, lock_timeout_s: float = 10.0) -> None:
        self._directory, self._snapshot_every, self._lock_timeout_s = directory, snapshot_every, lock_timeout_s
        self._kb = self._open(env_id)

    @ray.method(max_task_retries=0)
    def begin(self, env_id: str) -> None:
        """Hold ``env_id``'s KB and forget its facts, in one call: a rollout slot's episode (or a retried one)
        starts its env KB from step 0."""
        self.switch(env_id)
        self._kb.reset()

    @ray.method(max_task_retries=0)
    def switch(self, env_id: str) -> None:
        """Close (snapshot) the KB this actor holds and open the one of ``env_id`` (a no-op if already open).

        A rollout slot's env-KB actor (:func:`create_env_kb_slot`) serves one episode after another this way,
        instead of paying for a new worker process per episode (~0.5 s of CPU each, measured).
        """
        validate_env_id(env_id)
        if self._kb.env_id == env_id and not self._kb.stats()["closed"]:
            return
        self._kb.close()
        self._kb = self._open(env_id)

    def _open(self, env_id: str) -> DurableEnvironmentKB:
        return DurableEnvironmentKB(env_id, self._directory, snapshot_every=self._snapshot_every,
                                    lock_timeout_s=self._lock_timeout_s)

    @ray.method(max_task_retries=0)  # writes are resent in order by the writer (see the module docstring)
    def ingest(self, observation: Observation | Mapping[str, Any]) -> int:
        """Log and apply one observation; returns the number of facts opened or closed."""
        return self._kb.ingest(observation)

    @ray.method(max_task_retries=0)
    def ingest_many(self, observations: Sequence[Observation | Mapping[str, Any]]) -> dict[str, Any]:
        """Apply a batch of observations whole or not at all (:meth:`DurableEnvironmentKB.ingest_many`); returns
        ``changes`` and the KB's stats after it."""
        changes = self._kb.ingest_many(observations)
        return {"changes": changes, **self.stats()}

    @ray.method(max_task_retries=0)
    def ingest_triples(self, step: int, triples: Sequence[Triple | Mapping[str, Any]],
                       full_sets: Iterable[Sequence[str]] = ()) -> int:
        """Log and apply triples observed at ``step``; returns the number of facts opened or closed."""
        return self._kb.ingest_triples(step, triples, full_sets)

    @ray.method(max_task_retries=0)
    def reset(self) -> None:
        """Forget every fact durably (a retried episode starts its env KB again from step 0)."""
        self._kb.reset()

    def current(self) -> list[dict[str, Any]]:
        return [f.model_dump(mode="json") for f in self._kb.current()]

    def as_of(self, step: int) -> list[dict[str, Any]]:
        return [f.model_dump(mode="json") for f in self._kb.as_of(step)]

    def history(self, subject: str, relation: str) -> list[dict[str, Any]]:
        return [f.model_dump(mode="json") for f in self._kb.history(subject, relation)]

    def all_facts(self) -> list[dict[str, Any]]:
        """Every fact the KB ever held, open and closed, oldest first, with their step ranges."""
        return list(self._kb.kb.to_dict()["facts"])

    def about(self, objects: list[str], step: int | None = None) -> list[dict[str, Any]]:
        return [f.model_dump(mode="json") for f in self._kb.about(objects, step)]

    def segment(self, trajectory: Trajectory | Mapping[str, Any]) -> list[dict[str, Any]]:
        """Sub-goals of a finished trajectory, with the facts this KB holds about the objects they touched."""
        from knowmap.kb.segmentation import SubgoalSegmenter

        traj = trajectory if isinstance(trajectory, Trajectory) else Trajectory.model_validate(trajectory)
        return [s.model_dump(mode="json") for s in SubgoalSegmenter().segment(traj, self._kb.kb)]

    def stats(self) -> dict[str, Any]:
        """``facts``, ``current_facts``, ``last_step``, ``seq``, ``snapshot_seq``, and the actor's ``pid``."""
        return {**self._kb.stats(), "pid": os.getpid()}

    def snapshot(self) -> int:
        """Snapshot now; returns the sequence number it holds."""
        return self._kb.snapshot()

    def close(self) -> dict[str, Any]:
        """Snapshot and release the KB's files; returns the final stats. Writes are refused afterwards."""
        self._kb.close()
        return self._kb.stats()


def env_kb_actor_name(env_id: str) -> str:
    """``envkb:<env_id>``, after checking the env id (:class:`InvalidEnvIdError` names the allowed pattern)."""
    return f"envkb:{validate_env_id(env_id)}"


def env_kb_directory(config: KnowMapConfig) -> Path:
    """Where env KBs live: ``<data_dir>/env_kb``, absolute (actors may run in another working directory)."""
    return config.paths.env_kb.resolve()


def get_or_create_env_kb(env_id: str, config: KnowMapConfig | Mapping[str, Any]) -> ray.actor.ActorHandle:
    """The env-KB actor of ``env_id`` in the config's namespace, created (or revived from disk) if none runs.

    Options from ``config.ray``: ``env_kb_num_cpus``, ``max_restarts``, ``max_task_retries`` (reads only; writes
    are never retried by Ray, see the module docstring), ``env_kb_snapshot_every``. The actor is detached; end it
    with :func:`retire_env_kb`.

    Raises:
        InvalidEnvIdError: ``env_id`` does not match ``[A-Za-z0-9._-]{1,128}`` (or is ``.``/``..``).
        KnowMapError: Ray is not initialised.
    """
    config = _config(config)
    name = env_kb_actor_name(env_id)
    _require_ray()
    options = dict(name=name, namespace=config.ray.namespace, get_if_exists=True, lifetime="detached",
                   num_cpus=config.ray.env_kb_num_cpus, max_restarts=config.ray.max_restarts,
                   max_task_retries=config.ray.max_task_retries, max_concurrency=1)
    return ray.remote(EnvKBActor).options(**options).remote(
        env_id, str(env_kb_directory(config)), config.ray.env_kb_snapshot_every)


def create_env_kb_slot(env_id: str, config: KnowMapConfig) -> ray.actor.ActorHandle:
    """An unnamed env-KB actor owned by the calling actor (a rollout agent), holding ``env_id`` first.

    It shares its owner's fate and moves from episode to episode with :meth:`EnvKBActor.begin`; while an
    episode runs, its KB is held (locked) here, and afterwards :func:`get_or_create_env_kb` serves it by id.
    It is never restarted: Ray restarts an actor by running its constructor again, which would reopen the *first*
    episode's KB while its owner goes on writing the current one (measured: a later batch landed in the first
    episode's KB and ``close`` reported that KB's stats). A slot that dies fails its episode's calls instead, and
    the owner starts a fresh slot for the retry (:class:`knowmap.actors.kb_handles.RayEnvKBSlot`). Opening an
    episode's KB waits up to :data:`SLOT_LOCK_TIMEOUT_S` for a retried episode's previous slot to release it: Ray
    ends the slot of an agent that died asynchronously, which on busy cores can take longer than a few seconds.
    """
    _require_ray()
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(EnvKBActor).options(
        num_cpus=config.ray.env_kb_num_cpus, max_restarts=0, scheduling_strategy=here, max_concurrency=1,
    ).remote(validate_env_id(env_id), str(env_kb_directory(config)), config.ray.env_kb_snapshot_every,
             SLOT_LOCK_TIMEOUT_S)


def retire_env_kb(env_id: str, config: KnowMapConfig | Mapping[str, Any],
                  timeout_s: float = 60.0) -> dict[str, Any] | None:
    """Snapshot the env KB to disk and end its actor (no restart); :func:`get_or_create_env_kb` revives it.

    Returns:
        the KB's final stats, or None if no actor was running for ``env_id`` (its files are already durable).

    Raises:
        InvalidEnvIdError: ``env_id`` is not allowed.
        KnowMapError: Ray is not initialised, or the actor's name was not released within ``timeout_s``.
        ray.exceptions.RayError: the final snapshot failed (the actor is left running, its log intact).
    """
    config = _config(config)
    name = env_kb_actor_name(env_id)
    _require_ray()
    namespace = config.ray.namespace
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None
    stats = ray.get(handle.close.remote(), timeout=timeout_s)
    ray.kill(handle, no_restart=True)
    # The name is released asynchronously; wait so that an immediate revival creates a fresh actor.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return stats
        time.sleep(0.05)
    raise KnowMapError(f"env KB actor {name!r} was killed but its name was not released within {timeout_s} s")


def reset_env_kb(env_id: str, config: KnowMapConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Forget every fact of an env, durably (an operator's repair: a client sent a step it cannot go back from).

    The env's actor, if one runs, is ended first (:func:`retire_env_kb`); its KB is opened here, reset and closed,
    and the next request revives it empty. Returns the KB's stats before the reset.

    Raises:
        EnvNotFoundError: no KB exists for ``env_id``.
        InvalidEnvIdError: ``env_id`` is not allowed.
        KnowMapError: Ray is not initialised, or another process holds the KB open (a running episode's agent).
    """
    config = _config(config)
    directory = env_kb_directory(config)
    if not (directory / validate_env_id(env_id)).is_dir():
        raise EnvNotFoundError(f"no env KB for env id {env_id!r} under {directory}")
    retire_env_kb(env_id, config)
    kb = DurableEnvironmentKB(env_id, directory, snapshot_every=config.ray.env_kb_snapshot_every, lock_timeout_s=5)
    try:
        before = kb.stats()
        kb.reset()
    finally:
        kb.close()
    return before


def _config(config: KnowMapConfig | Mapping[str, Any]) -> KnowMapConfig:
    return config if isinstance(config, KnowMapConfig) else KnowMapConfig.model_validate(dict(config))


def _require_ray() -> None:
    if not ray.is_initialized():
        raise KnowMapError("Ray is not initialised: run inside knowmap.jobs.session.ray_session(config) "
                           "(or call ray.init) first")
