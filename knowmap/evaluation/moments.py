"""Retrieval moments of an episode, shared by the training pairs and the judges: what the agent knows at a step
(the query), what the expert's next actions touch, and the corpora and relevance built from them.

Every sub-goal of an expert trajectory is one retrieval moment: the agent stands at the step before the sub-goal
(``start_step - 1``) and asks for knowledge. What it knows then (the query) is the task description and that
step's action and observation; the sub-goal's own actions never appear in a query (they are the answer).

- ``env``: positives are the facts, held at the query step, about the objects the sub-goal's actions touch
  (:func:`action_objects` over the entity names known from the query step to the sub-goal's end); the corpus is
  every fact of the episode's env KB at that step.
- ``experience``: positives are sub-goals of *other* trajectories whose text is more similar than ``theta`` to
  this sub-goal's text under the base embedder (the paper's label rule: it may build training positives but
  never judges a model; :mod:`knowmap.evaluation.decision` judges by gold next actions).
- ``joint``: the experience query with a few env facts about the objects in view appended
  (:func:`knowmap.models.retrieval.enrich_query`, the form the served pipeline uses), same positives.

:func:`examples` yields them for :func:`knowmap.train.pairs.build_pairs`; :func:`eval_queries` returns each one's
full corpus and positive set for :mod:`knowmap.evaluation.retrieval`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from knowmap.environment.episodes import Episode
from knowmap.kb.segmentation import action_objects
from knowmap.models.retrieval import enrich_query
from knowmap.schemas import Fact, PairKind, Relation, Subgoal, Trajectory

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
    (kind,) = check_kinds([kind])
    if embedder is None and kind != "env":
        raise ValueError(f"{kind} relevance is defined by the base embedder's similarity (theta): pass embedder=")
    queries, corpora, qrels = [], [], []
    for ex in examples(episodes, kind, embedder, theta=theta, negative_margin=0.0, joint_facts=joint_facts):
        if not ex.positives:
            continue
        wanted = set(ex.positives)
        queries.append(EvalQuery(text=ex.query, task=ex.task, episode_id=ex.episode_id, step=ex.step))
        corpora.append(list(ex.corpus))
        qrels.append({i for i, text in enumerate(ex.corpus) if text in wanted})
    return queries, corpora, qrels


# -- the shared construction ---------------------------------------------------------------------------------
def examples(episodes: Sequence[Episode], kind: str, embedder: Encoder | None, *, theta: float,
              negative_margin: float, joint_facts: int) -> Iterator[Example]:
    """Every sub-goal of ``episodes`` that raised the score as an :class:`Example` of ``kind``, in episode and
    sub-goal order. One that did not (an agent's dead end, the tail of a -100 failure) is no moment to learn from
    and never a positive; it stays in the corpora, where it is a hard negative."""
    episodes = sorted(episodes, key=lambda e: e.episode_id)
    moments = [(e, sg, subgoal_query(e.trajectory, sg)) for e in episodes for sg in e.subgoals]
    vectors = VectorCache(embedder)
    if kind == "env":
        for e, sg, query in moments:
            if not sg.completed:
                continue
            facts = facts_at(e, sg.start_step - 1)
            corpus = list(dict.fromkeys(doc_text(f.text()) for f in facts))
            positives = [doc_text(f.text()) for f in env_positives(e, sg)]
            scores = vectors.similarities(query, corpus) if embedder is not None else {}
            yield Example(kind="env", query=query, positives=list(dict.fromkeys(positives)), corpus=corpus,
                          task=e.task, episode_id=e.episode_id, step=sg.start_step - 1, subgoal_index=sg.index,
                          rank_scores=scores)
        return
    if embedder is None:
        raise ValueError(f"{kind} examples need the base embedder: its similarity (theta) defines the positives")
    texts = [doc_text(sg.text()) for _, sg, _ in moments]
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


def joint_query(query: str, in_view: Sequence[Fact], vectors: VectorCache, k: int, subgoal: Subgoal) -> str:
    """``query`` with the ``k`` in-view facts most similar to it appended (none that mention an own action)."""
    texts = [t for t in dict.fromkeys(f.text() for f in in_view) if not _mentions_any(t, subgoal.actions)]
    if not texts or k == 0:
        return query
    scores = vectors.similarities(query, texts)
    top = sorted(texts, key=lambda t: -scores[t])[:k]
    return enrich_query(_clip(query, MAX_QUERY_WORDS - 8 * k), top, k)


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
    known = sorted(entities_between(episode, step, subgoal.end_step))
    for action in subgoal.actions:
        for name in action_objects(action, known):
            if name not in objects:
                objects.append(name)
    names = set(objects)
    about = [f for f in facts_at(episode, step) if f.subject in names or f.object in names]
    return sorted(about, key=lambda f: (-((f.subject in names) + (f.object in names)), f.subject not in names))


def entities_between(episode: Episode, first: int, last: int) -> set[str]:
    """The entity names of every fact that held at some step in ``[first, last]`` (as ``entities()`` names them)."""
    names: set[str] = set()
    for step in range(max(first, 0), last + 1):
        for f in episode.env_kb.as_of(step):
            names.add(f.subject)
            if f.relation in _ENTITY_OBJECT_RELATIONS:
                names.add(f.object)
    return names


def facts_at(episode: Episode, step: int) -> list[Fact]:
    return episode.env_kb.as_of(max(step, 0))


def _in_view_facts(episode: Episode, step: int) -> list[Fact]:
    """Facts about the agent, its room, the room's contents and the inventory, at ``step``."""
    facts = facts_at(episode, step)
    rooms = {f.object for f in facts if f.subject == "agent" and f.relation is Relation.LOCATION}
    holders = rooms | {"inventory"}
    view = holders | {"agent"} | {f.object for f in facts if f.subject in holders and f.relation is Relation.CONTAINS}
    return [f for f in facts if f.subject in view] or facts


class VectorCache:
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


def doc_text(text: str) -> str:
    return _clip(text, MAX_DOC_WORDS)


def check_kinds(kinds: Sequence[str]) -> list[PairKind]:
    if isinstance(kinds, str):
        kinds = [kinds]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown pair kind(s) {unknown}; allowed: {', '.join(KINDS)}")
    return list(kinds)  # type: ignore[arg-type]
