"""Connecting to Ray and building the KBs through the rollout pool."""

from __future__ import annotations

import time
from collections.abc import Callable

import ray

from knowmap.config import KnowMapConfig
from knowmap.environment.sciworld import ScienceWorld
from knowmap.jobs.build import BuildSummary, EpisodeSummary, episode_specs, write_summary


def init_ray(config: KnowMapConfig, **kwargs: object) -> None:
    """Start a local Ray (``ray.address`` empty) or join a cluster (``"auto"`` or ``ray://host:10001``).

    The project namespace makes named actors (env KBs, the experiential KB) findable across jobs.
    """
    if ray.is_initialized():
        return
    # The dashboard stays on: it serves the state API that Ray Train's controller polls (without it, the log
    # fills with "State API may be temporarily unavailable"), and users watch jobs there.
    ray.init(address=config.ray.address or None, namespace=config.ray.namespace, log_to_driver=True, **kwargs)


def build_with_pool(
    config: KnowMapConfig,
    num_workers: int | None = None,
    on_episode: Callable[[EpisodeSummary, int, int], None] | None = None,
) -> BuildSummary:
    """``build-kb`` through the rollout pool: gold replay on N agent actors, both KBs fed by actors.

    Raises:
        UnknownTaskError, VariationOutOfRangeError: before any actor starts.
        KnowMapError: some episodes failed after their retries (the message lists them).
    """
    from knowmap.actors.experience import get_experience_kb
    from knowmap.actors.pool import RolloutPool
    from knowmap.errors import KnowMapError

    started = time.perf_counter()
    sw = config.scienceworld
    with ScienceWorld(step_limit=sw.step_limit, simplifications=sw.simplifications, java_heap=sw.java_heap) as env:
        specs = episode_specs(config, env)  # validates tasks and variations before anything starts
    init_ray(config)
    experience = get_experience_kb(config)
    pool = RolloutPool(config, num_workers)
    summary = BuildSummary(env_kb_dir=str(config.paths.env_kb), experience_store=config.store_uri)
    count = {"n": 0}

    def report(result) -> None:  # noqa: ANN001 - EpisodeResult
        count["n"] += 1
        if not result.ok:
            return
        episode = EpisodeSummary(episode_id=result.episode_id, task=result.spec.task,
                                 variation=result.spec.variation, steps=result.steps,
                                 final_score=result.final_score, facts=result.facts,
                                 current_facts=result.current_facts,
                                 subgoals=result.subgoals, seconds=result.seconds)
        summary.add(episode)
        if on_episode is not None:
            on_episode(episode, count["n"], len(specs))

    try:
        results = pool.run(specs, on_result=report)
    finally:
        pool.shutdown()
    info = ray.get(experience.info.remote())
    summary.experience_collection, summary.experience_rows = info["collection"], info["rows"]
    summary.seconds = time.perf_counter() - started
    write_summary(config, summary)
    failed = [r for r in results if not r.ok]
    if failed:
        lines = "\n".join(f"  {r.spec.label()}: {r.error.splitlines()[0]}" for r in failed)
        raise KnowMapError(f"{len(failed)} of {len(results)} episodes failed after retries:\n{lines}")
    return summary
