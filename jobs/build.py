"""Build both knowledge bases from expert (gold) trajectories, in one process.

For every (task, variation) of the configured split: replay the gold path in ScienceWorld, ingest every step's
observation into the episode's durable env KB (``<data_dir>/env_kb/<episode_id>/``), segment the trajectory into
sub-goals, add it to the :class:`ExperienceKB` (Milvus) and keep it under ``<data_dir>/trajectories``. The Ray
layer (``knowmap.jobs.session.build_with_pool``) does the same through a pool of actors, with the same layout
on disk; this is the single-process path (``build-kb --workers 0``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, Field

from knowmap.agent.rollout import EpisodeRunner, EpisodeSpec
from knowmap.config import KnowMapConfig
from knowmap.environment.sciworld import ScienceWorld
from knowmap.kb.durable_kb import DurableEnvironmentKB
from knowmap.kb.environment_kb import EnvironmentKB
from knowmap.kb.segmentation import SubgoalSegmenter
from knowmap.schemas import Trajectory


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


def resolve_tasks(tasks: list[str], env: ScienceWorld) -> list[str]:
    """``["all"]`` means all 30 ScienceWorld tasks; otherwise each name is checked against ScienceWorld."""
    if [t.strip() for t in tasks] == ["all"]:
        return env.task_names
    return [env.check_task(t.strip()) for t in tasks if t.strip()]


def episode_specs(config: KnowMapConfig, env: ScienceWorld) -> list[EpisodeSpec]:
    """The first ``variations`` variations of the split for each configured task."""
    sw = config.scienceworld
    specs = []
    for task in resolve_tasks(sw.tasks, env):
        for variation in env.variations(task, sw.split)[: sw.variations]:
            specs.append(EpisodeSpec(task=task, variation=variation, split=sw.split))
    return specs


def build_env_kb(trajectory: Trajectory, extractor: object | None = None) -> EnvironmentKB:
    """A fresh env KB with every step of ``trajectory`` ingested, in order."""
    kb = EnvironmentKB(trajectory.episode_id, extractor=extractor)
    for record in trajectory.steps:
        kb.ingest(record.as_observation())
    return kb


def save_trajectory(config: KnowMapConfig, trajectory: Trajectory) -> Path:
    """Write ``<data_dir>/trajectories/<episode_id>.json`` atomically (a retried episode replaces its file)."""
    config.paths.trajectories.mkdir(parents=True, exist_ok=True)
    path = config.paths.trajectories / f"{trajectory.episode_id}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(trajectory.model_dump_json())
    os.replace(tmp, path)
    return path


@contextmanager
def open_experience_kb(config: KnowMapConfig) -> Iterator[object]:
    """The experiential KB of ``config``: its Milvus store opened, closed (and its file lock released) after."""
    from knowmap.kb.experience_kb import ExperienceKB
    from knowmap.kb.vectorstore import VectorStore
    from knowmap.models.embedder import Embedder

    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = VectorStore(config.store_uri, token=config.store.token, flat_max_rows=config.store.flat_max_rows,
                        hnsw_m=config.store.hnsw_m, hnsw_ef_construction=config.store.hnsw_ef_construction,
                        hnsw_ef=config.store.hnsw_ef)
    try:
        embedder = Embedder(config.models.embedder, device=config.models.device,
                            batch_size=config.models.batch_size)
        yield ExperienceKB(store, embedder, collection_prefix=config.store.collection_prefix)
    finally:
        store.close()


def build_knowledge_bases(
    config: KnowMapConfig,
    on_episode: Callable[[EpisodeSummary, int, int], None] | None = None,
) -> BuildSummary:
    """Replay gold paths for the configured tasks and variations and build both KBs.

    Args:
        config: tasks, variations and split under ``config.scienceworld``; the data dir and store.
        on_episode: called after each episode with its summary, its 1-based number and the total (progress).

    Returns:
        counts of episodes, steps, facts and sub-goals, and where the KBs are stored.

    Raises:
        UnknownTaskError, VariationOutOfRangeError: a task or variation is not valid for the split.
    """
    started = time.perf_counter()
    sw = config.scienceworld
    segmenter = SubgoalSegmenter()
    summary = BuildSummary(env_kb_dir=str(config.paths.env_kb), experience_store=config.store_uri)
    runner = EpisodeRunner(step_limit=sw.step_limit, simplifications=sw.simplifications, java_heap=sw.java_heap)
    with contextlib.closing(runner):
        specs = episode_specs(config, runner.env)  # validates every task before any work is done
        with open_experience_kb(config) as experience:
            for number, spec in enumerate(specs, start=1):
                t0 = time.perf_counter()
                trajectory = runner.run(spec)
                with DurableEnvironmentKB(trajectory.episode_id, config.paths.env_kb,
                                          snapshot_every=config.ray.env_kb_snapshot_every) as kb:
                    kb.reset()  # a rebuilt episode starts its env KB again from step 0
                    for record in trajectory.steps:
                        kb.ingest(record.as_observation())
                    subgoals = segmenter.segment(trajectory, kb.kb)
                    facts, current = len(kb), len(kb.current())
                experience.add_trajectory(trajectory, subgoals)
                save_trajectory(config, trajectory)
                episode = EpisodeSummary(
                    episode_id=trajectory.episode_id, task=spec.task, variation=spec.variation,
                    steps=len(trajectory.steps) - 1, final_score=trajectory.final_score, facts=facts,
                    current_facts=current, subgoals=len(subgoals), seconds=time.perf_counter() - t0,
                )
                summary.add(episode)
                if on_episode is not None:
                    on_episode(episode, number, len(specs))
            summary.experience_collection = experience.collection
            summary.experience_rows = experience.count()
    summary.seconds = time.perf_counter() - started
    return write_summary(config, summary)


def write_summary(config: KnowMapConfig, summary: BuildSummary) -> BuildSummary:
    """Write ``<data_dir>/build_summary.json`` and return the summary."""
    (config.paths.build_summary).write_text(json.dumps(summary.model_dump(mode="json"), indent=2))
    return summary
