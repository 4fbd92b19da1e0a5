"""LLM-agent rollouts through the pool: the entry point that evaluation and the main job call.

:func:`run_agent_episodes` makes sure an LLM answers (it starts the local SmolLM2 server when ``llm.base_url`` is
empty, and stops it afterwards), that the experiential KB holds an index for each embedder the episodes retrieve
with, and then plays the episodes on the rollout pool. Every episode feeds both KBs: its observations the
episode's env KB, its trajectory (with reflections) the experiential KB.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import ray

from knowmap.agent.llm_policy import embedder_path, knowledge_mode
from knowmap.agent.local_llm import llm_endpoint
from knowmap.agent.policy import is_llm_policy
from knowmap.agent.rollout import EpisodeSpec
from knowmap.config import KnowMapConfig
from knowmap.results import EpisodeResult


@contextlib.contextmanager
def agent_config(config: KnowMapConfig, log_path: str | None = None) -> Iterator[KnowMapConfig]:
    """``config`` with an LLM that answers: as given when ``llm.base_url`` is set, else with a local llama.cpp
    server started for the block (its URL filled in) and stopped after it.

    Raises:
        LLMUnavailableError: the local server could not be started (the message says what to install).
    """
    with llm_endpoint(config.llm, log_path=log_path) as llm:
        yield config.model_copy(update={"llm": llm})


def run_agent_episodes(config: KnowMapConfig, specs: Sequence[EpisodeSpec], *, num_workers: int | None = None,
                       on_result: Callable[[EpisodeResult], None] | None = None,
                       llm_log: str | None = None) -> list[EpisodeResult]:
    """Play ``specs`` (policies ``llm``, ``llm-none``, ``llm-kb-base``, ``llm-kb-finetuned``, ``expert``,
    ``random``) on a rollout pool of ``num_workers`` agent actors, with retrieval from both KBs.

    Runs inside the caller's :func:`~knowmap.jobs.session.ray_session` (Ray must be up); starts and stops the local
    LLM if ``llm.base_url`` is empty. Episode step limits come from ``config.scienceworld.step_limit``.

    Returns:
        one :class:`EpisodeResult` per spec, in order; a failed episode is a result with ``ok=False``.

    Raises:
        KnowMapError: a kb-finetuned episode and no fine-tuned embedder.
        LLMUnavailableError: no LLM could be reached or started.
    """
    from knowmap.actors.experience import get_experience_kb
    from knowmap.actors.pool import RolloutPool

    llm_specs = [s for s in specs if is_llm_policy(s.policy)]
    modes = {knowledge_mode(s.policy, config.agent.knowledge) for s in llm_specs} - {"none"}
    paths = {mode: embedder_path(config, mode) for mode in sorted(modes)}  # fails early without a trained model
    needs_llm = bool(llm_specs)
    with contextlib.ExitStack() as stack:
        if needs_llm and not config.llm.base_url:
            config = stack.enter_context(agent_config(config, llm_log))
        experience = get_experience_kb(config)
        # Index each embedder's collection now, before the episodes (re-embedding the KB once, here).
        ray.get([experience.ensure_index.remote(path) for path in paths.values()])
        pool = RolloutPool(config, num_workers)
        try:
            return pool.run(specs, on_result=on_result)
        finally:
            pool.shutdown()
