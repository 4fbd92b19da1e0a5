"""The LLM agent as a :class:`~knowmap.agent.policy.Policy`: planner, actuator and evaluator around a memory.

Each step: the memory records the observation; the evaluator judges it (progress moves the plan on, a stall
makes the planner rewrite the plan, with experience retrieved for the situation); env facts relevant to the
current sub-goal are retrieved; the actuator picks a valid action. The knowledge mode decides what is retrieved:
``none`` (the few-shot baseline: nothing), ``kb-base`` and ``kb-finetuned`` (both KBs, through the retriever the
caller built with the matching embedder).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from knowmap.agent.llm import ChatModel, TokenUsage
from knowmap.agent.memory import KnowledgeAccess, Memory
from knowmap.agent.policy import LLM_POLICY_NAMES, EpisodeContext
from knowmap.agent.scaffold import Actuator, Evaluator, Plan, Planner
from knowmap.config import AgentConfig, KnowMapConfig
from knowmap.errors import KnowMapError
from knowmap.models.registry import read_latest
from knowmap.schemas import KnowledgeItem, StepRecord

KnowledgeMode = Literal["none", "kb-base", "kb-finetuned"]
KNOWLEDGE_MODES: tuple[KnowledgeMode, ...] = ("none", "kb-base", "kb-finetuned")

# Builds the knowledge access of one episode: (context) -> access; None for mode "none".
KnowledgeFactory = Callable[[EpisodeContext], KnowledgeAccess | None]


def knowledge_mode(policy: str, default: str = "kb-base") -> KnowledgeMode:
    """The knowledge mode a policy name asks for (``llm`` = ``default``).

    Raises:
        KnowMapError: not an LLM policy name (the message lists them).
    """
    if policy == "llm":
        policy = f"llm-{default}"
    mode = policy.removeprefix("llm-")
    if not policy.startswith("llm-") or mode not in KNOWLEDGE_MODES:
        raise KnowMapError(f"unknown LLM policy {policy!r}; allowed: {', '.join(LLM_POLICY_NAMES)}")
    return mode  # type: ignore[return-value]


def embedder_path(config: KnowMapConfig, mode: str) -> str:
    """The embedder a knowledge mode retrieves with: ``kb-base`` = ``models.embedder`` (empty = the packaged
    MiniLM); ``kb-finetuned`` = ``agent.finetuned_embedder``, else the newest from ``knowmap train``.

    Raises:
        KnowMapError: ``kb-finetuned`` and no fine-tuned embedder exists (the message says how to train one).
    """
    if mode == "kb-base":
        return config.models.embedder
    if mode != "kb-finetuned":
        raise KnowMapError(f"mode {mode!r} retrieves nothing; embedders exist for kb-base and kb-finetuned")
    path = config.agent.finetuned_embedder
    latest = config.paths.latest_models
    if not path:
        path = read_latest(config.paths).embedder
    if not path or not Path(path).is_dir():
        raise KnowMapError(f"kb-finetuned needs a fine-tuned embedder, and none was found (agent.finetuned_embedder "
                           f"is empty and {latest} names {path or 'none'}): run `knowmap build-kb` and "
                           "`knowmap train` first, or leave kb-finetuned out of --modes")
    return str(path)


class AgentStats(BaseModel):
    """What one episode of the LLM agent cost and did."""

    usage: TokenUsage = TokenUsage()
    replans: int = 0
    invalid_answers: int = 0  # answers that named no valid action (the best candidate was taken instead)
    facts_retrieved: int = 0  # env facts put into prompts, over the episode
    experience_retrieved: int = 0  # experiential sub-goals put into plans and prompts (per retrieval)
    plan: list[str] = []


class LLMPolicy:
    """The scaffold behind the :class:`~knowmap.agent.policy.Policy` protocol.

    Args:
        llm: the chat model (:class:`~knowmap.agent.llm.LLMClient` or a test double).
        config: the ``agent`` config section.
        knowledge: builds each episode's knowledge access; None = the few-shot baseline.
        mode: the knowledge mode, for the policy's name.
    """

    needs_valid_actions = True
    needs_gold = False
    needs_knowledge = False  # the memory retrieves itself, with the plan's current sub-goal as the query

    def __init__(self, llm: ChatModel, config: AgentConfig | None = None, knowledge: KnowledgeFactory | None = None,
                 mode: KnowledgeMode = "none") -> None:
        self.config = config or AgentConfig()
        self.llm, self.knowledge, self.mode = llm, knowledge, mode
        self.name = f"llm-{mode}"
        self.planner = Planner(llm, self.config.plan_max_subgoals)
        self.actuator = Actuator(llm, self.config.shortlist)
        self.evaluator = Evaluator(self.config.stall_steps)
        self.memory = Memory(self.config.history_window)
        self.stats = AgentStats()
        self._context: EpisodeContext | None = None
        self._plan = Plan(steps=["explore"])
        self._experience: list[KnowledgeItem] = []
        self._plan_step = 0
        self._usage_start = TokenUsage()

    def begin(self, context: EpisodeContext) -> None:
        """Start an episode: fresh memory and usage, knowledge for this episode, a first plan."""
        self._context = context
        self.memory.reset(self.knowledge(context) if self.knowledge is not None else None)
        self.stats = AgentStats()
        self._usage_start = self.llm.usage.model_copy()
        self._experience = self.memory.experience(context.task_description, self.config.k_experience)
        self.stats.experience_retrieved += len(self._experience)
        self._plan = self.planner.plan(context.task_description, self._experience)
        self._plan_step = 0
        self.stats.plan = list(self._plan.steps)
        self.stats.usage = _minus(self.llm.usage, self._usage_start)

    def act(self, step: StepRecord, knowledge: list[KnowledgeItem]) -> str | None:
        """Observe ``step``, judge it, replan on a stall, and choose the next valid action."""
        if self._context is None:
            raise KnowMapError("LLMPolicy.act before begin(): start the episode first")
        task = self._context.task_description
        self.memory.observe(step)
        verdict = self.evaluator.assess(self.memory.entries, since=self._plan_step)
        if verdict.status == "progress":  # a new sub-goal: the experience that fits it, with this env's facts
            self._plan.advance()
            self._experience = self.memory.experience(f"{task} {self._plan.subgoal}", self.config.k_experience)
            self.stats.experience_retrieved += len(self._experience)
        elif verdict.status == "stall" and self.stats.replans < self.config.max_replans:
            query = f"{task} {self._plan.subgoal} {step.observation}"
            self._experience = self.memory.experience(query, self.config.k_experience)
            self.stats.experience_retrieved += len(self._experience)
            recent = self.memory.history_lines()[-4:]
            self._plan = self.planner.plan(task, self._experience, problem=verdict.reason, recent=recent)
            self._plan_step = step.step
            self.stats.replans += 1
            self.stats.plan = list(self._plan.steps)
        facts = self.memory.facts(f"{self._plan.subgoal}. {task}", self.config.k_env)
        self.stats.facts_retrieved += len(facts)
        choice = self.actuator.choose(
            task=task, plan=self._plan, experience=self._experience, facts=facts,
            history=self.memory.history_lines(), observation=step.observation,
            valid_actions=step.valid_actions or [],
            recent_actions=[e.action for e in self.memory.recent(self.config.history_window)],
        )
        if not choice.valid:
            self.stats.invalid_answers += 1
        self.stats.usage = _minus(self.llm.usage, self._usage_start)
        return choice.action

    def usage_since_begin(self) -> TokenUsage:
        """Tokens and calls since :meth:`begin`, including any made afterwards with :attr:`llm` (reflections)."""
        return _minus(self.llm.usage, self._usage_start)


def _minus(now: TokenUsage, start: TokenUsage) -> TokenUsage:
    return TokenUsage(prompt_tokens=now.prompt_tokens - start.prompt_tokens,
                      completion_tokens=now.completion_tokens - start.completion_tokens,
                      calls=now.calls - start.calls)
