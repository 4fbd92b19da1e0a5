"""The experiential KB across embedder versions: one collection per model, re-indexed without losing adds.

Milvus Lite allows one process per database file, so one owner holds this class: the shared experiential-KB actor
on Ray, or the process itself with a zero-worker pool. Adds are idempotent by episode id: a retried episode
replaces its rows and never duplicates them.

It holds one collection per embedder version (vectors of two models never mix). :meth:`ensure_index` builds a new
version's collection by re-embedding the current one's rows, and returns when it is complete; from the moment it
starts, every add goes to all held versions, so nothing added during a re-index is missed. A search names the
version whose model embedded its query (:meth:`search_vector`), so a retrieval service that is switching models
searches the matching collection throughout. Older versions stay held for rollback until :meth:`release_index`.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np

from knowmap.config import KnowMapConfig
from knowmap.errors import KnowMapError, VersionNotIndexedError
from knowmap.kb.experience_kb import ExperienceKB
from knowmap.kb.vectorstore import VectorStore
from knowmap.models.embedder import Embedder, embedder_version, trace_elsewhere
from knowmap.schemas import Subgoal, Trajectory


class VersionedExperienceKB:
    """The experiential KB in one collection per embedder version, over one vector store (see the module
    docstring). The Ray layer runs it as the shared actor (:mod:`knowmap.actors.experience`); in-process it serves
    a zero-worker rollout pool.

    Args:
        config: ``KnowMapConfig.model_dump()``; ``models.embedder`` is the first (current) version.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = KnowMapConfig.model_validate(config)
        cfg = self._config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self._store = VectorStore.from_config(cfg)
        try:
            embedder = Embedder(cfg.models.embedder, device=cfg.models.device, batch_size=cfg.models.batch_size,
                                traced_dir=cfg.paths.traced_models)
            kb = ExperienceKB(self._store, embedder, collection_prefix=cfg.store.collection_prefix)
        except BaseException:
            self._store.close()
            raise
        self._lock = threading.Lock()  # guards _kbs and _current (re-indexing runs in another thread)
        self._kbs = {embedder.version: kb}
        self._paths = {embedder.version: embedder.name_or_path}
        self._current = embedder.version
        self._deleted: set[str] = set()  # episodes deleted while this process runs (see delete_episode)

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

    def add_trajectory_timed(self, trajectory: dict[str, Any] | Trajectory,
                             subgoals: list[dict[str, Any] | Subgoal]) -> dict[str, Any]:
        """:meth:`add_trajectory`, reporting ``rows`` and ``seconds`` (embedding and storing, every held version):
        what a rollout counts as its experiential-KB ingest time."""
        started = time.perf_counter()
        rows = self.add_trajectory(trajectory, subgoals)
        return {"rows": rows, "seconds": time.perf_counter() - started}

    def search(self, query: str, k: int = 5, task: str | None = None, kind: str | None = "subgoal",
               source: str | None = None) -> list[dict[str, Any]]:
        """The current version's ``k`` best rows for a text query (embedded here)."""
        return [h.model_dump() for h in self._kb.search(query, k, task=task, kind=kind, source=source)]

    def search_vector(self, vector: Any, k: int = 5, task: str | None = None, version: str | None = None,
                      kind: str | None = "subgoal", source: str | None = None,
                      where: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The ``k`` best rows for a query embedded elsewhere, in the collection of the embedder ``version`` that
        embedded it (None = the current one), among those matching ``where`` (e.g. a tenant's visibility).

        Raises:
            VersionNotIndexedError: ``version`` is not indexed here (the message lists the held versions).
        """
        return self.search_vectors([(vector, k, task, where)], version, kind=kind, source=source)[0]

    def search_vectors(self, searches: list[tuple[Any, int, str | None, dict[str, Any] | None]],
                       version: str | None = None, kind: str | None = "subgoal",
                       source: str | None = None) -> list[list[dict[str, Any]]]:
        """Several :meth:`search_vector` searches ``(vector, k, task, where)`` in one call, as a retrieval service
        batches its concurrent requests: the searches that share ``k``, task and filter go to the vector store as
        one multi-vector query. Returns each search's rows, in order.

        Raises:
            VersionNotIndexedError: ``version`` is not indexed here (the message lists the held versions).
        """
        with self._lock:
            kb = self._kbs.get(version or self._current)
            held = sorted(self._kbs)
        if kb is None:
            raise VersionNotIndexedError(f"no experiential collection for embedder version {version!r}; "
                                         f"indexed: {held}. Call ensure_index(<model path>) first")
        groups: dict[str, list[int]] = {}
        for i, (_, k, task, where) in enumerate(searches):
            groups.setdefault(json.dumps([k, task, where], sort_keys=True, default=str), []).append(i)
        found: list[list[dict[str, Any]]] = [[] for _ in searches]
        for members in groups.values():
            _, k, task, where = searches[members[0]]
            vectors = np.stack([np.asarray(searches[i][0], dtype=np.float32) for i in members])  # (n, dim)
            hits = kb.search_vectors(vectors, k, task=task, kind=kind, source=source, where=where)
            for i, items in zip(members, hits, strict=True):
                found[i] = [h.model_dump() for h in items]
        return found

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
        cfg = self._config
        version, copied = embedder_version(embedder_path), 0  # no model load when the version is held
        with self._lock:
            kb, source = self._kbs.get(version), self._kbs[self._current]
        if kb is None:
            trace_elsewhere(embedder_path, cfg.models.device, cfg.paths.traced_models)
            embedder = Embedder(embedder_path, device=cfg.models.device, batch_size=cfg.models.batch_size,
                                traced_dir=cfg.paths.traced_models)
            kb = ExperienceKB(self._store, embedder, collection_prefix=cfg.store.collection_prefix)
            with self._lock:  # registered before the copy, so that concurrent adds reach it too
                self._kbs[embedder.version] = kb
                self._paths[embedder.version] = embedder.name_or_path
            try:
                copied = kb.copy_from(source)
                with self._lock:
                    deleted = sorted(self._deleted)
                for episode in deleted:  # deleted while the copy ran: it may have copied them back
                    kb.delete_episode(episode)
            except BaseException:
                with self._lock:
                    del self._kbs[embedder.version]
                raise
        if make_current:
            with self._lock:
                self._current = kb.embedder.version
        return {"version": kb.embedder.version, "collection": kb.collection, "rows": kb.count(), "copied": copied}

    def set_current(self, version: str) -> None:
        """Make a held version the one that :meth:`search`, :meth:`count` and :meth:`info` use.

        Raises:
            VersionNotIndexedError: ``version`` is not held here.
        """
        with self._lock:
            if version not in self._kbs:
                raise VersionNotIndexedError(f"embedder version {version!r} is not indexed; indexed: "
                                             f"{sorted(self._kbs)}. Call ensure_index(<model path>) first")
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

    def delete_episode(self, episode_id: str) -> int:
        """Delete an episode's rows from every collection of this KB in the store: the held versions and any older
        one still on disk (a later re-index or rollback must not bring them back). Each collection that held them
        is purged: when this returns, their texts and vectors are gone from the store's files. Returns the rows
        deleted from the current version. A re-index running meanwhile deletes them again from its copy when it
        ends."""
        with self._lock:
            self._deleted.add(episode_id)
            held = dict(self._kbs)
            current = self._current
        found = held[current].delete_episode(episode_id)
        for version, kb in held.items():
            if version != current:
                kb.delete_episode(episode_id)
        for name in self._older_collections(held):
            self._store.delete(name, filter={"episode_id": episode_id})
        return found

    def purge(self, replaced: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
        """Remove from the store's files the bytes of every row deleted or replaced so far, in every collection of
        this KB, after re-adding the episodes ``replaced`` (e.g. without the facts of a deleted env): their rows in
        older collections, which cannot be re-embedded without their model, are deleted first.

        Returns:
            ``{"collections": <how many were purged>, "seconds": <how long it took>}``.
        """
        started = time.perf_counter()
        with self._lock:
            held = dict(self._kbs)
        names = {kb.collection for kb in held.values()}
        for name in self._older_collections(held):  # only those that held a replaced episode
            if replaced and self._store.count(name, {"episode_id": list(replaced)}):
                self._store.delete(name, filter={"episode_id": list(replaced)}, purge=False)
                names.add(name)
        for name in sorted(names):
            self._store.purge(name)
        return {"collections": len(names), "seconds": time.perf_counter() - started}

    def _older_collections(self, held: dict[str, ExperienceKB]) -> list[str]:
        """This KB's collections in the store that no held version names (older embedder versions)."""
        prefix, names = f"{self._config.store.collection_prefix}_", {kb.collection for kb in held.values()}
        return [n for n in self._store.list_collections() if n.startswith(prefix) and n not in names]

    def subgoals(self, episode_id: str) -> list[dict[str, Any]]:
        """The sub-goals the current version holds for an episode (with their reflections), in order."""
        return [g.model_dump(mode="json") for g in self._kb.get_subgoals(episode_id)]

    def count(self, **filters: Any) -> int:
        return self._kb.count(**filters)

    def has_episode(self, episode_id: str) -> bool:
        return self._kb.has_episode(episode_id)

    def info(self) -> dict[str, Any]:
        return {"collection": self._kb.collection, "uri": self._config.store_uri, "rows": self._kb.count()}

    def close(self) -> None:
        self._store.close()
