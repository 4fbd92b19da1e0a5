"""Policies: what chooses the next action. The LLM agent (:mod:`knowmap.agent.llm_policy`) is one more
implementation of :class:`Policy`; :func:`knowmap.agent.rollout.make_policy` builds any of them by name.

A policy sees the task, the latest step (observation, score, valid actions where the policy asks for them) and
retrieved knowledge, and returns one action string.
"""

from __future__ import annotations

import random
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, Field

from knowmap.errors import KnowMapError
from knowmap.schemas import KnowledgeItem, StepRecord


class EpisodeContext(BaseModel):
    """What a policy is told when an episode starts."""

    task: str
    variation: int
    split: str
    task_description: str
    episode_id: str = Field(default="", description="the episode (and its env KB) id")
    gold_actions: list[str] = Field(default_factory=list, description="only for policies with needs_gold")
    seed: int = 0


@runtime_checkable
class Policy(Protocol):
    """Chooses actions. ``needs_valid_actions`` asks the env to build the (costly) valid-action list each step;
    ``needs_gold`` asks for the gold path at the start of the episode; ``needs_knowledge`` asks for retrieval."""

    name: str
    needs_valid_actions: bool
    needs_gold: bool
    needs_knowledge: bool

    def begin(self, context: EpisodeContext) -> None: ...

    def act(self, step: StepRecord, knowledge: list[KnowledgeItem]) -> str | None:
        """The next action, or None to end the episode."""
        ...


class ExpertPolicy:
    """Replays the gold action sequence."""

    name = "expert"
    needs_valid_actions = False
    needs_gold = True
    needs_knowledge = False

    def __init__(self) -> None:
        self._actions: list[str] = []
        self._next = 0

    def begin(self, context: EpisodeContext) -> None:
        if not context.gold_actions:
            raise KnowMapError(f"no gold path for {context.task} variation {context.variation}")
        self._actions, self._next = list(context.gold_actions), 0

    def act(self, step: StepRecord, knowledge: list[KnowledgeItem]) -> str | None:
        if self._next >= len(self._actions):
            return None
        self._next += 1
        return self._actions[self._next - 1]


class RandomPolicy:
    """Picks uniformly among the valid actions, seeded per episode: the floor any agent must beat."""

    name = "random"
    needs_valid_actions = True
    needs_gold = False
    needs_knowledge = False

    def __init__(self) -> None:
        self._rng = random.Random(0)

    def begin(self, context: EpisodeContext) -> None:
        self._rng = random.Random(f"{context.task}/{context.variation}/{context.seed}")

    def act(self, step: StepRecord, knowledge: list[KnowledgeItem]) -> str | None:
        if not step.valid_actions:
            raise KnowMapError("the random policy needs the valid actions of each step")
        return self._rng.choice(sorted(step.valid_actions))


POLICIES: dict[str, type] = {"expert": ExpertPolicy, "random": RandomPolicy}
# The LLM agent (knowmap.agent.llm_policy): "llm" (the configured knowledge mode) or "llm-<mode>" for the modes
# none, kb-base, kb-finetuned. It needs an LLM and knowledge, so it is built with keyword arguments.
LLM_POLICY_NAMES = ("llm", "llm-none", "llm-kb-base", "llm-kb-finetuned")


def is_llm_policy(name: str) -> bool:
    return name in LLM_POLICY_NAMES
