"""The retrieval service's env-KB actors, bounded: at most ``serve.max_env_actors`` alive, idle ones ended.

Every env id the API is sent has its own env-KB actor (:mod:`knowmap.actors.env_kb`), a worker process of
~65 MB. :class:`EnvActors` keeps their handles in least-recently-used order and holds the number alive to
``serve.max_env_actors``: opening one more ends the least recently used actor that has no call in flight
(:func:`~knowmap.actors.env_kb.retire_env_kb`: snapshot, then end), and a thread ends actors unused for
``serve.env_idle_s``. An ended env is revived from disk, with every acknowledged fact, on its next request. A call
that reaches an actor as it is being ended (from another replica, or a restart) sees it closed or dead, and is
sent again to the revived one.

The bound is per retriever replica; actors it did not start (an earlier service's, still alive) are adopted at
start, oldest first.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import OrderedDict
from typing import Any

import ray
from ray.exceptions import RayActorError

from knowmap.actors.env_kb import env_kb_directory, get_or_create_env_kb, retire_env_kb
from knowmap.config import KnowMapConfig
from knowmap.errors import EnvKBClosedError, EnvNotFoundError
from knowmap.kb.storage import validate_env_id

logger = logging.getLogger("ray.serve")

_PREFIX = "envkb:"
_ATTEMPTS = 4


class EnvActors:
    """Handles of the env-KB actors this replica uses, bounded in number and idle time (see the module doc).

    Args:
        config: ``serve.max_env_actors``, ``serve.env_idle_s``, the data dir and namespace.
        watch: start the thread that ends idle actors.
    """

    def __init__(self, config: KnowMapConfig, watch: bool = True) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._handles: OrderedDict[str, Any] = OrderedDict()  # env id -> handle, least recently used first
        self._used: dict[str, float] = {}  # env id -> monotonic time of its last call's end
        self._busy: dict[str, int] = {}  # env id -> calls in flight
        for name in self._alive_names():
            self._handles[name[len(_PREFIX):]] = None  # adopted: its handle is looked up on first use
            self._used[name[len(_PREFIX):]] = time.monotonic()
        if watch:
            threading.Thread(target=self._watch, name="env-idle-eviction", daemon=True).start()

    def exists(self, env_id: str) -> bool:
        """Whether the env has a KB: an actor this replica holds, or files on disk."""
        return env_id in self._handles or (env_kb_directory(self._config) / env_id).is_dir()

    def call(self, env_id: str, method: str, *args: Any, create: bool = False) -> Any:
        """Call ``method`` on the env's actor and wait for its answer; the actor is started (or revived from disk)
        if none runs.

        Raises:
            EnvNotFoundError: ``create`` is False and the env has no KB.
            InvalidEnvIdError: the env id is not allowed.
        """
        validate_env_id(env_id)
        if not create and not self.exists(env_id):
            raise EnvNotFoundError(f"no env KB for env id {env_id!r}: POST /v1/envs/{env_id}/observations first")
        with self._lock:
            self._busy[env_id] = self._busy.get(env_id, 0) + 1
        try:
            for attempt in range(_ATTEMPTS):
                handle = self._handle(env_id)
                try:
                    return ray.get(getattr(handle, method).remote(*args))
                except (RayActorError, EnvKBClosedError):  # ended meanwhile: revive from disk and send again
                    with self._lock:
                        if self._handles.get(env_id) is handle:
                            self._handles[env_id] = None
                    if attempt == _ATTEMPTS - 1:
                        raise
                    time.sleep(0.05 * 2**attempt)  # an ending actor releases its name asynchronously
            raise AssertionError("unreachable")
        finally:
            with self._lock:
                self._busy[env_id] -= 1
                self._used[env_id] = time.monotonic()
                if not self._busy[env_id] and env_id not in self._handles:  # ended meanwhile: forget it
                    del self._busy[env_id], self._used[env_id]

    def remove(self, env_id: str) -> int:
        """End the env's actor (if one runs) and delete its files; returns how many files went. A write racing the
        delete may find the env gone (404) or start it again, empty.

        Raises:
            EnvNotFoundError: no KB exists for ``env_id``.
        """
        validate_env_id(env_id)
        if not self.exists(env_id):
            raise EnvNotFoundError(f"no env KB for env id {env_id!r}")
        with self._lock:
            self._handles.pop(env_id, None)
        retire_env_kb(env_id, self._config)
        directory = env_kb_directory(self._config) / env_id
        files = sum(1 for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0
        if directory.is_dir():
            shutil.rmtree(directory)
        return files

    def alive(self) -> int:
        """Env-KB actors this replica holds open."""
        return len(self._handles)

    def _handle(self, env_id: str) -> Any:
        with self._lock:
            if env_id in self._handles:
                self._handles.move_to_end(env_id)
                handle = self._handles[env_id]
                if handle is not None:
                    return handle
            over = [e for e in self._handles if e != env_id][:max(0, len(self._handles) + (
                env_id not in self._handles) - self._config.serve.max_env_actors)]
        for victim in over:
            self._evict(victim)
        handle = get_or_create_env_kb(env_id, self._config)
        with self._lock:
            self._handles[env_id] = handle
            self._handles.move_to_end(env_id)
        return handle

    def _evict(self, env_id: str) -> None:
        """End one env's actor (snapshot first) unless a call is in flight on it."""
        with self._lock:
            if self._busy.get(env_id, 0) or env_id not in self._handles:
                return
            del self._handles[env_id]
            self._used.pop(env_id, None)
        try:
            retire_env_kb(env_id, self._config)
        except Exception:  # noqa: BLE001 - a failed snapshot leaves the actor running, its log intact
            logger.warning("could not end the env-KB actor of %r; it keeps running", env_id, exc_info=True)

    def _watch(self) -> None:
        idle = self._config.serve.env_idle_s
        while True:
            time.sleep(min(60.0, max(1.0, idle / 4)))
            now = time.monotonic()
            with self._lock:
                stale = [e for e in self._handles if now - self._used.get(e, now) > idle and not self._busy.get(e)]
            for env_id in stale:
                self._evict(env_id)

    def _alive_names(self) -> list[str]:
        namespace = self._config.ray.namespace
        try:
            actors = ray.util.list_named_actors(all_namespaces=True)
        except Exception:  # noqa: BLE001 - adoption is best effort: unadopted actors still end when idle elsewhere
            return []
        return [a["name"] for a in actors if a.get("namespace") == namespace and a["name"].startswith(_PREFIX)]
