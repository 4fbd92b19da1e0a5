"""The agent's memory: the short-term history of the episode and its access to both knowledge bases.

The history is append-only between *rebases*: the prompt shows the steps since the last rebase, and only when
they exceed twice the window does the start move forward to keep the last ``window`` steps. So most consecutive
prompts share their prefix (the server reuses it), and the prompt never outgrows the context.

Knowledge comes through a :class:`KnowledgeAccess`: :class:`RetrieverKnowledge` wraps the Ray-free
:class:`~knowmap.models.retrieval.Retriever` (whose env-KB and experiential-KB functions may be actor handles or plain
objects); :class:`ServiceKnowledge` goes through the retrieval HTTP API; ``None`` is the few-shot baseline.
Observations are written back through an optional ``sink`` (the agent actor streams each step to its env-KB
actor itself and passes none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pydantic import BaseModel

from knowmap.agent.prompts import history_line
from knowmap.models.retrieval import Retriever
from knowmap.schemas import KB_KINDS, KnowledgeItem, StepRecord


class HistoryEntry(BaseModel):
    step: int
    action: str
    observation: str
    score: float
    reward: float = 0.0


class KnowledgeAccess(Protocol):
    """Where the agent's knowledge comes from."""

    def facts(self, query: str, k: int) -> list[KnowledgeItem]:
        """The ``k`` env facts of this episode's env KB most relevant to ``query``."""
        ...

    def experience(self, query: str, k: int) -> list[KnowledgeItem]:
        """The ``k`` experiential sub-goals most relevant to ``query``."""
        ...


class RetrieverKnowledge:
    """Knowledge through a :class:`Retriever` for one episode.

    Args:
        retriever: with ``env_facts`` and ``experience`` functions.
        env_id: the episode's env KB (its episode id).
        task: experience of this task first; other tasks' only when this one has none.
        splits: keep only experience from these splits (evaluation on test never retrieves test episodes).
    """

    def __init__(self, retriever: Retriever, env_id: str, task: str | None, splits: Sequence[str] = ("train",)
                 ) -> None:
        self.retriever, self.env_id, self.task, self.splits = retriever, env_id, task, set(splits)

    def facts(self, query: str, k: int) -> list[KnowledgeItem]:
        if k < 1:
            return []
        return self.retriever.retrieve(query, env_id=self.env_id, k=k, kbs=("env",))

    def experience(self, query: str, k: int) -> list[KnowledgeItem]:
        """Joint retrieval, as in the paper and in joint training: the query carries this env's facts most relevant
        to it (the retriever appends them), so the sub-goals found fit the situation the agent is in."""
        if k < 1:
            return []
        # Over-fetch: rows of other splits are dropped after the search (the store filters only by task).
        for task in (self.task, None) if self.task else (None,):
            items = self.retriever.retrieve(query, env_id=self.env_id, task=task, k=4 * k, kbs=KB_KINDS)
            items = [i for i in items if i.kind == "subgoal" and i.provenance.get("split") in self.splits][:k]
            if items:
                return items
        return []


class ServiceKnowledge:
    """Knowledge through the retrieval HTTP API (``knowmap.serve.client.KnowMapClient`` or anything with its
    ``retrieve``), for agents that run outside the Ray cluster; the same filters as :class:`RetrieverKnowledge`.
    """

    def __init__(self, client: Any, env_id: str, task: str | None, splits: Sequence[str] = ("train",)) -> None:
        self.client, self.env_id, self.task, self.splits = client, env_id, task, set(splits)

    def facts(self, query: str, k: int) -> list[KnowledgeItem]:
        if k < 1:
            return []
        return list(self.client.retrieve(query, env_id=self.env_id, k=k, kbs=["env"]).items)

    def experience(self, query: str, k: int) -> list[KnowledgeItem]:
        """Joint retrieval: the service appends this env's most relevant facts to the experience query."""
        if k < 1:
            return []
        for task in (self.task, None) if self.task else (None,):
            items = self.client.retrieve(query, env_id=self.env_id, task=task, k=min(50, 4 * k),
                                         kbs=list(KB_KINDS)).items
            items = [i for i in items if i.kind == "subgoal" and i.provenance.get("split") in self.splits][:k]
            if items:
                return items
        return []


class Memory:
    """The episode's history and knowledge.

    Args:
        window: steps the prompt shows (at least this many, at most twice as many).
        knowledge: None = no retrieval (few-shot baseline).
        sink: called with each observed step (write-back to an env KB); None where the caller streams it.
    """

    def __init__(self, window: int = 6, knowledge: KnowledgeAccess | None = None,
                 sink: Callable[[StepRecord], None] | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window, self.knowledge, self.sink = window, knowledge, sink
        self.entries: list[HistoryEntry] = []
        self._start = 0  # first entry the prompt shows

    def reset(self, knowledge: KnowledgeAccess | None = None) -> None:
        self.entries, self._start, self.knowledge = [], 0, knowledge

    def observe(self, step: StepRecord) -> None:
        """Append a step (and write it back through the sink)."""
        self.entries.append(HistoryEntry(step=step.step, action=step.action, observation=step.observation,
                                         score=step.score, reward=step.reward))
        if self.sink is not None:
            self.sink(step)
        if len(self.entries) - self._start > 2 * self.window:
            self._start = len(self.entries) - self.window

    def history_lines(self) -> list[str]:
        """The prompt's history: steps since the last rebase, except the latest (shown as the observation)."""
        return [history_line(e.action, e.observation) for e in self.entries[self._start:-1] if e.step > 0]

    def recent(self, n: int) -> list[HistoryEntry]:
        return self.entries[-n:]

    @property
    def last(self) -> HistoryEntry:
        return self.entries[-1]

    def facts(self, query: str, k: int) -> list[KnowledgeItem]:
        return self.knowledge.facts(query, k) if self.knowledge is not None else []

    def experience(self, query: str, k: int) -> list[KnowledgeItem]:
        return self.knowledge.experience(query, k) if self.knowledge is not None else []
