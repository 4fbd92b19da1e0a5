"""Play one episode with a policy, Ray-free: the agent actor of the Ray layer wraps :class:`EpisodeRunner`.

The runner owns one ScienceWorld env (one JVM) and reuses it across episodes. Each step's observation goes to an
``on_step`` callback as soon as it is seen (the actor streams it to the episode's env-KB actor).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from knowmap.agent.llm_policy import LLMPolicy, knowledge_mode
from knowmap.agent.policy import LLM_POLICY_NAMES, POLICIES, EpisodeContext, Policy, is_llm_policy
from knowmap.environment.sciworld import ScienceWorld
from knowmap.errors import KnowMapError
from knowmap.schemas import KnowledgeItem, Split, StepRecord, Trajectory, TrajectorySource

KnowledgeSource = Callable[[Trajectory, StepRecord], list[KnowledgeItem]]


class EpisodeSpec(BaseModel):
    """One episode to play: which task and variation of which split, with which policy."""

    task: str
    variation: int = Field(ge=0)
    split: Split = "train"
    policy: str = "expert"
    seed: int = 0

    @property
    def source(self) -> TrajectorySource:
        return "expert" if self.policy == "expert" else "agent"

    def label(self) -> str:
        return f"{self.task}/{self.split}/{self.variation}/{self.policy}"


class EpisodeRunner:
    """Plays episodes in one ScienceWorld env.

    Args:
        step_limit, simplifications, java_heap: as in :class:`ScienceWorld`.
        look_every_step: record a free ``look around`` after each step (richer env KBs; costs a little).
    """

    def __init__(self, step_limit: int = 100, simplifications: str = "", java_heap: str = "512m",
                 look_every_step: bool = True) -> None:
        self._env_args = {"step_limit": step_limit, "simplifications": simplifications, "java_heap": java_heap}
        self.env = ScienceWorld(**self._env_args)
        self.step_limit = step_limit
        self.look_every_step = look_every_step

    def close(self) -> None:
        self.env.close()

    def ensure_env(self) -> bool:
        """Start a new JVM if this runner's has died; returns True if it had to."""
        if self.env.alive:
            return False
        self.env.close()
        self.env = ScienceWorld(**self._env_args)
        return True

    def run(self, spec: EpisodeSpec, *, policy: Policy | None = None,
            on_step: Callable[[Trajectory, StepRecord], None] | None = None,
            knowledge: KnowledgeSource | None = None) -> Trajectory:
        """Play ``spec`` to the end (the policy stops, the task completes, or the step limit).

        Expert replay is not cut at the step limit: a gold path is a whole demonstration.

        Args:
            policy: defaults to ``make_policy(spec.policy)``.
            on_step: called with the trajectory so far and each new step, step 0 included.
            knowledge: retrieval for policies that ask for it.

        Raises:
            UnknownTaskError, VariationOutOfRangeError, KnowMapError: invalid spec or policy.
        """
        policy = policy or make_policy(spec.policy)
        self.env.step_limit = 1_000_000 if policy.needs_gold else self.step_limit
        first = self.env.load(spec.task, spec.variation, spec.split, gold=policy.needs_gold)
        trajectory = self.env.new_trajectory(spec.source, policy.name, spec.seed)
        if policy.needs_valid_actions:
            first = first.model_copy(update={"valid_actions": self.env.valid_actions()})
        policy.begin(EpisodeContext(
            task=spec.task, variation=spec.variation, split=spec.split,
            task_description=trajectory.task_description, episode_id=trajectory.episode_id,
            gold_actions=self.env.gold_actions() if policy.needs_gold else [], seed=spec.seed,
        ))
        record = first
        while True:
            trajectory.steps.append(record)
            if on_step is not None:
                on_step(trajectory, record)
            if record.done or record.step >= self.env.step_limit:
                break
            items = knowledge(trajectory, record) if (knowledge and policy.needs_knowledge) else []
            action = policy.act(record, items)
            if action is None:
                break
            record = self.env.step(action, valid_actions=policy.needs_valid_actions, look=self.look_every_step)
        return trajectory


def make_policy(name: str, **kwargs: Any) -> Policy:
    """A fresh policy by name; raises KnowMapError listing the known names.

    Args:
        **kwargs: for the LLM policies, :class:`knowmap.agent.llm_policy.LLMPolicy`'s ``llm``, ``config`` and
            ``knowledge`` (its mode comes from the name).
    """
    if is_llm_policy(name):
        if kwargs.get("llm") is None:
            raise KnowMapError(f"policy {name!r} needs an LLM: make_policy({name!r}, llm=LLMClient(...), ...)")
        config = kwargs.get("config")
        mode = knowledge_mode(name, config.knowledge if config is not None else "kb-base")
        return LLMPolicy(mode=mode, **kwargs)
    try:
        return POLICIES[name]()
    except KeyError:
        allowed = ", ".join([*sorted(POLICIES), *LLM_POLICY_NAMES])
        raise KnowMapError(f"unknown policy {name!r}; allowed: {allowed}") from None
