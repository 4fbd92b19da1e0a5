"""What jobs and pools hand back: typed results that cross a Ray call or a job boundary.

:class:`EpisodeResult` is one played episode (a value also when it failed: ``ok``, ``error`` and ``retryable`` say
what happened and whether the pool may try again).

The jobs' results: :class:`RetrievalEvaluation` (``evaluate_retrieval``, ``knowmap eval-retrieval``),
:class:`TrainingReport` (``knowmap train``), :class:`AgentEvaluation` (``knowmap eval``) and :class:`AgentRounds`
(the agent stage of ``knowmap run``). Callers read them through attributes and accessors
(``evaluation.ndcg("env", "finetuned")``), never through nested string keys. Their ``model_dump(mode="json")`` is
exactly the JSON these jobs wrote as plain dicts before they were typed (same keys, same order, ints stay ints),
because committed result files and the docs quote it; tests/unit/test_results.py holds them to that.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

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
    segment_seconds: float = 0.0  # cutting the trajectory into sub-goals against the env KB (as the agent waits)
    embed_seconds: float = 0.0  # the experiential KB's time embedding and storing the episode's rows
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


# -- retrieval evaluation (knowmap.evaluation.retrieval.evaluate_retrieval) --------------------------------------------
MetricValues = dict[str, float | int]  # "recall@1", "mrr", "ndcg@10", ... -> mean; "queries" -> how many (an int)
SUBSETS = ("all", "seen", "unseen")


class RetrievalProtocol(BaseModel):
    """How a retrieval evaluation was run: the held-out episodes, which tasks the models saw in training, the
    relevance threshold and the systems compared.

    ``embedder``, ``reranker`` and ``variations`` are recorded by ``knowmap eval-retrieval`` (set them with
    :meth:`record_models`); a protocol that never had them set leaves them out of its JSON, as it always did.
    """

    splits: list[str]
    episodes: list[str]
    tasks: list[str]
    train_tasks: list[str]
    unseen_tasks: list[str] = Field(description="tasks of the episodes that are not among train_tasks")
    theta: float = Field(description="experience relevance: base-embedder similarity above this")
    rerank_top: int | None = Field(description="first-stage results the reranker re-orders; None: no reranker")
    relevance_embedder: str | None = Field(description="the version of the embedder that judged relevance")
    systems: list[str] = Field(description="the first-stage systems (each also '+rerank' with a reranker)")
    embedder: str | None = Field(default=None, description="the fine-tuned embedder's dir; None: none evaluated")
    reranker: str | None = Field(default=None, description="the reranker's dir; None: none evaluated")
    variations: int | None = Field(default=None, description="variations per task evaluated")

    def record_models(self, *, embedder: str | None, reranker: str | None, variations: int) -> None:
        """Record the evaluated model dirs (None: none) and the variations per task in the protocol."""
        self.embedder, self.reranker, self.variations = embedder, reranker, variations

    @model_serializer(mode="wrap")
    def _leave_out_unrecorded(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name in ("embedder", "reranker", "variations"):
            if name not in self.model_fields_set:  # None is a recorded value ("no fine-tuned model"); unset is not
                data.pop(name, None)
        return data


class SystemMetrics(BaseModel):
    """One retrieval system on one KB kind: metrics over all queries, over the queries of tasks seen in training
    and of unseen tasks (None: no such query), and per task."""

    all: MetricValues
    seen: MetricValues | None = None
    unseen: MetricValues | None = None
    per_task: dict[str, MetricValues] = Field(default_factory=dict)

    def subset(self, name: str = "all") -> MetricValues | None:
        """The metrics of the ``all``, ``seen`` or ``unseen`` queries (None: that subset has no query).

        Raises:
            ValueError: another subset name.
        """
        if name not in SUBSETS:
            raise ValueError(f"unknown subset {name!r}; allowed: {', '.join(SUBSETS)}")
        return getattr(self, name)

    def metric(self, name: str, subset: str = "all") -> float | None:
        """One metric (e.g. ``"ndcg@10"``) of a subset; None where the subset has no query or no such metric."""
        values = self.subset(subset)
        return None if values is None else values.get(name)


class KindEvaluation(BaseModel):
    """Every system's metrics on the queries of one KB kind (``env``, ``experience`` or ``joint``)."""

    queries: int = Field(ge=0)
    systems: dict[str, SystemMetrics] = Field(description="system name ('bm25', 'base', 'base+rerank', ...)")


class DecisionEvaluation(BaseModel):
    """What :func:`knowmap.evaluation.decision.evaluate_decision` measured, judged by gold next actions: per knowledge
    mode (``none``, ``bm25``, ``kb-base``, ``kb-finetuned``, each retrieving mode also ``+rerank``) the metrics over
    every judged step (``modes``), over the steps of topic families seen in training (``seen``) and of families
    never trained on (``unseen``; None: no such step), and the protocol they were measured under."""

    protocol: dict[str, Any]
    modes: dict[str, MetricValues]
    seen: dict[str, MetricValues] | None = None
    unseen: dict[str, MetricValues] | None = None
    unseen_families: list[str] = Field(default_factory=list)

    def subset(self, name: str = "all") -> dict[str, MetricValues] | None:
        """Every mode's metrics over the ``all``, ``seen`` or ``unseen`` steps (None: no such step).

        Raises:
            ValueError: another subset name.
        """
        if name not in SUBSETS:
            raise ValueError(f"unknown subset {name!r}; allowed: {', '.join(SUBSETS)}")
        return self.modes if name == "all" else getattr(self, name)

    def metric(self, mode: str, name: str, subset: str = "all") -> float | None:
        """One metric of one mode (None: the subset has no step, the mode was not run or lacks the metric)."""
        values = (self.subset(subset) or {}).get(mode)
        found = None if values is None else values.get(name)
        return None if found is None else float(found)


class RetrievalEvaluation(BaseModel):
    """What :func:`knowmap.evaluation.retrieval.evaluate_retrieval` measured: the protocol and, per KB kind, every
    system's metrics, and, where it was run, the decision-support evaluation. Its ``model_dump(mode="json")`` is
    the JSON ``knowmap eval-retrieval`` writes."""

    protocol: RetrievalProtocol
    kinds: dict[str, KindEvaluation] = Field(default_factory=dict)
    decision: DecisionEvaluation | None = None

    @model_serializer(mode="wrap")
    def _leave_out_unmeasured(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.decision is None:
            data.pop("decision", None)
        return data

    def system(self, kind: str, system: str) -> SystemMetrics:
        """The metrics of ``system`` on ``kind``.

        Raises:
            KeyError: a kind or system that was not evaluated (the message names those that were).
        """
        if kind not in self.kinds:
            raise KeyError(f"kind {kind!r} was not evaluated; evaluated: {', '.join(self.kinds) or 'none'}")
        systems = self.kinds[kind].systems
        if system not in systems:
            raise KeyError(f"system {system!r} was not evaluated on {kind}; evaluated: {', '.join(systems)}")
        return systems[system]

    def metric(self, kind: str, system: str, name: str, subset: str = "all") -> float | None:
        """One metric of ``system`` on ``kind`` over a subset of queries (None: the subset has no query)."""
        return self.system(kind, system).metric(name, subset)

    def ndcg(self, kind: str, system: str, subset: str = "all") -> float | None:
        """nDCG@10 of ``system`` on ``kind`` over a subset of queries (None: the subset has no query)."""
        return self.metric(kind, system, "ndcg@10", subset)

    def ndcg_by_kind(self, system: str) -> dict[str, float]:
        """nDCG@10 of ``system`` over all queries of each kind (what the retrain gate compares)."""
        return {kind: float(self.system(kind, system).all["ndcg@10"]) for kind in self.kinds}


# -- retriever training (knowmap.jobs.training.train_retriever) -----------------------------------------------------
class TrainedModel(BaseModel):
    """A model one training run produced: where it is, its per-epoch metrics (``epoch``, ``loss``, ...), and how
    many epochs this run trained (0 when checkpoints already covered them all)."""

    model_dir: str
    history: list[dict[str, Any]] = Field(default_factory=list)
    epochs_run: int = 0

    @property
    def final_loss(self) -> float | None:
        """The last epoch's loss; None before any epoch."""
        return self.history[-1].get("loss") if self.history else None


class TrainingReport(BaseModel):
    """What ``knowmap train`` did: the data it trained on, the pair counts, and the models it produced. Its JSON is
    ``<data_dir>/training/report.json``; ``reranker`` is left out where none was trained."""

    episodes: int = Field(ge=0)
    train_tasks: list[str]
    pairs: dict[str, int] = Field(description="training pairs per kind")
    data_hash: str
    embedder: TrainedModel
    reranker: TrainedModel | None = Field(default=None, exclude_if=lambda model: model is None)
    selection: dict[str, Any] | None = Field(default=None, exclude_if=lambda value: value is None,
                                             description="how the embedder was chosen on dev (select_on_dev)")

    @property
    def reranker_dir(self) -> str:
        """The reranker's dir; empty where none was trained."""
        return self.reranker.model_dir if self.reranker is not None else ""

    def models(self) -> dict[str, TrainedModel]:
        """The models trained, by role (``embedder``, and ``reranker`` where one was trained)."""
        return {"embedder": self.embedder} | ({"reranker": self.reranker} if self.reranker is not None else {})


# -- LLM-agent evaluation (knowmap.jobs.agent_eval) -----------------------------------------------------------------
class AgentEvalProtocol(BaseModel):
    """The exact protocol of an agent evaluation, printed and written with every score."""

    split: str
    tasks: list[str]
    variations_per_task: int
    variations: dict[str, list[int]] = Field(description="the variations played, per task")
    step_limit: int
    simplifications: str
    scienceworld_version: str
    model: str
    endpoint: str
    constraint_style: str
    temperature: float
    modes: list[str]
    embedders: dict[str, str] = Field(description="knowledge mode -> the embedder it retrieved with")
    agent: dict[str, Any] = Field(description="the agent config in force (its model_dump)")
    score: str = Field(description="how scores are counted")
    workers: int | str = Field(description="agent actors, or 'cores'")
    seconds: float


class ModeTokens(BaseModel):
    """Tokens and LLM calls one knowledge mode spent over all its episodes."""

    prompt: int = 0
    completion: int = 0
    calls: int = 0

    @property
    def total(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt + self.completion


class AgentModeSummary(BaseModel):
    """One knowledge mode's scores (0-100; None: no episode of it finished), failures and costs."""

    mean: float | None = None
    per_task: dict[str, float] = Field(default_factory=dict)
    episodes: int = 0
    failed: int = 0
    tokens: ModeTokens = Field(default_factory=ModeTokens)
    steps: int = 0
    invalid_answers: int = 0
    replans: int = 0
    seconds: float = 0.0


class AgentEpisodeScore(BaseModel):
    """One scored agent episode: ``score`` counts a failed task (-100) as 0 and is None where the episode errored;
    ``raw_score`` is ScienceWorld's own."""

    mode: str
    task: str
    variation: int
    ok: bool
    score: float | None
    raw_score: float
    steps: int = 0
    episode_id: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    llm_calls: int = 0
    replans: int = 0
    invalid_answers: int = 0
    plan: list[str] = Field(default_factory=list)
    facts_retrieved: int = 0
    experience_retrieved: int = 0
    seconds: float = 0.0
    error: str = Field(default="", description="the first line of the error; empty when ok")


class AgentEvaluation(BaseModel):
    """What :func:`knowmap.jobs.agent_eval.summarise` makes of the pool's results: per-mode scores and every
    episode, with the protocol where the caller recorded one. Its JSON is what ``knowmap eval`` writes."""

    protocol: AgentEvalProtocol | None = None
    modes: dict[str, AgentModeSummary] = Field(default_factory=dict)
    episodes: list[AgentEpisodeScore] = Field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        """The protocol's tasks; without a protocol, every task a mode has a score for."""
        if self.protocol is not None:
            return self.protocol.tasks
        return sorted({t for block in self.modes.values() for t in block.per_task})

    def failed_episodes(self) -> list[AgentEpisodeScore]:
        """The episodes that errored (not scored)."""
        return [e for e in self.episodes if not e.ok]


class AgentRoundSummary(BaseModel):
    """One knowledge mode's round of agent rollouts in ``knowmap run`` (``tokens``: prompt + completion)."""

    mean_score: float | None = None
    per_task: dict[str, float] = Field(default_factory=dict)
    episodes: int = 0
    failed: int = 0
    steps: int = 0
    tokens: int = 0


class AgentRounds(BaseModel):
    """The agent stage of ``knowmap run``: one round per knowledge mode on dev variations, every episode."""

    modes: dict[str, AgentRoundSummary] = Field(default_factory=dict)
    episodes: list[AgentEpisodeScore] = Field(default_factory=list)
    variations: dict[str, list[int]] = Field(default_factory=dict, description="dev variations played, per task")
    step_limit: int = 0

    @classmethod
    def from_evaluation(cls, evaluation: AgentEvaluation, variations: dict[str, list[int]],
                        step_limit: int) -> AgentRounds:
        """The rounds of an :class:`AgentEvaluation` (a mode's mean_score stays None where every episode failed)."""
        modes = {mode: AgentRoundSummary(mean_score=block.mean, per_task=block.per_task, episodes=block.episodes,
                                         failed=block.failed, steps=block.steps, tokens=block.tokens.total)
                 for mode, block in evaluation.modes.items()}
        return cls(modes=modes, episodes=evaluation.episodes, variations=variations, step_limit=step_limit)
