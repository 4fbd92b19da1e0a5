"""Decision support: does retrieved knowledge help the agent choose its next action? Judged by gold behaviour.

No model under test labels anything here. On held-out gold trajectories (annotated replays: the valid actions of
every step and each action typed by ScienceWorld's tables, :mod:`knowmap.environment.action_types`), at every step
``t`` the gold next action and the rest of its sub-goal's actions (the *answer*) define relevance:

- an env fact held at ``t`` is relevant if it mentions an object the answer's actions use;
- an experiential sub-goal (from train-split trajectories) is relevant if one of its actions has the same
  template on the same object types as one of the answer's actions (``move OBJ to OBJ`` on
  ``containers.MetalPot``, ``devices.Stove``), so variations with other objects still match; actions on no
  object (``look around``, ``wait``) judge nothing.

Per knowledge mode (``none``; ``bm25``, ``kb-base``, ``kb-finetuned``; the hybrid ``+bm25`` of a dense mode, and
``+rerank`` of any, both fused by reciprocal rank as the served pipeline fuses them) it measures support@k
(the share of steps whose top k holds a relevant item, over steps where the KB holds one), and what the agent
gets: the actuator's shortlist, built by :func:`knowmap.agent.scaffold.shortlist` from the step's real valid
actions with that mode's retrieved facts and experience, holds the gold next action or not (shortlist
recall@12), and the gold action's mean rank in the actuator's full ranking. There is no planner offline: the
shortlist sees the task, the retrieved facts and the retrieved sub-goals' actions, as the actuator does, with an
empty plan in every mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from knowmap.agent.scaffold import actuator_query, rank_actions, shortlist, written_actions
from knowmap.environment.sciworld import task_topics
from knowmap.kb.segmentation import action_objects
from knowmap.models.lexical import BM25Retriever, fused_order, rerank_head
from knowmap.results import DecisionEvaluation, MetricValues
from knowmap.train.data import Episode, is_annotated
from knowmap.train.pairs import Encoder, _doc, _entities_between, _facts_at, _VectorCache, moment_query

Key = tuple[str, ...]


@dataclass(frozen=True)
class ExperienceDoc:
    """A sub-goal of the experiential KB: the text retrieval sees and the typed actions it holds."""

    text: str
    keys: frozenset[Key]


@dataclass(frozen=True)
class DecisionStep:
    """One judged moment of a held-out gold trajectory."""

    episode_id: str
    task: str
    task_description: str
    step: int
    query: str  # what the agent knows at the step: task, last action, observation (as the training queries)
    facts: tuple[str, ...]  # the env KB at the step
    relevant_facts: frozenset[int]
    answer_keys: frozenset[Key]
    gold: str | None  # the valid action that is the gold next action; None: the gold action had no effect
    valid: tuple[str, ...]
    recent: tuple[str, ...]


def _require_annotated(episode: Episode) -> None:
    if not is_annotated(episode.trajectory) or all(s.action_type is None for s in episode.trajectory.steps[1:]):
        raise ValueError(f"episode {episode.episode_id} is not annotated with valid actions and action types; "
                         "collect it with collect_episodes(..., annotate=True)")


def experience_corpus(episodes: Sequence[Episode]) -> list[ExperienceDoc]:
    """The experiential KB's sub-goals of ``episodes`` (annotated train-split replays), one doc per distinct text.

    Raises:
        ValueError: an episode of another split than train, or one that is not annotated.
    """
    docs: dict[str, set[Key]] = {}
    for episode in sorted(episodes, key=lambda e: e.episode_id):
        if episode.split != "train":
            raise ValueError(f"the experiential KB holds train-split sub-goals only, got {episode.episode_id}")
        _require_annotated(episode)
        steps = {s.step: s for s in episode.trajectory.steps}
        for sg in episode.subgoals:
            keys = {steps[i].action_type.key() for i in range(sg.start_step, sg.end_step + 1)
                    if i in steps and steps[i].action_type is not None}
            docs.setdefault(_doc(sg.text()), set()).update(k for k in keys if k is not None)
    return [ExperienceDoc(text=text, keys=frozenset(keys)) for text, keys in docs.items()]


def decision_steps(episodes: Sequence[Episode], *, recent_window: int = 6) -> list[DecisionStep]:
    """Every step of ``episodes`` (annotated held-out replays) that has a next action, judged by its answer.

    Raises:
        ValueError: an episode that is not annotated, or of the train split.
    """
    out: list[DecisionStep] = []
    for episode in sorted(episodes, key=lambda e: e.episode_id):
        if episode.split == "train":
            raise ValueError(f"decision support is judged on held-out episodes; {episode.episode_id} is train")
        _require_annotated(episode)
        steps = episode.trajectory.steps
        for t in range(len(steps) - 1):
            nxt = steps[t + 1]
            sg = next((g for g in episode.subgoals if g.start_step <= nxt.step <= g.end_step), None)
            end = sg.end_step if sg is not None else nxt.step
            answer = [s for s in steps if nxt.step <= s.step <= end]
            keys = {s.action_type.key() for s in answer if s.action_type is not None}
            known = _entities_between(episode, steps[t].step, end)
            names = {n for s in answer for n in action_objects(s.action, known)}
            held = _facts_at(episode, steps[t].step)
            facts = list(dict.fromkeys(_doc(f.text()) for f in held))
            relevant_texts = {_doc(f.text()) for f in held if f.subject in names or f.object in names}
            out.append(DecisionStep(
                episode_id=episode.episode_id, task=episode.task, task_description=episode.trajectory.task_description,
                step=steps[t].step, query=moment_query(episode.trajectory, steps[t].step, [s.action for s in answer]),
                facts=tuple(facts), relevant_facts=frozenset(i for i, f in enumerate(facts) if f in relevant_texts),
                answer_keys=frozenset(k for k in keys if k is not None),
                gold=nxt.action_type.valid_as if nxt.action_type is not None else None,
                valid=tuple(steps[t].valid_actions or ()),
                recent=tuple(s.action for s in steps[max(1, t - recent_window + 1): t + 1]),
            ))
    return out


def evaluate_decision(
    steps: Sequence[DecisionStep],
    corpus: Sequence[ExperienceDoc],
    *,
    embedders: Mapping[str, Encoder],
    reranker: Any | None = None,
    rerank_top: int = 20,
    rerank_modes: Sequence[str] | None = None,
    hybrid_modes: Sequence[str] = (),
    hybrid_candidates: int = 100,
    k_env: int = 5,
    k_experience: int = 3,
    shortlist_size: int = 12,
    joint_facts: int = 5,
    train_tasks: Sequence[str] = (),
    protocol: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> DecisionEvaluation:
    """Support@k, shortlist recall and gold rank of every knowledge mode on ``steps``.

    Args:
        steps: :func:`decision_steps` of held-out episodes.
        corpus: :func:`experience_corpus` of the train-split episodes (the experiential KB).
        embedders: mode name -> embedder, e.g. ``{"kb-base": ..., "kb-finetuned": ...}``.
        reranker: anything with ``predict(list[(query, doc)])``; retrieving modes are also run ``+rerank``.
        rerank_top: the first-stage results the reranker re-orders.
        rerank_modes: which retrieving modes (``bm25``, the names of ``embedders`` and the hybrid ``NAME+bm25``)
            are also run ``+rerank``; None: all of them. The cross-encoder reads ~50 pairs/s on 2 cores: each
            costs ~3 x rerank_top pairs a step.
        hybrid_modes: names of ``embedders`` also run as ``NAME+bm25``: BM25 over the dense top
            ``hybrid_candidates`` fused with them by reciprocal rank (as :class:`~knowmap.models.retrieval.Retriever`
            with ``hybrid``).
        k_env, k_experience: the facts and sub-goals the agent puts in front of its actuator (``agent.k_env``,
            ``agent.k_experience``); the support@k metrics use the same k.
        train_tasks: the tasks the models were trained on; their topic families are "seen".
        protocol: recorded with the results (tasks, splits, variations, package versions, ...).
        progress: called with a line after each mode.

    Raises:
        ValueError: a k or ``rerank_top`` below 1, or no step to judge.
    """
    if min(k_env, k_experience, shortlist_size, rerank_top) < 1:
        raise ValueError("k_env, k_experience, shortlist_size and rerank_top must be >= 1")
    if not steps:
        raise ValueError("no step to judge: pass annotated held-out episodes with at least two steps")
    topics = task_topics()
    seen_families = sorted({topics.get(t, t) for t in train_tasks})
    unknown = sorted(set(hybrid_modes) - set(embedders))
    if unknown:
        raise ValueError(f"hybrid modes {unknown} name no embedder; allowed: {sorted(embedders)}")
    first: dict[str, _Ranker] = {"bm25": _BM25(), **{name: _Dense(e) for name, e in embedders.items()}}
    first.update({f"{name}+bm25": _Hybrid(first[name], first["bm25"], hybrid_candidates) for name in hybrid_modes})
    rankers: dict[str, _Ranker | None] = {"none": None, **first}
    if reranker is not None:
        scores: dict[tuple[str, str], float] = {}  # one reranker: a pair two modes put in their top is scored once
        rankers.update({f"{name}+rerank": _Reranked(r, reranker, rerank_top, scores) for name, r in first.items()
                        if rerank_modes is None or name in rerank_modes})
    texts = [d.text for d in corpus]
    per_mode: dict[str, list[dict[str, float | None]]] = {}
    for mode, ranker in rankers.items():
        env_ranks: list[list[int]] = [[] for _ in steps]
        joint: list[str] = [s.query for s in steps]
        if ranker is not None:
            ranker.warm([(s.query, s.facts) for s in steps] + [(s.query, texts) for s in steps])
            env_ranks = [ranker(s.query, s.facts) if s.facts else [] for s in steps]
            joint = [s.query + ("\nKnown facts: " + "; ".join(s.facts[i] for i in r[:joint_facts]) if r else "")
                     for s, r in zip(steps, env_ranks, strict=True)]
            ranker.warm([(q, texts) for q in joint])
        per_mode[mode] = [_judge(s, r, q, corpus, texts, ranker, k_env, k_experience, shortlist_size)
                          for s, r, q in zip(steps, env_ranks, joint, strict=True)]
        if progress is not None:
            progress(f"decision support: {mode} judged on {len(steps)} steps")

    def summary(keep: list[int]) -> dict[str, MetricValues] | None:
        if not keep:
            return None
        return {mode: _aggregate([rows[i] for i in keep], k_env, k_experience, shortlist_size)
                for mode, rows in per_mode.items()}

    every = list(range(len(steps)))
    family = [topics.get(s.task, s.task) for s in steps]
    unseen = sorted({f for f in family if f not in seen_families})
    return DecisionEvaluation(
        protocol={**(protocol or {}), "steps": len(steps), "experience_docs": len(corpus), "k_env": k_env,
                  "k_experience": k_experience, "shortlist": shortlist_size, "joint_facts": joint_facts,
                  "rerank_top": rerank_top if reranker is not None else None, "train_tasks": sorted(train_tasks),
                  "fusion": "reciprocal rank (k=60) of the first stage and BM25 (+bm25, over the dense top "
                            f"{hybrid_candidates}) or the reranker (+rerank, over the first stage's top {rerank_top})",
                  "seen_families": seen_families, "relevance": "gold next action and the rest of its sub-goal",
                  "query": "task, last action, observation", "plan": "none offline (empty in every mode)"},
        modes=summary(every) or {}, seen=summary([i for i in every if family[i] in seen_families]),
        unseen=summary([i for i in every if family[i] not in seen_families]), unseen_families=unseen,
    )


def _judge(step: DecisionStep, env_rank: list[int], joint: str, corpus: Sequence[ExperienceDoc], texts: list[str],
           ranker: _Ranker | None, k_env: int, k_exp: int, size: int) -> dict[str, float | None]:
    """One step under one mode: hits of each kind (None: nothing relevant in that KB) and the gold action's fate."""
    relevant_exp = {j for j, d in enumerate(corpus) if d.keys & step.answer_keys}
    row: dict[str, float | None] = {"env": None, "experience": None, "joint": None, "shortlist": None, "rank": None}
    facts: list[str] = []
    experience: list[str] = []
    if ranker is not None:
        facts = [step.facts[i] for i in env_rank[:k_env]]
        if step.relevant_facts:
            row["env"] = float(any(i in step.relevant_facts for i in env_rank[:k_env]))
        if texts:
            exp_rank = ranker(step.query, texts)
            experience = [texts[j] for j in exp_rank[:k_exp]]
            if relevant_exp:
                row["experience"] = float(any(j in relevant_exp for j in exp_rank[:k_exp]))
                row["joint"] = float(any(j in relevant_exp for j in ranker(joint, texts)[:k_exp]))
    if step.gold is not None and step.gold in step.valid:
        valid = set(step.valid)
        preferred = [a for a in written_actions(experience) if a in valid]
        query = actuator_query("", step.task_description, facts)
        ranked = rank_actions(step.valid, query, preferred=preferred, recent=step.recent)
        listed = shortlist(step.valid, query, size=size, preferred=preferred, recent=step.recent, ranked=ranked)
        row["shortlist"] = float(step.gold in listed)
        row["rank"] = float(ranked.index(step.gold) + 1)
    return row


def _aggregate(rows: list[dict[str, float | None]], k_env: int, k_exp: int, size: int) -> MetricValues:
    def mean(key: str) -> tuple[float | None, int]:
        values = [r[key] for r in rows if r[key] is not None]
        return (float(np.mean(values)) if values else None), len(values)

    shortlist_recall, judged = mean("shortlist")
    env, env_steps = mean("env")
    experience, exp_steps = mean("experience")
    joint, _ = mean("joint")
    rank, _ = mean("rank")
    out: dict[str, Any] = {f"shortlist_recall@{size}": shortlist_recall, "gold_rank_mean": rank, "steps": judged,
                           f"support@{k_env}_env": env, f"support@{k_exp}_experience": experience,
                           f"support@{k_exp}_joint": joint, "steps_env": env_steps, "steps_experience": exp_steps}
    return {k: v for k, v in out.items() if v is not None}


# -- rankers: (query, corpus) -> positions, best first ------------------------------------------------------------
class _Ranker:
    def prefetch(self, texts: Sequence[str]) -> None:
        """Embed ``texts`` in one batch ahead of the calls that need them (dense rankers)."""

    def warm(self, requests: Sequence[tuple[str, Sequence[str]]]) -> None:
        """Do in batches what the (query, corpus) ``requests`` will need (embeddings, reranker scores)."""
        self.prefetch([t for query, corpus in requests for t in (query, *corpus)])

    def __call__(self, query: str, corpus: Sequence[str]) -> list[int]:
        raise NotImplementedError


class _BM25(_Ranker):
    def __init__(self) -> None:
        self._cache: dict[tuple[str, ...], BM25Retriever] = {}

    def __call__(self, query: str, corpus: Sequence[str]) -> list[int]:
        key = tuple(corpus)
        if key not in self._cache:
            if len(self._cache) > 512:
                self._cache.clear()
            self._cache[key] = BM25Retriever(corpus)
        return self._cache[key].rank(query)


class _Dense(_Ranker):
    def __init__(self, embedder: Encoder) -> None:
        self._vectors = _VectorCache(embedder)  # each distinct text embedded once

    def prefetch(self, texts: Sequence[str]) -> None:
        self._vectors.matrix(list(dict.fromkeys(texts)))

    def __call__(self, query: str, corpus: Sequence[str]) -> list[int]:
        vectors = self._vectors.matrix([query, *corpus])  # (1 + len(corpus), dim): query first
        scores = vectors[1:] @ vectors[0]
        return [int(i) for i in np.argsort(-scores, kind="stable")]


class _Hybrid(_Ranker):
    """BM25 over the dense ranker's top ``top``, fused with the dense order by reciprocal rank; the rest after."""

    def __init__(self, dense: _Ranker, bm25: _BM25, top: int) -> None:
        self.dense, self.bm25, self.top = dense, bm25, top

    def prefetch(self, texts: Sequence[str]) -> None:
        self.dense.prefetch(texts)

    def __call__(self, query: str, corpus: Sequence[str]) -> list[int]:
        ranking = self.dense(query, corpus)
        head = ranking[: self.top]
        lexical = [head[i] for i in self.bm25(query, [corpus[i] for i in head])]
        return fused_order([head, lexical]) + ranking[self.top:]


class _Reranked(_Ranker):
    """The first stage's top ``top`` re-ordered by fusing, by reciprocal rank, the reranker's order with the first
    stage's (as the served pipeline does; the reranker never replaces the first stage); the rest after."""

    def __init__(self, first: _Ranker, reranker: Any, top: int, scores: dict[tuple[str, str], float]) -> None:
        self.first, self.reranker, self.top = first, reranker, top
        self._scores = scores

    def prefetch(self, texts: Sequence[str]) -> None:
        self.first.prefetch(texts)

    def warm(self, requests: Sequence[tuple[str, Sequence[str]]]) -> None:
        self.first.warm(requests)
        self._score([(q, corpus[i]) for q, corpus in requests if corpus for i in self.first(q, corpus)[: self.top]])

    def _score(self, pairs: Sequence[tuple[str, str]]) -> None:
        wanted = list(dict.fromkeys(p for p in pairs if p not in self._scores))
        if wanted:
            got = np.asarray(self.reranker.predict(wanted), dtype=np.float64).reshape(-1)
            if len(got) != len(wanted):
                raise ValueError(f"the reranker returned {len(got)} scores for {len(wanted)} pairs; it must "
                                 "return one score per (query, document) pair")
            self._scores.update(zip(wanted, got.tolist(), strict=True))

    def __call__(self, query: str, corpus: Sequence[str]) -> list[int]:
        ranking = self.first(query, corpus)
        self._score([(query, corpus[i]) for i in ranking[: self.top]])
        return rerank_head(ranking, lambda i: self._scores[(query, corpus[i])], self.top)
