"""``knowmap build-kb``: both knowledge bases from expert (gold) trajectories, through the rollout pool.

For every (task, variation) of the configured split, an agent (:class:`knowmap.agent.worker.AgentWorker`)
replays the gold path in ScienceWorld, ingests every step's observation into the episode's durable env KB
(``env_kb/<episode_id>/``), segments the trajectory into sub-goals, adds it to the experiential KB (Milvus) and
keeps it under ``trajectories/``. With ``num_workers=0`` that worker runs in this process without Ray; otherwise
N of them run as Ray actors. The episode code and the files on disk are the same either way.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pydantic import BaseModel, Field

from knowmap.actors.pool import RolloutPool
from knowmap.agent.rollout import EpisodeSpec
from knowmap.config import KnowMapConfig
from knowmap.environment.sciworld import ScienceWorld, check_tasks
from knowmap.errors import KnowMapError
from knowmap.jobs.session import ray_session
from knowmap.results import EpisodeResult


class EpisodeSummary(BaseModel):
    episode_id: str
    task: str
    variation: int
    steps: int
    final_score: float
    facts: int
    current_facts: int
    subgoals: int
    seconds: float


class BuildSummary(BaseModel):
    """What ``build-kb`` did: counts, and where it stored the KBs."""

    episodes: int = 0
    steps: int = 0
    facts: int = 0
    subgoals: int = 0
    env_kb_dir: str = ""
    experience_store: str = ""
    experience_collection: str = ""
    experience_rows: int = 0
    seconds: float = 0.0
    per_episode: list[EpisodeSummary] = Field(default_factory=list)

    def add(self, episode: EpisodeSummary) -> None:
        """Count a finished episode."""
        self.per_episode.append(episode)
        self.episodes += 1
        self.steps += episode.steps
        self.facts += episode.facts
        self.subgoals += episode.subgoals


def episode_specs(config: KnowMapConfig, env: ScienceWorld) -> list[EpisodeSpec]:
    """The first ``variations`` variations of the split for each configured task (``["all"]`` = all 30).

    Raises:
        UnknownTaskError, VariationOutOfRangeError: a task or the split is not valid.
    """
    sw = config.scienceworld
    return [EpisodeSpec(task=task, variation=variation, split=sw.split)
            for task in check_tasks(sw.tasks)
            for variation in env.variations(task, sw.split)[: sw.variations]]


@contextmanager
def open_experience_kb(config: KnowMapConfig) -> Iterator[object]:
    """The experiential KB of ``config`` in this process: its Milvus store opened, closed (and its file lock
    released) after. For reading what a build stored, when no Ray job holds the store."""
    from knowmap.kb.experience_kb import ExperienceKB
    from knowmap.kb.vectorstore import VectorStore
    from knowmap.models.embedder import Embedder

    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = VectorStore.from_config(config)
    try:
        embedder = Embedder(config.models.embedder, device=config.models.device,
                            batch_size=config.models.batch_size)
        yield ExperienceKB(store, embedder, collection_prefix=config.store.collection_prefix)
    finally:
        store.close()


def build_knowledge_bases(
    config: KnowMapConfig,
    num_workers: int | None = None,
    on_episode: Callable[[EpisodeSummary, int, int], None] | None = None,
) -> BuildSummary:
    """Replay gold paths for the configured tasks and variations and build both KBs.

    Args:
        config: tasks, variations and split under ``config.scienceworld``; the data dir and store.
        num_workers: agent actors; None = ``ray.num_workers`` or one per core; 0 = in this process, no Ray.
        on_episode: called after each episode with its summary, its 1-based number and the total (progress).

    Returns:
        counts of episodes, steps, facts and sub-goals, and where the KBs are stored
        (also written to ``build_summary.json``).

    Raises:
        UnknownTaskError, VariationOutOfRangeError: a task or variation is not valid for the split (before any
            episode starts).
        KnowMapError: some episodes failed after their retries (the message lists them).
    """
    started = time.perf_counter()
    sw = config.scienceworld
    with ScienceWorld(step_limit=sw.step_limit, simplifications=sw.simplifications, java_heap=sw.java_heap) as env:
        specs = episode_specs(config, env)
    summary = BuildSummary(env_kb_dir=str(config.paths.env_kb), experience_store=config.store_uri)

    def report(result: EpisodeResult) -> None:
        if result.ok:
            episode = EpisodeSummary(episode_id=result.episode_id, task=result.spec.task,
                                     variation=result.spec.variation, steps=result.steps,
                                     final_score=result.final_score, facts=result.facts,
                                     current_facts=result.current_facts, subgoals=result.subgoals,
                                     seconds=result.seconds)
            summary.add(episode)
            if on_episode is not None:
                on_episode(episode, summary.episodes, len(specs))

    with ray_session(config) if num_workers != 0 else contextlib.nullcontext():
        pool = RolloutPool(config, num_workers)
        try:
            results = pool.run(specs, on_result=report)
            info = pool.experience_info()
        finally:
            pool.shutdown()
    summary.experience_collection, summary.experience_rows = info["collection"], info["rows"]
    summary.seconds = time.perf_counter() - started
    config.paths.build_summary.write_text(json.dumps(summary.model_dump(mode="json"), indent=2))
    failed = [r for r in results if not r.ok]
    if failed:
        lines = "\n".join(f"  {r.spec.label()}: {r.error.splitlines()[0]}" for r in failed)
        raise KnowMapError(f"{len(failed)} of {len(results)} episodes failed after retries:\n{lines}")
    return summary
