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
from typing import Any, NamedTuple

import numpy as np

from knowmap.errors import KnowMapError
from knowmap.models.lexical import BM25Retriever, fuse
from knowmap.schemas import KB_KINDS, Fact, KBKind, KnowledgeItem

Encode = Callable[[list[str]], np.ndarray]
EnvFacts = Callable[[str, "int | None"], list[Fact]]
ExperienceSearch = Callable[[np.ndarray, int, "str | None", "dict[str, Any] | None"], list[KnowledgeItem]]
Rerank = Callable[[str, list[str]], list[float]]

ExperienceSearches = Callable[[list[tuple[np.ndarray, int, "str | None", "dict[str, Any] | None"]]],
                              list[list[KnowledgeItem]]]

ENRICH_FACTS = 5  # env facts appended to the experiential query
_FACT_CACHE = 50_000  # fact texts whose vectors are kept (facts repeat from step to step and across queries)


class RetrieveArgs(NamedTuple):
    """One request of :meth:`Retriever.retrieve_many`: the arguments of :meth:`Retriever.retrieve`."""

    query: str
    env_id: str | None = None
    task: str | None = None
    k: int = 5
    kbs: tuple[KBKind, ...] = KB_KINDS
    rerank: bool = False
    step: int | None = None
    hybrid: bool | None = None
    where: dict[str, Any] | None = None


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
        experience_many: several experiential searches ``(vector, k, task, where)`` in one call (a service's
            batch: one round trip); None = ``experience`` once per search.
        rerank: a cross-encoder's scores for (query, text) pairs; None = reranking is unavailable.
        rerank_candidates: how many first-stage hits per KB the reranker re-orders (at least ``k``).
        hybrid: fuse BM25 with the embedder by default (a retrieve may say otherwise).
        hybrid_candidates: the embedder's sub-goal hits that BM25 re-scores for the fusion.
    """

    def __init__(self, encode: Encode, *, env_facts: EnvFacts | None = None,
                 experience: ExperienceSearch | None = None, experience_many: ExperienceSearches | None = None,
                 rerank: Rerank | None = None, rerank_candidates: int = 20, hybrid: bool = False,
                 hybrid_candidates: int = 100) -> None:
        if rerank_candidates < 1 or hybrid_candidates < 1:
            raise ValueError(f"rerank_candidates and hybrid_candidates must be >= 1, got {rerank_candidates} and "
                             f"{hybrid_candidates}")
        self.encode, self.env_facts, self.experience = encode, env_facts, experience
        self.experience_many: ExperienceSearches | None = experience_many or (
            None if experience is None else lambda searches: [experience(*search) for search in searches])
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
        found = self.retrieve_many([RetrieveArgs(query, env_id, task, k, tuple(kbs), rerank, step, hybrid, where)])[0]
        if isinstance(found, Exception):
            raise found
        return found

    def retrieve_many(self, requests: Sequence[RetrieveArgs]) -> list[list[KnowledgeItem] | Exception]:
        """:meth:`retrieve` for several requests at once, as a service batches concurrent ones: each env KB is read
        once per batch, the embedder is called twice in all (facts and queries, then the enriched queries) and
        ``experience_many`` once. Returns each request's items, or the exception that request alone raised (its
        own bad input, or a failure of a stage only it used); a stage failing for the whole batch is retried
        request by request, so one request never fails another."""
        try:
            return self._batch(requests)
        except Exception as e:  # noqa: BLE001 - a stage's failure belongs to the requests that caused it
            if len(requests) == 1:
                return [e]
        out: list[list[KnowledgeItem] | Exception] = []
        for request in requests:
            try:
                out.append(self._batch([request])[0])
            except Exception as e:  # noqa: BLE001 - this request's own failure
                out.append(e)
        return out

    def _batch(self, requests: Sequence[RetrieveArgs]) -> list[list[KnowledgeItem] | Exception]:
        results: list[list[KnowledgeItem] | Exception] = [[] for _ in requests]
        valid = []
        for i, request in enumerate(requests):
            try:
                self._check(request)
                valid.append(i)
            except KnowMapError as e:
                results[i] = e
        env_items: dict[int, list[KnowledgeItem]] = {}
        wants_env = [i for i in valid if "env" in requests[i].kbs and requests[i].env_id and self.env_facts]
        for i, items in self._env_search([requests[i] for i in wants_env]).items():
            if isinstance(items, Exception):
                results[wants_env[i]] = items
            else:
                env_items[wants_env[i]] = items[:requests[wants_env[i]].k]
        wants_exp = [i for i in valid if "experience" in requests[i].kbs and self.experience_many is not None
                     and not isinstance(results[i], Exception)]
        enriched = {i: enrich_query(requests[i].query, [item.text for item in env_items.get(i, [])]) for i in wants_exp}
        vectors = np.asarray(self.encode([enriched[i] for i in wants_exp]), dtype=np.float32) if wants_exp else []
        searches = [(vectors[n], self._depth(requests[i], candidates=True), requests[i].task, requests[i].where)
                    for n, i in enumerate(wants_exp)]
        found = self.experience_many(searches) if searches else []  # type: ignore[misc]
        for i, hits in zip(wants_exp, found, strict=True):
            request = requests[i]
            exp_items = [h.model_copy(update={"provenance": {**h.provenance, "ranker": "embedder"}}) for h in hits]
            if self._hybrid(request):
                exp_items = _fuse(exp_items, BM25Retriever([h.text for h in exp_items]).rank(enriched[i])
                                  if exp_items else [], "embedder+bm25")[:self._depth(request)]
            if request.rerank:
                exp_items = self._rerank(enriched[i], exp_items)
            results[i] = env_items.get(i, []) + exp_items[:request.k]
        for i, items in env_items.items():
            if i not in enriched:
                results[i] = items
        return results

    def _check(self, request: RetrieveArgs) -> None:
        if not request.query.strip():
            raise KnowMapError("query must not be empty")
        if request.k < 1:
            raise KnowMapError(f"k must be >= 1, got {request.k}")
        unknown = sorted(set(request.kbs) - set(KB_KINDS))
        if unknown:
            raise KnowMapError(f"unknown KB kind(s) {unknown}; allowed: {list(KB_KINDS)}")
        if request.rerank and self.rerank is None:
            raise KnowMapError("reranking was asked for but no reranker is configured (models.reranker)")

    def _hybrid(self, request: RetrieveArgs) -> bool:
        return self.hybrid if request.hybrid is None else request.hybrid

    def _depth(self, request: RetrieveArgs, candidates: bool = False) -> int:
        """Items a first stage keeps: ``k``, or the reranker's candidates; with ``candidates``, also the sub-goal
        hits BM25 re-scores in a hybrid fusion."""
        depth = max(request.k, self.rerank_candidates) if request.rerank else request.k
        return max(depth, self.hybrid_candidates) if candidates and self._hybrid(request) else depth

    def _env_search(self, requests: list[RetrieveArgs]) -> dict[int, list[KnowledgeItem] | Exception]:
        """Each request's env facts, ranked (and reranked if asked); keys are positions in ``requests``. Each env
        KB is read once (per step asked), every fact not yet embedded and every query in one encoder call."""
        facts: dict[tuple[str, int | None], list[Fact] | Exception] = {}
        for request in requests:
            key = (request.env_id, request.step)
            if key not in facts:
                try:
                    facts[key] = self.env_facts(*key)  # type: ignore[misc,arg-type]
                except Exception as e:  # noqa: BLE001 - an unavailable env KB fails its own requests only
                    facts[key] = e
        texts = {key: [f.text() for f in found] for key, found in facts.items() if not isinstance(found, Exception)}
        asking = {n: row for row, n in enumerate(n for n, r in enumerate(requests) if texts.get((r.env_id, r.step)))}
        query_vectors = self._fact_vectors([t for ts in texts.values() for t in ts],
                                           [requests[n].query for n in asking]) if asking else []
        out: dict[int, list[KnowledgeItem] | Exception] = {}
        lexical: dict[tuple[str, int | None], BM25Retriever] = {}
        for n, request in enumerate(requests):
            key = (request.env_id, request.step)
            found = facts[key]
            if isinstance(found, Exception) or not found:
                out[n] = found if isinstance(found, Exception) else []
                continue
            matrix = np.stack([self._vectors[t] for t in texts[key]])  # (n_facts, dim)
            bm25 = lexical.get(key) or lexical.setdefault(key, BM25Retriever(texts[key])) if self._hybrid(request) \
                else None
            items = _rank_facts(request, found, texts[key], matrix @ query_vectors[asking[n]],
                                bm25, self._depth(request))
            out[n] = self._rerank(request.query, items) if request.rerank else items
        return out

    def cached_facts(self, limit: int = _FACT_CACHE) -> list[str]:
        """The fact texts whose vectors are cached, the most recently used ``limit``."""
        return list(self._vectors)[-limit:]

    def cache_facts(self, texts: Sequence[str], encode: Encode | None = None, chunk: int = 8) -> int:
        """Embed the ``texts`` not cached yet (a service warming a new model before it serves with it), ``chunk``
        per call of ``encode`` (default: this retriever's encoder); returns how many were embedded."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        for start in range(0, len(missing), chunk):
            self._fact_vectors(missing[start:start + chunk], [], encode)
        return len(missing)

    def _fact_vectors(self, texts: list[str], queries: list[str], encode: Encode | None = None) -> np.ndarray:
        """Cache the vectors of ``texts`` (facts, by text) and return the queries' ``(len(queries), dim)``, all
        embedded in one encoder call: every call is a hop to the model thread in the service."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        # (len(missing) + len(queries), dim)
        encoded = np.asarray((encode or self.encode)([*missing, *queries]), dtype=np.float32)
        for text, vector in zip(missing, encoded[:len(missing)], strict=True):
            self._vectors[text] = vector
        for text in texts:
            self._vectors.move_to_end(text)
        while len(self._vectors) > max(_FACT_CACHE, len(texts)):
            self._vectors.popitem(last=False)
        return encoded[len(missing):]

    def _rerank(self, query: str, items: list[KnowledgeItem]) -> list[KnowledgeItem]:
        """The cross-encoder's order of ``items`` fused with the order they came in (never replacing it)."""
        if not items:
            return items
        scores = self.rerank(query, [i.text for i in items])  # type: ignore[misc]
        items = [i.model_copy(update={"provenance": {**i.provenance, "reranker_score": float(s)}})
                 for i, s in zip(items, scores, strict=True)]
        by_reranker = sorted(range(len(items)), key=lambda i: (-scores[i], i))
        return _fuse(items, by_reranker, items[0].provenance.get("ranker", "embedder") + "+reranker")


def _rank_facts(request: RetrieveArgs, facts: list[Fact], texts: list[str], scores: np.ndarray,
                bm25: BM25Retriever | None, depth: int) -> list[KnowledgeItem]:
    """One env KB's facts as items, best ``depth`` first: by cosine ``scores``, fused with ``bm25``'s order of the
    request's query when given."""
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    fused: dict[int, float] = {}
    if bm25 is not None:
        order, fused = fuse([order, bm25.rank(request.query)])
    order = order[:depth]
    items = [
        KnowledgeItem(
            id=f"{request.env_id}:{facts[i].subject}|{facts[i].relation.value}|{facts[i].object}|"
               f"{facts[i].valid_from}",
            kind="env_fact", text=texts[i], score=float(scores[i]),
            provenance={"env_id": request.env_id, "subject": facts[i].subject, "relation": facts[i].relation.value,
                        "object": facts[i].object, "valid_from": facts[i].valid_from,
                        "valid_to": facts[i].valid_to, "ranker": "embedder"},
        )
        for i in order
    ]
    if bm25 is None:
        return items
    return [i.model_copy(update={"score": fused[o], "provenance": {**i.provenance, "ranker": "embedder+bm25",
                                                                   "embedder_score": i.score}})
            for i, o in zip(items, order, strict=True)]


def _fuse(items: list[KnowledgeItem], other: list[int], ranker: str) -> list[KnowledgeItem]:
    """``items`` (in their first-stage order) fused by reciprocal rank with ``other`` (positions into ``items``,
    best first); each item's score becomes the fused score, its cosine kept as ``provenance["embedder_score"]``."""
    order, fused = fuse([list(range(len(items))), other])
    return [items[i].model_copy(update={"score": fused[i], "provenance": {
        **items[i].provenance, "ranker": ranker,
        "embedder_score": items[i].provenance.get("embedder_score", items[i].score)}})
        for i in order]
