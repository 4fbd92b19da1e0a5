"""The retrieval service's models: the embedder (held in the ingress replica) and the reranker deployment, each
batching over a pure function.

Models are not constructor arguments but ``user_config`` (``{"model": path, "max_batch_size": n,
"batch_wait_timeout_s": t}``; the ingress's for the embedder): changing it is a lightweight Serve update that calls
``reconfigure`` on the running replicas, which load the new model in the background while they keep answering
with the old one, then switch. A batch holds the model it started with until it ends (see
:class:`knowmap.serve.retriever.RetrievalBackend`), so no request fails during a swap; the embedder keeps the
previous model too (``keep_models``), so swapping back is quick."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve

from knowmap.api_schemas import EncodedTexts, ScoredDocuments
from knowmap.errors import RerankerUnavailableError
from knowmap.models.embedder import Embedder, default_embedder_path, low_priority
from knowmap.models.reranker import Reranker
from knowmap.serve.metrics import record_batch

logger = logging.getLogger("ray.serve")
PARALLEL_MIN_TEXTS = 4  # an embedder call of fewer texts runs on one torch thread (EmbedderModels._sized)


# -- pure batch functions (tested without Ray) -----------------------------------------------------------------
def encode_requests(encode: Any, requests: Sequence[Sequence[str]]) -> list[np.ndarray | Exception]:
    """Embed several requests' texts in one call and give each request its rows back.

    If the one call fails, each request is embedded alone, so a request whose texts the model cannot take (the
    tokenizer refuses them) gets its own error and the others in the batch still get their vectors.

    Args:
        encode: ``list[str] -> (n, dim)`` array.
        requests: each request's texts.

    Returns:
        one ``(len(texts), dim)`` array per request, in order, or the exception that request's texts raised.
    """
    def run(batch: Sequence[Sequence[str]]) -> list[np.ndarray]:
        flat = [text for texts in batch for text in texts]
        vectors = np.asarray(encode(flat), dtype=np.float32) if flat else np.zeros((0, 0), dtype=np.float32)
        out, start = [], 0
        for texts in batch:
            out.append(vectors[start:start + len(texts)])
            start += len(texts)
        return out

    return _isolated(run, requests)


def score_requests(predict: Any, requests: Sequence[tuple[str, Sequence[str]]]) -> list[list[float] | Exception]:
    """Score several ``(query, documents)`` requests with one cross-encoder call over all their pairs.

    Like :func:`encode_requests`, a failed call is retried request by request, so only the request that caused
    it gets an error.

    Args:
        predict: ``list[(query, document)] -> list[float]``.

    Returns:
        one list of scores per request, in document order, or the exception that request raised.
    """
    def run(batch: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        pairs = [(query, doc) for query, docs in batch for doc in docs]
        scores = list(predict(pairs)) if pairs else []
        out, start = [], 0
        for _, docs in batch:
            out.append([float(s) for s in scores[start:start + len(docs)]])
            start += len(docs)
        return out

    return _isolated(run, requests)


def _isolated(run: Any, requests: Sequence[Any]) -> list[Any]:
    """``run(requests)``; if that raises, ``run([request])[0]`` for each request, with a failing request's
    exception in its place: one request's bad input never fails the others batched with it."""
    try:
        return list(run(requests))
    except Exception as e:  # noqa: BLE001 - the model's own errors (tokenizer, shapes) belong to a request
        if len(requests) == 1:
            return [e]
    out: list[Any] = []
    for request in requests:
        try:
            out.append(run([request])[0])
        except Exception as e:  # noqa: BLE001 - this request's error, for this request only
            out.append(e)
    return out


def _raised(result: Any) -> Any:
    """A batch gives each request its result or, when only that request failed, its exception: raise that."""
    if isinstance(result, Exception):
        raise result
    return result


class IdleGate:
    """Admits requests into a ``@serve.batch`` queue only while the model is idle.

    Serve 2.60 closes a batch when ``batch_wait_timeout_s`` runs out even while the previous batch still runs (the
    ``max_concurrent_batches`` permit is taken after the batch is formed), so under load it queues many batches of
    one or two requests that then run one after another. Requests held here while a batch runs enter together when
    it ends and the next batch takes them all; a request to an idle model enters at once. So the batch wait can be
    0: a lone request waits for nothing, and a busy model still batches everything that arrived meanwhile.
    """

    def __init__(self) -> None:
        self._idle = asyncio.Event()
        self._idle.set()

    async def call(self, batched: Any, request: Any) -> Any:
        """``await batched(request)`` once the model is idle; the batch function calls :meth:`release` when done."""
        await self._idle.wait()
        self._idle.clear()  # every request woken with this one still enters: Event.set() wakes all waiters
        try:
            return await batched(request)
        except BaseException:
            self.release()  # e.g. cancelled before its batch ran, which then never releases: keep the gate open
            raise

    def release(self) -> None:
        self._idle.set()


def use_model_threads(threads: int) -> int:
    """Torch's intra-op threads in this replica: ``threads``, or with 0 this node's CPU count (Ray sets
    ``OMP_NUM_THREADS`` from a replica's ``num_cpus``, one thread below 2, which leaves cores idle under a model
    that is the service's main work). Returns the count set."""
    from knowmap.train.loop import set_threads

    count = threads or os.cpu_count() or 1
    set_threads(count)
    return count


def _batch_settings(handler: Any, user_config: dict[str, Any]) -> None:
    if "max_batch_size" in user_config:
        handler.set_max_batch_size(int(user_config["max_batch_size"]))
    if "batch_wait_timeout_s" in user_config:
        handler.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))


# -- the models ------------------------------------------------------------------------------------------------
class EmbedderModels:
    """Sentence embeddings, batched across the concurrent requests of the replica that holds it (the ingress: a
    hop to a model deployment cost as much as the model's own work on a query; docs/service-and-api.md).

    Args:
        device: torch device for the models.
        batch_size: texts per forward pass.
        threads: torch threads (:func:`use_model_threads`).
        keep_models: models held at once (the current one and the ones before it), at least 2, so that swapping
            back is quick.
        traced_dir: where traced models are shared with other processes (:class:`Embedder`).
    """

    def __init__(self, device: str = "cpu", batch_size: int = 64, threads: int = 0, keep_models: int = 2,
                 traced_dir: str | None = None) -> None:
        self._threads, self._threads_now = use_model_threads(threads), 0  # most, and the model thread's now
        self._device, self._batch_size, self._keep = device, batch_size, max(2, keep_models)
        self._traced_dir = traced_dir
        self._models: OrderedDict[str, Embedder] = OrderedDict()  # model dir -> Embedder, current last
        self._current = ""
        self._swap = asyncio.Lock()
        self._gate = IdleGate()
        # Its own thread: callers wait for batches from worker threads (the retrieval backend's), which must never
        # hold every thread the model needs.
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="embedder")
        self._stats = {"batches": 0, "requests": 0, "texts": 0, "model_seconds": 0.0}
        self._loading: asyncio.Task[None] | None = None
        self._load_error: dict[str, str] | None = None

    async def reconfigure(self, user_config: dict[str, Any], warm: Any = None) -> None:
        """Apply ``{"model", "max_batch_size", "batch_wait_timeout_s"}``.

        The first model loads before this returns (the replica serves nothing without it). A later one loads in the
        background and the replica switches to it once it is loaded and ``warm(path, embedder)`` (if given) has run
        in a thread: Serve holds a replica's requests while its ``reconfigure`` runs (measured: every request
        waited for the whole load), so this returns at once. :meth:`info` says which model serves and, if a load
        failed, ``load_error``; :func:`knowmap.serve.app.swap_models` waits for the switch and raises that error.
        """
        _batch_settings(self._encode_batch, user_config)
        path = str(user_config.get("model") or "") or default_embedder_path()
        if not self._current:
            await self._switch(path, warm)
            return
        self._load_error = None
        self._loading = asyncio.create_task(self._switch(path, warm))  # a reference keeps the task alive

    async def _switch(self, path: str, warm: Any) -> None:
        try:
            async with self._swap:  # swaps apply in the order they came
                if path not in self._models:
                    if self._current:  # a swap: the serving threads come first
                        self._models[path] = await asyncio.to_thread(low_priority, self._load, path, warm)
                    else:  # the first model: nothing serves yet
                        self._models[path] = await asyncio.to_thread(self._load, path, None)
                self._models.move_to_end(path)
                self._current = path
                while len(self._models) > self._keep:
                    self._models.popitem(last=False)
        except Exception as e:
            if not self._current:
                raise
            self._load_error = {"path": path, "error": f"{type(e).__name__}: {e}"}
            logger.error("the embedder keeps %s: loading %s failed: %s", self._current, path, e)
            return
        logger.info("embedder now %s", self._models[path].version)

    async def encode(self, texts: list[str]) -> EncodedTexts:
        """Embed ``texts`` with the current model, batched with concurrent calls."""
        return _raised(await self._gate.call(self._encode_batch, list(texts)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _encode_batch(self, requests: list[list[str]]) -> list[EncodedTexts | Exception]:
        try:
            embedder = self._models[self._current]  # held here even if a swap evicts it meanwhile
            started = time.perf_counter()
            rows = await asyncio.get_running_loop().run_in_executor(
                self._model_thread, encode_requests, lambda texts: self._sized(embedder.encode, texts), requests)
            self._stats["model_seconds"] += time.perf_counter() - started
            self._stats["batches"] += 1
            self._stats["requests"] += len(requests)
            self._stats["texts"] += sum(len(texts) for texts in requests)
            record_batch("embedder", len(requests))
            return [vectors if isinstance(vectors, Exception) else EncodedTexts(vectors=vectors,
                                                                                version=embedder.version)
                    for vectors in rows]
        finally:
            self._gate.release()

    def _load(self, path: str, warm: Any) -> Embedder:
        """Load the model at ``path`` and run ``warm(path, embedder)`` (if given) in the calling thread (in a swap a
        nice-19 thread: :func:`low_priority`) on one torch thread of its own: the model thread and its batches are
        left alone, and a one-thread pass waits for no second core (see :meth:`_sized`)."""
        import torch

        torch.set_num_threads(1)  # this thread's own setting, as on the model thread
        embedder = Embedder(path, self._device, self._batch_size, traced_dir=self._traced_dir)
        if warm is not None:
            warm(path, embedder)
        return embedder

    def _sized(self, encode: Any, texts: list[str]) -> Any:
        """``encode(texts)`` on the model thread with all its torch threads only for a call of at least
        ``PARALLEL_MIN_TEXTS`` texts. A small call saves a few ms on two threads alone (one query 6.1 -> 3.4 ms; the
        service's p50 at concurrency 1 did not move: 40.5-41.6 ms either way) but then waits for any busy core: on 2
        cores beside a nice-19 CPU hog, retrieve p50 at 2 clients went 73 -> 395 ms on two threads, 75 -> 88 ms on
        one. The large calls of a loaded service ran ~10% more retrieves a second on two threads."""
        want = self._threads if len(texts) >= PARALLEL_MIN_TEXTS else 1
        if want != self._threads_now:  # this thread's own OpenMP setting: other threads keep theirs
            import torch

            torch.set_num_threads(want)
            self._threads_now = want
        return encode(texts)

    def pinned(self) -> tuple[str, Embedder]:
        """The current model's path and :class:`Embedder`: what a batch of retrieves embeds everything with (the
        object stays usable while the batch holds it, even if a swap evicts it meanwhile)."""
        return self._current, self._models[self._current]

    def run(self, embedder: Embedder, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` with ``embedder`` on the model thread, waiting from a worker thread (a retrieve batch's
        stages): one model call, counted in :meth:`info`'s ``model_seconds``."""
        started = time.perf_counter()
        vectors = self._model_thread.submit(self._sized, embedder.encode, texts).result()
        self._stats["model_seconds"] += time.perf_counter() - started
        return vectors

    async def info(self) -> dict[str, Any]:
        """The current model: ``path``, ``version``, ``dim``; every model held; this replica's batching counters
        (``batches``, ``requests``, ``texts``, ``model_seconds``: time inside the model)."""
        embedder = self._models[self._current]
        return {"path": self._current, "version": embedder.version, "dim": embedder.dim,
                "held": [m.version for m in self._models.values()], "stats": dict(self._stats),
                "load_error": self._load_error}


# -- deployments -----------------------------------------------------------------------------------------------
@serve.deployment(name="Reranker")
class RerankerDeployment:
    """Cross-encoder scores, batched across concurrent requests; ``model`` "" = no reranker."""

    def __init__(self, device: str = "cpu", batch_size: int = 64, threads: int = 0) -> None:
        use_model_threads(threads)
        self._device, self._batch_size = device, batch_size
        self._model: Reranker | None = None
        self._swap = asyncio.Lock()
        self._gate = IdleGate()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        _batch_settings(self._score_batch, user_config)
        path = str(user_config.get("model") or "")
        async with self._swap:
            if not path:
                self._model = None
            elif self._model is None or self._model.name_or_path != path:
                # Loaded aside, then swapped in one assignment: a batch in flight keeps the model it started with.
                self._model = await asyncio.to_thread(Reranker, path, self._device, self._batch_size)

    async def score(self, query: str, documents: list[str]) -> ScoredDocuments:
        """Relevance of each document to ``query``.

        Raises:
            RerankerUnavailableError: the service runs without a reranker.
        """
        if self._model is None:
            raise RerankerUnavailableError("this service runs without a reranker: start it with "
                                           "`knowmap serve --reranker PATH` (a directory `knowmap train` wrote)")
        return _raised(await self._gate.call(self._score_batch, (query, list(documents))))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _score_batch(self, requests: list[tuple[str, list[str]]]) -> list[ScoredDocuments]:
        try:
            model = self._model
            if model is None:
                raise RerankerUnavailableError("the reranker was removed while this request waited; retry without "
                                               "rerank")
            scores = await asyncio.to_thread(score_requests, model.predict, requests)
            record_batch("reranker", len(requests))
            return [s if isinstance(s, Exception) else ScoredDocuments(scores=s, version=model.version)
                    for s in scores]
        finally:
            self._gate.release()

    async def info(self) -> dict[str, Any] | None:
        return None if self._model is None else {"path": self._model.name_or_path, "version": self._model.version}
