"""Reflections on agent trajectories: one lesson per sub-goal, stored with it in the experiential KB.

With an LLM, the LLM writes it (:func:`reflect` with ``llm``); without one, or where its answer is empty or the
call fails, it is derived from the score changes (:func:`score_reflection`). Successes and failures both get one:
a failed episode is as useful to the next agent as a successful one.
"""

from __future__ import annotations

import logging

from knowmap.agent import prompts
from knowmap.agent.llm import ChatModel
from knowmap.errors import LLMError
from knowmap.schemas import Subgoal, Trajectory

log = logging.getLogger(__name__)
MAX_LLM_REFLECTIONS = 6  # per episode: an episode of failed steps has few segments, but bound the cost anyway


def score_reflection(goal: Subgoal, final_score: float) -> str:
    """A lesson from the score alone: which action raised it, or which actions did not."""
    if goal.completed:
        return (f"'{goal.actions[-1]}' raised the score from {goal.score_before:g} to {goal.score_after:g}; "
                f"repeat these {len(goal.actions)} action(s) in a similar situation.")
    tried = "; ".join(dict.fromkeys(goal.actions[-5:]))
    ending = "the episode ended" if final_score < 100 else "the task was already complete"
    return (f"{len(goal.actions)} action(s) without a score change before {ending} (final score "
            f"{final_score:g}); these did not help: {tried}.")


def reflect(trajectory: Trajectory, subgoals: list[Subgoal], llm: ChatModel | None = None,
            max_llm: int = MAX_LLM_REFLECTIONS) -> list[Subgoal]:
    """``subgoals`` with a reflection each (sub-goals that already have one keep it).

    Args:
        llm: writes the reflections of the first ``max_llm`` sub-goals; None = from score changes only.
    """
    out = []
    for i, goal in enumerate(subgoals):
        if goal.reflection:
            out.append(goal)
            continue
        text = ""
        if llm is not None and i < max_llm:
            try:
                answer = llm.chat(prompts.reflection_messages(trajectory.task_description or trajectory.task,
                                                              goal.actions, goal.score_before, goal.score_after,
                                                              trajectory.final_score), max_tokens=48)
                text = prompts.clip(answer, 300)
            except LLMError as e:  # a reflection is worth less than the trajectory: fall back, do not fail
                log.warning("LLM reflection failed, using the score-based one: %s", e)
        out.append(goal.model_copy(update={"reflection": text or score_reflection(goal, trajectory.final_score)}))
    return out
