"""The retrieval pipeline, Ray-free: env facts and experiential sub-goals for a query, as the agent's prompt needs them.

:class:`Retriever` composes three plain functions, so the same logic runs in-process (an agent with its own
embedder), behind Ray actor handles, and inside the Serve deployments (which pass their batched handles):

* ``encode(texts) -> (n, dim)`` unit vectors: the embedder;
* ``env_facts(env_id, step) -> list[Fact]``: the env KB of one environment instance, now or as of a step;
* ``experience(vector, k, task, where) -> list[KnowledgeItem]``: a vector search of the experiential KB, in the
  collection embedded by the **same** model as ``encode`` (the caller keeps the two versions in step), among the rows
  matching ``where`` (a vector-store filter, e.g. a tenant's visibility; None = the searcher's own);
* optionally ``rerank(query, texts) -> scores``: a cross-encoder.

Two optional stages after the embedder, both fused by reciprocal rank (:mod:`knowmap.models.lexical`), so neither
replaces the embedder's order: ``hybrid`` fuses BM25 with it (over all of an env's facts; over the embedder's top
``hybrid_candidates`` sub-goals, since the vector store has no full-text index here), and ``rerank`` fuses the
cross-encoder's order of the top ``rerank_candidates`` with the order they came in. Which of them is on by default
is decided by measurement (``benchmarks/decision_support.py``; the README quotes it).

As in the paper, the experiential query is enriched with the env facts retrieved first: the model was trained
(joint pairs) to associate a situation's facts with the sub-goals that used them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from knowmap.errors import KnowMapError
from knowmap.models.lexical import BM25Retriever, fuse
from knowmap.schemas import KB_KINDS, Fact, KBKind, KnowledgeItem

Encode = Callable[[list[str]], np.ndarray]
EnvFacts = Callable[[str, "int | None"], list[Fact]]
ExperienceSearch = Callable[[np.ndarray, int, "str | None", "dict[str, Any] | None"], list[KnowledgeItem]]
Rerank = Callable[[str, list[str]], list[float]]

ENRICH_FACTS = 5  # env facts appended to the experiential query
_FACT_CACHE = 50_000  # fact texts whose vectors are kept (facts repeat from step to step and across queries)


def enrich_query(query: str, facts: Sequence[str], limit: int = ENRICH_FACTS) -> str:
    """The experiential query with the top env facts appended (the joint training pairs use the same form)."""
    facts = [f for f in facts if f][:limit]
    return query if not facts else f"{query}\nKnown facts: " + "; ".join(facts)


class Retriever:
    """Ranks env facts and experiential sub-goals for a query.

    Args:
        encode: the embedder (unit-length vectors).
        env_facts: env KB lookup by env id; None = this retriever serves no env KB.
        experience: experiential KB vector search; None = none.
        rerank: a cross-encoder's scores for (query, text) pairs; None = reranking is unavailable.
        rerank_candidates: how many first-stage hits per KB the reranker re-orders (at least ``k``).
        hybrid: fuse BM25 with the embedder by default (a retrieve may say otherwise).
        hybrid_candidates: the embedder's sub-goal hits that BM25 re-scores for the fusion.
    """

    def __init__(self, encode: Encode, *, env_facts: EnvFacts | None = None,
                 experience: ExperienceSearch | None = None, rerank: Rerank | None = None,
                 rerank_candidates: int = 20, hybrid: bool = False, hybrid_candidates: int = 100) -> None:
        if rerank_candidates < 1 or hybrid_candidates < 1:
            raise ValueError(f"rerank_candidates and hybrid_candidates must be >= 1, got {rerank_candidates} and "
                             f"{hybrid_candidates}")
        self.encode, self.env_facts, self.experience = encode, env_facts, experience
        self.rerank, self.rerank_candidates = rerank, rerank_candidates
        self.hybrid, self.hybrid_candidates = hybrid, hybrid_candidates
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()

    def retrieve(self, query: str, *, env_id: str | None = None, task: str | None = None, k: int = 5,
                 kbs: Sequence[KBKind] = KB_KINDS, rerank: bool = False, step: int | None = None,
                 hybrid: bool | None = None, where: dict[str, Any] | None = None) -> list[KnowledgeItem]:
        """Up to ``k`` items from each KB asked for: env facts first, then sub-goals, each best first.

        Args:
            query: the situation: task, current sub-goal, recent observation.
            env_id: whose env KB to search; env facts are skipped without it.
            task: restrict experience to this ScienceWorld task (None = all tasks, for unseen ones).
            k: items per KB, at least 1.
            kbs: which KBs: ``"env"``, ``"experience"``.
            rerank: fuse the cross-encoder's order of each KB's top ``rerank_candidates`` with the first stage's.
            step: env facts as of this step (None = now).
            hybrid: fuse BM25 with the embedder; None = this retriever's default.
            where: a filter on the experiential rows, passed to ``experience`` (e.g. what a tenant may see).

        Returns:
            knowledge items with ``score`` (the cosine; the fused reciprocal-rank score after a fusion, the stages'
            own scores then in ``provenance``) and ``provenance`` (where from, ``ranker``).

        Raises:
            KnowMapError: an empty query, ``k`` < 1, an unknown KB, or rerank asked of a retriever without one.
        """
        if not query.strip():
            raise KnowMapError("query must not be empty")
        if k < 1:
            raise KnowMapError(f"k must be >= 1, got {k}")
        unknown = sorted(set(kbs) - set(KB_KINDS))
        if unknown:
            raise KnowMapError(f"unknown KB kind(s) {unknown}; allowed: {list(KB_KINDS)}")
        if rerank and self.rerank is None:
            raise KnowMapError("reranking was asked for but no reranker is configured (models.reranker)")
        hybrid = self.hybrid if hybrid is None else hybrid
        depth = max(k, self.rerank_candidates) if rerank else k
        env_items: list[KnowledgeItem] = []
        if "env" in kbs and env_id and self.env_facts is not None:
            env_items = self._env_search(query, env_id, step, depth, hybrid)
            if rerank:
                env_items = self._rerank(query, env_items)
            env_items = env_items[:k]
        exp_items: list[KnowledgeItem] = []
        if "experience" in kbs and self.experience is not None:
            enriched = enrich_query(query, [item.text for item in env_items])
            found = self.experience(self.encode([enriched])[0], max(depth, self.hybrid_candidates) if hybrid
                                    else depth, task, where)
            exp_items = [i.model_copy(update={"provenance": {**i.provenance, "ranker": "embedder"}}) for i in found]
            if hybrid:
                exp_items = _fuse(exp_items, BM25Retriever([i.text for i in exp_items]).rank(enriched)
                                  if exp_items else [], "embedder+bm25")[:depth]
            if rerank:
                exp_items = self._rerank(enriched, exp_items)
            exp_items = exp_items[:k]
        return env_items + exp_items

    def _env_search(self, query: str, env_id: str, step: int | None, depth: int,
                    hybrid: bool) -> list[KnowledgeItem]:
        facts = self.env_facts(env_id, step)  # type: ignore[misc]
        if not facts:
            return []
        texts = [f.text() for f in facts]
        matrix, query_vector = self._fact_vectors(texts, query)  # (n_facts, dim), (dim,)
        scores = matrix @ query_vector  # (n_facts,)
        order = [int(i) for i in np.argsort(-scores, kind="stable")]
        fused: dict[int, float] = {}
        if hybrid:
            lexical = BM25Retriever(texts).rank(query)
            order, fused = fuse([order, lexical])
        order = order[:depth]
        items = [
            KnowledgeItem(
                id=f"{env_id}:{facts[i].subject}|{facts[i].relation.value}|{facts[i].object}|{facts[i].valid_from}",
                kind="env_fact", text=texts[i], score=float(scores[i]),
                provenance={"env_id": env_id, "subject": facts[i].subject, "relation": facts[i].relation.value,
                            "object": facts[i].object, "valid_from": facts[i].valid_from,
                            "valid_to": facts[i].valid_to, "ranker": "embedder"},
            )
            for i in order
        ]
        if not hybrid:
            return items
        return [i.model_copy(update={"score": fused[o], "provenance": {**i.provenance, "ranker": "embedder+bm25",
                                                                       "embedder_score": i.score}})
                for i, o in zip(items, order, strict=True)]

    def _fact_vectors(self, texts: list[str], query: str) -> tuple[np.ndarray, np.ndarray]:
        """The facts' vectors (cached by text) and the query's, embedded together in one encoder call: every
        call is a hop to the embedder in the service, so facts and query never pay for two."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        encoded = np.asarray(self.encode([*missing, query]), dtype=np.float32)  # (len(missing) + 1, dim)
        for text, vector in zip(missing, encoded[:-1], strict=True):
            self._vectors[text] = vector
        while len(self._vectors) > _FACT_CACHE:
            self._vectors.popitem(last=False)
        for text in texts:
            self._vectors.move_to_end(text)
        return np.stack([self._vectors[t] for t in texts]), encoded[-1]

    def _rerank(self, query: str, items: list[KnowledgeItem]) -> list[KnowledgeItem]:
        """The cross-encoder's order of ``items`` fused with the order they came in (never replacing it)."""
        if not items:
            return items
        scores = self.rerank(query, [i.text for i in items])  # type: ignore[misc]
        items = [i.model_copy(update={"provenance": {**i.provenance, "reranker_score": float(s)}})
                 for i, s in zip(items, scores, strict=True)]
        by_reranker = sorted(range(len(items)), key=lambda i: (-scores[i], i))
        return _fuse(items, by_reranker, items[0].provenance.get("ranker", "embedder") + "+reranker")


def _fuse(items: list[KnowledgeItem], other: list[int], ranker: str) -> list[KnowledgeItem]:
    """``items`` (in their first-stage order) fused by reciprocal rank with ``other`` (positions into ``items``,
    best first); each item's score becomes the fused score, its cosine kept as ``provenance["embedder_score"]``."""
    order, fused = fuse([list(range(len(items))), other])
    return [items[i].model_copy(update={"score": fused[i], "provenance": {
        **items[i].provenance, "ranker": ranker,
        "embedder_score": items[i].provenance.get("embedder_score", items[i].score)}})
        for i in order]
