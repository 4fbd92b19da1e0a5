"""A small facade over ``pymilvus.MilvusClient``: one row schema, explicit indexes, exact filtered top-k.

A URI ending in ``.db`` is a Milvus Lite database (in-process; one process per file), ``http://host:19530`` a
Milvus server; the code path is the same. Index and search design, measured here (see the integration tests):

* Up to ``flat_max_rows`` rows a collection has a ``FLAT`` index: exact search (NumPy brute force per segment in
  Milvus Lite), filtered searches included, since the filter masks rows before scoring.
* Past that the collection is switched once to ``HNSW`` (M, efConstruction from config). Milvus Lite supports
  FLAT/BRUTE_FORCE, HNSW, HNSW_SQ, IVF_FLAT, IVF_SQ8 (FAISS) and AUTOINDEX; AUTOINDEX is HNSW with M=16 searched
  with ef=64 unless a request says otherwise (recall@10 0.15 on 100k random vectors), so every search passes
  ``ef = max(hnsw_ef, k)`` explicitly.
* Under a filter HNSW spends its ef budget on rows the filter rejects: it returns wrong rows, or fewer than k
  although enough rows match. A filtered graph search therefore divides ef by the filter's selectivity; where
  that exceeds 4096 (a selective filter: FAISS' candidate heap makes wide walks quadratic) the few matching rows
  are scored exactly in NumPy instead. Every search checks each query's hits against ``min(k, matching rows)``
  and scores short queries exactly. On Lite the counts and the matching rows' vectors are cached until the next
  write (one process owns a Lite file, so nothing else writes it).
* Milvus Lite scans its unflushed write buffer row by row in Python (~50 us per buffered row per search), so on
  Lite every write is flushed into indexed segments at once; a server seals segments itself.
* A delete purges: when it returns, the deleted rows' texts and vectors are gone from the files (knowmap.kb.purge).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from knowmap.config import KnowMapConfig
from knowmap.errors import VectorStoreError
from knowmap.kb.purge import PURGE_SUFFIX, SwapGate, compact_and_wait, copy_live_rows, finish_interrupted_purge
from knowmap.kb.store_rows import OUTPUT_FIELDS, VARCHAR_LIMITS, Hit, build_filter, clean_row

log = logging.getLogger(__name__)

EXACT_INDEX, GRAPH_INDEX = "FLAT", "HNSW"
METRIC = "COSINE"  # rows are unit vectors, so COSINE = IP; a hit's score is the cosine similarity
MAX_TOP_K = 16384  # Milvus' limit on k
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_GRAPH_EF_MAX = 4096  # a wider HNSW walk costs more (faiss' candidate heap is linear) than exact scoring
_EXACT_MAX_ROWS = 16384  # most rows one query returns (Milvus' limit); exact search scores at most these
_SUBSET_CACHE_ROWS = 100_000  # vectors kept for exact filtered search, per store (~150 MB at 384-d)
_lite_lock = threading.Lock()
_lite_users: dict[str, int] = {}  # Milvus Lite file -> VectorStores of this process that have it open
_lite_writes: dict[str, int] = {}  # Milvus Lite file -> writes through any VectorStore of this process


class VectorStore:
    """Collections of rows ``{id, vector, text, task, kind, episode_id, source, meta}`` in Milvus or Milvus Lite.

    Args:
        uri: a ``.db`` path (Milvus Lite; parent directories are created) or a server URI ``http://host:19530``.
        token: the server's ``user:password`` or API token; unused by Milvus Lite.
        flat_max_rows: collections up to this many rows are searched exactly (FLAT); larger ones use HNSW.
        hnsw_m, hnsw_ef_construction: HNSW graph degree and build-time breadth.
        hnsw_ef: HNSW search breadth; a search uses at least ``max(hnsw_ef, k)``.

    Raises:
        VectorStoreError: the store cannot be opened (e.g. another process holds the Milvus Lite file).
    """

    def __init__(self, uri: str, *, token: str = "", flat_max_rows: int = 20_000, hnsw_m: int = 32,
                 hnsw_ef_construction: int = 256, hnsw_ef: int = 256) -> None:
        self.uri, self.is_lite = str(uri), str(uri).endswith(".db")
        self.flat_max_rows, self.hnsw_m, self.hnsw_ef_construction, self.hnsw_ef = (
            flat_max_rows, hnsw_m, hnsw_ef_construction, hnsw_ef)
        self._collections: dict[str, tuple[str, int]] = {}  # name -> (index type, dim), once opened here
        # Per (collection, filter expression), stamped with the Lite file's write count (see _stamp): row counts,
        # and the ids and vectors of the matching rows for exact search.
        self._counts: dict[tuple[str, str], tuple[int | None, int]] = {}
        self._subsets: dict[tuple[str, str], tuple[int | None, list[str], np.ndarray]] = {}
        self._path = str(Path(self.uri).expanduser().resolve()) if self.is_lite else ""
        self._gate = SwapGate()  # reads share it; a purge's drop-and-rename holds it alone
        self._writing = threading.RLock()  # held by writes, and by a purge while it copies: no write is lost
        if self.is_lite:
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            logger = logging.getLogger("pymilvus.client.iterator.query_iterator")
            if _not_mvcc_warning not in logger.filters:
                logger.addFilter(_not_mvcc_warning)
        try:
            self._client: MilvusClient | None = MilvusClient(uri=self._path or self.uri, token=token)
        except MilvusException as e:
            if self.is_lite:
                raise VectorStoreError(
                    f"cannot open the Milvus Lite database {self._path}: {e.message}. Only one process may open a "
                    "Lite file: stop the process that has it (e.g. the experiential-KB actor) or close its "
                    "VectorStore, or use a Milvus server URI to share the store between processes") from e
            raise VectorStoreError(f"cannot connect to Milvus at {self.uri}: {e.message}; is the server up and "
                                   "the token right?") from e
        if self.is_lite:
            with _lite_lock:
                _lite_users[self._path] = _lite_users.get(self._path, 0) + 1

    # -- collections --------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: KnowMapConfig) -> VectorStore:
        """The store of ``config``: ``store_uri`` (a Milvus Lite file under the data dir by default) with the
        ``store`` section's token and index settings."""
        store = config.store
        return cls(config.store_uri, token=store.token, flat_max_rows=store.flat_max_rows, hnsw_m=store.hnsw_m,
                   hnsw_ef_construction=store.hnsw_ef_construction, hnsw_ef=store.hnsw_ef)

    def ensure_collection(self, name: str, dim: int) -> None:
        """Create the collection if missing (FLAT index), and load it; idempotent.

        Raises:
            VectorStoreError: the name is invalid, or the collection exists with vectors of another dimension.
        """
        if not _NAME.match(name):
            raise VectorStoreError(f"invalid collection name {name!r}: use letters, digits and _, not first a digit")
        with self._errors("finish an interrupted purge", name):
            finish_interrupted_purge(self._cli, name)
        if not self.has_collection(name):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=VARCHAR_LIMITS["id"])
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            for key, limit in VARCHAR_LIMITS.items():
                if key != "id":
                    schema.add_field(key, DataType.VARCHAR, max_length=limit)
            schema.add_field("meta", DataType.JSON)
            with self._errors("create collection", name):
                # Strong: a read right after an acknowledged write sees it (servers default to Bounded staleness).
                self._cli.create_collection(name, schema=schema, consistency_level="Strong")
        if (have := self._open(name)[1]) != dim:
            raise VectorStoreError(f"collection {name!r} holds {have}-d vectors, not {dim}-d; each embedding model "
                                   "needs its own collection (name it after the embedder version)")
        self._maybe_use_graph_index(name)

    def has_collection(self, name: str) -> bool:
        """Whether the collection exists."""
        with self._errors("has_collection", name):
            return bool(self._cli.has_collection(name))

    def list_collections(self) -> list[str]:
        """Names of all collections, sorted (not the copies a purge is writing)."""
        with self._errors("list collections", ""):
            return sorted(n for n in self._cli.list_collections() if not n.endswith(PURGE_SUFFIX))

    def drop_collection(self, name: str) -> None:
        """Drop the collection and its rows; no error if it does not exist."""
        with self._errors("drop collection", name):
            self._cli.drop_collection(name)
        self._collections.pop(name, None)
        self._wrote()

    def index_type(self, name: str) -> str:
        """The collection's vector index: ``FLAT`` (exact) or ``HNSW`` (graph)."""
        return self._open(name)[0]

    # -- rows ---------------------------------------------------------------------------------------------------
    def upsert(self, name: str, rows: Sequence[Mapping[str, Any]]) -> int:
        """Insert or replace rows by id (idempotent); for an id given twice the last row wins.

        Args:
            rows: dicts with ``id``, ``vector`` (unit length) and ``text``; ``task``, ``kind``, ``episode_id``,
                ``source`` default to ``""``, ``meta`` (a JSON-serialisable dict) to ``{}``.

        Returns:
            the number of distinct rows written.

        Raises:
            VectorStoreError: a row lacks a field or has an unknown one, a string is too long, a vector has the
                wrong dimension, meta is not JSON; or Milvus refused the write.
        """
        dim = self._open(name)[1]
        batch = list({row["id"]: row for row in (clean_row(r, dim) for r in rows)}.values())
        with self._writing, self._errors("upsert", name):
            for start in range(0, len(batch), 512):
                self._cli.upsert(name, batch[start:start + 512])
            if self.is_lite and batch:
                self._cli.flush(name)
        self._wrote()
        self._maybe_use_graph_index(name)
        return len(batch)

    def delete(self, name: str, ids: Sequence[str] | None = None, filter: Mapping[str, Any] | None = None, *,
               purge: bool = True) -> int:
        """Delete rows by id or by filter (exactly one of them), and with ``purge`` (the default) :meth:`purge` the
        collection, so that the rows' texts and vectors are gone from the store's files when this returns.

        Returns:
            the number of rows deleted (Milvus Lite reports the ids it was asked to delete).

        Raises:
            VectorStoreError: both or neither of ``ids`` and ``filter``, or an invalid filter.
        """
        if (ids is None) == (not filter):
            raise VectorStoreError("delete() takes exactly one of ids=[...] or filter={...}; to delete every row, "
                                   "drop the collection")
        if ids is not None and not ids or filter and purge and not self.count(name, filter):
            return 0  # nothing to delete: no purge either
        self._open(name)
        with self._writing:
            with self._errors("delete", name):
                expr = {"ids": list(ids)} if ids is not None else {"filter": build_filter(filter)}
                result = self._cli.delete(name, **expr)
                if self.is_lite:
                    self._cli.flush(name)
            self._wrote()
            if purge:
                self.purge(name)
        return len(result) if isinstance(result, list) else int(result.get("delete_count", 0))

    def purge(self, name: str) -> None:
        """Make every delete and replacement so far physical: their rows' texts and vectors leave the store's files.
        On Lite the collection is rewritten from its live rows (~1.5 ms a row), on a server compacted (this waits for
        it; :mod:`knowmap.kb.purge`). Writes wait; reads go on but for the final swap (milliseconds). Raises
        VectorStoreError if it fails (a rewrite cut short leaves the collection as it was)."""
        with self._writing:
            if not self.is_lite:
                with self._errors("compact", name):
                    compact_and_wait(self._cli, name)
                return
            copy = copy_live_rows(self, name, self._open(name)[1])
            with self._gate.alone(), self._errors("swap in the purged copy", name):
                self.drop_collection(name)  # Lite removes the collection's directory
                self._cli.rename_collection(copy, name)
                self._collections.pop(copy, None)
                self._open(name)
            self._wrote()

    def count(self, name: str, filter: Mapping[str, Any] | None = None) -> int:
        """Number of rows, or of rows matching ``filter`` (see :func:`build_filter`)."""
        with self._gate.shared():
            return self._count(name, build_filter(filter))

    def iterate(self, name: str, filter: Mapping[str, Any] | None = None, *, batch_size: int = 1000,
                with_vectors: bool = False) -> Iterator[dict[str, Any]]:
        """Every row (matching ``filter``), paged with Milvus' query iterator.

        Yields:
            dicts with ``id`` and the other fields, plus ``vector`` (float32 array) if ``with_vectors``.
        """
        expr, fields = build_filter(filter), ["id", *OUTPUT_FIELDS, *(["vector"] if with_vectors else [])]
        with self._gate.shared(), self._errors("iterate", name):
            self._open(name)
            pages = self._cli.query_iterator(name, batch_size=batch_size, filter=expr, output_fields=fields)
        try:
            while True:  # the gate is held a page at a time: the iterator pages by id, so it survives a purge
                with self._gate.shared(), self._errors("iterate", name):
                    page = pages.next()
                if not page:
                    return
                for row in map(dict, page):
                    if with_vectors:
                        row["vector"] = np.asarray(row["vector"], dtype=np.float32)
                    yield row
        finally:
            pages.close()

    # -- search -------------------------------------------------------------------------------------------------
    def search(self, name: str, vectors: Any, k: int = 10, filter: Mapping[str, Any] | None = None,
               ) -> list[list[Hit]]:
        """The ``k`` rows most similar to each query vector, best first, among the rows matching ``filter``.

        Each query gets exactly ``min(k, rows matching filter)`` hits (the module docstring says how).

        Args:
            vectors: one vector ``(dim,)`` or a batch ``(n, dim)``, unit length as :class:`Embedder` gives them.
            k: hits per query, 1 to 16384.
            filter: see :func:`build_filter`.

        Returns:
            one list of :class:`Hit` per query vector.

        Raises:
            VectorStoreError: a wrong shape or k, an invalid filter, or a Milvus failure.
        """
        with self._gate.shared():
            index, dim = self._open(name)
            queries = np.asarray(vectors, dtype=np.float32)
            queries = queries.reshape(1, -1) if queries.ndim == 1 else queries  # (n, dim)
            if queries.ndim != 2 or queries.shape[1] != dim:
                raise VectorStoreError(f"query vectors must have shape (n, {dim}) for {name!r}, got "
                                       f"{queries.shape}")
            if not 1 <= k <= MAX_TOP_K:
                raise VectorStoreError(f"k must be between 1 and {MAX_TOP_K}, got {k}")
            expr, ef = build_filter(filter), 0
            if index == GRAPH_INDEX:
                ef = max(self.hnsw_ef, k)
                if expr:  # widen by the filter's selectivity, so the walk meets about ef matching rows
                    total, matching = self._count(name, "", cached=True), self._count(name, expr, cached=True)
                    ef = max(ef, math.ceil(ef * total / max(matching, 1)))
                    if ef > _GRAPH_EF_MAX and matching <= _EXACT_MAX_ROWS:  # scoring few matching rows is cheaper
                        return self._exact_search(name, queries, k, expr)
                    ef = min(ef, _GRAPH_EF_MAX)
            results = self._search(name, queries, k, expr, ef=ef)
            short, want = [i for i, hits in enumerate(results) if len(hits) < k], k
            if short:  # the graph walk missed matching rows, or they are fewer than k
                want = min(k, self._count(name, expr))
                short = [i for i in short if len(results[i]) < want]
            if short:
                log.info("search %s: %d of %d queries short of %d hits; scoring the matching rows exactly", name,
                         len(short), len(queries), want)
                for i, hits in zip(short, self._exact_search(name, queries[short], k, expr), strict=True):
                    results[i] = hits
            return results

    def _search(self, name: str, queries: np.ndarray, k: int, expr: str, *, ef: int) -> list[list[Hit]]:
        params: dict[str, Any] = {"metric_type": METRIC, **({"params": {"ef": ef}} if ef else {})}
        with self._errors("search", name):
            raw = self._cli.search(name, data=queries.tolist(), limit=k, filter=expr, output_fields=OUTPUT_FIELDS,
                                   search_params=params)
        return [[Hit.from_row(h["id"], h["distance"], h["entity"]) for h in hits] for hits in raw]

    def _exact_search(self, name: str, queries: np.ndarray, k: int, expr: str) -> list[list[Hit]]:
        """Exact top-k in NumPy over the rows matching ``expr``; their vectors are cached on Lite (one process)."""
        cached = self._subsets.get((name, expr))
        if cached is None or cached[0] is None or cached[0] != self._stamp():
            with self._errors("search", name):
                rows = self._cli.query(name, filter=expr, output_fields=["id", "vector"], limit=_EXACT_MAX_ROWS)
            vectors = np.asarray([r["vector"] for r in rows], dtype=np.float32).reshape(len(rows), self._open(name)[1])
            cached = (self._stamp(), [str(r["id"]) for r in rows], vectors)
            if self.is_lite:
                self._subsets[name, expr] = cached
                while sum(len(ids) for _, ids, _ in self._subsets.values()) > _SUBSET_CACHE_ROWS:
                    del self._subsets[next(iter(self._subsets))]  # the oldest
        _, ids, vectors = cached
        if not ids:
            return [[] for _ in queries]
        scores = queries @ vectors.T  # (queries, matching rows)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        with self._errors("search", name):
            found = self._cli.get(name, ids=sorted({ids[j] for j in top.flat}), output_fields=OUTPUT_FIELDS)
        rows_by_id = {str(r["id"]): r for r in found}  # a row deleted meanwhile is skipped
        return [[Hit.from_row(ids[j], scores[q, j], rows_by_id[ids[j]]) for j in ranked if ids[j] in rows_by_id]
                for q, ranked in enumerate(top)]

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the client. For Milvus Lite also stop its server, which syncs the file and releases its lock, once
        no other VectorStore of this process has the same file open. Idempotent."""
        if self._client is None:
            return
        self._client.close()
        self._client = None
        if not self.is_lite:
            return
        with _lite_lock:
            _lite_users[self._path] -= 1
            last = _lite_users[self._path] == 0
            if last:
                del _lite_users[self._path]
        if last:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self._path)

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------------------
    @property
    def _cli(self) -> MilvusClient:
        if self._client is None:
            raise VectorStoreError(f"the VectorStore for {self.uri} is closed; open a new one")
        return self._client

    def _open(self, name: str) -> tuple[str, int]:
        """Index type and dim of a collection; on first use here, index and load it (Lite reopens it released)."""
        if name in self._collections:
            return self._collections[name]
        with self._errors("open collection", name):
            if not self._cli.has_collection(name):
                raise VectorStoreError(f"collection {name!r} does not exist in {self.uri}; call "
                                       "ensure_collection(name, dim) first")
            fields = self._cli.describe_collection(name)["fields"]
            dim = int(next(f for f in fields if f["name"] == "vector")["params"]["dim"])
            if not self._cli.list_indexes(name, field_name="vector"):
                self._create_index(name, EXACT_INDEX if self.flat_max_rows > 0 else GRAPH_INDEX)
            index_name = self._cli.list_indexes(name, field_name="vector")[0]
            index = str(self._cli.describe_index(name, index_name)["index_type"]).upper()
            if "Loaded" not in str(self._cli.get_load_state(name)["state"]):
                self._cli.load_collection(name)
        self._collections[name] = (index, dim)
        return index, dim

    def _maybe_use_graph_index(self, name: str) -> None:
        """Switch a FLAT collection that outgrew ``flat_max_rows`` to HNSW (once; it never switches back)."""
        if self._open(name)[0] == GRAPH_INDEX or self._count(name, "") <= self.flat_max_rows:
            return
        log.info("collection %s passed %d rows: rebuilding its vector index as HNSW", name, self.flat_max_rows)
        with self._errors("switch to HNSW", name):
            self._cli.flush(name)
            self._cli.release_collection(name)
            self._cli.drop_index(name, self._cli.list_indexes(name, field_name="vector")[0])
            self._create_index(name, GRAPH_INDEX)
            self._cli.load_collection(name)  # builds the graph of every flushed segment
        self._collections.pop(name, None)

    def _create_index(self, name: str, index: str) -> None:
        params = MilvusClient.prepare_index_params()
        build = {"M": self.hnsw_m, "efConstruction": self.hnsw_ef_construction} if index == GRAPH_INDEX else {}
        params.add_index(field_name="vector", index_type=index, metric_type=METRIC, params=build)
        # Milvus Lite builds indexes when loading; a sync create would poll it for timestamps it does not have.
        self._cli.create_index(name, params, sync=not self.is_lite)

    def _count(self, name: str, expr: str, *, cached: bool = False) -> int:
        """Rows matching ``expr``; ``cached`` reuses a count taken since the last write (on Lite)."""
        stamp, n = self._counts.get((name, expr), (None, 0))
        if not cached or stamp is None or stamp != self._stamp():
            self._open(name)
            with self._errors("count", name):
                n = int(self._cli.query(name, filter=expr, output_fields=["count(*)"])[0]["count(*)"])
            self._counts[name, expr] = (self._stamp(), n)
        return n

    def _stamp(self) -> int | None:
        """Writes to this Lite file from this process, which owns it: cached reads stay valid while it holds.
        None for a server, whose other clients may write at any time: nothing is cached."""
        return _lite_writes.get(self._path, 0) if self.is_lite else None

    def _wrote(self) -> None:
        if self.is_lite:
            with _lite_lock:
                _lite_writes[self._path] = _lite_writes.get(self._path, 0) + 1

    def _errors(self, op: str, name: str) -> AbstractContextManager[None]:
        return _milvus_errors(op, name, self.uri)


@contextmanager
def _milvus_errors(op: str, name: str, uri: str) -> Iterator[None]:
    """A pymilvus failure becomes a VectorStoreError that names the operation and a fix."""
    try:
        yield
    except MilvusException as e:
        message = str(getattr(e, "message", e))
        hint = "check the arguments against the collection's schema"
        if "not exist" in message or "not found" in message:
            hint = "call ensure_collection(name, dim) first"
        elif "connect" in message.lower() or "unavailable" in message.lower():
            hint = f"is the Milvus server at {uri} running and reachable?"
        raise VectorStoreError(f"{op}{f' on {name!r}' if name else ''} failed: {message}; {hint}") from e


def _not_mvcc_warning(record: logging.LogRecord) -> bool:
    """Milvus Lite has no MVCC timestamps, so pymilvus' query iterator warns on every page: drop that line."""
    return "failed to get mvccTs" not in record.getMessage()
