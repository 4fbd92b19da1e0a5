"""Policies' pure logic: gold replay order, seeded random choice, clear errors."""

from __future__ import annotations

import pytest

from knowmap.agent.policy import EpisodeContext, ExpertPolicy, Policy, RandomPolicy
from knowmap.agent.rollout import make_policy
from knowmap.errors import KnowMapError
from knowmap.schemas import StepRecord


def ctx(**kw) -> EpisodeContext:
    return EpisodeContext(**{"task": "boil", "variation": 0, "split": "train", "task_description": "boil water",
                             **kw})


def step(valid: list[str] | None = None) -> StepRecord:
    return StepRecord(step=0, action="look around", observation="", score=0.0, valid_actions=valid)


def test_expert_replays_gold_then_stops() -> None:
    policy = make_policy("expert")
    assert isinstance(policy, Policy) and policy.needs_gold and not policy.needs_valid_actions
    policy.begin(ctx(gold_actions=["open door to kitchen", "go to kitchen"]))
    assert [policy.act(step(), []) for _ in range(3)] == ["open door to kitchen", "go to kitchen", None]


def test_expert_without_gold_path_is_an_error() -> None:
    with pytest.raises(KnowMapError, match="no gold path"):
        ExpertPolicy().begin(ctx())


def test_random_is_seeded_per_episode_and_picks_valid_actions() -> None:
    valid = [f"action {i}" for i in range(50)]
    runs = []
    for _ in range(2):
        policy = RandomPolicy()
        policy.begin(ctx(seed=7))
        runs.append([policy.act(step(valid), []) for _ in range(10)])
    assert runs[0] == runs[1] and set(runs[0]) <= set(valid)
    other = RandomPolicy()
    other.begin(ctx(seed=8))
    assert [other.act(step(valid), []) for _ in range(10)] != runs[0]
    with pytest.raises(KnowMapError, match="valid actions"):
        other.act(step(None), [])


def test_unknown_policy_lists_the_known_ones() -> None:
    with pytest.raises(KnowMapError, match="allowed: expert, random"):
        make_policy("llm-9000")
