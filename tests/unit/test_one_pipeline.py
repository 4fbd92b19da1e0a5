"""One ranking pipeline: what the service serves is what evaluation, the benchmark and the retrain gate measure.

The service calls :meth:`Retriever.retrieve_many` (env facts from an env KB, sub-goals from a vector search);
decision support and ``eval-retrieval`` call :meth:`Retriever.rank` over the same candidates, and the gate and the
benchmark run decision support with ``config.retrieval``. Same query, same corpus, same settings: same ranking.
"""

from __future__ import annotations

import numpy as np
import pytest
from doubles import HashingEncoder  # tests/unit is on sys.path (pytest prepends it)

import knowmap.evaluation.decision as decision
from knowmap.config import RetrievalConfig
from knowmap.evaluation.decision import DecisionStep, ExperienceDoc, evaluate_decision
from knowmap.models.retrieval import RetrieveArgs, Retriever
from knowmap.schemas import Fact, KnowledgeItem, Relation

FACTS = [Fact(subject=s, relation=Relation.LOCATION, object=o, valid_from=0) for s, o in [
    ("stove", "kitchen"), ("pot", "stove"), ("thermometer", "table"), ("seed", "greenhouse"), ("water", "pot"),
    ("sink", "kitchen"), ("lighter", "drawer"), ("table", "kitchen"), ("fridge", "kitchen")]]
SUBGOALS = ["heat the pot on the stove", "plant the seed in the pot", "read the thermometer in the water",
            "move the pot to the sink", "open the fridge", "pick up the lighter", "focus on the seed",
            "pour water into the pot", "wait for the water to boil", "look at the stove"]
QUERIES = ["boil the water in the pot", "where is the thermometer", "grow a seed in the greenhouse"]


def by_length(query: str, texts: list[str]) -> list[float]:
    """A reranker whose order differs from the first stage's, so its fusion shows."""
    return [float(-len(t) + len(set(query.split()) & set(t.split()))) for t in texts]


def exact_search(encoder: HashingEncoder):
    """The vector store's contract over SUBGOALS: the top k by cosine, best first (Milvus Lite, exactly)."""
    matrix = encoder.encode(SUBGOALS)

    def search(vector: np.ndarray, k: int, task: str | None, where: object = None) -> list[KnowledgeItem]:
        scores = matrix @ vector
        order = np.argsort(-scores, kind="stable")[:k]
        return [KnowledgeItem(id=f"g{i}", kind="subgoal", text=SUBGOALS[i], score=float(scores[i])) for i in order]

    return search


@pytest.mark.parametrize("settings", [
    RetrievalConfig(hybrid=False), RetrievalConfig(hybrid=True, hybrid_candidates=4),
    RetrievalConfig(hybrid=True, hybrid_candidates=4, rerank=True, rerank_candidates=5),
    RetrievalConfig(hybrid=False, rerank=True, rerank_candidates=3, joint_facts=2)])
def test_the_service_and_evaluation_give_the_same_ranking(settings: RetrievalConfig) -> None:
    encoder = HashingEncoder()
    served = Retriever(encoder.encode, env_facts=lambda env_id, step: FACTS, experience=exact_search(encoder),
                       rerank=by_length, settings=settings)
    measured = Retriever(encoder.encode, rerank=by_length, settings=settings)
    texts = [f.text() for f in FACTS]
    k = 3
    found = served.retrieve_many([RetrieveArgs(q, "env", k=k, rerank=settings.rerank) for q in QUERIES])
    env = measured.rank([(q, texts) for q in QUERIES])
    joint = [measured.joint_query(q, [texts[i] for i in order]) for q, order in zip(QUERIES, env, strict=True)]
    experience = measured.rank([(q, SUBGOALS) for q in joint])
    for items, env_order, exp_order in zip(found, env, experience, strict=True):
        assert [i.text for i in items if i.kind == "env_fact"] == [texts[i] for i in env_order[:k]]
        assert [i.text for i in items if i.kind == "subgoal"] == [SUBGOALS[i] for i in exp_order[:k]]


def test_decision_support_ranks_with_the_settings_it_is_given(monkeypatch) -> None:
    """The gate and the benchmark pass ``config.retrieval`` (asserted in test_retrain and by the benchmark's
    code); decision support hands it to the pipeline, whose rankings it judges."""
    made: list[RetrievalConfig] = []

    class Recording(Retriever):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(kwargs["settings"])

    monkeypatch.setattr(decision, "Retriever", Recording)
    settings = RetrievalConfig(hybrid_candidates=3, joint_facts=1)
    step = DecisionStep(episode_id="e", task="boil", task_description="boil water", step=0, query=QUERIES[0],
                        facts=tuple(f.text() for f in FACTS), relevant_facts=frozenset({1}), answer_keys=frozenset(),
                        gold=None, valid=(), recent=())
    result = evaluate_decision([step], [ExperienceDoc(text=t, keys=frozenset()) for t in SUBGOALS],
                               embedders={"kb-base": HashingEncoder()}, hybrid_modes=["kb-base"], settings=settings,
                               k_env=1, k_experience=1, train_tasks=["boil"])
    assert made and all(s is settings for s in made)
    served = Retriever(HashingEncoder().encode, env_facts=lambda env_id, step: FACTS, settings=settings)
    top = served.retrieve(QUERIES[0], env_id="env", k=1, kbs=["env"], hybrid=True)[0].text
    assert result.modes["kb-base+bm25"]["support@1_env"] == float(top == FACTS[1].text())
