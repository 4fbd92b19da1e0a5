"""Distillation data: a student learns to act without retrieval from a teacher that acted with it.

Following Ibrahim et al. (arXiv 2510.01375): successful knowledge-guided episodes become supervised fine-tuning
data with the knowledge taken out (the student sees the task and the observations; the targets are the teacher's
actions), and failed episodes give hints (their reflections) that a teacher can be given once, at episode start.

Both files are JSON Lines, one object per episode (``SFTRecord`` and ``HintRecord`` below are their schemas):

- ``sft.jsonl``: ``{"messages": [system, user, assistant, user, assistant, ...], "episode_id", "task",
  "variation", "split", "policy", "final_score", "steps"}``. The first user turn is the task and the first
  observation; each assistant turn is the teacher's action; each later user turn is the observation that action
  produced. No retrieved fact, sub-goal or plan appears anywhere: they were never stored with the trajectory.
  This is OpenAI's chat fine-tuning format, which TRL's ``SFTTrainer`` also reads.
- ``hints.jsonl``: ``{"task", "episode_id", "variation", "split", "final_score", "hint", "reflections"}`` for
  each failed episode: its sub-goals' reflections (the LLM's where the experiential KB holds them, else the
  score-based ones, recomputed), and ``hint``, them joined into one paragraph for a prompt.

Episodes come from the training store (``<data_dir>/trajectories``): those of ``source`` agent whose ``policy``
retrieved knowledge (``llm-kb-base``, ``llm-kb-finetuned``), of the chosen splits.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, Field

from knowmap.agent.prompts import SYSTEM
from knowmap.agent.reflection import reflect
from knowmap.errors import KnowMapError
from knowmap.kb.segmentation import SubgoalSegmenter
from knowmap.layout import DataLayout
from knowmap.schemas import Split, Subgoal, Trajectory

KNOWLEDGE_POLICIES = ("llm-kb-base", "llm-kb-finetuned")
STUDENT_SYSTEM = SYSTEM + " Reply with the next action only."


class SFTRecord(BaseModel):
    """One line of ``sft.jsonl``: a successful knowledge-guided episode as a chat, the knowledge removed."""

    messages: list[dict[str, str]] = Field(description="system, then user (task + observation) and assistant "
                                           "(the teacher's action) turns, alternating")
    episode_id: str
    task: str
    variation: int
    split: Split
    policy: str = Field(description="the teacher's policy (its knowledge mode)")
    final_score: float
    steps: int = Field(description="assistant turns")


class HintRecord(BaseModel):
    """One line of ``hints.jsonl``: what a failed episode teaches, for a teacher's one-shot hint at episode start."""

    task: str
    episode_id: str
    variation: int
    split: Split
    final_score: float
    hint: str = Field(description="the reflections as one paragraph")
    reflections: list[str]


class ExportSummary(BaseModel):
    sft: int = Field(description="episodes written to the SFT file")
    hints: int = Field(description="failed episodes written to the hints file")
    skipped: dict[str, int] = Field(default_factory=dict, description="episodes left out, by reason")


def sft_record(trajectory: Trajectory) -> SFTRecord:
    """The chat of one episode: task and observations from the environment, actions from the teacher."""
    first, *rest = trajectory.steps
    task = trajectory.task_description or trajectory.task
    messages = [{"role": "system", "content": STUDENT_SYSTEM},
                {"role": "user", "content": f"Task: {task}\n\nObservation: {first.observation}"}]
    for step in rest:
        messages.append({"role": "assistant", "content": step.action})
        messages.append({"role": "user", "content": f"Observation: {step.observation}"})
    if messages[-1]["role"] == "user":  # the last observation answers no action
        messages.pop()
    return SFTRecord(messages=messages, episode_id=trajectory.episode_id, task=trajectory.task,
                     variation=trajectory.variation, split=trajectory.split, policy=trajectory.policy,
                     final_score=trajectory.final_score, steps=len(rest))


def hint_record(trajectory: Trajectory, subgoals: Sequence[Subgoal]) -> HintRecord:
    """The lessons of a failed episode: its sub-goals' reflections (score-based ones where none is stored)."""
    reflections = [g.reflection for g in reflect(trajectory, list(subgoals)) if g.reflection]
    task = trajectory.task_description or trajectory.task
    hint = f"An earlier attempt at '{task}' failed (final score {trajectory.final_score:g}). " + " ".join(
        reflections)
    return HintRecord(task=trajectory.task, episode_id=trajectory.episode_id, variation=trajectory.variation,
                      split=trajectory.split, final_score=trajectory.final_score, hint=hint, reflections=reflections)


def export_sft(paths: DataLayout, out: Path, hints_out: Path | None = None, *, splits: Sequence[str] = ("train",),
               min_score: float = 100.0, stored_subgoals: Callable[[str], list[Subgoal]] | None = None,
               ) -> ExportSummary:
    """Write the SFT file (successes: final score >= ``min_score``) and the hints file (the other episodes).

    Args:
        paths: the data layout whose training store is read.
        out, hints_out: the JSONL files to write (``hints_out`` None: no hints file).
        splits: episodes of these splits only (``test`` is allowed: exporting is not training).
        min_score: the final score an episode needs to count as a success.
        stored_subgoals: an episode's sub-goals as the experiential KB holds them (with the LLM's reflections);
            None, or an empty answer: segment the trajectory again and use score-based reflections.

    Raises:
        KnowMapError: no training store, or a file in it is not a trajectory.
    """
    folder = paths.trajectories
    if not folder.is_dir():
        raise KnowMapError(f"no trajectories under {folder}: run `knowmap run` or agent rollouts first")
    summary = ExportSummary(sft=0, hints=0)
    segmenter = SubgoalSegmenter()
    out.parent.mkdir(parents=True, exist_ok=True)
    hints = hints_out.open("w", encoding="utf-8") if hints_out is not None else None
    try:
        with out.open("w", encoding="utf-8") as sft:
            for path in sorted(folder.glob("*.json")):
                try:
                    trajectory = Trajectory.model_validate_json(path.read_text(encoding="utf-8"))
                except ValueError:
                    continue  # the episode cache's index and other JSON that is no trajectory
                reason = _left_out(trajectory, splits)
                if reason:
                    summary.skipped[reason] = summary.skipped.get(reason, 0) + 1
                elif trajectory.final_score >= min_score:
                    sft.write(sft_record(trajectory).model_dump_json() + "\n")
                    summary.sft += 1
                elif hints is not None:
                    goals = (stored_subgoals(trajectory.episode_id) if stored_subgoals else []) or \
                        segmenter.segment(trajectory)
                    hints.write(hint_record(trajectory, goals).model_dump_json() + "\n")
                    summary.hints += 1
    finally:
        if hints is not None:
            hints.close()
    return summary


def _left_out(trajectory: Trajectory, splits: Sequence[str]) -> str:
    if trajectory.source != "agent":
        return "not an agent episode"
    if trajectory.policy not in KNOWLEDGE_POLICIES:
        return "no knowledge retrieved (policy " + (trajectory.policy or "unknown") + ")"
    if trajectory.split not in splits:
        return f"split {trajectory.split}"
    if len(trajectory.steps) < 2:
        return "no action taken"
    return ""


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSON Lines file (what the export writes), for checks and tests."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
