"""What jobs and pools hand back: typed results that cross a Ray call or a job boundary.

:class:`EpisodeResult` is one played episode (a value also when it failed: ``ok``, ``error`` and ``retryable`` say
what happened and whether the pool may try again).
"""

from __future__ import annotations

from pydantic import BaseModel

from knowmap.agent.rollout import EpisodeSpec


class EpisodeResult(BaseModel):
    """What the pool returns for one episode: a value, also when the episode failed (``error`` set)."""

    spec: EpisodeSpec
    episode_id: str = ""
    ok: bool = True
    error: str = ""
    retryable: bool = False  # set where the error was caught: may another attempt succeed (a JVM or actor died)?
    attempts: int = 1
    steps: int = 0
    final_score: float = 0.0
    facts: int = 0
    current_facts: int = 0
    subgoals: int = 0
    seconds: float = 0.0
    env_seconds: float = 0.0  # stepping the env, the policy and handing observations off
    ingest_seconds: float = 0.0  # the env-KB actor's own time spent ingesting (log, fsync, extraction, apply)
    node: str = ""
    pid: int = 0
    # The LLM agent (policies llm-*): tokens, calls, replans, answers that named no valid action, the last plan.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    llm_calls: int = 0
    replans: int = 0
    invalid_answers: int = 0
    facts_retrieved: int = 0
    experience_retrieved: int = 0
    plan: list[str] = []
