"""Physical deletion in the vector store: a deleted row's text and vector leave the store's files.

Milvus deletes by writing a deletion marker; the row's bytes stay in its segment until a compaction merges that
segment. Measured on Milvus Lite 3.2.2 with pymilvus 3.0.2 (grepping every file under the ``.db`` directory for a
deleted row's text and vector bytes): after ``delete`` and ``flush`` both were still in the segment's parquet file
and its ``.flat.idx`` index sidecar; ``MilvusClient.compact`` is a no-op there (Lite answers ``ManualCompaction``
with success and does nothing), and Lite's own compaction merges a segment only when four files of its size
bucket exist, so a deleted text stays for as long as no more writes come. Lite's ``drop_collection`` removes the
collection's directory and ``rename_collection`` renames one, so :meth:`VectorStore.purge` rewrites a Lite
collection: it copies the live rows into ``<name>__purge``, drops the collection and renames the copy to its name.
The rewrite costs 1.5 to 5 ms per row on 2 cores (2,000 sub-goal rows with their meta plus 200 trajectory rows,
384-d: 3.3 s, and 4.7 to 11.5 s while other jobs loaded the cores; ``tests/integration/test_purge.py`` prints it).
On a Milvus server ``purge`` runs the server's compaction and waits for it; the server's garbage collector then
removes the old segment files after its ``dataCoord.gc.dropTolerance`` (see docs/service-and-api.md).

A purge is crash safe: the collection is dropped only once its copy is complete, so a copy found next to its
collection is an unfinished one (dropped, :func:`finish_interrupted_purge`) and a copy without its collection is a
finished one whose rename was cut short (renamed). Writes to the collection wait for the purge; reads go on, and
only the drop-and-rename (milliseconds) excludes them (:class:`SwapGate`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pymilvus import MilvusClient

from knowmap.errors import VectorStoreError

PURGE_SUFFIX = "__purge"


def purge_copy_name(name: str) -> str:
    """The name of the collection that a purge of ``name`` copies its live rows into."""
    return name + PURGE_SUFFIX


def finish_interrupted_purge(client: MilvusClient, name: str) -> None:
    """Finish a purge of ``name`` that a crash cut short: drop a partial copy, or rename a complete one."""
    copy = purge_copy_name(name)
    if not client.has_collection(copy):
        return
    if client.has_collection(name):
        client.drop_collection(copy)  # the copy was not complete: the collection was never dropped
    else:
        client.rename_collection(copy, name)


def compact_and_wait(client: MilvusClient, name: str, timeout_s: float = 600.0) -> None:
    """Run a Milvus server's compaction of ``name`` and wait until it has completed.

    Raises:
        VectorStoreError: it did not complete within ``timeout_s``.
    """
    client.flush(name)
    job = client.compact(name)
    deadline = time.monotonic() + timeout_s
    while (state := str(client.get_compaction_state(job))) != "Completed":
        if time.monotonic() > deadline:
            raise VectorStoreError(f"compaction of {name!r} did not complete within {timeout_s:g} s (state "
                                   f"{state}); the deleted rows stay in their segments until it does: retry the "
                                   "delete, or raise the timeout")
        time.sleep(0.2)


class SwapGate:
    """Reads share the gate; swapping a collection (drop and rename) holds it alone. A waiting swap goes first, so
    a stream of reads cannot hold it off. Not reentrant: a reader must not take it again inside its read."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._swapping = self._waiting = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not (self._swapping or self._waiting))
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not (self._swapping or self._waiting))
            self._waiting = True
            self._cond.wait_for(lambda: self._readers == 0)
            self._waiting, self._swapping = False, True
        try:
            yield
        finally:
            with self._cond:
                self._swapping = False
                self._cond.notify_all()


def copy_live_rows(store: Any, name: str, dim: int, batch_size: int = 2048) -> str:
    """Copy the live rows of ``store``'s collection ``name`` (a :class:`VectorStore`), vectors included, into a
    fresh collection :func:`purge_copy_name` (one flushed segment per batch); returns the copy's name."""
    copy = purge_copy_name(name)
    store.drop_collection(copy)
    store.ensure_collection(copy, dim)
    batch: list[dict[str, Any]] = []
    for row in store.iterate(name, with_vectors=True, batch_size=batch_size):
        batch.append(row)
        if len(batch) == batch_size:
            store.upsert(copy, batch)
            batch = []
    store.upsert(copy, batch)
    return copy
