"""The shared experiential-KB actor: one named actor owns the ``ExperienceKB`` and its Milvus (Lite) file.

Milvus Lite allows one process per database file, so every writer and reader goes through this actor. Adds are
idempotent by episode id: a retried episode replaces its rows and never duplicates them.

The actor holds one collection per embedder version (vectors of two models never mix). :meth:`ensure_index`
builds a new version's collection by re-embedding the current one's rows, and returns when it is complete; from
the moment it starts, every add goes to all held versions, so nothing added during a re-index is missed. A
search names the version whose model embedded its query (:meth:`search_vector`), so a retrieval service that is
switching models searches the matching collection throughout. Older versions stay held for rollback until
:meth:`release_index`. Re-indexing runs in its own thread (concurrency group ``reindex``) so searches and adds
go on meanwhile.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import ray

from knowmap.config import KnowMapConfig
from knowmap.errors import KnowMapError
from knowmap.schemas import Subgoal, Trajectory, stable_id


class ExperienceKBActor:
    """Plain class around :class:`knowmap.kb.experience_kb.ExperienceKB`; Ray is applied in :func:`get_experience_kb`.

    Args:
        config: ``KnowMapConfig.model_dump()``; ``models.embedder`` is the first (current) version.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        from knowmap.kb.experience_kb import ExperienceKB
        from knowmap.kb.vectorstore import VectorStore
        from knowmap.models.embedder import Embedder

        self._config = KnowMapConfig.model_validate(config)
        cfg = self._config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self._store = VectorStore(cfg.store_uri, token=cfg.store.token, flat_max_rows=cfg.store.flat_max_rows,
                                  hnsw_m=cfg.store.hnsw_m, hnsw_ef_construction=cfg.store.hnsw_ef_construction,
                                  hnsw_ef=cfg.store.hnsw_ef)
        try:
            embedder = Embedder(cfg.models.embedder, device=cfg.models.device, batch_size=cfg.models.batch_size)
            kb = ExperienceKB(self._store, embedder, collection_prefix=cfg.store.collection_prefix)
        except BaseException:
            self._store.close()
            raise
        self._lock = threading.Lock()  # guards _kbs and _current (re-indexing runs in another thread)
        self._kbs = {embedder.version: kb}
        self._paths = {embedder.version: embedder.name_or_path}
        self._current = embedder.version

    @property
    def _kb(self) -> Any:
        with self._lock:
            return self._kbs[self._current]

    def add_trajectory(self, trajectory: dict[str, Any] | Trajectory,
                       subgoals: list[dict[str, Any] | Subgoal]) -> int:
        """Store a finished trajectory and its sub-goals in every held version (replacing earlier rows of the
        same episode); returns the rows written to the current version."""
        traj = Trajectory.model_validate(trajectory)
        goals = [Subgoal.model_validate(g) for g in subgoals]
        with self._lock:
            current, others = self._kbs[self._current], [kb for v, kb in self._kbs.items() if v != self._current]
        written = current.add_trajectory(traj, goals)
        for kb in others:
            kb.add_trajectory(traj, goals)
        return written

    def search(self, query: str, k: int = 5, task: str | None = None, kind: str | None = "subgoal",
               source: str | None = None) -> list[dict[str, Any]]:
        """The current version's ``k`` best rows for a text query (embedded here)."""
        return [h.model_dump() for h in self._kb.search(query, k, task=task, kind=kind, source=source)]

    def search_vector(self, vector: Any, k: int = 5, task: str | None = None, version: str | None = None,
                      kind: str | None = "subgoal", source: str | None = None) -> list[dict[str, Any]]:
        """The ``k`` best rows for a query embedded elsewhere, in the collection of the embedder ``version`` that
        embedded it (None = the current one).

        Raises:
            KnowMapError: ``version`` is not indexed here (the message lists the held versions).
        """
        with self._lock:
            kb = self._kbs.get(version or self._current)
            held = sorted(self._kbs)
        if kb is None:
            raise KnowMapError(f"no experiential collection for embedder version {version!r}; indexed: {held}. "
                               "Call ensure_index(<model path>) first")
        return [h.model_dump() for h in kb.search_vector(vector, k, task=task, kind=kind, source=source)]

    @ray.method(concurrency_group="reindex")
    def ensure_index(self, embedder_path: str, make_current: bool = False) -> dict[str, Any]:
        """Hold the collection of the embedder at ``embedder_path``, re-embedding the current version's rows into
        it if it is new; returns when the collection is complete.

        Adds made while it runs go to both versions. Idempotent: a held version returns at once.

        Args:
            embedder_path: a sentence-transformers model directory (or "" for the packaged MiniLM).
            make_current: also make it the version that :meth:`search` and :meth:`count` use.

        Returns:
            ``{"version", "collection", "rows", "copied"}``.

        Raises:
            EmbedderError: the model cannot be loaded.
        """
        from knowmap.kb.experience_kb import ExperienceKB
        from knowmap.models.embedder import Embedder, embedder_version

        cfg = self._config
        version, copied = embedder_version(embedder_path), 0  # no model load when the version is held
        with self._lock:
            kb, source = self._kbs.get(version), self._kbs[self._current]
        if kb is None:
            embedder = Embedder(embedder_path, device=cfg.models.device, batch_size=cfg.models.batch_size)
            kb = ExperienceKB(self._store, embedder, collection_prefix=cfg.store.collection_prefix)
            with self._lock:  # registered before the copy, so that concurrent adds reach it too
                self._kbs[embedder.version] = kb
                self._paths[embedder.version] = embedder.name_or_path
            try:
                copied = kb.copy_from(source)
            except BaseException:
                with self._lock:
                    del self._kbs[embedder.version]
                raise
        if make_current:
            with self._lock:
                self._current = kb.embedder.version
        return {"version": kb.embedder.version, "collection": kb.collection, "rows": kb.count(), "copied": copied}

    def set_current(self, version: str) -> None:
        """Make a held version the one that :meth:`search`, :meth:`count` and :meth:`info` use."""
        with self._lock:
            if version not in self._kbs:
                raise KnowMapError(f"embedder version {version!r} is not indexed; indexed: {sorted(self._kbs)}")
            self._current = version

    def release_index(self, version: str) -> bool:
        """Stop holding (and adding to) a version other than the current one; its collection stays on disk.
        Returns False if it was not held."""
        with self._lock:
            if version == self._current:
                raise KnowMapError(f"{version!r} is the current version; set_current another one first")
            return self._kbs.pop(version, None) is not None

    def versions(self) -> dict[str, Any]:
        """``{"current": version, "held": {version: model path}}``."""
        with self._lock:
            return {"current": self._current, "held": {v: self._paths[v] for v in self._kbs}}

    def count(self, **filters: Any) -> int:
        return self._kb.count(**filters)

    def has_episode(self, episode_id: str) -> bool:
        return self._kb.has_episode(episode_id)

    def info(self) -> dict[str, Any]:
        return {"collection": self._kb.collection, "uri": self._config.store_uri, "rows": self._kb.count()}

    def close(self) -> None:
        self._store.close()


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
    actor = ray.remote(concurrency_groups={"reindex": 1})(ExperienceKBActor)
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
