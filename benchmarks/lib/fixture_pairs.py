"""Env-KB training pairs synthesised from saved trajectories (no ScienceWorld needed): what the training benchmarks
train on when no pairs file is given. Imported as ``lib.fixture_pairs``."""

from __future__ import annotations

import random
from pathlib import Path

from knowmap.kb.environment_kb import build_env_kb
from knowmap.kb.segmentation import action_objects
from knowmap.schemas import TrainingPair, Trajectory


def fixture_pairs(directory: Path, seed: int = 0, negatives: int = 3) -> list[TrainingPair]:
    """Pairs from every trajectory ``*.json`` in ``directory``: query = task description + the last actions,
    positive = a fact about an object the next action touches, negatives = facts about other objects at that
    step (at most ``negatives``, drawn with ``seed``)."""
    rng = random.Random(seed)
    pairs = []
    for path in sorted(directory.glob("*.json")):
        trajectory = Trajectory.model_validate_json(path.read_text())
        kb = build_env_kb(trajectory)
        for i, step in enumerate(trajectory.steps[1:], start=1):
            objects = set(action_objects(step.action))
            known = kb.as_of(i - 1)
            about = [f for f in known if f.subject in objects]
            others = [f.text() for f in known if f.subject not in objects]
            recent = "; ".join(s.action for s in trajectory.steps[max(1, i - 3):i]) or "none"
            query = f"{trajectory.task_description} Recent actions: {recent}."
            for fact in about[:2]:
                pairs.append(TrainingPair(kind="env", query=query, positive=fact.text(),
                                          negatives=rng.sample(others, min(negatives, len(others))),
                                          task=trajectory.task, episode_id=trajectory.episode_id))
    return pairs
