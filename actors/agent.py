"""The agent actor: one ScienceWorld env (one JVM) and a policy, streaming what it sees into the KBs.

:class:`AgentWorker` is a plain class (it runs in-process in tests and with zero workers); the pool applies
``ray.remote`` with options from config. Each step's observation goes to the episode's env-KB actor as it is
seen (one env-KB actor per agent, next to it, switched from episode to episode: an actor per episode would cost
a worker process each); the finished trajectory and its sub-goals go to the shared experiential-KB actor.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback
from typing import Any

import ray
from ray.exceptions import RayActorError

from knowmap.agent.llm_policy import LLMPolicy
from knowmap.agent.policy import is_llm_policy
from knowmap.agent.rollout import EpisodeRunner, EpisodeSpec
from knowmap.config import KnowMapConfig
from knowmap.jobs.build import save_trajectory
from knowmap.results import EpisodeResult
from knowmap.schemas import StepRecord, Trajectory


class AgentWorker:
    """Plays episodes and feeds both KBs.

    Args:
        config: the ``KnowMapConfig`` as ``model_dump()``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = KnowMapConfig.model_validate(config)
        sw = self.config.scienceworld
        self.runner = EpisodeRunner(step_limit=sw.step_limit, simplifications=sw.simplifications,
                                    java_heap=sw.java_heap)
        self.env_kb: ray.actor.ActorHandle | None = None  # this slot's env-KB actor, created at first use
        self._llm_agent: Any = None  # LLM client and retrievers, created at the first LLM episode

    def ping(self) -> dict[str, Any]:
        """Where this agent runs: node id, process id and its JVM's process id."""
        return {"node": ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname(),
                "pid": os.getpid(), "jvm_pid": self.runner.env.jvm_pid}

    def run_episode(self, spec: dict[str, Any] | EpisodeSpec, feed_kbs: bool = True) -> EpisodeResult:
        """Play one episode and store it in both KBs; an error comes back as a result, not an exception.

        Args:
            feed_kbs: False plays the episode without touching the KBs (to measure rollout alone).
        """
        from knowmap.actors.env_kb import create_env_kb_slot
        from knowmap.actors.experience import get_experience_kb

        spec = EpisodeSpec.model_validate(spec)
        self.runner.ensure_env()  # a JVM that died in an earlier episode is replaced before this one
        result = EpisodeResult(spec=spec, node=self.ping()["node"], pid=os.getpid())
        started = time.perf_counter()
        pending: list[ray.ObjectRef] = []

        def on_step(trajectory: Trajectory, record: StepRecord) -> None:
            if not pending:  # step 0: open this episode's env KB in the slot actor
                if self.env_kb is None:
                    self.env_kb = create_env_kb_slot(trajectory.episode_id, self.config)
                ray.get(self.env_kb.switch.remote(trajectory.episode_id))
                ray.get(self.env_kb.reset.remote())  # a retried episode starts its env KB again from step 0
            pending.append(self.env_kb.ingest.remote(record.as_observation().model_dump()))

        policy = None
        try:
            policy = self._llm_policy(spec.policy) if is_llm_policy(spec.policy) else None
            trajectory = self.runner.run(spec, policy=policy, on_step=on_step if feed_kbs else None)
            result.episode_id = trajectory.episode_id
            result.steps = len(trajectory.steps) - 1
            result.final_score = trajectory.final_score
            result.env_seconds = time.perf_counter() - started
            if not feed_kbs:
                _llm_stats(result, policy)
                result.seconds = time.perf_counter() - started
                return result
            ray.get(pending)  # every observation acknowledged before the episode counts as done
            assert self.env_kb is not None
            subgoals = ray.get(self.env_kb.segment.remote(trajectory.model_dump()))
            if trajectory.source == "agent":  # successes and failures alike carry a reflection
                subgoals = self._reflect(trajectory, subgoals, policy)
            ray.get(get_experience_kb(self.config).add_trajectory.remote(trajectory.model_dump(), subgoals))
            save_trajectory(self.config, trajectory)
            # The episode is over: snapshot and release its env KB; get_or_create_env_kb serves it by id.
            stats = ray.get(self.env_kb.close.remote())
            result.ingest_seconds = float(stats.get("ingest_seconds", 0.0))
            result.facts = int(stats.get("facts", 0))
            result.current_facts = int(stats.get("current_facts", 0))
            result.subgoals = len(subgoals)
        except Exception as e:  # noqa: BLE001 - the pool wants every failure as a value
            if isinstance(e, RayActorError) and self.env_kb is not None:
                # The env-KB actor died (and may be out of restarts): end it, and start a fresh one next episode.
                with contextlib.suppress(Exception):
                    ray.kill(self.env_kb, no_restart=True)
                self.env_kb = None
            result.ok = False
            result.error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        _llm_stats(result, policy)
        result.seconds = time.perf_counter() - started
        return result

    def _llm_policy(self, name: str) -> Any:
        from knowmap.actors.experience import get_experience_kb
        from knowmap.actors.llm_agent import LLMAgentResources

        if self._llm_agent is None:
            self._llm_agent = LLMAgentResources(self.config, lambda: self.env_kb, get_experience_kb(self.config))
        return self._llm_agent.policy(name)

    def _reflect(self, trajectory: Trajectory, subgoals: list[dict[str, Any]], policy: Any) -> list[dict[str, Any]]:
        """Reflections written by the episode's LLM where there is one (and ``agent.llm_reflections``), else
        derived from the score changes."""
        from knowmap.agent.reflection import reflect
        from knowmap.schemas import Subgoal

        llm = policy.llm if isinstance(policy, LLMPolicy) and self.config.agent.llm_reflections else None
        goals = reflect(trajectory, [Subgoal.model_validate(g) for g in subgoals], llm)
        return [g.model_dump(mode="json") for g in goals]

    def close(self) -> None:
        self.runner.close()


def _llm_stats(result: EpisodeResult, policy: Any) -> None:
    """Copy the LLM policy's episode statistics (tokens include the reflections written after the episode)."""
    if not isinstance(policy, LLMPolicy):
        return
    usage = policy.usage_since_begin()
    result.prompt_tokens, result.completion_tokens, result.llm_calls = (usage.prompt_tokens, usage.completion_tokens,
                                                                        usage.calls)
    stats = policy.stats
    result.replans, result.invalid_answers, result.plan = stats.replans, stats.invalid_answers, stats.plan
    result.facts_retrieved, result.experience_retrieved = stats.facts_retrieved, stats.experience_retrieved
