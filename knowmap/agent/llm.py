"""The LLM client: any OpenAI-compatible chat endpoint, with the answer constrained to a set of choices.

How the constraint is expressed differs between servers, so it is a setting (``llm.constraint_style``):

* ``json_schema``: ``response_format={"type": "json_schema", ...}`` with an enum (OpenAI, vLLM);
* ``llama_cpp_json``: ``response_format={"type": "json_object", "schema": ...}`` (llama.cpp's server, which
  answers ``json_schema`` with HTTP 500);
* ``grammar``: a GBNF grammar in ``extra_body`` whose only sentences are the choices (llama.cpp, vLLM);
* ``none``: free text; the caller matches it to the nearest valid choice (:func:`nearest_choice`).

Transient failures (connection errors, timeouts, 429, 5xx) are retried with exponential backoff; an endpoint that
never answers raises :class:`LLMUnavailableError`, which says how to start one. Token usage is counted per client
and can be read and reset per episode.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from difflib import SequenceMatcher
from typing import Any, Protocol

from pydantic import BaseModel

from knowmap.config import LLMConfig
from knowmap.errors import ConstraintIgnoredError, LLMError, LLMUnavailableError

Message = dict[str, str]
_WORD = re.compile(r"[a-z0-9]+")


class TokenUsage(BaseModel):
    """Tokens and calls spent, as the endpoint reports them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: TokenUsage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.calls += other.calls


class ChatModel(Protocol):
    """What the scaffold needs of an LLM (the real client, or a scripted double in tests)."""

    constraint_style: str
    usage: TokenUsage

    def chat(self, messages: list[Message], *, choices: Sequence[str] | None = None,
             max_tokens: int | None = None) -> str:
        """The assistant's answer; with ``choices`` and a constraining style, exactly one of them."""
        ...


def choice_schema(choices: Sequence[str]) -> dict[str, Any]:
    """A JSON schema whose only valid documents are ``{"action": <one of choices>}``."""
    return {"type": "object", "properties": {"action": {"type": "string", "enum": list(choices)}},
            "required": ["action"], "additionalProperties": False}


def choice_grammar(choices: Sequence[str]) -> str:
    """A GBNF grammar whose only sentences are the choices (quoted as GBNF string literals)."""
    def literal(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    return "root ::= " + " | ".join(literal(c) for c in choices) + "\n"


def nearest_choice(text: str, choices: Sequence[str]) -> str:
    """The choice closest to free text: exact (case- and space-insensitive), then contained, then by word overlap
    with character similarity to break ties.

    Raises:
        ValueError: ``choices`` is empty.
    """
    if not choices:
        raise ValueError("nearest_choice needs at least one choice")
    folded = {" ".join(c.lower().split()): c for c in choices}
    lines = [" ".join(line.lower().split()).strip(" .\"'`") for line in text.splitlines()]
    lines = [line.removeprefix("action:").strip() for line in lines if line]
    if any(line in folded for line in lines):
        return folded[next(line for line in lines if line in folded)]
    # A model often wraps the action in a sentence ("Your next action is to focus on water."): the longest
    # choice written inside the answer wins.
    whole = " ".join(lines)
    inside = [c for f, c in folded.items() if f and re.search(rf"(?<![a-z0-9]){re.escape(f)}(?![a-z0-9])", whole)]
    if inside:
        return max(inside, key=len)
    norm = lines[0] if lines else ""
    words = set(_WORD.findall(norm))

    def score(choice: str) -> tuple[float, float]:
        cw = set(_WORD.findall(choice.lower()))
        overlap = len(words & cw) / max(1, len(words | cw))
        return overlap, SequenceMatcher(None, norm, choice.lower()).ratio()

    return max(choices, key=score)


class LLMClient:
    """An OpenAI-compatible chat client configured by :class:`LLMConfig`.

    Args:
        config: endpoint (``base_url``), ``model``, ``api_key``, ``temperature``, ``constraint_style``,
            ``max_tokens``, ``timeout_s``, ``max_retries``, ``retry_backoff_s``.

    Raises:
        LLMError: ``base_url`` is empty (start the local server first: :func:`knowmap.agent.local_llm.llm_endpoint`).
    """

    def __init__(self, config: LLMConfig) -> None:
        from openai import OpenAI

        if not config.base_url:
            raise LLMError("llm.base_url is empty: set it to an OpenAI-compatible endpoint "
                           "(e.g. https://api.openai.com/v1) or start the local one with `knowmap llm serve`")
        self.config = config
        self.constraint_style = config.constraint_style
        self.usage = TokenUsage()
        # Retries are ours (below), so that every transient failure is counted and reported the same way.
        self._client = OpenAI(base_url=config.base_url, api_key=config.api_key or "none",
                              timeout=config.timeout_s, max_retries=0)

    def chat(self, messages: list[Message], *, choices: Sequence[str] | None = None,
             max_tokens: int | None = None) -> str:
        """One chat completion.

        Args:
            messages: OpenAI chat messages.
            choices: constrain the answer to one of these (by ``constraint_style``); with style ``none`` the raw
                text comes back and the caller matches it.
            max_tokens: default ``llm.max_tokens``; constrained answers get enough for the longest choice.

        Returns:
            the answer text: one of ``choices`` where the style constrains it.

        Raises:
            LLMUnavailableError: the endpoint did not answer after the retries.
            ConstraintIgnoredError: a constrained answer was not one of the choices.
            LLMError: the endpoint refused the request, or a constrained JSON answer could not be read.
        """
        kwargs: dict[str, Any] = {"model": self.config.model, "messages": messages,
                                  "temperature": self.config.temperature,
                                  "max_tokens": max_tokens or self.config.max_tokens}
        style = self.constraint_style
        if choices:
            choices = list(dict.fromkeys(choices))
            longest = max(len(c) for c in choices)
            kwargs["max_tokens"] = max(kwargs["max_tokens"], longest // 2 + 24)
            if style == "json_schema":
                kwargs["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": "action", "schema": choice_schema(choices), "strict": True}}
            elif style == "llama_cpp_json":
                kwargs["response_format"] = {"type": "json_object", "schema": choice_schema(choices)}
            elif style == "grammar":
                kwargs["extra_body"] = {"grammar": choice_grammar(choices)}
        text = self._complete(kwargs)
        if not choices or style == "none":
            return text
        if style in ("json_schema", "llama_cpp_json"):
            try:
                text = str(json.loads(text)["action"])
            except (ValueError, KeyError, TypeError) as e:
                raise LLMError(f"the endpoint's answer is not the constrained JSON {{'action': ...}}: {text[:200]!r};"
                               f" try llm.constraint_style 'grammar' or 'none' for this server") from e
        text = text.strip()
        if text not in choices:
            raise ConstraintIgnoredError(f"the endpoint ignored the {style} constraint (answered {text[:120]!r}); "
                                         "set llm.constraint_style to one the server supports, or 'none'")
        return text

    def _complete(self, kwargs: dict[str, Any]) -> str:
        import openai

        transient = (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
                     openai.InternalServerError)
        delay = self.config.retry_backoff_s
        for attempt in range(self.config.max_retries + 1):
            try:
                response = self._client.chat.completions.create(**kwargs)
                break
            except transient as e:
                if attempt == self.config.max_retries:
                    if isinstance(e, openai.APIConnectionError | openai.APITimeoutError):
                        raise LLMUnavailableError(
                            f"no LLM answers at {self.config.base_url} after {attempt + 1} attempt(s): {e}. "
                            "Check llm.base_url, or leave it empty to start the local SmolLM2 server") from e
                    raise LLMError(f"{self.config.base_url} failed {attempt + 1} time(s): {e}; if it rejects "
                                   f"constraint style {self.constraint_style!r}, set llm.constraint_style") from e
                time.sleep(delay)
                delay *= 2
            except openai.APIStatusError as e:
                raise LLMError(f"{self.config.base_url} refused the request ({e.status_code}): {e.message}; "
                               "check llm.model, llm.api_key and llm.constraint_style") from e
        usage = getattr(response, "usage", None)
        self.usage.add(TokenUsage(prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                                  completion_tokens=getattr(usage, "completion_tokens", 0) or 0, calls=1))
        if not response.choices:
            raise LLMError(f"{self.config.base_url} returned no choices")
        return response.choices[0].message.content or ""

    def reset_usage(self) -> TokenUsage:
        """Return the usage so far and start counting again (per episode)."""
        used, self.usage = self.usage, TokenUsage()
        return used
