"""Training pairs for the retriever (InfoNCE), and evaluation queries built by exactly the same rules.

Every sub-goal of an expert trajectory is one retrieval moment: the agent stands at the step before the sub-goal
(``start_step - 1``) and asks for knowledge. What it knows then (the query) is the task description and that
step's action and observation; the sub-goal's own actions never appear in a query (they are the answer).

- ``env``: positives are the facts, held at the query step, about the objects the sub-goal's actions touch
  (:func:`action_objects` over the entity names known from the query step to the sub-goal's end); the corpus is
  every fact of the episode's env KB at that step, and the hard negatives are the others, mined by the base
  embedder's similarity to the query.
- ``experience``: positives are sub-goals of *other* trajectories whose text is more similar than ``theta`` to
  this sub-goal's text under the base embedder; negatives come from the same ranked list below
  ``theta - negative_margin`` (the band just under the threshold is ambiguous and left out of both).
- ``joint``: the experience query with a few env facts about the objects in view injected (those the base
  embedder ranks highest for the query, i.e. what env retrieval would return at that moment), same positives.

:func:`eval_queries` returns each example's full corpus and positive set instead of sampled pairs.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from knowmap.errors import SplitError
from knowmap.kb.segmentation import action_objects
from knowmap.schemas import Fact, PairKind, Relation, Subgoal, TrainingPair, Trajectory
from knowmap.train.data import Episode

DEFAULT_THETA = 0.8  # MiniLM cosine between sub-goal texts; measured: ~70% of positives then share the task
KINDS: tuple[PairKind, ...] = ("env", "experience", "joint")
# Word budgets that keep a text inside a 256-word-piece window (ScienceWorld text is ~1.3 pieces per word).
MAX_QUERY_WORDS = 150
MAX_OBSERVATION_WORDS = 60
MAX_DOC_WORDS = 190
_ENTITY_OBJECT_RELATIONS = (Relation.CONTAINS, Relation.LOCATION, Relation.FOCUS, Relation.CONNECTS_TO)


class Encoder(Protocol):
    """Anything that embeds texts into L2-normalised rows, like :class:`knowmap.models.embedder.Embedder`."""

    def encode(self, texts: list[str]) -> np.ndarray: ...


@dataclass
class Example:
    """One retrieval moment: the query, its full positive list (best first) and its corpus (positives included)."""

    kind: PairKind
    query: str
    positives: list[str]
    corpus: list[str]
    task: str
    episode_id: str
    step: int
    subgoal_index: int
    rank_scores: dict[str, float] = field(default_factory=dict)  # corpus text -> similarity, for negative mining
    excluded: set[str] = field(default_factory=set)  # neither positive nor negative (the margin band)


@dataclass
class PairSet:
    """Training pairs per kind, what was skipped, the parameters and a hash of the whole data."""

    env: list[TrainingPair]
    experience: list[TrainingPair]
    joint: list[TrainingPair]
    params: dict[str, Any]
    skipped: dict[str, int]  # sub-goals that gave no pair, per kind (no positive)
    data_hash: str = ""

    def __post_init__(self) -> None:
        if not self.data_hash:
            body = json.dumps({"params": self.params, "pairs": [p.model_dump(mode="json") for p in self.pairs()]},
                              sort_keys=True, separators=(",", ":"))
            self.data_hash = hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]

    @property
    def counts(self) -> dict[str, int]:
        return {kind: len(getattr(self, kind)) for kind in KINDS}

    def pairs(self, kinds: Sequence[str] = KINDS) -> list[TrainingPair]:
        """The pairs of ``kinds``, kind by kind, in construction order."""
        return [p for kind in _check_kinds(kinds) for p in getattr(self, kind)]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able), e.g. to pass to Ray Train workers or write next to a checkpoint."""
        return {"params": self.params, "skipped": self.skipped, "data_hash": self.data_hash,
                **{kind: [p.model_dump(mode="json") for p in getattr(self, kind)] for kind in KINDS}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PairSet:
        return cls(**{kind: [TrainingPair.model_validate(p) for p in data[kind]] for kind in KINDS},
                   params=data["params"], skipped=data["skipped"], data_hash=data["data_hash"])


def build_pairs(
    episodes: Sequence[Episode],
    embedder: Encoder,
    *,
    theta: float = DEFAULT_THETA,
    max_positives: int = 8,
    max_negatives: int = 7,
    negative_margin: float = 0.05,
    joint_facts: int = 5,
    seed: int = 0,
    splits: Sequence[str] = ("train",),
) -> PairSet:
    """Training pairs of all three kinds from train-split episodes.

    One pair per (query, positive), at most ``max_positives`` per query (the best first). Each pair's negatives
    are ``max_negatives`` drawn, with a generator seeded by ``seed`` and the pair's identity, from the
    ``2 * max_negatives`` hardest non-positives, so pairs of the same query see different hard negatives.
    Pairs with the same (query, positive) are kept once; empty texts are dropped.

    Args:
        episodes: train-split episodes (:func:`collect_episodes`, :func:`load_episodes`).
        embedder: the base embedder: it defines experience positives (``theta``) and ranks hard negatives.
        theta: cosine threshold for two sub-goals of different trajectories to count as the same experience.
        max_positives, max_negatives: per query and per pair; ``max_negatives`` may be 0.
        negative_margin: experience negatives must be at most ``theta - negative_margin`` similar.
        joint_facts: env facts injected into each joint query.
        seed: the same seed and episodes give the same pairs (and ``data_hash``).
        splits: the splits episodes may come from. Only ``train`` by default; the retrain controller also passes
            ``dev``, for agent rollouts on dev variations that its gate never evaluates on. Never ``test``.

    Returns:
        a :class:`PairSet`.

    Raises:
        SplitError: an episode is not from the train split (dev/test data must never reach training).
        ValueError: a parameter out of range (the message says the allowed range).
    """
    _check_params(theta, max_positives, max_negatives, negative_margin, joint_facts)
    if "test" in splits:
        raise SplitError("test-split episodes never become training pairs: the test split is for reporting")
    wrong = sorted({e.split for e in episodes if e.split not in splits})
    if wrong:
        raise SplitError(f"build_pairs takes {'/'.join(splits)}-split episodes only, got {wrong}; evaluate "
                         "held-out episodes with eval_queries instead")
    params = {"theta": theta, "max_positives": max_positives, "max_negatives": max_negatives,
              "negative_margin": negative_margin, "joint_facts": joint_facts, "seed": seed,
              "episodes": sorted(e.episode_id for e in episodes)}
    out: dict[str, list[TrainingPair]] = {kind: [] for kind in KINDS}
    skipped = dict.fromkeys(KINDS, 0)
    for kind in KINDS:
        seen: set[tuple[str, str]] = set()
        for ex in _examples(episodes, kind, embedder, theta=theta, negative_margin=negative_margin,
                            joint_facts=joint_facts):
            if not ex.positives:
                skipped[kind] += 1
                continue
            positives = set(ex.positives)
            ranked = sorted((t for t in ex.corpus if t not in ex.excluded and t not in positives),
                            key=lambda t: -ex.rank_scores.get(t, 0.0))  # stable: ties keep corpus order
            pool = ranked[: 2 * max_negatives]
            for number, positive in enumerate(ex.positives[:max_positives]):
                if (ex.query, positive) in seen:
                    continue
                seen.add((ex.query, positive))
                rng = random.Random(f"{seed}|{kind}|{ex.episode_id}|{ex.subgoal_index}|{number}")
                picked = sorted(rng.sample(range(len(pool)), min(max_negatives, len(pool))))
                out[kind].append(TrainingPair(kind=kind, query=ex.query, positive=positive,
                                              negatives=[pool[i] for i in picked], task=ex.task,
                                              episode_id=ex.episode_id))
    return PairSet(env=out["env"], experience=out["experience"], joint=out["joint"], params=params,
                   skipped=skipped)


@dataclass(frozen=True)
class EvalQuery:
    """A held-out query: its text and where it comes from (for per-task and seen/unseen reports)."""

    text: str
    task: str
    episode_id: str
    step: int


def eval_queries(
    episodes: Sequence[Episode],
    kind: str,
    *,
    embedder: Encoder | None = None,
    theta: float = DEFAULT_THETA,
    joint_facts: int = 5,
) -> tuple[list[EvalQuery], list[list[str]], list[set[int]]]:
    """Retrieval queries, per-query corpora and relevance, built from a split's episodes as for training.

    ``env``: the corpus of a query is its episode's env KB at the query step; relevant = the env positives (all
    of them, not only the first ``max_positives``). ``experience`` and ``joint``: the corpus is every sub-goal
    of the other trajectories of ``episodes``; relevant = those more similar than ``theta`` under ``embedder``
    (pass the *base* embedder, so that every system is judged against the same relevance). Queries without a
    relevant document are left out.

    Returns:
        ``(queries, corpora, qrels)``: ``qrels[i]`` holds indices into ``corpora[i]``.

    Raises:
        ValueError: an unknown kind, or no ``embedder`` for experience/joint.
    """
    (kind,) = _check_kinds([kind])
    if embedder is None and kind != "env":
        raise ValueError(f"{kind} relevance is defined by the base embedder's similarity (theta): pass embedder=")
    queries, corpora, qrels = [], [], []
    for ex in _examples(episodes, kind, embedder, theta=theta, negative_margin=0.0, joint_facts=joint_facts):
        if not ex.positives:
            continue
        wanted = set(ex.positives)
        queries.append(EvalQuery(text=ex.query, task=ex.task, episode_id=ex.episode_id, step=ex.step))
        corpora.append(list(ex.corpus))
        qrels.append({i for i, text in enumerate(ex.corpus) if text in wanted})
    return queries, corpora, qrels


# -- the shared construction ---------------------------------------------------------------------------------
def _examples(episodes: Sequence[Episode], kind: str, embedder: Encoder | None, *, theta: float,
              negative_margin: float, joint_facts: int) -> Iterator[Example]:
    """Every sub-goal of ``episodes`` that raised the score as an :class:`Example` of ``kind``, in episode and
    sub-goal order. One that did not (an agent's dead end, the tail of a -100 failure) is no moment to learn from
    and never a positive; it stays in the corpora, where it is a hard negative."""
    episodes = sorted(episodes, key=lambda e: e.episode_id)
    moments = [(e, sg, subgoal_query(e.trajectory, sg)) for e in episodes for sg in e.subgoals]
    vectors = _VectorCache(embedder)
    if kind == "env":
        for e, sg, query in moments:
            if not sg.completed:
                continue
            facts = _facts_at(e, sg.start_step - 1)
            corpus = list(dict.fromkeys(_doc(f.text()) for f in facts))
            positives = [_doc(f.text()) for f in env_positives(e, sg)]
            scores = vectors.similarities(query, corpus) if embedder is not None else {}
            yield Example(kind="env", query=query, positives=list(dict.fromkeys(positives)), corpus=corpus,
                          task=e.task, episode_id=e.episode_id, step=sg.start_step - 1, subgoal_index=sg.index,
                          rank_scores=scores)
        return
    if embedder is None:
        raise ValueError(f"{kind} examples need the base embedder: its similarity (theta) defines the positives")
    texts = [_doc(sg.text()) for _, sg, _ in moments]
    matrix = vectors.matrix(texts)  # (n_subgoals, dim)
    sims = matrix @ matrix.T  # (n_subgoals, n_subgoals)
    useful = {texts[j] for j, (_, sg, _) in enumerate(moments) if sg.completed}
    for i, (e, sg, query) in enumerate(moments):
        if not sg.completed:
            continue
        others = [j for j, (o, _, _) in enumerate(moments) if o.episode_id != e.episode_id]
        corpus = list(dict.fromkeys(texts[j] for j in others))
        score = {texts[j]: float(sims[i, j]) for j in others}
        positives = sorted((t for t in corpus if score[t] > theta and t in useful), key=lambda t: -score[t])
        excluded = {t for t in corpus if theta - negative_margin < score[t] <= theta}
        if kind == "joint":
            query = joint_query(query, _in_view_facts(e, sg.start_step - 1), vectors, joint_facts, sg)
        yield Example(kind=kind, query=query, positives=positives, corpus=corpus, task=e.task,
                      episode_id=e.episode_id, step=sg.start_step - 1, subgoal_index=sg.index, rank_scores=score,
                      excluded=excluded)


def subgoal_query(trajectory: Trajectory, subgoal: Subgoal) -> str:
    """What the agent knows right before ``subgoal``: the task, and the previous step's action and observation.

    A part that contains one of the sub-goal's own actions (a repeated action) is left out, so that no query
    gives the answer away.
    """
    return moment_query(trajectory, subgoal.start_step - 1, subgoal.actions)


def moment_query(trajectory: Trajectory, step: int, answer: Sequence[str]) -> str:
    """What the agent knows at ``step``: the task, and that step's action and observation, leaving out a part that
    contains one of the ``answer`` actions."""
    previous = next(s for s in trajectory.steps if s.step == step)
    parts = [("Task", _clip(trajectory.task_description, MAX_QUERY_WORDS - MAX_OBSERVATION_WORDS - 20)),
             ("Last action", previous.action),
             ("Observation", _clip(previous.observation, MAX_OBSERVATION_WORDS))]
    kept = [f"{label}: {text}" for label, text in parts
            if text.strip() and (label == "Task" or not _mentions_any(text, answer))]
    return _clip("\n".join(kept), MAX_QUERY_WORDS)


def joint_query(query: str, in_view: Sequence[Fact], vectors: _VectorCache, k: int, subgoal: Subgoal) -> str:
    """``query`` with the ``k`` in-view facts most similar to it appended (none that mention an own action)."""
    texts = [t for t in dict.fromkeys(f.text() for f in in_view) if not _mentions_any(t, subgoal.actions)]
    if not texts or k == 0:
        return query
    scores = vectors.similarities(query, texts)
    top = sorted(texts, key=lambda t: -scores[t])[:k]
    return _clip(query, MAX_QUERY_WORDS - 8 * k) + "\nKnown facts: " + "; ".join(top)


def env_positives(episode: Episode, subgoal: Subgoal) -> list[Fact]:
    """Facts held at the step before ``subgoal`` about the objects its actions touch, most specific first.

    Object names come from :func:`action_objects` with the entities the KB knew from that step to the
    sub-goal's end (so ``dove`` is matched once the dove has been seen). Facts that link two touched objects
    come first, then facts whose subject is a touched object, then facts that merely mention one.
    """
    step = subgoal.start_step - 1
    objects: list[str] = []
    # A sorted list, not the set: action_objects breaks ties between names of equal length in iteration order,
    # and a set's order changes with PYTHONHASHSEED.
    known = sorted(_entities_between(episode, step, subgoal.end_step))
    for action in subgoal.actions:
        for name in action_objects(action, known):
            if name not in objects:
                objects.append(name)
    names = set(objects)
    about = [f for f in _facts_at(episode, step) if f.subject in names or f.object in names]
    return sorted(about, key=lambda f: (-((f.subject in names) + (f.object in names)), f.subject not in names))


def _entities_between(episode: Episode, first: int, last: int) -> set[str]:
    """The entity names of every fact that held at some step in ``[first, last]`` (as ``entities()`` names them)."""
    names: set[str] = set()
    for step in range(max(first, 0), last + 1):
        for f in episode.env_kb.as_of(step):
            names.add(f.subject)
            if f.relation in _ENTITY_OBJECT_RELATIONS:
                names.add(f.object)
    return names


def _facts_at(episode: Episode, step: int) -> list[Fact]:
    return episode.env_kb.as_of(max(step, 0))


def _in_view_facts(episode: Episode, step: int) -> list[Fact]:
    """Facts about the agent, its room, the room's contents and the inventory, at ``step``."""
    facts = _facts_at(episode, step)
    rooms = {f.object for f in facts if f.subject == "agent" and f.relation is Relation.LOCATION}
    holders = rooms | {"inventory"}
    view = holders | {"agent"} | {f.object for f in facts if f.subject in holders and f.relation is Relation.CONTAINS}
    return [f for f in facts if f.subject in view] or facts


class _VectorCache:
    """Embeds each distinct text once per build (fact texts repeat across steps and episodes)."""

    def __init__(self, embedder: Encoder | None) -> None:
        self.embedder = embedder
        self._vectors: dict[str, np.ndarray] = {}

    def matrix(self, texts: Sequence[str]) -> np.ndarray:
        if self.embedder is None:
            raise ValueError("this construction needs an embedder")
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if missing:
            encoded = np.asarray(self.embedder.encode(missing), dtype=np.float32)
            self._vectors.update(zip(missing, encoded, strict=True))
        return np.stack([self._vectors[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)

    def similarities(self, query: str, texts: Sequence[str]) -> dict[str, float]:
        if not texts:
            return {}
        scores = self.matrix(texts) @ self.matrix([query])[0]  # (n_texts,)
        return {t: float(s) for t, s in zip(texts, scores, strict=True)}


def _mentions_any(text: str, actions: Sequence[str]) -> bool:
    """True if one of ``actions`` occurs in ``text`` as whole words (case and whitespace folded)."""
    folded = " ".join(text.lower().split())
    return any(re.search(rf"(?<!\w){re.escape(' '.join(a.lower().split()))}(?!\w)", folded) for a in actions if a)


def _clip(text: str, max_words: int) -> str:
    """``text`` cut to ``max_words`` whitespace-separated words (unchanged if it fits)."""
    words = text.split()
    return text.strip() if len(words) <= max_words else " ".join(words[:max_words]) + " ..."


def _doc(text: str) -> str:
    return _clip(text, MAX_DOC_WORDS)


def _check_kinds(kinds: Sequence[str]) -> list[PairKind]:
    if isinstance(kinds, str):
        kinds = [kinds]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown pair kind(s) {unknown}; allowed: {', '.join(KINDS)}")
    return list(kinds)  # type: ignore[arg-type]


def _check_params(theta: float, max_positives: int, max_negatives: int, margin: float, joint_facts: int) -> None:
    if not -1.0 <= theta < 1.0:
        raise ValueError(f"theta must be a cosine in [-1, 1), got {theta}")
    if max_positives < 1:
        raise ValueError(f"max_positives must be >= 1, got {max_positives}")
    if max_negatives < 0:
        raise ValueError(f"max_negatives must be >= 0, got {max_negatives}")
    if margin < 0:
        raise ValueError(f"negative_margin must be >= 0, got {margin}")
    if joint_facts < 0:
        raise ValueError(f"joint_facts must be >= 0, got {joint_facts}")
