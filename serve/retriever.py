"""The retrieval backend the ingress holds: :class:`knowmap.models.retrieval.Retriever` over the ingress's own
embedder, the reranker deployment and the KB actors, plus the env-KB and trajectory operations of the API.

It runs in the ingress replica, not in a deployment of its own: every Serve hop on a request's path (a handle call
to another replica) cost about what the embedder's own work on a query costs, and a retrieve made three of them
(ingress -> retriever -> embedder, twice). Now a retrieve's only hops are to the KB actors.

Env facts come from the env-KB actor named ``envkb:<env_id>`` (:mod:`knowmap.actors.env_kb`): each env id has
its own actor and files, so a request for one env id can only ever see that env's facts. Experience comes from
the shared experiential-KB actor, searched in the collection of the embedder version that embedded the query.

Concurrent retrieves are batched (``@serve.batch``, admitted while no batch runs, like the embedder's): a batch
reads each env KB once, calls the model twice in all and the experiential-KB actor once (one multi-vector search),
which on a busy replica costs less per request than one retrieve alone (docs/service-and-api.md, "Measured").

Hot swap without failed requests: a batch embeds everything with the model that is current when it starts, and
keeps that model alive until it ends even if a swap evicts it meanwhile; its experiential search goes to that
model's collection (a swap indexes the new one before the replicas switch). A request thus never mixes vectors of
two models, and fact vectors are cached per model.

Writes of the experiential KB (contributions, deletions) go through a :class:`ContributionQueue`: per-tenant
queues served by ``serve.contribution_workers`` threads, a tenant's writes one at a time, no lock across
segmentation or embedding; a full queue is a :class:`ContributionQueueFullError` (429), a write not begun by
``serve.contribution_timeout_s`` (or whose request was answered) stores nothing (504). See that module."""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import ray
from ray import serve

from knowmap.actors.env_kb import env_kb_directory
from knowmap.actors.experience import get_experience_kb
from knowmap.api_schemas import (
    FactsRequest,
    ObservationsRequest,
    ObservationsResponse,
    RetrieveRequest,
    RetrieveResponse,
    TrajectoryRequest,
    TrajectoryResponse,
)
from knowmap.config import KnowMapConfig
from knowmap.errors import (
    ContributionQueueFullError,
    ContributionTimeoutError,
    EpisodeConflictError,
    KnowMapError,
    VersionNotIndexedError,
)
from knowmap.kb.storage import list_env_kbs
from knowmap.kb.trajectory_store import (
    check_contribution,
    check_deletion,
    contributions,
    delete_trajectory,
    save_trajectory,
)
from knowmap.models.embedder import Embedder
from knowmap.models.retrieval import RetrieveArgs, Retriever
from knowmap.schemas import Fact, KnowledgeItem, Subgoal, Trajectory
from knowmap.serve.contribution_queue import ContributionQueue, Ticket
from knowmap.serve.deployments import EmbedderModels, IdleGate
from knowmap.serve.envs import EnvActors
from knowmap.serve.metrics import record_batch, record_kb_size
from knowmap.tenancy import DEPLOYMENT_VIEW, unscoped

T = TypeVar("T")


def _refusal(error: Exception) -> Exception:
    """A refusal of what the client sent (an unknown env, a step out of order, an expert's episode id) as a
    KnowMapError, unwrapped from the RayTaskError an env-KB actor's error arrives in; any other error as it is."""
    if not isinstance(error, KnowMapError | ValueError):
        return error
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, KnowMapError) and type(cause).__module__ == KnowMapError.__module__:
        return cause
    return KnowMapError(str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__)


class RetrievalBackend:
    """Retrieval, env-KB reads and writes, and trajectory contributions, for the HTTP ingress that holds it.

    Its methods are coroutines of the ingress's event loop; the blocking work (actor calls, the retriever) runs in
    worker threads, which reach the embedder's batching back on that loop.

    Args:
        embedder: the ingress's models.
        reranker: a handle of the reranker deployment.
        config: ``KnowMapConfig.model_dump(mode="json")``: the store, data dir, namespace, ``serve`` limits.
    """

    def __init__(self, embedder: EmbedderModels, reranker: Any, config: dict[str, Any]) -> None:
        self._config = KnowMapConfig.model_validate(config)
        self._embedder, self._reranker = embedder, reranker
        self._pool = ThreadPoolExecutor(self._config.serve.max_ongoing_requests, thread_name_prefix="retrieval")
        self._experience = get_experience_kb(self._config)
        self._lock = threading.Lock()
        self._retrievers: OrderedDict[str, Retriever] = OrderedDict()  # per model: each has its own fact cache
        self._gate = IdleGate()
        self._retrieve_batch.set_max_batch_size(self._config.serve.max_batch_size)
        self._stats = {"retrieve_batches": 0, "retrieve_requests": 0}
        self._envs = EnvActors(self._config)
        self._reranker_version: str | None = None
        limits = self._config.serve
        self._writes = ContributionQueue(limits.contribution_workers, limits.contribution_queue_per_tenant,
                                         limits.contribution_queue_total)

    async def _run(self, fn: Callable[[], T]) -> T | KnowMapError:
        """``fn()`` in a thread of this backend's pool; a refusal of what the client sent comes back as a
        KnowMapError (:func:`_refusal`), which the ingress answers with its 4xx."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except (KnowMapError, ValueError) as e:
            return _refusal(e)  # type: ignore[return-value]

    async def _write(self, tenant: str, work: Callable[[Ticket], T]) -> T | KnowMapError:
        """``work(ticket)`` in the tenant's lane of the write queue; it calls ``ticket.begin_write()`` before it
        stores anything. Comes back as :meth:`_run`'s does, or as a ContributionQueueFullError (the queue is full,
        nothing done) or ContributionTimeoutError (not begun by the deadline: nothing stored).

        If this coroutine is cancelled (the request's own deadline, or the client went away), a job that has not
        begun its write is taken back and stores nothing; one that has is awaited, and its outcome returned, so
        that no answer ever says "not stored" about a write that lands."""
        try:
            ticket = self._writes.submit(tenant, work, self._config.serve.contribution_timeout_s)
        except ContributionQueueFullError as e:
            return e
        done = asyncio.wrap_future(ticket.future)
        try:
            try:
                return await asyncio.wait_for(asyncio.shield(done), ticket.remaining_s())
            except TimeoutError:
                if self._writes.cancel(ticket):
                    return ContributionTimeoutError(
                        f"the write did not begin within serve.contribution_timeout_s "
                        f"({self._config.serve.contribution_timeout_s} s): nothing was stored; send it again "
                        "later (Retry-After), or a smaller one")
                return await done  # its write has begun: wait for it and say what happened
            except asyncio.CancelledError:
                if self._writes.cancel(ticket):
                    raise
                return await done
        except (KnowMapError, ValueError) as e:
            return _refusal(e)  # type: ignore[return-value]

    def write_queue(self) -> dict[str, Any]:
        """This replica's write queue: jobs running, waiting, and held per tenant."""
        return self._writes.stats()

    # -- retrieval -------------------------------------------------------------------------------------------
    async def retrieve(self, request: RetrieveRequest, where: dict[str, Any] | None = None,
                       ) -> RetrieveResponse | KnowMapError:
        """Env facts, then experiential sub-goals among the rows matching ``where`` (the caller's tenant's
        visibility), for the request (see :meth:`Retriever.retrieve`), batched with concurrent retrieves; a
        refusal of this request's input comes back as a KnowMapError."""
        result = await self._gate.call(self._retrieve_batch, (request, where))
        if isinstance(result, Exception) and not isinstance(result, KnowMapError):
            raise result
        return result

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _retrieve_batch(self, requests: list[tuple[RetrieveRequest, dict[str, Any] | None]],
                              ) -> list[RetrieveResponse | Exception]:
        try:
            path, embedder = self._embedder.pinned()
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._retrieve_many, requests, path,
                                                                    embedder)
        finally:
            self._gate.release()

    def _retrieve_many(self, requests: list[tuple[RetrieveRequest, dict[str, Any] | None]], path: str,
                       embedder: Embedder) -> list[RetrieveResponse | Exception]:
        self._stats["retrieve_batches"] += 1
        self._stats["retrieve_requests"] += len(requests)
        record_batch("retrieve", len(requests))
        found = self._retriever_for(path, embedder).retrieve_many([
            RetrieveArgs(r.query, r.env_id, r.task, r.k, tuple(r.kbs), bool(r.rerank), r.as_of_step, r.hybrid,
                         where) for r, where in requests])
        return [_refusal(items) if isinstance(items, Exception) else RetrieveResponse(
            items=items, embedder=embedder.version, reranker=self._reranker_version if r.rerank else None)
            for items, (r, _) in zip(found, requests, strict=True)]

    def warm(self, path: str, embedder: Embedder) -> int:
        """Before a swap to ``embedder`` (at ``path``): embed with it the env facts cached for the current model, so
        the first requests on the new model find their fact vectors ready. Embeds in the calling thread (the
        replica's loading thread), not on the model thread. Returns how many facts it embedded."""
        with self._lock:
            current = next(reversed(self._retrievers.values()), None)
        texts = current.cached_facts(limit=4096) if current is not None else []
        return self._retriever_for(path, embedder).cache_facts(texts, encode=embedder.encode) if texts else 0

    def stats(self) -> dict[str, int]:
        """Retrieve batches and the requests they held, in this replica."""
        return dict(self._stats)

    def _retriever_for(self, path: str, embedder: Embedder) -> Retriever:
        with self._lock:
            retriever = self._retrievers.get(path)
            if retriever is None:
                retriever = Retriever(lambda texts: self._embedder.run(embedder, texts), env_facts=self._env_facts,
                                      experience_many=lambda searches: self._search(searches, path, embedder.version),
                                      rerank=self._rerank, settings=self._config.retrieval)
                self._retrievers[path] = retriever
            self._retrievers.move_to_end(path)
            while len(self._retrievers) > 3:
                self._retrievers.popitem(last=False)
            return retriever

    def _search(self, searches: list[tuple[Any, int, str | None, dict[str, Any] | None]], path: str,
                version: str) -> list[list[KnowledgeItem]]:
        """A batch's experiential searches, in one call to the actor, in the collection of ``version``."""
        searches = [(vector, k, task, where or DEPLOYMENT_VIEW) for vector, k, task, where in searches]
        try:
            rows = ray.get(self._experience.search_vectors.remote(searches, version))
        except VersionNotIndexedError:
            # The experiential-KB actor restarted and holds only its configured version again: re-index, retry.
            ray.get(self._experience.ensure_index.remote(path))
            rows = ray.get(self._experience.search_vectors.remote(searches, version))
        return [[KnowledgeItem.model_validate(r) for r in found] for found in rows]

    def _rerank(self, query: str, documents: list[str]) -> list[float]:
        scored = self._reranker.score.remote(query, documents).result()
        self._reranker_version = scored.version
        return scored.scores

    # -- env KBs ---------------------------------------------------------------------------------------------
    def _env_call(self, env_id: str, method: str, *args: Any, create: bool = False) -> Any:
        return self._envs.call(env_id, method, *args, create=create)

    def _env_facts(self, env_id: str, step: int | None) -> list[Fact]:
        if not self._envs.exists(env_id):
            return []  # an env that has sent nothing yet has no facts
        rows = self._env_call(env_id, "current") if step is None else self._env_call(env_id, "as_of", step)
        return [Fact.model_validate(r) for r in rows]

    async def add_observations(self, env_id: str, request: ObservationsRequest) -> ObservationsResponse:
        """Ingest observations into the env KB of ``env_id``, creating it on first use."""
        def run() -> ObservationsResponse:
            batch = [o.model_dump() for o in request.observations]
            stats = self._env_call(env_id, "ingest_many", batch, create=True)  # whole or not at all
            return ObservationsResponse(env_id=env_id, accepted=len(batch), changes=stats["changes"],
                                        last_step=stats["last_step"], facts=stats["facts"])
        return await self._run(run)

    async def add_facts(self, env_id: str, request: FactsRequest) -> ObservationsResponse:
        """Log and apply structured triples in the env KB of ``env_id`` (created on first use), with the same
        replacement rule and history as observations."""
        def run() -> ObservationsResponse:
            changes = self._env_call(env_id, "ingest_triples", request.step,
                                     [t.model_dump(mode="json") for t in request.triples],
                                     [list(pair) for pair in request.full_sets], create=True)
            stats = self._env_call(env_id, "stats")
            return ObservationsResponse(env_id=env_id, accepted=len(request.triples), changes=changes,
                                        last_step=stats["last_step"], facts=stats["facts"])
        return await self._run(run)

    async def facts(self, env_id: str, as_of_step: int | None = None) -> list[Fact]:
        """The env's facts now, or as of a step.

        Raises:
            EnvNotFoundError: no KB exists for ``env_id``.
        """
        def run() -> list[Fact]:
            rows = self._env_call(env_id, "current" if as_of_step is None else "as_of",
                                  *(() if as_of_step is None else (as_of_step,)))
            return [Fact.model_validate(r) for r in rows]
        return await self._run(run)

    async def history(self, env_id: str, subject: str | None = None, relation: str | None = None) -> list[Fact]:
        """Every fact the env KB ever held, open and closed, with step ranges; optionally one subject/relation."""
        def run() -> list[Fact]:
            if subject is not None and relation is not None:
                rows = self._env_call(env_id, "history", subject, relation)
            else:
                rows = self._env_call(env_id, "all_facts")
                if subject is not None:
                    name = " ".join(subject.split()).lower()
                    rows = [r for r in rows if r["subject"] == name]
                if relation is not None:
                    rows = [r for r in rows if r["relation"] == relation]
            return [Fact.model_validate(r) for r in rows]
        return await self._run(run)

    async def delete_env(self, env_id: str, tenant: str) -> dict[str, int]:
        """Delete an env KB (its actor and files) and the facts it lent to sub-goals of its tenant's contributed
        trajectories (they are segmented again without them).

        Raises:
            EnvNotFoundError: no KB exists for ``env_id``.
        """
        def run(ticket: Ticket) -> dict[str, int]:
            ticket.begin_write()  # from here on it runs to its end: an env removed must not keep lending facts
            removed = self._envs.remove(env_id)
            rewritten, episodes = 0, []
            for trajectory in contributions(self._config.paths, tenant):
                if trajectory.env_id == env_id:
                    rewritten += self._store_trajectory(trajectory.model_copy(update={"env_id": ""}))[0]
                    episodes.append(trajectory.episode_id)
            if episodes:  # their replaced rows held the env's facts: purge them from the store's files
                ray.get(self._experience.purge.remote(episodes))
            return {"files": removed, "subgoals_rewritten": rewritten}
        return await self._write(tenant, run)

    # -- trajectories ----------------------------------------------------------------------------------------
    async def add_trajectory(self, request: TrajectoryRequest, admin: bool = False) -> TrajectoryResponse:
        """Segment a contributed trajectory into sub-goals and store it (source ``agent``) in the training store
        (where retraining reads it) and in every version of the experiential KB. The ingress has set its stored
        episode id, tenant, contributor and env id (:mod:`knowmap.tenancy`).

        It runs in the tenant's lane of the write queue (one write of a tenant at a time, so the check and the write
        of an episode are not interleaved with another's); it stores nothing if it cannot begin its write within
        ``serve.contribution_timeout_s``."""
        def run(ticket: Ticket) -> TrajectoryResponse:
            trajectory = request.trajectory.model_copy(update={"source": "agent"})
            episode = trajectory.episode_id
            if ray.get(self._experience.count.remote(episode_id=episode, source="expert")):
                raise EpisodeConflictError(f"episode id {episode!r} is an expert episode; contribute under "
                                           "another id")
            check_contribution(self._config.paths, trajectory, overwrite=request.overwrite, admin=admin)
            goals = self._segment(trajectory)
            ticket.begin_write()
            subgoals, rows = self._store_trajectory(trajectory, goals)
            return TrajectoryResponse(episode_id=unscoped(trajectory.tenant, episode), subgoals=subgoals, rows=rows)
        return await self._write(request.trajectory.tenant, run)

    def _segment(self, trajectory: Trajectory) -> list[Subgoal]:
        """The trajectory's sub-goals (source ``agent``), with the facts of its env KB if it has one."""
        if trajectory.env_id and self._envs.exists(trajectory.env_id):
            goals = [Subgoal.model_validate(g) for g in
                     self._env_call(trajectory.env_id, "segment", trajectory.model_dump())]
        else:
            from knowmap.kb.segmentation import SubgoalSegmenter

            goals = SubgoalSegmenter().segment(trajectory)
        return [g.model_copy(update={"source": "agent"}) for g in goals]

    def _store_trajectory(self, trajectory: Trajectory, goals: list[Subgoal] | None = None) -> tuple[int, int]:
        """Save to the training store first (a crash before the rows leaves a file that a delete still finds),
        then replace the episode's rows in the experiential KB; returns (sub-goals, rows)."""
        goals = self._segment(trajectory) if goals is None else goals
        save_trajectory(self._config.paths, trajectory)
        rows = ray.get(self._experience.add_trajectory.remote(trajectory.model_dump(),
                                                              [g.model_dump() for g in goals]))
        return len(goals), rows

    async def delete_trajectory(self, episode_id: str, tenant: str, contributor: str,
                                admin: bool = False) -> dict[str, int]:
        """Delete a contributed trajectory: its rows in every collection of the experiential KB, then its file in
        the training store (so no retrain reads it again).

        Raises:
            EpisodeNotFoundError: no contribution of the tenant has this id.
            ForbiddenError: another key contributed it and the caller is not an admin.
        """
        def run(ticket: Ticket) -> dict[str, int]:
            check_deletion(self._config.paths, tenant, episode_id, contributor, admin)
            ticket.begin_write()
            rows = ray.get(self._experience.delete_episode.remote(episode_id))
            return {"rows": rows, "files": int(delete_trajectory(self._config.paths, episode_id))}
        return await self._write(tenant, run)

    async def contributions(self, tenant: str) -> list[Trajectory]:
        """The trajectories ``tenant`` contributed, by stored episode id."""
        return await self._run(lambda: contributions(self._config.paths, tenant))

    async def envs(self) -> list[str]:
        """Every env id (as stored) with a KB on disk."""
        return await self._run(lambda: list_env_kbs(env_kb_directory(self._config)))

    async def ready(self) -> dict[str, str]:
        """Whether the experiential-KB actor answers (a count through the vector store) and how many env-KB actors
        this replica holds; sets the KB-size metrics. Never raises: each failed check is named."""
        checks = {"env_kbs": "ok"}
        try:
            rows = await asyncio.wait_for(self._experience.count.remote(), timeout=10)
            record_kb_size("experience", rows)
            checks["experience_kb"] = checks["vector_store"] = "ok"
        except Exception as e:  # noqa: BLE001 - readiness reports any failure as a failed check
            checks["experience_kb"] = checks["vector_store"] = f"failing: {type(e).__name__}"
        record_kb_size("env_actors", self._envs.alive())
        return checks

    async def experience_versions(self) -> dict[str, Any]:
        return await self._experience.versions.remote()

