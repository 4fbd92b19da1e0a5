"""The retrieval pipeline's logic with a hashing encoder: ranking, enrichment, reranking, validation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from knowmap.config import RetrievalConfig
from knowmap.errors import KnowMapError
from knowmap.models.retrieval import RetrieveArgs, Retriever, enrich_query
from knowmap.schemas import Fact, KnowledgeItem, Relation
from tests.unit.doubles import HashingEncoder

FACTS = {
    "env-a": [Fact(subject="stove", relation=Relation.LOCATION, object="kitchen", valid_from=0),
              Fact(subject="pot", relation=Relation.CONTAINS, object="water", valid_from=1),
              Fact(subject="thermometer", relation=Relation.LOCATION, object="kitchen", valid_from=0)],
    "env-b": [Fact(subject="seed", relation=Relation.LOCATION, object="greenhouse", valid_from=0)],
}


class RecordingExperience:
    """Returns fixed sub-goals and records the query vectors it was given."""

    def __init__(self, encoder: HashingEncoder) -> None:
        self.encoder, self.queries = encoder, []

    def __call__(self, vector: np.ndarray, k: int, task: str | None, where: object = None) -> list[KnowledgeItem]:
        self.queries.append((vector, k, task))
        items = [KnowledgeItem(id=f"g{i}", kind="subgoal", text=t, score=1.0 - i / 10)
                 for i, t in enumerate(["heat the pot on the stove", "plant the seed", "read the thermometer"])]
        return items[:k]


def make(rerank=None) -> tuple[Retriever, RecordingExperience]:
    encoder = HashingEncoder()
    experience = RecordingExperience(encoder)
    retriever = Retriever(encoder.encode, env_facts=lambda env_id, step: FACTS.get(env_id, []),
                          experience=experience, rerank=rerank,
                          settings=RetrievalConfig(hybrid=False, rerank_candidates=3))
    return retriever, experience


def test_env_facts_ranked_by_similarity_and_only_of_that_env() -> None:
    retriever, _ = make()
    items = retriever.retrieve("where is the stove", env_id="env-a", k=1, kbs=["env"])
    assert len(items) == 1 and items[0].provenance["subject"] == "stove"
    assert all(i.provenance["env_id"] == "env-a" for i in items)
    other = retriever.retrieve("where is the stove", env_id="env-b", k=5, kbs=["env"])
    assert [i.provenance["subject"] for i in other] == ["seed"]


def test_experience_query_is_enriched_with_the_env_facts() -> None:
    retriever, experience = make()
    items = retriever.retrieve("boil water", env_id="env-a", task="boil", k=2)
    kinds = [i.kind for i in items]
    assert kinds == ["env_fact", "env_fact", "subgoal", "subgoal"]
    vector, k, task = experience.queries[-1]
    # The joint query holds the top retrieval.joint_facts env facts, however few the request keeps (k).
    env_texts = [i.text for i in retriever.retrieve("boil water", env_id="env-a", k=5, kbs=["env"])]
    assert len(env_texts) == 3 and [i.text for i in items if i.kind == "env_fact"] == env_texts[:2]
    expected = HashingEncoder().encode([enrich_query("boil water", env_texts, 5)])[0]
    assert np.allclose(vector, expected) and k == 2 and task == "boil"


def test_rerank_is_fused_with_the_first_stage_never_replacing_it() -> None:
    def by_length(query: str, texts: list[str]) -> list[float]:
        return [-len(t) for t in texts]

    retriever, _ = make(rerank=by_length)
    items = retriever.retrieve("boil water", k=3, kbs=["experience"], rerank=True)
    # first stage: heat (1st), plant (2nd), read (3rd); reranker: plant, read, heat. Fused: plant 1/62 + 1/61,
    # heat 1/61 + 1/63, read 1/63 + 1/62.
    assert [i.text for i in items] == ["plant the seed", "heat the pot on the stove", "read the thermometer"]
    assert all(i.provenance["ranker"] == "embedder+reranker" for i in items)
    assert items[0].score == pytest.approx(1 / 62 + 1 / 61)
    assert items[0].provenance["reranker_score"] == -14 and items[0].provenance["embedder_score"] == 0.9


def test_hybrid_fuses_bm25_with_the_embedder_by_default_or_when_asked() -> None:
    encoder = HashingEncoder()
    experience = RecordingExperience(encoder)
    facts = lambda env_id, step: FACTS.get(env_id, [])  # noqa: E731
    plain = Retriever(encoder.encode, env_facts=facts, experience=experience,
                      settings=RetrievalConfig(hybrid=False, hybrid_candidates=7))
    hybrid = Retriever(encoder.encode, env_facts=facts, experience=experience,
                       settings=RetrievalConfig(hybrid=True, hybrid_candidates=7))
    query = "thermometer reading"
    dense = plain.retrieve(query, k=3, kbs=["experience"])
    assert experience.queries[-1][1] == 3 and [i.provenance["ranker"] for i in dense] == ["embedder"] * 3
    fused = hybrid.retrieve(query, k=3, kbs=["experience"])
    assert experience.queries[-1][1] == 7  # BM25 re-scores the embedder's deeper candidate list
    # dense: heat, plant, read; BM25: read (the only lexical match), heat, plant -> read overtakes plant
    assert [i.text for i in dense] == ["heat the pot on the stove", "plant the seed", "read the thermometer"]
    assert [i.text for i in fused] == ["heat the pot on the stove", "read the thermometer", "plant the seed"]
    assert all(i.provenance["ranker"] == "embedder+bm25" for i in fused)
    assert [i.text for i in hybrid.retrieve(query, k=3, kbs=["experience"], hybrid=False)] == [i.text for i in dense]
    assert [i.text for i in plain.retrieve(query, k=3, kbs=["experience"], hybrid=True)] == [i.text for i in fused]
    env = hybrid.retrieve("thermometer", env_id="env-a", k=3, kbs=["env"])
    assert env[0].provenance["subject"] == "thermometer" and env[0].provenance["ranker"] == "embedder+bm25"
    assert "embedder_score" in env[0].provenance


@pytest.mark.parametrize("kwargs, message", [
    ({"query": "  "}, "empty"), ({"query": "x", "k": 0}, "k must be"),
    ({"query": "x", "kbs": ["web"]}, "unknown KB"), ({"query": "x", "rerank": True}, "no reranker"),
])
def test_bad_requests_say_what_is_allowed(kwargs, message) -> None:
    retriever, _ = make()
    query = kwargs.pop("query")
    with pytest.raises(KnowMapError, match=message):
        retriever.retrieve(query, **kwargs)


def recording_encoder() -> tuple[Callable[[list[str]], np.ndarray], list[list[str]]]:
    """A hashing encoder that records the texts of every call."""
    encoder = HashingEncoder()
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return encoder.encode(texts)

    return encode, calls


def test_env_facts_and_query_are_embedded_in_one_call() -> None:
    encode, calls = recording_encoder()
    retriever = Retriever(encode, env_facts=lambda env_id, step: FACTS.get(env_id, []))
    first = retriever.retrieve("where is the pot", env_id="env-a", k=2, kbs=("env",))
    assert len(calls) == 1 and calls[0][-1] == "where is the pot" and len(calls[0]) == len(FACTS["env-a"]) + 1
    retriever.retrieve("where is the pot", env_id="env-a", k=2, kbs=("env",))
    assert calls[1] == ["where is the pot"]  # fact vectors come from the cache
    assert [i.text for i in retriever.retrieve("where is the pot", env_id="env-a", k=2, kbs=("env",))] == \
        [i.text for i in first]


def test_a_batch_answers_as_its_requests_alone_would_with_one_read_per_env_and_two_model_calls() -> None:
    encoder = HashingEncoder()
    calls: dict[str, list] = {"encode": [], "env": [], "experience": []}

    def encode(texts: list[str]) -> np.ndarray:
        calls["encode"].append(list(texts))
        return encoder.encode(texts)

    def env_facts(env_id: str, step: int | None) -> list[Fact]:
        calls["env"].append((env_id, step))
        return FACTS.get(env_id, [])

    experience = RecordingExperience(encoder)

    def experience_many(searches: list) -> list[list[KnowledgeItem]]:
        calls["experience"].append(len(searches))
        return [experience(*search) for search in searches]

    batched = Retriever(encode, env_facts=env_facts, experience_many=experience_many,
                        settings=RetrievalConfig(hybrid=True))
    requests = [RetrieveArgs("boil water", "env-a", "boil", 2), RetrieveArgs("where is the pot", "env-a", k=1),
                RetrieveArgs("plant a seed", "env-b", "grow", 3), RetrieveArgs("heat it", None, None, 2),
                RetrieveArgs("only facts", "env-a", k=2, kbs=("env",))]
    found = batched.retrieve_many(requests)
    assert calls["env"] == [("env-a", None), ("env-b", None)]  # each env KB read once
    assert len(calls["encode"]) == 2 and calls["experience"] == [4]  # facts + queries, then the enriched queries
    alone, _ = make()
    alone.settings.hybrid = True
    for request, items in zip(requests, found, strict=True):
        expected = alone.retrieve(request.query, env_id=request.env_id, task=request.task, k=request.k,
                                  kbs=request.kbs)
        assert [(i.id, i.score) for i in items] == [(i.id, i.score) for i in expected]


def test_one_requests_bad_input_or_failing_stage_fails_only_that_request() -> None:
    encoder = HashingEncoder()

    def encode(texts: list[str]) -> np.ndarray:
        if any("poison" in t for t in texts):
            raise ValueError("the tokenizer refused a text")
        return encoder.encode(texts)

    def env_facts(env_id: str, step: int | None) -> list[Fact]:
        if env_id == "env-down":
            raise ConnectionError("env KB actor unavailable")
        return FACTS.get(env_id, [])

    retriever = Retriever(encode, env_facts=env_facts, experience=RecordingExperience(encoder))
    found = retriever.retrieve_many([RetrieveArgs("boil water", "env-a", k=2), RetrieveArgs("   ", "env-a"),
                                     RetrieveArgs("poison text", "env-a"), RetrieveArgs("x", "env-down"),
                                     RetrieveArgs("plant", "env-b", k=1)])
    assert isinstance(found[1], KnowMapError) and "empty" in str(found[1])
    assert isinstance(found[2], ValueError) and isinstance(found[3], ConnectionError)
    assert [i.kind for i in found[0]] == ["env_fact", "env_fact", "subgoal", "subgoal"]
    assert [i.kind for i in found[4]] == ["env_fact", "subgoal"]


def test_facts_cached_ahead_are_not_embedded_again() -> None:
    encode, calls = recording_encoder()
    retriever = Retriever(encode, env_facts=lambda env_id, step: FACTS.get(env_id, []))
    texts = [f.text() for f in FACTS["env-a"]]
    assert retriever.cache_facts(texts, chunk=2) == 3 and [len(c) for c in calls] == [2, 1]
    assert retriever.cached_facts() == texts and retriever.cache_facts(texts) == 0
    retriever.retrieve("where is the pot", env_id="env-a", k=2, kbs=("env",))
    assert calls[-1] == ["where is the pot"]
