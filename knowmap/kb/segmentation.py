"""Sub-goal segmentation of trajectories at score increases, without an LLM.

ScienceWorld's score rises when a sub-goal is reached, so cutting a trajectory after every step whose score is
higher than the step before gives a deterministic segmentation of expert (and agent) trajectories. The tail after
the last rise is its own segment. Each sub-goal carries its actions, the objects they touched and the env facts
about those objects as known when the sub-goal was reached.

Descriptions and reflections come from a :class:`SubgoalWriter`; :class:`RuleWriter` is the deterministic
default, and an LLM-backed writer can be plugged in behind the same protocol.
"""

from __future__ import annotations

import re
from typing import Protocol

from knowmap.kb.environment_kb import EnvironmentKB
from knowmap.schemas import StepRecord, Subgoal, Trajectory, Triple, stable_id

# ScienceWorld's action verbs, longest first so "pick up" wins over "pick".
_VERBS = sorted(
    ["open", "close", "go to", "teleport to", "pick up", "put down", "move", "pour", "dunk", "mix", "look at",
     "look in", "look around", "examine", "read", "use", "focus on", "activate", "deactivate", "connect",
     "disconnect", "eat", "flush", "wait", "wait1", "inventory", "task", "plant", "water", "mix", "drop"],
    key=len, reverse=True,
)
_SPLIT = re.compile(r"\b(?:to|on|into|in|from|with)\b")
_ARTICLES = re.compile(r"^(?:a|an|the)\s+")


class SubgoalWriter(Protocol):
    """Writes a sub-goal's description and reflection (the seam for an LLM-written version)."""

    def write(self, task_description: str, steps: list[StepRecord], objects: list[str], facts: list[Triple],
              score_before: float, score_after: float) -> tuple[str, str]: ...


class RuleWriter:
    """Deterministic description from the task and the action that raised the score; no reflection."""

    def write(self, task_description: str, steps: list[StepRecord], objects: list[str], facts: list[Triple],
              score_before: float, score_after: float) -> tuple[str, str]:
        goal = task_description.split(".")[0].strip() or "the task"
        last = steps[-1].action
        if score_after > score_before:
            text = (f"Towards '{goal}': reach score {score_after:g} (from {score_before:g}) by '{last}' "
                    f"after {len(steps)} action(s)")
        else:
            text = f"Towards '{goal}': {len(steps)} action(s) ending with '{last}' without a score change"
        if objects:
            text += f", involving {', '.join(objects)}"
        return text + ".", ""


def action_objects(action: str, known: set[str] | None = None) -> list[str]:
    """The object names an action mentions.

    With ``known`` (the env KB's entity names), the known names that occur in the action as whole words,
    longest first and without overlaps; otherwise (or if none match) the noun phrases between the verb and
    the prepositions (``"move metal pot to sink"`` -> ``["metal pot", "sink"]``).
    """
    text = " ".join(action.lower().split())
    if known:
        found: list[str] = []
        taken = text
        for name in sorted(known, key=lambda n: (-len(n), n)):  # ties by name: never by hash order
            if len(name) < 2:
                continue
            pattern = re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])")
            if pattern.search(taken):
                found.append(name)
                taken = pattern.sub("\x00", taken)
        if found:
            return found
    for verb in _VERBS:
        if text == verb:
            return []
        if text.startswith(verb + " "):
            text = text[len(verb) + 1:]
            break
    parts = [_ARTICLES.sub("", p.strip()) for p in _SPLIT.split(text)]
    return [p for p in parts if p and p not in {"inventory", "substance"}]


class SubgoalSegmenter:
    """Cuts trajectories into sub-goals at score increases.

    Args:
        writer: writes descriptions and reflections; default :class:`RuleWriter`.
    """

    def __init__(self, writer: SubgoalWriter | None = None) -> None:
        self.writer = writer or RuleWriter()

    @staticmethod
    def boundaries(steps: list[StepRecord]) -> list[tuple[int, int]]:
        """``(first, last)`` indices into ``steps`` of each segment; step 0 (the reset) belongs to none."""
        segments: list[tuple[int, int]] = []
        start = 1
        for i in range(1, len(steps)):
            if steps[i].score > steps[i - 1].score:
                segments.append((start, i))
                start = i + 1
        if start < len(steps):
            segments.append((start, len(steps) - 1))
        return segments

    def segment(self, trajectory: Trajectory, env_kb: EnvironmentKB | None = None) -> list[Subgoal]:
        """The sub-goals of ``trajectory``.

        Args:
            env_kb: the env KB the episode's observations were ingested into; supplies the object names and
                the facts about them as of the step where each sub-goal ended. Without it, facts are empty.
        """
        steps = trajectory.steps
        known = env_kb.entities() if env_kb is not None else None
        subgoals: list[Subgoal] = []
        for index, (first, last) in enumerate(self.boundaries(steps)):
            seg = steps[first:last + 1]
            objects: list[str] = []
            for record in seg:
                for name in action_objects(record.action, known):
                    if name not in objects:
                        objects.append(name)
            facts: list[Triple] = []
            if env_kb is not None and objects:
                about = env_kb.about(objects, step=seg[-1].step)
                # Facts about the touched objects themselves first, then those that merely mention them.
                facts = [f.triple() for f in sorted(about, key=lambda f: f.subject not in objects)]
            before, after = steps[first - 1].score, seg[-1].score
            description, reflection = self.writer.write(trajectory.task_description, seg, objects, facts,
                                                        before, after)
            subgoals.append(Subgoal(
                subgoal_id=stable_id(trajectory.episode_id, index),
                episode_id=trajectory.episode_id, task=trajectory.task, variation=trajectory.variation,
                split=trajectory.split, source=trajectory.source, index=index,
                start_step=seg[0].step, end_step=seg[-1].step, actions=[s.action for s in seg],
                objects=objects, facts=facts, score_before=before, score_after=after,
                description=description, reflection=reflection,
            ))
        return subgoals
