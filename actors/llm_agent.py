"""What an agent actor needs to run the LLM policy: its LLM client, and a retriever per knowledge mode whose env
facts come from the episode's env-KB actor and whose experience comes from the shared experiential-KB actor.

Everything is created on first use and kept for the actor's life (embedders load once per mode). The
experiential KB is searched in the collection of the same embedder that embeds the queries: the actor asks the
experiential-KB actor to hold that version's index (``ensure_index``, idempotent) before its first search.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from knowmap.agent.llm import LLMClient
from knowmap.agent.llm_policy import LLMPolicy, embedder_path, knowledge_mode
from knowmap.agent.memory import RetrieverKnowledge
from knowmap.agent.policy import EpisodeContext
from knowmap.config import KnowMapConfig
from knowmap.models.retrieval import Retriever
from knowmap.schemas import Fact, KnowledgeItem


class LLMAgentResources:
    """The LLM client and per-mode retrievers of one agent actor.

    Args:
        config: the whole config; ``llm.base_url`` must be set (the caller starts the local server if needed).
        env_kb: returns this actor's env-KB actor handle at the time of the call (it may be replaced).
        experience: the experiential-KB actor handle.
    """

    def __init__(self, config: KnowMapConfig, env_kb: Callable[[], Any], experience: Any) -> None:
        self.config, self._env_kb, self._experience = config, env_kb, experience
        self._llm: LLMClient | None = None
        self._retrievers: dict[str, Retriever] = {}

    @property
    def llm(self) -> LLMClient:
        if self._llm is None:
            self._llm = LLMClient(self.config.llm)
        return self._llm

    def policy(self, name: str) -> LLMPolicy:
        """A fresh LLM policy for ``name`` (``llm`` or ``llm-<mode>``), with this actor's knowledge access.

        Raises:
            KnowMapError: an unknown name, or kb-finetuned without a trained embedder.
            LLMError: ``llm.base_url`` is empty.
        """
        mode = knowledge_mode(name, self.config.agent.knowledge)
        factory = None
        if mode != "none":
            retriever = self._retriever(mode)
            splits = self.config.agent.experience_splits

            def factory(context: EpisodeContext) -> RetrieverKnowledge:
                return RetrieverKnowledge(retriever, context.episode_id, context.task, splits)

        return LLMPolicy(self.llm, self.config.agent, knowledge=factory, mode=mode)

    def _retriever(self, mode: str) -> Retriever:
        if mode not in self._retrievers:
            from knowmap.models.embedder import Embedder

            path = embedder_path(self.config, mode)
            embedder = Embedder(path, device=self.config.models.device, batch_size=self.config.models.batch_size)
            version = ray.get(self._experience.ensure_index.remote(path))["version"]
            experience = self._experience

            def env_facts(env_id: str, step: int | None) -> list[Fact]:
                handle = self._env_kb()
                if handle is None:
                    return []
                rows = ray.get(handle.current.remote() if step is None else handle.as_of.remote(step))
                return [Fact.model_validate(row) for row in rows]

            def search(vector: Any, k: int, task: str | None) -> list[KnowledgeItem]:
                rows = ray.get(experience.search_vector.remote(vector.tolist(), k, task=task, version=version))
                return [KnowledgeItem.model_validate(row) for row in rows]

            self._retrievers[mode] = Retriever(embedder.encode, env_facts=env_facts, experience=search)
        return self._retrievers[mode]
