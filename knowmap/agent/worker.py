"""The one episode path: an agent with one ScienceWorld env (one JVM) and a policy, feeding what it sees into the KBs.

:class:`AgentWorker` is a plain class. The rollout pool (:mod:`knowmap.actors.pool`) runs it in this process with
zero workers, given :class:`~knowmap.agent.knowledge.LocalKnowledgeBases`, or applies ``ray.remote`` with options
from config and gives it :class:`knowmap.actors.kb_handles.RayKnowledgeBases`; the episode code is the same.

One episode: the env KB slot opens the episode's KB (emptied, so a retry starts from step 0); each step's
observation goes to it as it is seen; at the end every observation is acknowledged, the trajectory is cut into
sub-goals against the KB's facts (reflections added for agent trajectories), handed to the experiential KB (awaited
here, or left pending for the rollout pool to await: ``await_experience``) and stored as
``trajectories/<episode_id>.json``, and the env KB is snapshotted and released. Any error becomes a result with
``ok=False`` and ``retryable`` decided here, where it was caught (:func:`knowmap.errors.is_retryable`).
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Any

from knowmap.agent.knowledge import KnowledgeBases
from knowmap.agent.llm import LLMClient
from knowmap.agent.llm_policy import LLMPolicy, embedder_path, knowledge_mode
from knowmap.agent.memory import RetrieverKnowledge
from knowmap.agent.policy import EpisodeContext, is_llm_policy
from knowmap.agent.reflection import reflect
from knowmap.agent.rollout import EpisodeRunner, EpisodeSpec
from knowmap.config import KnowMapConfig
from knowmap.errors import is_retryable
from knowmap.kb.trajectory_store import save_trajectory
from knowmap.models.embedder import Embedder
from knowmap.models.retrieval import Retriever
from knowmap.results import EpisodeResult
from knowmap.schemas import StepRecord, Trajectory


class AgentWorker:
    """Plays episodes and feeds both KBs.

    Args:
        config: the ``KnowMapConfig`` (or its ``model_dump()``, as it crosses Ray).
        kbs: how to reach the KBs: in-process objects or Ray handle adapters.
    """

    def __init__(self, config: KnowMapConfig | dict[str, Any], kbs: KnowledgeBases) -> None:
        self.config = config if isinstance(config, KnowMapConfig) else KnowMapConfig.model_validate(config)
        sw = self.config.scienceworld
        self.runner = EpisodeRunner(step_limit=sw.step_limit, simplifications=sw.simplifications,
                                    java_heap=sw.java_heap)
        self.kbs = kbs
        self.env_kb = kbs.env_slot()
        self._llm: LLMClient | None = None  # created at the first LLM episode, kept for the worker's life
        self._retrievers: dict[str, Retriever] = {}  # per knowledge mode (embedders load once)
        self.pending_add: Any = None  # the last episode's experiential-KB add, when run without awaiting it

    def node(self) -> str:
        """Where this worker runs (the Ray pool's actors report their Ray node id instead)."""
        return socket.gethostname()

    def ping(self) -> dict[str, Any]:
        """Where this agent runs: node id, process id and its JVM's process id."""
        return {"node": self.node(), "pid": os.getpid(), "jvm_pid": self.runner.env.jvm_pid}

    def run_episode(self, spec: dict[str, Any] | EpisodeSpec, feed_kbs: bool = True, *,
                    await_experience: bool = True) -> EpisodeResult:
        """Play one episode and store it in both KBs; an error comes back as a result, not an exception.

        Args:
            feed_kbs: False plays the episode without touching the KBs (to measure rollout alone).
            await_experience: False returns once the env KB has acknowledged the episode, leaving the experiential
                KB's add in :attr:`pending_add` for the caller to await (the rollout pool does, while this worker
                plays its next episode); the result is then not final until :func:`settle_add` has run.
        """
        spec = EpisodeSpec.model_validate(spec)
        result = EpisodeResult(spec=spec, node=self.node(), pid=os.getpid())
        started = time.perf_counter()

        def on_step(trajectory: Trajectory, record: StepRecord) -> None:
            if record is trajectory.steps[0]:
                self.env_kb.open(trajectory.episode_id)
            self.env_kb.ingest(record.as_observation())

        policy = None
        try:
            self.runner.ensure_env()  # a JVM that died in an earlier episode is replaced before this one
            policy = self._llm_policy(spec.policy) if is_llm_policy(spec.policy) else None
            trajectory = self.runner.run(spec, policy=policy, on_step=on_step if feed_kbs else None)
            result.episode_id, result.steps = trajectory.episode_id, len(trajectory.steps) - 1
            result.final_score = trajectory.final_score
            result.env_seconds = time.perf_counter() - started
            if feed_kbs:
                self._store(trajectory, policy, result, await_experience)
        except Exception as e:  # noqa: BLE001 - the pool wants every failure as a value
            self.env_kb.discard()
            result.ok, result.retryable = False, is_retryable(e)
            result.error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        _llm_stats(result, policy)
        result.seconds = time.perf_counter() - started
        return result

    def _store(self, trajectory: Trajectory, policy: Any, result: EpisodeResult, await_experience: bool) -> None:
        self.env_kb.flush()  # every observation acknowledged before the episode counts as done
        started = time.perf_counter()
        subgoals = self.env_kb.segment(trajectory)
        result.segment_seconds = time.perf_counter() - started
        if trajectory.source == "agent":  # successes and failures alike carry a reflection
            llm = policy.llm if isinstance(policy, LLMPolicy) and self.config.agent.llm_reflections else None
            subgoals = reflect(trajectory, subgoals, llm)
        experience = self.kbs.experience()
        pending = experience.start_add(trajectory, subgoals)
        save_trajectory(self.config.paths, trajectory)
        stats = self.env_kb.close()  # the episode is over: snapshot and release its env KB
        result.ingest_seconds = float(stats.get("ingest_seconds", 0.0))
        result.facts, result.current_facts = int(stats.get("facts", 0)), int(stats.get("current_facts", 0))
        result.subgoals = len(subgoals)
        if await_experience:
            settle_add(result, experience.finish_add(pending))
        else:
            self.pending_add = pending

    def _llm_policy(self, name: str) -> LLMPolicy:
        """A fresh LLM policy for ``name`` (``llm`` or ``llm-<mode>``), retrieving through this worker's KBs.

        Raises:
            KnowMapError: an unknown name, or kb-finetuned without a trained embedder.
        """
        if self._llm is None:
            self._llm = LLMClient(self.config.llm)
        mode = knowledge_mode(name, self.config.agent.knowledge)
        factory = None
        if mode != "none":
            retriever, splits = self._retriever(mode), self.config.agent.experience_splits

            def factory(context: EpisodeContext) -> RetrieverKnowledge:
                return RetrieverKnowledge(retriever, context.episode_id, context.task, splits)

        return LLMPolicy(self._llm, self.config.agent, knowledge=factory, mode=mode)

    def _retriever(self, mode: str) -> Retriever:
        """The retrieval pipeline of a knowledge mode: env facts from this worker's env KB slot, sub-goals from the
        experiential KB's collection of the same embedder that embeds the queries."""
        if mode not in self._retrievers:
            path = embedder_path(self.config, mode)
            embedder = Embedder(path, device=self.config.models.device, batch_size=self.config.models.batch_size)
            experience = self.kbs.experience()
            version = experience.ensure_index(path)
            self._retrievers[mode] = Retriever(
                embedder.encode, env_facts=lambda env_id, step: self.env_kb.facts(step),
                experience=lambda vector, k, task, where: experience.search(vector, k, task, version),
                settings=self.config.retrieval)
        return self._retrievers[mode]

    def close(self) -> None:
        """Close the JVM and release the env KB slot."""
        self.env_kb.discard()
        self.runner.close()


def settle_add(result: EpisodeResult, done: dict[str, Any]) -> None:
    """Fold an experiential-KB add's acknowledgement (:meth:`ExperienceAccess.finish_add`) into its episode's
    result."""
    result.embed_seconds = float(done["seconds"])


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

