"""Decisions on errors read their type, never their message: the actuator falls back on ``ConstraintIgnoredError``
only, whatever another error's text says; the new types keep their parents and retry flags. (The retrieval
backend's re-index on ``VersionNotIndexedError``: ``test_reindex_by_type.py``.)"""

from __future__ import annotations

from typing import Any

import pytest

from knowmap.agent.scaffold import Actuator, Plan
from knowmap.errors import (
    ConstraintIgnoredError,
    KnowMapError,
    LLMError,
    LLMUnavailableError,
    VersionNotIndexedError,
    is_retryable,
)


class RefusingLLM:
    """Raises ``error`` on the constrained action call."""

    constraint_style = "grammar"

    def __init__(self, error: Exception) -> None:
        self.error = error

    def chat(self, messages: Any, *, choices: Any = None, max_tokens: Any = None) -> str:
        raise self.error


def choose(error: Exception) -> Any:
    return Actuator(RefusingLLM(error)).choose(
        task="boil water", plan=Plan(steps=["heat the water"]), experience=[], facts=[], history=[],
        observation="You see a stove.", valid_actions=["activate stove", "look around"], recent_actions=[])


def test_the_actuator_falls_back_when_the_server_ignored_the_constraint() -> None:
    choice = choose(ConstraintIgnoredError("the endpoint ignored the grammar constraint"))
    assert choice.answer == "" and not choice.valid and choice.action == choice.candidates[0]


@pytest.mark.parametrize("error", [LLMError("the endpoint ignored the grammar constraint"),  # the old text match
                                   LLMUnavailableError("no LLM answers at http://127.0.0.1:9/v1")])
def test_the_actuator_lets_other_llm_errors_through_whatever_their_message(error: Exception) -> None:
    with pytest.raises(type(error)):
        choose(error)


def test_the_new_types_keep_their_parents_and_retry_flags() -> None:
    assert issubclass(VersionNotIndexedError, KnowMapError) and not is_retryable(VersionNotIndexedError("v"))
    assert issubclass(ConstraintIgnoredError, LLMError)  # callers catching LLMError still catch it
    assert is_retryable(ConstraintIgnoredError("x")) == is_retryable(LLMError("x"))
