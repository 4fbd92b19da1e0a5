"""The rollout pool: episode specs scheduled over N agent actors with ``ray.wait``; results come back as values.

One episode is in flight per actor. An episode whose actor (or its JVM) died is retried, up to
``ray.max_episode_retries`` times, on a live actor; a dead actor is replaced. Episodes are idempotent by id (the
env KB restarts from step 0, the experiential KB replaces the episode's rows), so a retry never duplicates.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from knowmap.actors.agent import AgentWorker
from knowmap.actors.experience import get_experience_kb
from knowmap.agent.rollout import EpisodeSpec
from knowmap.config import KnowMapConfig
from knowmap.errors import KnowMapError
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


class RolloutPool:
    """N agent actors, created with options from config.

    Args:
        config: the whole config; ``ray.num_cpus_per_agent``, ``ray.max_restarts`` and the JVM heap are used.
        num_workers: actors to start; default :func:`default_workers`.
    """

    def __init__(self, config: KnowMapConfig, num_workers: int | None = None) -> None:
        self.config = config
        wait_for_room(config)
        self.num_workers = num_workers or default_workers(config)
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        self._payload = config.model_dump(mode="json")
        self._actor_cls = ray.remote(AgentWorker).options(
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
        return self._actor_cls.remote(self._payload)

    def run(self, specs: Iterable[EpisodeSpec], on_result: Callable[[EpisodeResult], None] | None = None,
            *, feed_kbs: bool = True) -> list[EpisodeResult]:
        """Play every spec; returns one result per spec, in the order given.

        Args:
            on_result: called as each episode ends (progress); retried attempts are not reported until final.
            feed_kbs: False plays without feeding the KBs (measures rollout alone).
        """
        specs = list(specs)
        queue: deque[tuple[int, int]] = deque((i, 1) for i in range(len(specs)))  # (spec index, attempt)
        results: list[EpisodeResult | None] = [None] * len(specs)
        in_flight: dict[ray.ObjectRef, tuple[int, int, int]] = {}  # ref -> (spec index, attempt, actor slot)
        idle = deque(range(len(self.actors)))
        max_attempts = 1 + self.config.ray.max_episode_retries

        while queue or in_flight:
            while queue and idle:
                index, attempt = queue.popleft()
                slot = idle.popleft()
                ref = self.actors[slot].run_episode.remote(specs[index].model_dump(), feed_kbs)
                in_flight[ref] = (index, attempt, slot)
            done, _ = ray.wait(list(in_flight), num_returns=1)
            ref = done[0]
            index, attempt, slot = in_flight.pop(ref)
            try:
                result: EpisodeResult = ray.get(ref)
            except _ACTOR_LOST as e:
                # The actor (or its node) died mid-episode. Ray restarts it up to max_restarts; if it is gone
                # for good, a fresh actor takes its slot. Either way the episode is tried again.
                if not self._alive(slot):
                    self.actors[slot] = self._new_actor()
                if attempt < max_attempts:
                    queue.append((index, attempt + 1))
                    idle.append(slot)
                    continue
                result = EpisodeResult(spec=specs[index], ok=False, error=f"actor lost: {e}")
            result.attempts = attempt
            if not result.ok and attempt < max_attempts and _retryable(result.error):
                queue.append((index, attempt + 1))
                idle.append(slot)
                continue
            results[index] = result
            idle.append(slot)
            if on_result is not None:
                on_result(result)
        return [r for r in results if r is not None]

    def _alive(self, slot: int) -> bool:
        try:
            ray.get(self.actors[slot].ping.remote(), timeout=60)
            return True
        except Exception:  # noqa: BLE001 - any failure to answer means the slot needs a new actor
            return False

    def shutdown(self) -> None:
        """Close every JVM and stop the actors."""
        for actor in self.actors:
            with contextlib.suppress(Exception):  # a dead actor has nothing left to close
                ray.get(actor.close.remote(), timeout=30)
            ray.kill(actor)


def _retryable(error: str) -> bool:
    """Transient failures (a JVM or a KB actor that died) are retried; invalid specs are not."""
    permanent = ("UnknownTaskError", "VariationOutOfRangeError", "ValidationError", "KnowMapError")
    return not error.startswith(permanent)

