"""The one ranking pipeline, Ray-free: everything that ranks knowledge ranks it here, with the same settings.

The service (:mod:`knowmap.serve.retriever`), the in-process agent (:mod:`knowmap.agent.worker`), ``knowmap
eval-retrieval`` and decision support (:mod:`knowmap.evaluation`), and the retrain gate all rank through
:class:`Retriever`, configured by one :class:`~knowmap.config.RetrievalConfig` (the ``retrieval:`` section), so what
is measured is what is served. It composes plain functions, so it runs in-process, behind Ray actor handles and
inside the Serve deployments alike:

* ``encode(texts) -> (n, dim)`` unit vectors: the embedder; None = the lexical baseline (BM25 alone);
* ``env_facts(env_id, step) -> list[Fact]``: the env KB of one environment instance, now or as of a step;
* ``experience(vector, k, task, where) -> list[KnowledgeItem]``: a vector search of the experiential KB, in the
  collection embedded by the **same** model as ``encode`` (the caller keeps the two versions in step), among the rows
  matching ``where`` (a vector-store filter, e.g. a tenant's visibility; None = the searcher's own);
* optionally ``rerank(query, texts) -> scores``: a cross-encoder.

The stages, the same for both KBs (:meth:`Retriever.rank` runs them over given candidates, as evaluation does):

1. **first stage**: the embedder's cosine: over all of an env KB's facts; over the vector store's top hits for
   sub-goals (an in-memory corpus given to :meth:`Retriever.rank` is scored whole, as an exact search would).
   Without an encoder, BM25 over all candidates.
2. **hybrid** (``retrieval.hybrid``): BM25 orders the first stage's top ``hybrid_candidates``, fused with the first
   stage's order by reciprocal rank (:mod:`knowmap.models.lexical`); the rest keeps its place after them.
3. **rerank** (``retrieval.rerank``): the cross-encoder orders the top ``rerank_candidates``, fused with the order
   they came in; the rest after. Neither second stage replaces the embedder's order.

As in the paper, the experiential query is the **joint query**: the query with the top ``joint_facts`` env facts
retrieved first appended (:func:`enrich_query`; the joint training pairs use the same form). Which stages are on by
default is decided by measurement on dev (``benchmarks/decision_support.py``; docs/training-and-evaluation.md).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from knowmap.config import RetrievalConfig
from knowmap.errors import KnowMapError
from knowmap.models.lexical import BM25Retriever, fuse
from knowmap.schemas import KB_KINDS, Fact, KBKind, KnowledgeItem

Encode = Callable[[list[str]], np.ndarray]
EnvFacts = Callable[[str, "int | None"], list[Fact]]
ExperienceSearch = Callable[[np.ndarray, int, "str | None", "dict[str, Any] | None"], list[KnowledgeItem]]
Rerank = Callable[[str, list[str]], list[float]]

ExperienceSearches = Callable[[list[tuple[np.ndarray, int, "str | None", "dict[str, Any] | None"]]],
                              list[list[KnowledgeItem]]]

_FACT_CACHE = 50_000  # texts whose vectors are kept (facts repeat from step to step and across queries)


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


class Ranked(NamedTuple):
    """One candidate list through the pipeline: positions into it, best first (all of them), and each stage's
    scores of the positions it ranked."""

    order: list[int]
    scores: dict[int, float]  # what the final order sorted by: the first stage's, or the last fusion's
    first: dict[int, float]  # the first stage's: the cosine (BM25's score in the lexical baseline)
    reranker: dict[int, float]  # the cross-encoder's, where it ran
    ranker: str  # the stages: embedder | bm25, then +bm25 (hybrid), then +reranker


def enrich_query(query: str, facts: Sequence[str], limit: int) -> str:
    """The joint query: the experiential query with the top ``limit`` env facts appended (the joint training
    pairs use the same form)."""
    facts = [f for f in facts if f][:limit]
    return query if not facts else f"{query}\nKnown facts: " + "; ".join(facts)


class Retriever:
    """Ranks env facts and experiential sub-goals for a query: the project's one ranking pipeline.

    Args:
        encode: the embedder (unit-length vectors); None = the lexical baseline, BM25 alone (env facts and given
            candidates only: the vector store needs vectors).
        env_facts: env KB lookup by env id; None = this retriever serves no env KB.
        experience: experiential KB vector search; None = none.
        experience_many: several experiential searches ``(vector, k, task, where)`` in one call (a service's
            batch: one round trip); None = ``experience`` once per search.
        rerank: a cross-encoder's scores for (query, text) pairs; None = reranking is unavailable.
        settings: the ``retrieval`` config section (hybrid and rerank defaults, candidate counts, joint facts).

    Raises:
        KnowMapError: an experiential search without an encoder.
    """

    def __init__(self, encode: Encode | None, *, env_facts: EnvFacts | None = None,
                 experience: ExperienceSearch | None = None, experience_many: ExperienceSearches | None = None,
                 rerank: Rerank | None = None, settings: RetrievalConfig | None = None) -> None:
        if encode is None and (experience is not None or experience_many is not None):
            raise KnowMapError("an experiential vector search needs an encoder; a retriever without one (BM25 "
                               "alone) ranks env facts and given candidates")
        self.encode, self.env_facts, self.experience = encode, env_facts, experience
        self.experience_many: ExperienceSearches | None = experience_many or (
            None if experience is None else lambda searches: [experience(*search) for search in searches])
        self.rerank = rerank
        self.settings = settings if settings is not None else RetrievalConfig()
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
            hybrid: fuse BM25 with the embedder; None = ``settings.hybrid``.
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
        once per batch, the embedder is called twice in all (facts and queries, then the joint queries) and
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

    def rank(self, requests: Sequence[tuple[str, Sequence[str]]], *, hybrid: bool | None = None,
             rerank: bool | None = None) -> list[list[int]]:
        """The pipeline over given candidates, as evaluation runs it: each ``(query, texts)`` ranked whole.

        Every text and query not cached yet is embedded in one encoder call; the first stage scores every text
        (an exact search of an in-memory corpus), then the second stages run as :meth:`retrieve` runs them.

        Args:
            hybrid, rerank: the second stages; None = ``settings.hybrid`` / ``settings.rerank``.

        Returns:
            per request, positions into its texts, best first (all of them; empty for no texts).

        Raises:
            KnowMapError: rerank asked of a retriever without a reranker.
        """
        hybrid = self.settings.hybrid if hybrid is None else hybrid
        rerank = self.settings.rerank if rerank is None else rerank
        self._check_rerank(rerank)
        asking = [n for n, (_, texts) in enumerate(requests) if texts]
        corpora = {id(requests[n][1]): list(requests[n][1]) for n in asking}  # requests often share one corpus
        queries: Any = []
        if self.encode is not None and asking:
            queries = self._vectors_of([t for texts in corpora.values() for t in texts],
                                       [requests[n][0] for n in asking])
        matrices: dict[int, np.ndarray] = {}  # (len(texts), dim) per corpus
        lexical: dict[int, BM25Retriever] = {}
        out: list[list[int]] = [[] for _ in requests]
        for row, n in enumerate(asking):
            query, key = requests[n][0], id(requests[n][1])
            cosine = None
            if self.encode is not None:
                if key not in matrices:
                    matrices[key] = np.stack([self._vectors[t] for t in corpora[key]])
                cosine = matrices[key] @ queries[row]
            elif key not in lexical:
                lexical[key] = BM25Retriever(corpora[key])
            out[n] = self._pipeline(query, corpora[key], cosine, hybrid, rerank, bm25=lexical.get(key)).order
        return out

    def joint_query(self, query: str, facts: Sequence[str]) -> str:
        """The experiential query with the top ``settings.joint_facts`` of ``facts`` (env facts, best first)."""
        return enrich_query(query, facts, self.settings.joint_facts)

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
                env_items[wants_env[i]] = items
        wants_exp = [i for i in valid if "experience" in requests[i].kbs and self.experience_many is not None
                     and not isinstance(results[i], Exception)]
        joint = {i: self.joint_query(requests[i].query, [item.text for item in env_items.get(i, [])])
                 for i in wants_exp}
        vectors = np.asarray(self.encode([joint[i] for i in wants_exp]), dtype=np.float32) \
            if wants_exp else []  # type: ignore[misc]
        searches = [(vectors[n], self._search_depth(requests[i]), requests[i].task, requests[i].where)
                    for n, i in enumerate(wants_exp)]
        found = self.experience_many(searches) if searches else []  # type: ignore[misc]
        for i, hits in zip(wants_exp, found, strict=True):
            request = requests[i]
            ranked = self._pipeline(joint[i], [h.text for h in hits], np.asarray([h.score for h in hits]),
                                    self._hybrid(request), request.rerank, ordered=True)
            results[i] = env_items.get(i, [])[:request.k] + _items(ranked, request.k, hits.__getitem__)
        for i, items in env_items.items():
            if i not in joint:
                results[i] = items[:requests[i].k]
        return results

    def _check(self, request: RetrieveArgs) -> None:
        if not request.query.strip():
            raise KnowMapError("query must not be empty")
        if request.k < 1:
            raise KnowMapError(f"k must be >= 1, got {request.k}")
        unknown = sorted(set(request.kbs) - set(KB_KINDS))
        if unknown:
            raise KnowMapError(f"unknown KB kind(s) {unknown}; allowed: {list(KB_KINDS)}")
        self._check_rerank(request.rerank)

    def _check_rerank(self, rerank: bool) -> None:
        if rerank and self.rerank is None:
            raise KnowMapError("reranking was asked for but no reranker is configured (models.reranker)")

    def _hybrid(self, request: RetrieveArgs) -> bool:
        return self.settings.hybrid if request.hybrid is None else request.hybrid

    def _search_depth(self, request: RetrieveArgs) -> int:
        """The sub-goal hits a request's vector search returns: ``k``, and every candidate its second stages read."""
        return max(request.k, self.settings.rerank_candidates if request.rerank else 0,
                   self.settings.hybrid_candidates if self._hybrid(request) else 0)

    def _env_search(self, requests: list[RetrieveArgs]) -> dict[int, list[KnowledgeItem] | Exception]:
        """Each request's env facts, ranked, at least ``joint_facts`` of them (the joint query takes its top);
        keys are positions in ``requests``. Each env KB is read once (per step asked), every fact not yet embedded
        and every query in one encoder call."""
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
        query_vectors: Any = []
        if asking and self.encode is not None:
            query_vectors = self._vectors_of([t for ts in texts.values() for t in ts],
                                             [requests[n].query for n in asking])
        out: dict[int, list[KnowledgeItem] | Exception] = {}
        for n, request in enumerate(requests):
            key = (request.env_id, request.step)
            found = facts[key]
            if isinstance(found, Exception) or not found:
                out[n] = found if isinstance(found, Exception) else []
                continue
            cosine = None if self.encode is None else \
                np.stack([self._vectors[t] for t in texts[key]]) @ query_vectors[asking[n]]  # (n_facts,)
            depth = max(request.k, self.settings.joint_facts)
            ranked = self._pipeline(request.query, texts[key], cosine, self._hybrid(request), request.rerank)
            out[n] = _items(ranked, depth, lambda i, f=found, t=texts[key], e=request.env_id: _fact_item(e, f[i], t[i]))
        return out

    def _pipeline(self, query: str, texts: list[str], cosine: np.ndarray | None, hybrid: bool, rerank: bool,
                  ordered: bool = False, bm25: BM25Retriever | None = None) -> Ranked:
        """The stages over one candidate list (see the module's docstring); ``ordered``: the candidates come in
        the first stage's order already (the vector store's hits); ``bm25``: the lexical first stage's index of
        ``texts``, if built already."""
        if not texts:
            return Ranked([], {}, {}, {}, "embedder")
        if cosine is None:
            bm25 = bm25 or BM25Retriever(texts)
            order, first, ranker = bm25.rank(query), dict(enumerate(bm25.scores(query).tolist())), "bm25"
            hybrid = False  # BM25 is the first stage already
        else:
            order = list(range(len(texts))) if ordered else [int(i) for i in np.argsort(-cosine, kind="stable")]
            first, ranker = dict(enumerate(cosine.tolist())), "embedder"
        scores, reranker = dict(first), {}
        # Each second stage orders the head only and is fused with the whole order: a head item's two shares
        # (>= 2 / (60 + head)) outweigh any item's below the head (<= 1 / (61 + head)), so the rest keeps its place.
        if hybrid:
            head = order[:self.settings.hybrid_candidates]
            order, scores = fuse([order, [head[i] for i in BM25Retriever([texts[i] for i in head]).rank(query)]])
            ranker += "+bm25"
        if rerank:
            head = order[:self.settings.rerank_candidates]
            got = self.rerank(query, [texts[i] for i in head])  # type: ignore[misc]
            reranker = {i: float(s) for i, s in zip(head, got, strict=True)}
            order, scores = fuse([order, sorted(head, key=lambda i: -reranker[i])])
            ranker += "+reranker"
        return Ranked(order, scores, first, reranker, ranker)

    def cached_facts(self, limit: int = _FACT_CACHE) -> list[str]:
        """The fact texts whose vectors are cached, the most recently used ``limit``."""
        return list(self._vectors)[-limit:]

    def cache_facts(self, texts: Sequence[str], encode: Encode | None = None, chunk: int = 8) -> int:
        """Embed the ``texts`` not cached yet (a service warming a new model before it serves with it), ``chunk``
        per call of ``encode`` (default: this retriever's encoder); returns how many were embedded."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        for start in range(0, len(missing), chunk):
            self._vectors_of(missing[start:start + chunk], [], encode)
        return len(missing)

    def _vectors_of(self, texts: list[str], queries: list[str], encode: Encode | None = None) -> np.ndarray:
        """Cache the vectors of ``texts`` (candidates, by text) and return the queries' ``(len(queries), dim)``,
        all embedded in one encoder call: every call is a hop to the model thread in the service."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        # (len(missing) + len(queries), dim)
        encoded = np.asarray((encode or self.encode)([*missing, *queries]), dtype=np.float32)  # type: ignore[misc]
        for text, vector in zip(missing, encoded[:len(missing)], strict=True):
            self._vectors[text] = vector
        for text in texts:
            self._vectors.move_to_end(text)
        while len(self._vectors) > max(_FACT_CACHE, len(texts)):
            self._vectors.popitem(last=False)
        return encoded[len(missing):]


def _fact_item(env_id: str | None, fact: Fact, text: str) -> KnowledgeItem:
    return KnowledgeItem(
        id=f"{env_id}:{fact.subject}|{fact.relation.value}|{fact.object}|{fact.valid_from}", kind="env_fact",
        text=text, score=0.0,
        provenance={"env_id": env_id, "subject": fact.subject, "relation": fact.relation.value,
                    "object": fact.object, "valid_from": fact.valid_from, "valid_to": fact.valid_to})


def _items(ranked: Ranked, depth: int, candidate: Callable[[int], KnowledgeItem]) -> list[KnowledgeItem]:
    """The top ``depth`` candidates in ``ranked`` order (``candidate(i)``: the item at position ``i``), each scored
    by the final stage (the first stage's score where no fusion ran), with the stages' own scores and the ranker in
    its provenance."""
    fused = ranked.ranker not in ("embedder", "bm25")
    out = []
    for i in ranked.order[:depth]:
        item = candidate(i)
        provenance = {**item.provenance, "ranker": ranked.ranker}
        if fused:
            provenance[f"{ranked.ranker.split('+')[0]}_score"] = ranked.first[i]
        if i in ranked.reranker:
            provenance["reranker_score"] = ranked.reranker[i]
        out.append(item.model_copy(update={"score": float(ranked.scores[i]), "provenance": provenance}))
    return out
