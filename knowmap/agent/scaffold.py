"""The LLM agent's parts: a Planner (sub-goals), an Actuator (the next valid action), an Evaluator (progress or
stall). :class:`~knowmap.agent.llm_policy.LLMPolicy` composes them around a :class:`~knowmap.agent.memory.Memory`.

ScienceWorld offers ~2,000 valid actions per step, too many for a prompt or a grammar on a small context. The
actuator therefore ranks them by relevance to the current sub-goal, the task and the retrieved knowledge
(:func:`shortlist`: word overlap weighted by rarity, actions that retrieved experience used first, recent
repeats last) and lets the LLM choose among the top few; the answer is constrained to that shortlist, or, with
constraint style ``none``, matched to the nearest valid action. An answer that is still not valid is never sent
to the environment: the best-ranked candidate is taken instead, and counted.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel

from knowmap.agent import prompts
from knowmap.agent.llm import ChatModel, nearest_choice
from knowmap.agent.memory import HistoryEntry
from knowmap.errors import ConstraintIgnoredError
from knowmap.schemas import KnowledgeItem

_WORD = re.compile(r"[a-z0-9]+")
_NUMBERED = re.compile(r"^\s*(?:\d+[.):]|[-*•])\s*")
_STOPWORDS = {"the", "a", "an", "to", "on", "in", "of", "and", "is", "it", "your", "you", "that", "this", "for",
              "then", "with", "from", "first", "task", "will", "be", "into", "at", "by", "which", "are"}
# Feedback ScienceWorld gives to actions that did nothing.
_NO_EFFECT = ("no known action", "not clear", "can't", "cannot", "unknown action", "there is no", "nothing happens",
              "is not", "already", "ambiguous")


def words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


def knowledge_actions(items: Sequence[KnowledgeItem]) -> list[str]:
    """The actions written in retrieved sub-goals (their ``Actions: a; b`` line), in order, without repeats."""
    return written_actions([item.text for item in items])


def written_actions(texts: Sequence[str]) -> list[str]:
    """The actions written in sub-goal texts (their ``Actions: a; b`` line), in order, without repeats."""
    found: list[str] = []
    for text in texts:
        for line in text.splitlines():
            if line.startswith("Actions:"):
                found += [a.strip() for a in line.removeprefix("Actions:").split(";") if a.strip()]
    return list(dict.fromkeys(found))


def actuator_query(subgoal: str, task: str, facts: Sequence[str]) -> str:
    """What the actuator ranks valid actions against: the current sub-goal (twice: it weighs most), the task and
    the retrieved env facts."""
    return " ".join([subgoal, subgoal, task, *facts])


def rank_actions(valid: Sequence[str], query: str, *, preferred: Sequence[str] = (),
                 recent: Sequence[str] = ()) -> list[str]:
    """Every distinct valid action, most relevant to ``query`` first: the order :func:`shortlist` picks from.

    Word overlap with ``query`` weighted by rarity among the valid actions, ``preferred`` actions (from retrieved
    experience) first, ``recent`` ones down so that the agent does not loop.
    """
    valid = list(dict.fromkeys(valid))
    tokens = [set(words(a)) for a in valid]
    df = Counter(w for ws in tokens for w in ws)
    n = len(valid)
    q = Counter(words(query))
    recent_count = Counter(recent)
    preferred_rank = {a: i for i, a in enumerate(preferred)}

    def score(i: int) -> float:
        action = valid[i]
        s = sum(math.log(1 + n / df[w]) * min(q[w], 3) for w in tokens[i] if w in q)
        s /= math.sqrt(max(1, len(tokens[i])))  # long "move X to Y" combinations do not win by length alone
        if action in preferred_rank:
            s += 50.0 - preferred_rank[action] * 0.1
        s -= 4.0 * recent_count[action]
        return s

    return [valid[i] for i in sorted(range(n), key=lambda i: (-score(i), len(valid[i]), valid[i]))]


def shortlist(valid: Sequence[str], query: str, *, size: int, preferred: Sequence[str] = (),
              recent: Sequence[str] = (), ranked: Sequence[str] | None = None) -> list[str]:
    """The ``size`` valid actions most relevant to ``query``, best first.

    Args:
        valid: the step's valid actions.
        query: what the agent is after (:func:`actuator_query`).
        preferred: actions known to have helped before (from retrieved experience); valid ones rank first.
        recent: actions taken in the last steps; ranked down so that the agent does not loop.
        ranked: :func:`rank_actions` of the same arguments, where the caller has it already.

    Returns:
        up to ``size`` distinct valid actions; a couple of movement actions are always among them.
    """
    order = list(ranked) if ranked is not None else rank_actions(valid, query, preferred=preferred, recent=recent)
    preferred_set = set(preferred)
    # At most a quarter of the list per verb: combinatorial verbs (connect X to Y, move X to Y, mix, pour) would
    # otherwise fill it with variations of one idea; known-good actions are exempt.
    cap, per_verb, chosen = max(2, size // 4), Counter(), []
    for action in order:
        if len(chosen) == size:
            break
        verb = _verb(action)
        if action in preferred_set or per_verb[verb] < cap:
            chosen.append(action)
            per_verb[verb] += 1
    taken = set(chosen)
    chosen += [a for a in order if a not in taken][: size - len(chosen)]
    movement = [a for a in order if a.startswith(("go to", "open door"))]
    for action in movement[:2]:
        if action in chosen:
            continue
        if len(chosen) < size:
            chosen.append(action)
            continue
        # Full: the movement action takes the place of the lowest-ranked other action.
        spare = [i for i, a in enumerate(chosen) if not a.startswith(("go to", "open door"))]
        if spare:
            chosen[spare[-1]] = action
    return chosen


def _verb(action: str) -> str:
    """The action's verb: its first word, or first two for ScienceWorld's two-word verbs (``go to``)."""
    parts = action.split()
    if len(parts) > 1 and parts[1] in ("to", "on", "up", "down", "at", "in", "around"):
        return " ".join(parts[:2])
    return parts[0] if parts else ""


def parse_plan(text: str, max_subgoals: int) -> list[str]:
    """Sub-goals from a numbered (or bulleted, or plain) list, one per line; at most ``max_subgoals``."""
    steps = []
    for line in text.splitlines():
        line = _NUMBERED.sub("", line).strip().strip("*").strip()
        # Small models echo the prompt's example: its history lines ("> ...") and headings ("History:").
        if len(line) >= 3 and not line.startswith(">") and not line.endswith(":") and not line.lower().startswith(
                ("plan", "here is", "task:", "example")):
            steps.append(prompts.clip(line, 120))
    return list(dict.fromkeys(steps))[:max_subgoals]


class Plan(BaseModel):
    """Sub-goals and which one the agent is on."""

    steps: list[str]
    current: int = 0

    @property
    def subgoal(self) -> str:
        return self.steps[min(self.current, len(self.steps) - 1)]

    def advance(self) -> None:
        self.current = min(self.current + 1, len(self.steps) - 1)


class Planner:
    """Writes a plan from the task and retrieved experience; rewrites it when the evaluator reports a stall."""

    def __init__(self, llm: ChatModel, max_subgoals: int = 5, max_tokens: int = 96) -> None:
        self.llm, self.max_subgoals, self.max_tokens = llm, max_subgoals, max_tokens

    def plan(self, task: str, experience: Sequence[KnowledgeItem], problem: str = "",
             recent: Sequence[str] = ()) -> Plan:
        """A new plan; falls back to the task itself as the one sub-goal if the answer has no usable line."""
        text = self.llm.chat(prompts.plan_messages(task, experience, self.max_subgoals, problem, recent),
                             max_tokens=self.max_tokens)
        steps = parse_plan(text, self.max_subgoals)
        return Plan(steps=steps or [prompts.clip(task.split(".")[0], 120)])


class Choice(BaseModel):
    """The actuator's decision and how it was reached."""

    action: str
    candidates: list[str]
    answer: str  # what the LLM said
    valid: bool  # the answer named a valid action (else the best-ranked candidate was taken)


class Actuator:
    """Chooses the next action among the valid ones, given the plan, env facts and recent history."""

    def __init__(self, llm: ChatModel, shortlist_size: int = 12) -> None:
        self.llm, self.shortlist_size = llm, shortlist_size

    def choose(self, *, task: str, plan: Plan, experience: Sequence[KnowledgeItem], facts: Sequence[KnowledgeItem],
               history: Sequence[str], observation: str, valid_actions: Sequence[str],
               recent_actions: Sequence[str]) -> Choice:
        """Build the shortlist, ask the LLM, validate the answer.

        Raises:
            LLMError: the endpoint failed (after the client's retries).
            ValueError: there are no valid actions.
        """
        if not valid_actions:
            raise ValueError("the actuator needs the step's valid actions")
        query = actuator_query(plan.subgoal, task, [f.text for f in facts])
        candidates = shortlist(valid_actions, query, size=self.shortlist_size,
                               preferred=[a for a in knowledge_actions(experience) if a in set(valid_actions)],
                               recent=recent_actions)
        constrained = self.llm.constraint_style != "none"
        messages = prompts.action_messages(task, plan.steps, plan.current, experience, history, observation, facts,
                                           candidates, constrained)
        try:
            answer = self.llm.chat(messages, choices=candidates)
        except ConstraintIgnoredError:
            answer = ""  # a server that ignored the constraint: fall back to the best candidate, counted
        if constrained:
            valid = answer in candidates
            action = answer if valid else candidates[0]
        else:
            action = nearest_choice(answer, list(valid_actions)) if answer.strip() else candidates[0]
            valid = " ".join(answer.lower().split()).strip(" .") == action.lower()
        return Choice(action=action, candidates=candidates, answer=answer, valid=valid)


Status = Literal["start", "progress", "ok", "stall", "done"]


class Verdict(BaseModel):
    status: Status
    reason: str = ""


class Evaluator:
    """Judges the last step: progress (the score rose), stall (no rise for ``stall_steps`` steps since the plan
    was made, the same action three times, or three ineffective actions in a row), or ok."""

    def __init__(self, stall_steps: int = 6) -> None:
        self.stall_steps = stall_steps

    def assess(self, history: Sequence[HistoryEntry], since: int) -> Verdict:
        """Args: history: the episode so far; since: the step at which the current plan was made."""
        if len(history) <= 1:
            return Verdict(status="start")
        last = history[-1]
        if last.reward > 0:
            return Verdict(status="progress", reason=f"the score rose to {last.score:g}")
        actions = [h.action for h in history[-3:]]
        if len(history) > 3 and len(set(actions)) == 1:
            return Verdict(status="stall", reason=f"the same action '{actions[0]}' three times")
        tail = history[-3:]
        if len(history) > 3 and all(any(p in h.observation.lower() for p in _NO_EFFECT) for h in tail):
            return Verdict(status="stall", reason="the last three actions had no effect")
        best_step = max((h.step for h in history if h.reward > 0), default=0)
        if last.step - max(best_step, since) >= self.stall_steps:
            return Verdict(status="stall", reason=f"no progress in {last.step - max(best_step, since)} steps")
        return Verdict(status="ok")
