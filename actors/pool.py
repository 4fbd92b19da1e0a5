"""The rollout pool: episode specs scheduled over N agent actors with ``ray.wait``; results come back as values.

The agents are :class:`knowmap.agent.worker.AgentWorker`, the one episode path: with ``num_workers=0`` the pool
runs one in this process without Ray (over :class:`~knowmap.agent.knowledge.LocalKnowledgeBases`), otherwise as
Ray actors over the KB actors (:class:`~knowmap.actors.kb_handles.RayKnowledgeBases`). One episode is in flight
per actor; an actor moves on to its next episode once the env KB has acknowledged its last one, while the pool
awaits the experiential KB's acknowledgement (embedding the sub-goals) before it reports the episode done (at
most two such pending adds per actor). An episode whose actor died, whose add failed, or whose result says it is
``retryable`` (its JVM or its env-KB actor died), is retried up to ``ray.max_episode_retries`` times on a live
actor; a dead actor is replaced. Episodes are idempotent by id (the env KB restarts from step 0, the
experiential KB replaces the episode's rows), so a retry never duplicates.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from knowmap.actors.experience import get_experience_kb
from knowmap.actors.kb_handles import RayKnowledgeBases
from knowmap.agent.knowledge import LocalKnowledgeBases
from knowmap.agent.rollout import EpisodeSpec
from knowmap.agent.worker import AgentWorker, settle_add
from knowmap.config import KnowMapConfig
from knowmap.errors import KnowMapError, is_retryable
from knowmap.results import EpisodeResult

_ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


def default_workers(config: KnowMapConfig) -> int:
    """``ray.num_workers`` if set, else as many agents as the cluster's free CPUs (and ``ray.agent_resources``)
    fit now, or this machine's cores before Ray starts."""
    if config.ray.num_workers:
        return config.ray.num_workers
    if ray.is_initialized():
        available = ray.available_resources()
        return max(1, min(int(available.get(name, 0) // amount) for name, amount in _ask(config).items()
                          if amount > 0))
    return os.cpu_count() or 1


def wait_for_room(config: KnowMapConfig, timeout_s: float = 120.0) -> None:
    """Return once the cluster has room for one agent actor; fail with a clear error instead of queueing forever.

    Raises:
        KnowMapError: no node offers what an agent asks for, or nothing frees up within ``timeout_s`` (other
            actors, e.g. Serve replicas, hold the CPUs).
    """
    ask = _ask(config)
    total = ray.cluster_resources()
    if any(total.get(name, 0.0) < amount for name, amount in ask.items()):
        raise KnowMapError(f"no node can host an agent actor: each asks for {ask}, the cluster offers "
                           f"{ {n: total.get(n, 0.0) for n in ask} }; lower ray.num_cpus_per_agent or "
                           "ray.agent_resources, or add nodes that offer them")
    deadline = time.monotonic() + timeout_s
    while True:
        free = ray.available_resources()
        if all(free.get(name, 0.0) >= amount for name, amount in ask.items()):
            return
        if time.monotonic() > deadline:
            raise KnowMapError(f"no room for an agent actor ({ask}) after {timeout_s:.0f} s: free "
                               f"{ {n: free.get(n, 0.0) for n in ask} } of {ask}; other actors hold the rest (Serve "
                               "replicas reserve serve.*_num_cpus); lower those or ray.num_cpus_per_agent")
        time.sleep(0.5)


def _ask(config: KnowMapConfig) -> dict[str, float]:
    """What one agent actor asks Ray for: its CPUs and the custom resources of ``ray.agent_resources``."""
    return {"CPU": config.ray.num_cpus_per_agent, **config.ray.agent_resources}


class RayAgentWorker(AgentWorker):
    """:class:`AgentWorker` as a Ray actor: the same episode path, reporting its Ray node id."""

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def play(self, spec: dict[str, Any], feed_kbs: bool) -> tuple[EpisodeResult, ray.ObjectRef | None]:
        """:meth:`run_episode` without waiting for the experiential KB: the result and the pending add (None if
        nothing was fed), which the pool awaits while this actor plays its next episode."""
        result = self.run_episode(spec, feed_kbs, await_experience=False)
        pending, self.pending_add = self.pending_add, None
        return result, pending


class RolloutPool:
    """N agent actors, created with options from config; with ``num_workers=0``, one agent in this process.

    Args:
        config: the whole config; ``ray.num_cpus_per_agent``, ``ray.max_restarts`` and the JVM heap are used.
        num_workers: actors to start; None = :func:`default_workers`; 0 = no Ray: the episodes are played here,
            one after another, into KBs this process opens (and :meth:`shutdown` closes).
    """

    def __init__(self, config: KnowMapConfig, num_workers: int | None = None) -> None:
        self.config = config
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 = in this process), got {num_workers}")
        self.local: AgentWorker | None = None
        self.actors: list[ray.actor.ActorHandle] = []
        if num_workers == 0:
            self.num_workers = 0
            self.kbs: LocalKnowledgeBases | None = LocalKnowledgeBases(config)
            self.local = AgentWorker(config, self.kbs)
            return
        self.kbs = None
        wait_for_room(config)
        self.num_workers = num_workers or default_workers(config)
        self._payload = config.model_dump(mode="json")
        self._actor_cls = ray.remote(RayAgentWorker).options(
            num_cpus=config.ray.num_cpus_per_agent,
            resources=dict(config.ray.agent_resources),
            max_restarts=config.ray.max_restarts,
            # Bound the JVM heap; it grows to 2.5 GB after a few tasks unless capped.
            runtime_env={"env_vars": {"JAVA_TOOL_OPTIONS": f"-Xmx{config.scienceworld.java_heap}"}},
        )
        # The shared experiential KB exists before any agent looks it up.
        self.experience = get_experience_kb(config)
        self.actors = [self._new_actor() for _ in range(self.num_workers)]

    def _new_actor(self) -> ray.actor.ActorHandle:
        return self._actor_cls.remote(self._payload, RayKnowledgeBases(self.config))

    def run(self, specs: Iterable[EpisodeSpec], on_result: Callable[[EpisodeResult], None] | None = None,
            *, feed_kbs: bool = True) -> list[EpisodeResult]:
        """Play every spec; returns one result per spec, in the order given.

        Args:
            on_result: called as each episode ends (progress); retried attempts are not reported until final.
            feed_kbs: False plays without feeding the KBs (measures rollout alone).
        """
        specs = list(specs)
        if self.local is not None:
            return [self._run_here(spec, on_result, feed_kbs) for spec in specs]
        queue: deque[tuple[int, int]] = deque((i, 1) for i in range(len(specs)))  # (spec index, attempt)
        results: list[EpisodeResult | None] = [None] * len(specs)
        in_flight: dict[ray.ObjectRef, tuple[int, int, int]] = {}  # ref -> (spec index, attempt, actor slot)
        # Episodes played whose experiential-KB add is still pending: ack ref -> (spec index, attempt, result).
        # Bounded, so that agents cannot run ahead of the experiential KB without limit.
        acking: dict[ray.ObjectRef, tuple[int, int, EpisodeResult]] = {}
        idle = deque(range(len(self.actors)))

        def finish(index: int, attempt: int, result: EpisodeResult) -> None:
            if self._again(result, attempt):
                queue.append((index, attempt + 1))
                return
            results[index] = result
            if on_result is not None:
                on_result(result)

        while queue or in_flight or acking:
            while queue and idle and len(acking) < 2 * len(self.actors):
                index, attempt = queue.popleft()
                slot = idle.popleft()
                ref = self.actors[slot].play.remote(specs[index].model_dump(), feed_kbs)
                in_flight[ref] = (index, attempt, slot)
            ref = ray.wait([*in_flight, *acking], num_returns=1)[0][0]
            if ref in acking:
                index, attempt, result = acking.pop(ref)
                try:
                    settle_add(result, ray.get(ref))
                except Exception as e:  # noqa: BLE001 - the add failed: the episode is played again (idempotent)
                    result.ok, result.retryable = False, is_retryable(e)
                    result.error = f"the experiential KB did not store the episode: {type(e).__name__}: {e}"
                finish(index, attempt, result)
                continue
            index, attempt, slot = in_flight.pop(ref)
            idle.append(slot)
            try:
                result, pending = ray.get(ref)
            except _ACTOR_LOST as e:
                # The actor (or its node) died mid-episode. Ray restarts it up to max_restarts; if it is gone
                # for good, a fresh actor takes its slot. Either way the episode may be tried again.
                if not self._alive(slot):
                    self.actors[slot] = self._new_actor()
                result, pending = EpisodeResult(spec=specs[index], ok=False, retryable=True,
                                                error=f"actor lost: {e}"), None
            if pending is not None and result.ok:
                acking[pending] = (index, attempt, result)
            else:
                finish(index, attempt, result)
        return [r for r in results if r is not None]

    def _run_here(self, spec: EpisodeSpec, on_result: Callable[[EpisodeResult], None] | None,
                  feed_kbs: bool) -> EpisodeResult:
        assert self.local is not None
        attempt = 1
        while True:
            result = self.local.run_episode(spec, feed_kbs)
            if not self._again(result, attempt):
                break
            attempt += 1
        if on_result is not None:
            on_result(result)
        return result

    def _again(self, result: EpisodeResult, attempt: int) -> bool:
        """Record the attempt; True if the episode failed in a way worth another attempt, and one is left."""
        result.attempts = attempt
        return not result.ok and result.retryable and attempt <= self.config.ray.max_episode_retries

    def experience_info(self) -> dict[str, object]:
        """The experiential KB's ``collection``, ``uri`` and ``rows``."""
        if self.kbs is not None:
            return self.kbs.info()
        return ray.get(self.experience.info.remote())

    def _alive(self, slot: int) -> bool:
        try:
            ray.get(self.actors[slot].ping.remote(), timeout=60)
            return True
        except Exception:  # noqa: BLE001 - any failure to answer means the slot needs a new actor
            return False

    def shutdown(self) -> None:
        """Close every JVM and stop the actors (in-process: close the JVM and the KBs this pool opened)."""
        if self.local is not None:
            self.local.close()
            assert self.kbs is not None
            self.kbs.close()
            return
        for actor in self.actors:
            with contextlib.suppress(Exception):  # a dead actor has nothing left to close
                ray.get(actor.close.remote(), timeout=30)
            ray.kill(actor)
