"""Episodes for retriever training and evaluation: a trajectory with its in-memory env KB and its sub-goals.

Two sources, both Ray-free:
- :func:`collect_episodes` replays gold paths in-process with one :class:`EpisodeRunner` (one JVM), and caches
  each trajectory as ``<cache_dir>/<episode_id>.json`` so a second run starts no JVM at all;
- :func:`load_episodes` reads the trajectories ``build-kb`` saved under ``<data_dir>/trajectories``.

Env KBs are rebuilt from the trajectory's observations (the extraction is deterministic), so an episode is fully
described by its trajectory file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from knowmap.agent.rollout import EpisodeRunner, EpisodeSpec
from knowmap.environment.sciworld import check_split, check_tasks, episode_id
from knowmap.errors import KnowMapError
from knowmap.kb.environment_kb import EnvironmentKB, build_env_kb
from knowmap.kb.segmentation import SubgoalSegmenter
from knowmap.schemas import Split, Subgoal, Trajectory

_VARIATIONS_INDEX = "variations.json"  # {"task/split": [variation, ...]}: lets a cached run skip the JVM


@dataclass
class Episode:
    """One played episode: the trajectory, the env KB built from its observations, and its sub-goals."""

    trajectory: Trajectory
    env_kb: EnvironmentKB
    subgoals: list[Subgoal]

    @property
    def episode_id(self) -> str:
        return self.trajectory.episode_id

    @property
    def task(self) -> str:
        return self.trajectory.task

    @property
    def split(self) -> Split:
        return self.trajectory.split

    @classmethod
    def from_trajectory(cls, trajectory: Trajectory, segmenter: SubgoalSegmenter | None = None) -> Episode:
        """Build the env KB and the sub-goals of ``trajectory`` in memory."""
        env_kb = build_env_kb(trajectory)
        subgoals = (segmenter or SubgoalSegmenter()).segment(trajectory, env_kb)
        return cls(trajectory=trajectory, env_kb=env_kb, subgoals=subgoals)


def collect_episodes(
    tasks: Sequence[str],
    split: str,
    variations: int | Sequence[int],
    *,
    cache_dir: str | Path | None = None,
    step_limit: int = 100,
    simplifications: str = "",
    java_heap: str = "512m",
    annotate: bool = False,
) -> list[Episode]:
    """Replay the gold paths of ``tasks`` in-process and return them as episodes.

    Args:
        tasks: ScienceWorld task names, or ``["all"]``.
        split: ``"train"``, ``"dev"`` or ``"test"``: ScienceWorld's own variation partition.
        variations: an int ``n`` = the first ``n`` variations of the split for each task (fewer where the split
            has fewer); a list = exactly these variation indices, checked against the split.
        cache_dir: where trajectories are cached as ``<episode_id>.json``; a cached episode is loaded, not
            replayed, and a fully cached call starts no JVM.
        step_limit, simplifications, java_heap: as for :class:`EpisodeRunner` (gold paths are never cut short).
        annotate: record every step's valid actions and each action's type (what decision-support evaluation
            judges with; :meth:`ScienceWorld.play_gold`); a cached episode without them is replayed once more.

    Returns:
        the episodes in (task, variation) order.

    Raises:
        SplitError, UnknownTaskError, VariationOutOfRangeError: invalid split, task or variation.
        ValueError: ``variations`` is an int below 1.
    """
    split = check_split(split)
    names = check_tasks(tasks)
    if isinstance(variations, int) and variations < 1:
        raise ValueError(f"variations must be >= 1 (the first n of the split) or a list of indices, got {variations}")
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    index = _read_index(cache)
    runner: EpisodeRunner | None = None
    segmenter = SubgoalSegmenter()
    episodes: list[Episode] = []
    try:
        for task in names:
            key = f"{task}/{split}"
            if isinstance(variations, int) and key not in index:
                runner = runner or EpisodeRunner(step_limit=step_limit, simplifications=simplifications,
                                                 java_heap=java_heap)
                index[key] = runner.env.variations(task, split)
                _write_index(cache, index)
            chosen = index[key][:variations] if isinstance(variations, int) else [int(v) for v in variations]
            for variation in chosen:
                spec = EpisodeSpec(task=task, variation=variation, split=split)
                path = cache / f"{episode_id(task, variation, split)}.json" if cache is not None else None
                trajectory = None
                if path is not None and path.is_file():
                    trajectory = Trajectory.model_validate_json(path.read_text(encoding="utf-8"))
                    if annotate and not is_annotated(trajectory):
                        trajectory = None
                if trajectory is None:
                    runner = runner or EpisodeRunner(step_limit=step_limit, simplifications=simplifications,
                                                     java_heap=java_heap)
                    if annotate:
                        runner.env.check_variation(task, variation, split)
                        runner.env.step_limit = 1_000_000  # a gold path is a whole demonstration
                        trajectory = runner.env.play_gold(task, variation, split, look=runner.look_every_step,
                                                          annotate=True)
                    else:
                        trajectory = runner.run(spec)  # checks the variation against the split
                    if path is not None:
                        _write_atomic(path, trajectory.model_dump_json())
                episodes.append(Episode.from_trajectory(trajectory, segmenter))
    finally:
        if runner is not None:
            runner.close()
    return episodes


def is_annotated(trajectory: Trajectory) -> bool:
    """True if every step of ``trajectory`` has its valid actions recorded (an annotated gold replay)."""
    return bool(trajectory.steps) and all(s.valid_actions is not None for s in trajectory.steps)


def load_episodes(trajectories_dir: str | Path, split: str) -> list[Episode]:
    """Episodes from the trajectories ``build-kb`` saved (``<data_dir>/trajectories/*.json``), of one split.

    Args:
        trajectories_dir: the folder of ``<episode_id>.json`` files.
        split: keep only trajectories of this split.

    Returns:
        the episodes sorted by episode id (deterministic whatever the directory order).

    Raises:
        SplitError: an unknown split name.
        KnowMapError: the folder does not exist or a file is not a trajectory.
    """
    split = check_split(split)
    folder = Path(trajectories_dir)
    if not folder.is_dir():
        raise KnowMapError(f"no trajectories folder at {folder}; run `knowmap build-kb` first, or pass "
                           "<data_dir>/trajectories")
    segmenter = SubgoalSegmenter()
    episodes = []
    for path in sorted(folder.glob("*.json")):
        if path.name == _VARIATIONS_INDEX:
            continue
        try:
            trajectory = Trajectory.model_validate_json(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise KnowMapError(f"{path} is not a trajectory file ({e}); remove it or rebuild it with build-kb") from e
        if trajectory.split == split:
            episodes.append(Episode.from_trajectory(trajectory, segmenter))
    return sorted(episodes, key=lambda e: e.episode_id)


def _read_index(cache: Path | None) -> dict[str, list[int]]:
    if cache is None or not (cache / _VARIATIONS_INDEX).is_file():
        return {}
    with contextlib.suppress(ValueError):  # a broken index is only a cache: rebuild it from the env
        return {k: [int(v) for v in vs] for k, vs in json.loads((cache / _VARIATIONS_INDEX).read_text()).items()}
    return {}


def _write_index(cache: Path | None, index: dict[str, list[int]]) -> None:
    if cache is not None:
        _write_atomic(cache / _VARIATIONS_INDEX, json.dumps(index, sort_keys=True))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
