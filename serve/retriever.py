"""The retrieval backend the ingress holds: :class:`knowmap.models.retrieval.Retriever` over the ingress's own
embedder, the reranker deployment and the KB actors, plus the env-KB and trajectory operations of the API.

It runs in the ingress replica, not in a deployment of its own: every Serve hop on a request's path (a handle call
to another replica) cost about what the embedder's own work on a query costs, and a retrieve made three of them
(ingress -> retriever -> embedder, twice). Now a retrieve's only hops are to the KB actors.

Env facts come from the env-KB actor named ``envkb:<env_id>`` (:mod:`knowmap.actors.env_kb`): each env id has
its own actor and files, so a request for one env id can only ever see that env's facts. Experience comes from
the shared experiential-KB actor, searched in the collection of the embedder version that embedded the query.

Hot swap without failed requests: every request is pinned to one embedder model. Its first call asks the
embedder for the model this replica last saw as current; the embedder answers with that model if it still holds
it (it keeps the previous one) and says which model is now current, which later requests then use. If it no
longer holds the pinned model, the answer names the model it used instead and the request starts over on it.
A request thus never mixes vectors of two models, and fact vectors are cached per model."""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import ray

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
from knowmap.errors import EpisodeConflictError, KnowMapError
from knowmap.kb.storage import list_env_kbs
from knowmap.kb.trajectory_store import (
    check_contribution,
    check_deletion,
    contributions,
    delete_trajectory,
    save_trajectory,
)
from knowmap.models.embedder import embedder_version
from knowmap.models.retrieval import Retriever
from knowmap.schemas import Fact, KnowledgeItem, Subgoal, Trajectory
from knowmap.serve.deployments import EmbedderModels
from knowmap.serve.envs import EnvActors
from knowmap.serve.metrics import record_kb_size
from knowmap.tenancy import DEPLOYMENT_VIEW, unscoped

_ATTEMPTS = 3
T = TypeVar("T")


class _ModelChanged(Exception):  # noqa: N818 - a control-flow signal, not an error
    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


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
        self._loop: asyncio.AbstractEventLoop | None = None  # the ingress's, where the embedder batches
        self._pool = ThreadPoolExecutor(self._config.serve.max_ongoing_requests, thread_name_prefix="retrieval")
        self._experience = get_experience_kb(self._config)
        self._lock = threading.Lock()
        self._model: str | None = None  # the embedder model new requests are pinned to
        self._retrievers: OrderedDict[str, Retriever] = OrderedDict()  # per model: each has its own fact cache
        self._versions: dict[str, str] = {}  # model dir -> embedder version
        self._envs = EnvActors(self._config)
        self._reranker_version: str | None = None
        self._contributing = threading.Lock()  # contributions and deletions, one at a time (per replica)

    async def _run(self, fn: Callable[[], T]) -> T | KnowMapError:
        """``fn()`` in a thread of this backend's pool. A refusal of what the client sent (an unknown env, a step
        out of order, an expert's episode id) comes back as a KnowMapError, unwrapped from the RayTaskError an
        env-KB actor's error arrives in; the ingress answers it with its 4xx."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except (KnowMapError, ValueError) as e:
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, KnowMapError) and type(cause).__module__ == KnowMapError.__module__:
                return cause
            return KnowMapError(str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__)

    # -- retrieval -------------------------------------------------------------------------------------------
    async def retrieve(self, request: RetrieveRequest, where: dict[str, Any] | None = None) -> RetrieveResponse:
        """Env facts, then experiential sub-goals among the rows matching ``where`` (the caller's tenant's
        visibility), for the request (see :meth:`Retriever.retrieve`)."""
        self._loop = asyncio.get_running_loop()
        model = self._model or (await self._embedder.info())["path"]
        return await self._run(lambda: self._retrieve(request, where, model))

    def _retrieve(self, request: RetrieveRequest, where: dict[str, Any] | None, model: str) -> RetrieveResponse:
        for _ in range(_ATTEMPTS):
            retriever = self._retriever_for(model)
            try:
                items = retriever.retrieve(request.query, env_id=request.env_id, task=request.task, k=request.k,
                                           kbs=request.kbs, rerank=bool(request.rerank), step=request.as_of_step,
                                           hybrid=request.hybrid, where=where)
            except _ModelChanged as e:  # this replica's embedder no longer holds the pinned model
                model = e.model
                continue
            if model not in self._versions:  # nothing was embedded (e.g. only env facts of an env without any)
                self._versions[model] = embedder_version(model)
            return RetrieveResponse(items=items, embedder=self._versions[model],
                                    reranker=self._reranker_version if request.rerank else None)
        raise KnowMapError(f"the embedder changed model {_ATTEMPTS} times during one request; retry")

    def _retriever_for(self, model: str) -> Retriever:
        with self._lock:
            retriever = self._retrievers.get(model)
            if retriever is None:
                retriever = Retriever(lambda texts: self._encode(texts, model), env_facts=self._env_facts,
                                      experience=lambda v, k, task, where: self._search(v, k, task, where, model),
                                      rerank=self._rerank, rerank_candidates=self._config.serve.rerank_candidates,
                                      hybrid=self._config.serve.hybrid,
                                      hybrid_candidates=self._config.serve.hybrid_candidates)
                self._retrievers[model] = retriever
            self._retrievers.move_to_end(model)
            while len(self._retrievers) > 3:
                self._retrievers.popitem(last=False)
            return retriever

    def _encode(self, texts: list[str], model: str) -> Any:
        assert self._loop is not None  # set by retrieve(), which runs this in a worker thread
        encoded = asyncio.run_coroutine_threadsafe(self._embedder.encode(texts, model), self._loop).result()
        self._versions[encoded.model] = encoded.version
        self._model = encoded.current  # later requests start on the embedder's current model
        if encoded.model != model:
            raise _ModelChanged(encoded.model)
        return encoded.vectors

    def _search(self, vector: Any, k: int, task: str | None, where: dict[str, Any] | None,
                model: str) -> list[KnowledgeItem]:
        version = self._versions[model]  # set by the encode of this very query
        search = self._experience.search_vector
        try:
            rows = ray.get(search.remote(vector, k, task, version, where=where or DEPLOYMENT_VIEW))
        except KnowMapError as e:
            if "ensure_index" not in str(e):
                raise
            # The experiential-KB actor restarted and holds only its configured version again: re-index, retry.
            ray.get(self._experience.ensure_index.remote(model))
            rows = ray.get(search.remote(vector, k, task, version, where=where or DEPLOYMENT_VIEW))
        return [KnowledgeItem.model_validate(r) for r in rows]

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
        def run() -> dict[str, int]:
            with self._contributing:
                removed = self._envs.remove(env_id)
                rewritten = 0
                for trajectory in contributions(self._config.paths, tenant):
                    if trajectory.env_id == env_id:
                        rewritten += self._store_trajectory(trajectory.model_copy(update={"env_id": ""}))[0]
            return {"files": removed, "subgoals_rewritten": rewritten}
        return await self._run(run)

    # -- trajectories ----------------------------------------------------------------------------------------
    async def add_trajectory(self, request: TrajectoryRequest, admin: bool = False) -> TrajectoryResponse:
        """Segment a contributed trajectory into sub-goals and store it (source ``agent``) in the training store
        (where retraining reads it) and in every version of the experiential KB. The ingress has set its stored
        episode id, tenant, contributor and env id (:mod:`knowmap.tenancy`)."""
        def run() -> TrajectoryResponse:
            trajectory = request.trajectory.model_copy(update={"source": "agent"})
            episode = trajectory.episode_id
            if ray.get(self._experience.count.remote(episode_id=episode, source="expert")):
                raise EpisodeConflictError(f"episode id {episode!r} is an expert episode; contribute under "
                                           "another id")
            with self._contributing:  # the check and the write of one episode are not interleaved with another's
                check_contribution(self._config.paths, trajectory, overwrite=request.overwrite, admin=admin)
                subgoals, rows = self._store_trajectory(trajectory)
            return TrajectoryResponse(episode_id=unscoped(trajectory.tenant, episode), subgoals=subgoals, rows=rows)
        return await self._run(run)

    def _store_trajectory(self, trajectory: Trajectory) -> tuple[int, int]:
        """Save to the training store first (a crash before the rows leaves a file that a delete still finds),
        then replace the episode's rows in the experiential KB; returns (sub-goals, rows)."""
        if trajectory.env_id and self._envs.exists(trajectory.env_id):
            goals = [Subgoal.model_validate(g) for g in
                     self._env_call(trajectory.env_id, "segment", trajectory.model_dump())]
        else:
            from knowmap.kb.segmentation import SubgoalSegmenter

            goals = SubgoalSegmenter().segment(trajectory)
        goals = [g.model_copy(update={"source": "agent"}) for g in goals]
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
        def run() -> dict[str, int]:
            with self._contributing:
                check_deletion(self._config.paths, tenant, episode_id, contributor, admin)
                rows = ray.get(self._experience.delete_episode.remote(episode_id))
                return {"rows": rows, "files": int(delete_trajectory(self._config.paths, episode_id))}
        return await self._run(run)

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

