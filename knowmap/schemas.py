"""Wire schemas: the types every layer (core, actors, HTTP, training) passes around.

All of them are pydantic models, so they validate on the way in and serialise with ``model_dump()`` across Ray
calls and HTTP. Keep this module free of logic beyond small derived properties.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator


class Cardinality(StrEnum):
    SINGLE = "single"
    SET = "set"


class Relation(StrEnum):
    """The relation vocabulary of the environmental KB.

    Single-valued relations hold one object per subject at a time: a new value closes the old fact (the paper's
    replacement rule). Set-valued relations hold many; a full observation of the set replaces it.
    """

    LOCATION = "location"  # (object, location, container or room); the agent's room is (agent, location, room)
    OPEN_STATE = "open_state"  # (door/container, open_state, open|closed)
    POWER_STATE = "power_state"  # (device, power_state, on|off|activated|deactivated)
    READING = "reading"  # (instrument, reading, "10 degrees celsius")
    TEMPERATURE = "temperature"  # (substance, temperature, "13 degrees celsius at step 7"): a measurement and when
    STATE_OF_MATTER = "state_of_matter"  # (substance, state_of_matter, solid|liquid|gas)
    FOCUS = "focus"  # (agent, focus, object): the object the agent focused on
    CONTAINS = "contains"  # (container or room, contains, object)
    CONNECTS_TO = "connects_to"  # (room, connects_to, room), through a door
    PROPERTY = "property"  # (object, property, text): anything else observed about an object


CARDINALITY: dict[Relation, Cardinality] = {
    Relation.LOCATION: Cardinality.SINGLE,
    Relation.OPEN_STATE: Cardinality.SINGLE,
    Relation.POWER_STATE: Cardinality.SINGLE,
    Relation.READING: Cardinality.SINGLE,
    Relation.TEMPERATURE: Cardinality.SINGLE,
    Relation.STATE_OF_MATTER: Cardinality.SINGLE,
    Relation.FOCUS: Cardinality.SINGLE,
    Relation.CONTAINS: Cardinality.SET,
    Relation.CONNECTS_TO: Cardinality.SET,
    Relation.PROPERTY: Cardinality.SET,
}

# How each relation reads as text, for embedding and for prompts.
_PHRASES: dict[Relation, str] = {
    Relation.LOCATION: "is in the",
    Relation.OPEN_STATE: "is",
    Relation.POWER_STATE: "is",
    Relation.READING: "reads",
    Relation.TEMPERATURE: "was measured at",
    Relation.STATE_OF_MATTER: "is a",
    Relation.FOCUS: "is focused on the",
    Relation.CONTAINS: "contains",
    Relation.CONNECTS_TO: "connects to the",
    Relation.PROPERTY: "is",
}


def _clean(text: str) -> str:
    return " ".join(text.split())


class Triple(BaseModel):
    """A fact without time: ``(subject, relation, object)``. Names are lower-cased, whitespace-folded."""

    model_config = ConfigDict(frozen=True)

    subject: str = Field(min_length=1, max_length=256)
    relation: Relation
    object: str = Field(min_length=1, max_length=512)

    @field_validator("subject", "object")
    @classmethod
    def _normalise(cls, value: str) -> str:
        value = _clean(value).lower()
        if not value:
            raise ValueError("must contain a non-blank name")
        return value

    @property
    def key(self) -> tuple[str, Relation]:
        """The (subject, relation) a single-valued relation holds one value for."""
        return (self.subject, self.relation)

    @property
    def cardinality(self) -> Cardinality:
        return CARDINALITY[self.relation]

    def text(self) -> str:
        """The triple as a short English sentence, e.g. ``"metal pot is in the sink"``."""
        return f"{self.subject} {_PHRASES[self.relation]} {self.object}"


class Fact(Triple):
    """A triple with the step range in which it held: ``valid_from <= t < valid_to`` (``valid_to`` None = now)."""

    valid_from: int = Field(ge=0)
    valid_to: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _range(self) -> Fact:
        if self.valid_to is not None and self.valid_to < self.valid_from:
            raise ValueError(f"valid_to ({self.valid_to}) must be >= valid_from ({self.valid_from})")
        return self

    @property
    def is_current(self) -> bool:
        return self.valid_to is None

    def holds_at(self, step: int) -> bool:
        return self.valid_from <= step and (self.valid_to is None or step < self.valid_to)

    def triple(self) -> Triple:
        return Triple(subject=self.subject, relation=self.relation, object=self.object)


# Hard ceilings of the domain types, which every API request body is built from: a deployment's own limits
# (``serve.max_text_chars``, ``serve.max_step``, ...) are checked by the routes and may only be lower.
MAX_STEP = 2**31 - 1  # fits every store's integer column; ScienceWorld episodes are a few hundred steps
MAX_TEXT = 100_000  # an observation, a look, a task description
MAX_ACTION = 1_000  # an action or a valid action's text
MAX_NAME = 256  # a task name, an id, a type class
MAX_VALID_ACTIONS = 20_000  # ScienceWorld lists a few thousand at most
MAX_STEPS = 100_000  # steps of one trajectory
ActionText = Annotated[str, Field(max_length=MAX_ACTION)]
Label = Annotated[str, Field(max_length=MAX_NAME)]


class Observation(BaseModel):
    """What an agent saw at one step: the action's feedback, and optionally a full look and inventory."""

    step: int = Field(ge=0, le=MAX_STEP)
    action: ActionText = ""
    text: str = Field(default="", max_length=MAX_TEXT)
    look: str | None = Field(default=None, max_length=MAX_TEXT)
    inventory: str | None = Field(default=None, max_length=MAX_TEXT)


class ActionType(BaseModel):
    """An action as ScienceWorld's tables type it (:mod:`knowmap.environment.action_types`): its template, its
    objects' types (rooms and doors with their names) and the valid action that means the same."""

    template: Label
    objects: list[Label] = Field(default_factory=list, max_length=16)
    valid_as: ActionText | None = None  # None: no valid action means the same (the action had no effect there)

    def key(self) -> tuple[str, ...] | None:
        """What two actions share when they are the same behaviour; None for actions on no object."""
        return (self.template, *self.objects) if self.objects else None


class StepRecord(BaseModel):
    """One ScienceWorld step, typed at once from ``(obs, reward, done, info)``.

    ``step`` 0 is the initial ``look around`` of a reset; the action of step ``i`` produced ``observation``.
    ``score`` is ScienceWorld's 0-100 score after the step; ``valid_actions`` (the actions valid after this step)
    and ``action_type`` are only filled where they were built.
    """

    step: int = Field(ge=0, le=MAX_STEP)
    action: ActionText
    observation: str = Field(max_length=MAX_TEXT)
    score: float = Field(allow_inf_nan=False)
    reward: float = Field(default=0.0, allow_inf_nan=False)
    done: bool = False
    look: str | None = Field(default=None, max_length=MAX_TEXT)
    inventory: str | None = Field(default=None, max_length=MAX_TEXT)
    valid_actions: list[ActionText] | None = Field(default=None, max_length=MAX_VALID_ACTIONS)
    action_type: ActionType | None = None  # ``action`` typed before it was taken (annotated gold replays)

    def as_observation(self) -> Observation:
        return Observation(
            step=self.step, action=self.action, text=self.observation, look=self.look, inventory=self.inventory
        )


Split = Literal["train", "dev", "test"]
KBKind = Literal["env", "experience"]
KB_KINDS: tuple[KBKind, ...] = ("env", "experience")
# An env id names a KB directory and an actor: 1 to 128 characters, no path separators.
ENV_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
TrajectorySource = Literal["expert", "agent"]


class Trajectory(BaseModel):
    """A whole episode. ``episode_id`` is stable for the same (task, variation, split, source, policy, seed)."""

    episode_id: str = Field(min_length=1, max_length=MAX_NAME)
    task: Label
    variation: int = Field(ge=0, le=MAX_STEP)
    split: Split
    source: TrajectorySource = "expert"
    policy: Label = Field(default="", description="the policy that played it (``expert``, ``random``, ``llm-kb-base``, "
                          "...); empty in trajectories stored before it was recorded")
    contributor: str = Field(default="", max_length=64, description="who contributed it through the API (set by "
                             "the service from the caller's key, never by the caller); empty for this project's own")
    tenant: str = Field(default="", max_length=32, description="the tenant that contributed it through the API (set "
                        "by the service); empty for the deployment's own, which every tenant shares")
    env_id: str = Field(default="", max_length=MAX_NAME, description="the env KB whose facts its sub-goals carry, as "
                        "stored (set by the service for contributions)")
    simplifications: Label = ""
    task_description: str = Field(default="", max_length=MAX_TEXT)
    steps: list[StepRecord] = Field(default_factory=list, max_length=MAX_STEPS)

    @property
    def final_score(self) -> float:
        return self.steps[-1].score if self.steps else 0.0

    @property
    def actions(self) -> list[str]:
        return [s.action for s in self.steps if s.step > 0]


class Subgoal(BaseModel):
    """A segment of a trajectory that ends where the score rose (or the tail after the last rise).

    ``facts`` are the env facts about the objects the segment's actions touched, as known at its first step.
    ``description`` is deterministic; ``reflection`` is filled later (by an LLM or from score changes).
    """

    subgoal_id: str
    episode_id: str
    task: str
    variation: int = Field(ge=0)
    split: Split
    source: TrajectorySource = "expert"
    index: int = Field(ge=0)
    start_step: int = Field(ge=0)
    end_step: int = Field(ge=0)
    actions: list[str]
    objects: list[str] = Field(default_factory=list)
    facts: list[Triple] = Field(default_factory=list)
    score_before: float
    score_after: float
    description: str
    reflection: str = ""

    @property
    def completed(self) -> bool:
        """True where the segment ended with a score rise (not the tail of a trajectory)."""
        return self.score_after > self.score_before

    def text(self) -> str:
        """The text that is embedded for retrieval: description, actions and the facts it relied on."""
        parts = [self.description, "Actions: " + "; ".join(self.actions)]
        if self.facts:
            # The first facts only: the embedder reads 256 tokens, and a room's full contents would crowd out
            # the actions (and cost embedding time) without helping retrieval.
            parts.append("Facts: " + "; ".join(f.text() for f in self.facts[:MAX_TEXT_FACTS]))
        if self.reflection:
            parts.append("Reflection: " + self.reflection)
        return "\n".join(parts)


MAX_TEXT_FACTS = 12

KnowledgeKind = Literal["env_fact", "subgoal", "trajectory"]


class KnowledgeItem(BaseModel):
    """One piece of retrieved knowledge with its score and where it came from."""

    id: str
    kind: KnowledgeKind
    text: str
    score: float = 0.0
    provenance: dict[str, Any] = Field(default_factory=dict)


PairKind = Literal["env", "experience", "joint"]


class TrainingPair(BaseModel):
    """One InfoNCE example for the retriever: a query, its positive, and hard negatives (may be empty).

    ``env``: query = task + context, positive = a fact about an object the expert touched next.
    ``experience``: positive = a similar sub-goal of another trajectory. ``joint``: an experience query with env
    facts injected. Built from train-split trajectories only.
    """

    kind: PairKind
    query: str = Field(min_length=1)
    positive: str = Field(min_length=1)
    negatives: list[str] = Field(default_factory=list)
    task: str
    episode_id: str


class ServingModels(BaseModel):
    """The retrieval models in service: what ``GET /v1/models`` and ``knowmap retrain status`` report."""

    embedder: str = Field(description="model dir or name; empty = the packaged base MiniLM")
    reranker: str = ""
    train_tasks: list[str] = Field(default_factory=list, description="the tasks its training data covered")
    scores: dict[str, float] = Field(default_factory=dict, validation_alias=AliasChoices("scores", "ndcg"),
                                     description="the gate's decision-support metrics on its dev set (state files "
                                     "written before they replaced nDCG@10 hold nDCG@10 per KB kind)")
    since: str = Field(default="", description="ISO time it started serving")


class RetrainDecision(BaseModel):
    """One retrain cycle: what was trained, how candidate and serving model scored, and whether it was promoted."""

    at: str
    trigger: str = Field(description="'new-trajectories' (K reached) or 'manual'")
    trajectories: int = Field(ge=0, description="trajectories in the experiential KB when the cycle started")
    train_episodes: int = Field(ge=0)
    candidate: ServingModels
    serving: ServingModels
    candidate_scores: dict[str, float] = Field(validation_alias=AliasChoices("candidate_scores", "candidate_ndcg"))
    serving_scores: dict[str, float] = Field(validation_alias=AliasChoices("serving_scores", "serving_ndcg"))
    gate_episodes: list[str] = Field(default_factory=list, description="dev episodes the gate evaluated on")
    promoted: bool
    reason: str
    seconds: float = 0.0


class RetrainStatus(BaseModel):
    """The retrain controller's state, persisted in ``<data_dir>/retrain/state.json``."""

    serving: ServingModels
    previous: ServingModels | None = Field(default=None, description="kept for rollback")
    trajectories_at_last_cycle: int = 0
    retrain_every: int = 0
    last_decision: RetrainDecision | None = None
    history: list[RetrainDecision] = Field(default_factory=list)


def stable_id(*parts: object) -> str:
    """A short deterministic id from its parts (sha1 hex, 20 chars): the same inputs always give the same id."""
    digest = hashlib.sha1("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return digest[:20]
