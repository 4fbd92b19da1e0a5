"""The agent's KB interfaces (:mod:`knowmap.agent.knowledge`) over Ray actor handles.

:class:`RayKnowledgeBases` is what the rollout pool hands each agent actor: picklable (it carries only the
config), it opens handles inside the actor that uses it. Its env KB slot is an env-KB actor next to the agent,
switched from episode to episode (an actor per episode would cost a worker process each); observations are sent
without waiting (pipelined), in batches of up to :data:`INGEST_BATCH` (one call and one ``fsync`` each; a read
of the KB waits for what was sent before it), and :meth:`RayEnvKBSlot.flush` waits for every acknowledgement.
Ray runs one caller's calls to one actor in order, and only while that actor lives: a failed episode's slot
settles before the episode is retried elsewhere (:meth:`RayEnvKBSlot.discard`), and a slot is never restarted
(:func:`~knowmap.actors.env_kb.create_env_kb_slot`); an env-KB actor that died is killed for good, and the next
episode starts a fresh one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import ray
from ray.exceptions import RayActorError

from knowmap.actors.env_kb import SLOT_LOCK_TIMEOUT_S, create_env_kb_slot
from knowmap.actors.experience import get_experience_kb
from knowmap.config import KnowMapConfig
from knowmap.schemas import Fact, KnowledgeItem, Observation, Subgoal, Trajectory
from knowmap.tenancy import DEPLOYMENT_VIEW

T = TypeVar("T")
INGEST_BATCH = 16  # observations per ingest call: one Ray call and one fsync for up to this many agent steps
SETTLE_TIMEOUT_S = 2 * SLOT_LOCK_TIMEOUT_S  # a failed episode's slot runs what it was sent within this


class RayEnvKBSlot:
    """:class:`~knowmap.agent.knowledge.EnvKBSlot` over an env-KB actor owned by the calling agent actor."""

    def __init__(self, config: KnowMapConfig) -> None:
        self._config = config
        self._handle: ray.actor.ActorHandle | None = None
        self._pending: list[ray.ObjectRef] = []
        self._held: list[dict[str, Any]] = []  # observations not sent yet

    def open(self, env_id: str) -> None:
        self._pending, self._held = [], []
        if self._handle is None:
            self._handle = create_env_kb_slot(env_id, self._config)
        # Not awaited: the actor runs this caller's calls in order, so the ingests behind it land in the new KB; a
        # failure surfaces at the next read or flush (a read waits for every write sent before it).
        self._pending = self._call(lambda h: [h.begin.remote(env_id)])

    def ingest(self, observation: Observation) -> None:
        self._held.append(observation.model_dump())
        if len(self._held) >= INGEST_BATCH:
            self._send()

    def _send(self) -> None:
        """Send the held observations (the actor runs calls in order: a read sent after this sees them)."""
        if self._held:
            held, self._held = self._held, []
            self._pending.append(self._call(lambda h: h.ingest_many.remote(held)))

    def flush(self) -> None:
        self._send()
        pending, self._pending = self._pending, []
        self._call(lambda h: ray.get(pending))

    def facts(self, step: int | None = None) -> list[Fact]:
        if self._handle is None:
            return []
        self.flush()
        rows = self._call(lambda h: ray.get(h.current.remote() if step is None else h.as_of.remote(step)))
        return [Fact.model_validate(row) for row in rows]

    def segment(self, trajectory: Trajectory) -> list[Subgoal]:
        self._send()
        rows = self._call(lambda h: ray.get(h.segment.remote(trajectory.model_dump())))
        return [Subgoal.model_validate(row) for row in rows]

    def close(self) -> dict[str, Any]:
        self._send()
        return self._call(lambda h: ray.get(h.close.remote()))

    def discard(self) -> None:
        """After a failed episode: drop its unsent observations, wait until the slot has run every call the
        episode sent, and release its KB, so that its retry (on whichever agent) finds it settled.

        Ray orders calls per caller *and actor* only: nothing orders this slot's calls after those of the slot
        that plays the retry. Keeping the KB held until this slot's next episode made a retry on another agent
        wait for the lock and fail; releasing it without waiting let the failed attempt's pipelined ``begin`` (a
        reset) and batches run after the retry and land in its finished KB (both reproduced by
        ``tests/ray/test_kb_slot.py``). A slot that does not settle within :data:`SETTLE_TIMEOUT_S` (or has died)
        is killed for good.
        """
        pending, self._pending, self._held = self._pending, [], []
        if self._handle is None:
            return
        closed = self._handle.close.remote()
        calls = [*pending, closed]
        ready, _ = ray.wait(calls, num_returns=len(calls), timeout=SETTLE_TIMEOUT_S)
        try:
            if len(ready) < len(calls):
                raise TimeoutError(f"the env-KB slot did not settle within {SETTLE_TIMEOUT_S} s")
            ray.get(closed)
        except (RayActorError, TimeoutError):
            with contextlib.suppress(Exception):
                ray.kill(self._handle, no_restart=True)
            self._handle = None
        except Exception:  # noqa: BLE001 - the failed episode's own error (a refused write): already reported
            pass

    def _call(self, fn: Callable[[ray.actor.ActorHandle], T]) -> T:
        if self._handle is None:
            raise RuntimeError("no env KB is open in this slot: call open(env_id) first")
        try:
            return fn(self._handle)
        except RayActorError:
            # The env-KB actor died (and may be out of restarts): end it; the next episode starts a fresh one.
            with contextlib.suppress(Exception):
                ray.kill(self._handle, no_restart=True)
            self._handle, self._pending, self._held = None, [], []
            raise


class RayExperience:
    """:class:`~knowmap.agent.knowledge.ExperienceAccess` over the shared experiential-KB actor."""

    def __init__(self, handle: ray.actor.ActorHandle) -> None:
        self.handle = handle

    def start_add(self, trajectory: Trajectory, subgoals: Sequence[Subgoal]) -> ray.ObjectRef:
        return self.handle.add_trajectory_timed.remote(trajectory.model_dump(),
                                                       [g.model_dump(mode="json") for g in subgoals])

    def finish_add(self, pending: ray.ObjectRef) -> dict[str, Any]:
        return ray.get(pending)

    def ensure_index(self, embedder_path: str) -> str:
        return ray.get(self.handle.ensure_index.remote(embedder_path))["version"]

    def search(self, vector: np.ndarray, k: int, task: str | None, version: str) -> list[KnowledgeItem]:
        rows = ray.get(self.handle.search_vector.remote(np.asarray(vector).tolist(), k, task=task, version=version,
                                                        where=DEPLOYMENT_VIEW))
        return [KnowledgeItem.model_validate(row) for row in rows]


class RayKnowledgeBases:
    """:class:`~knowmap.agent.knowledge.KnowledgeBases` on Ray: env KB slots as actors, the shared experiential-KB
    actor of the config's store. Carries only the config across Ray; handles are opened where it is used."""

    def __init__(self, config: KnowMapConfig) -> None:
        self.config = config

    def env_slot(self) -> RayEnvKBSlot:
        return RayEnvKBSlot(self.config)

    def experience(self) -> RayExperience:
        return RayExperience(get_experience_kb(self.config))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.config.model_dump(mode="json"),))


def _rebuild(config: dict[str, Any]) -> RayKnowledgeBases:
    return RayKnowledgeBases(KnowMapConfig.model_validate(config))
