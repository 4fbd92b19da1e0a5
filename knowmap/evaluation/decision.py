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
``+rerank`` of any), every ranking is made by the served pipeline itself, :class:`~knowmap.models.retrieval.Retriever`
with the deployment's ``retrieval`` settings (candidate counts, joint facts), the mode saying which stages run.
It measures support@k
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
from knowmap.config import RetrievalConfig
from knowmap.environment.episodes import Episode, is_annotated
from knowmap.environment.sciworld import task_topics
from knowmap.evaluation.moments import Encoder, doc_text, entities_between, facts_at, moment_query
from knowmap.kb.segmentation import action_objects
from knowmap.models.retrieval import Rerank, Retriever
from knowmap.results import DecisionEvaluation, MetricValues

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
            docs.setdefault(doc_text(sg.text()), set()).update(k for k in keys if k is not None)
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
            known = entities_between(episode, steps[t].step, end)
            names = {n for s in answer for n in action_objects(s.action, known)}
            held = facts_at(episode, steps[t].step)
            facts = list(dict.fromkeys(doc_text(f.text()) for f in held))
            relevant_texts = {doc_text(f.text()) for f in held if f.subject in names or f.object in names}
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
    rerank_modes: Sequence[str] | None = None,
    hybrid_modes: Sequence[str] = (),
    settings: RetrievalConfig | None = None,
    k_env: int = 5,
    k_experience: int = 3,
    shortlist_size: int = 12,
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
        rerank_modes: which retrieving modes (``bm25``, the names of ``embedders`` and the hybrid ``NAME+bm25``)
            are also run ``+rerank``; None: all of them. The cross-encoder reads ~50 pairs/s on 2 cores: each
            costs ~3 x ``rerank_candidates`` pairs a step.
        hybrid_modes: names of ``embedders`` also run as ``NAME+bm25`` (the pipeline's hybrid stage).
        settings: the pipeline's ``retrieval`` settings (candidate counts, joint facts); None = the defaults.
        k_env, k_experience: the facts and sub-goals the agent puts in front of its actuator (``agent.k_env``,
            ``agent.k_experience``); the support@k metrics use the same k.
        train_tasks: the tasks the models were trained on; their topic families are "seen".
        protocol: recorded with the results (tasks, splits, variations, package versions, ...).
        progress: called with a line after each mode.

    Raises:
        ValueError: a k below 1, no step to judge, or a hybrid mode that names no embedder.
    """
    if min(k_env, k_experience, shortlist_size) < 1:
        raise ValueError("k_env, k_experience and shortlist_size must be >= 1")
    if not steps:
        raise ValueError("no step to judge: pass annotated held-out episodes with at least two steps")
    settings = settings if settings is not None else RetrievalConfig()
    topics = task_topics()
    seen_families = sorted({topics.get(t, t) for t in train_tasks})
    unknown = sorted(set(hybrid_modes) - set(embedders))
    if unknown:
        raise ValueError(f"hybrid modes {unknown} name no embedder; allowed: {sorted(embedders)}")
    rerank = None if reranker is None else memoized_pair_scores(reranker)
    # One retriever per first stage, so a text is embedded once for all of its modes.
    retrievers = {name: Retriever(encoder, rerank=rerank, settings=settings)
                  for name, encoder in {"bm25": None, **{n: e.encode for n, e in embedders.items()}}.items()}
    first = {name: (name, False) for name in retrievers}
    first.update({f"{name}+bm25": (name, True) for name in hybrid_modes})
    modes: dict[str, tuple[str, bool, bool] | None] = {"none": None}
    modes.update({mode: (name, hybrid, False) for mode, (name, hybrid) in first.items()})
    if reranker is not None:
        modes.update({f"{mode}+rerank": (name, hybrid, True) for mode, (name, hybrid) in first.items()
                      if rerank_modes is None or mode in rerank_modes})
    texts = [d.text for d in corpus]
    per_mode: dict[str, list[dict[str, float | None]]] = {}
    for mode, how in modes.items():
        env: list[list[int]] = [[] for _ in steps]
        experience: list[list[int]] = [[] for _ in steps]
        joint: list[list[int]] = [[] for _ in steps]
        if how is not None:
            retriever, stages = retrievers[how[0]], {"hybrid": how[1], "rerank": how[2]}
            env = retriever.rank([(s.query, s.facts) for s in steps], **stages)
            queries = [retriever.joint_query(s.query, [s.facts[i] for i in r]) for s, r in zip(steps, env, strict=True)]
            experience = retriever.rank([(s.query, texts) for s in steps], **stages)
            joint = retriever.rank([(q, texts) for q in queries], **stages)
        per_mode[mode] = [_judge(s, e, x, j, corpus, texts, how is not None, k_env, k_experience, shortlist_size)
                          for s, e, x, j in zip(steps, env, experience, joint, strict=True)]
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
                  "k_experience": k_experience, "shortlist": shortlist_size, "joint_facts": settings.joint_facts,
                  "rerank_top": settings.rerank_candidates if reranker is not None else None,
                  "train_tasks": sorted(train_tasks),
                  "fusion": "the served pipeline (knowmap.models.retrieval.Retriever): reciprocal rank (k=60) of the "
                            f"first stage and BM25 (+bm25, over its top {settings.hybrid_candidates}) or the reranker "
                            f"(+rerank, over its top {settings.rerank_candidates})",
                  "seen_families": seen_families, "relevance": "gold next action and the rest of its sub-goal",
                  "query": "task, last action, observation", "plan": "none offline (empty in every mode)"},
        modes=summary(every) or {}, seen=summary([i for i in every if family[i] in seen_families]),
        unseen=summary([i for i in every if family[i] not in seen_families]), unseen_families=unseen,
    )


def memoized_pair_scores(reranker: Any) -> Rerank:
    """The pipeline's ``rerank`` callable over ``reranker.predict`` (a cross-encoder), each (query, text) pair scored
    once however many modes put it in their head.

    Raises:
        ValueError: (when called) the reranker returned another number of scores than pairs.
    """
    scores: dict[tuple[str, str], float] = {}

    def rerank(query: str, texts: list[str]) -> list[float]:
        wanted = list(dict.fromkeys((query, t) for t in texts if (query, t) not in scores))
        if wanted:
            got = np.asarray(reranker.predict(wanted), dtype=np.float64).reshape(-1)
            if len(got) != len(wanted):
                raise ValueError(f"the reranker returned {len(got)} scores for {len(wanted)} pairs; it must "
                                 "return one score per (query, document) pair")
            scores.update(zip(wanted, got.tolist(), strict=True))
        return [scores[(query, t)] for t in texts]

    return rerank


def _judge(step: DecisionStep, env_rank: list[int], exp_rank: list[int], joint_rank: list[int],
           corpus: Sequence[ExperienceDoc], texts: list[str], retrieving: bool, k_env: int, k_exp: int,
           size: int) -> dict[str, float | None]:
    """One step under one mode: hits of each kind (None: nothing relevant in that KB) and the gold action's fate."""
    relevant_exp = {j for j, d in enumerate(corpus) if d.keys & step.answer_keys}
    row: dict[str, float | None] = {"env": None, "experience": None, "joint": None, "shortlist": None, "rank": None}
    facts: list[str] = []
    experience: list[str] = []
    if retrieving:
        facts = [step.facts[i] for i in env_rank[:k_env]]
        if step.relevant_facts:
            row["env"] = float(any(i in step.relevant_facts for i in env_rank[:k_env]))
        if texts:
            experience = [texts[j] for j in exp_rank[:k_exp]]
            if relevant_exp:
                row["experience"] = float(any(j in relevant_exp for j in exp_rank[:k_exp]))
                row["joint"] = float(any(j in relevant_exp for j in joint_rank[:k_exp]))
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
