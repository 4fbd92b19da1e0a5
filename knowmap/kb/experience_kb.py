"""The experiential knowledge base: sub-goals of past trajectories, embedded and searchable in the vector store.

Each embedding model gets its own collection, ``<prefix>_<embedder.version>``: vectors of two models never mix,
and re-indexing under a retrained embedder is an explicit :meth:`ExperienceKB.copy_from` into a new collection.

Rows are of two kinds, both tagged with their ``episode_id``:

* ``subgoal``: one per sub-goal; the embedded text is :meth:`Subgoal.text`, and ``meta["subgoal"]`` holds the whole
  sub-goal, so it can be rebuilt (:meth:`ExperienceKB.get_subgoals`) and re-embedded without the trajectory.
* ``trajectory``: one per episode, summarising it: task description, actions, final score.

Adding a trajectory is idempotent by episode: its rows are upserted by stable ids, then any row of that episode that
the new version no longer has (a retried episode that found fewer sub-goals) is deleted. The new rows are written
before the stale ones go, so a reader never sees the episode missing. The bytes of replaced and stale rows stay in
the store's files until the next purge (:meth:`ExperienceKB.purge`, or Milvus' own compaction); deleting an episode
purges, so its texts and vectors are gone from the files when :meth:`ExperienceKB.delete_episode` returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from knowmap.kb.store_rows import Hit
from knowmap.kb.vectorstore import VectorStore
from knowmap.models.embedder import Embedder
from knowmap.schemas import KnowledgeItem, Subgoal, Trajectory, stable_id

RowKind = Literal["subgoal", "trajectory"]
ROW_KINDS = ("subgoal", "trajectory")
SOURCES = ("expert", "agent")
_MAX_TEXT_BYTES = 60_000  # under the store's 65,535-byte VARCHAR; the embedder reads only the first ~256 tokens


class ExperienceKB:
    """Sub-goals and trajectory summaries in one vector-store collection per embedding model.

    Args:
        store: the vector store (Milvus Lite file or server).
        embedder: embeds stored texts and queries; its ``version`` names the collection.
        collection_prefix: the collection is ``<collection_prefix>_<embedder.version>``.

    Raises:
        VectorStoreError: the collection cannot be created or opened.
    """

    def __init__(self, store: VectorStore, embedder: Embedder, collection_prefix: str = "knowmap") -> None:
        self.store = store
        self.embedder = embedder
        self.collection = f"{collection_prefix}_{embedder.version}"
        store.ensure_collection(self.collection, embedder.dim)

    # -- writes -------------------------------------------------------------------------------------------------
    def add_trajectory(self, trajectory: Trajectory, subgoals: list[Subgoal]) -> int:
        """Store an episode: one row per sub-goal and one trajectory row; idempotent by ``episode_id``.

        Re-adding an episode replaces its rows; rows of the earlier version that the new one lacks are deleted.

        Returns:
            the number of rows written (sub-goals + 1).

        Raises:
            ValueError: a sub-goal belongs to another episode.
            VectorStoreError: the store refused the write.
        """
        episode = trajectory.episode_id
        strangers = sorted({g.episode_id for g in subgoals} - {episode})
        if strangers:
            raise ValueError(f"sub-goals of episodes {strangers} passed with trajectory {episode!r}; "
                             "pass each trajectory with its own sub-goals")
        rows = episode_rows(trajectory, subgoals)
        written = self._write(rows)
        keep = {row["id"] for row in rows}
        stale = [r["id"] for r in self.store.iterate(self.collection, {"episode_id": episode}) if r["id"] not in keep]
        if stale:
            self.store.delete(self.collection, ids=stale, purge=False)  # a replacement, not a deletion: no rewrite
        return written

    def delete_episode(self, episode_id: str) -> int:
        """Delete every row of an episode (its sub-goals and its trajectory row) and purge them: their texts and
        vectors are gone from the store's files when this returns (:meth:`VectorStore.purge`). Returns how many rows
        there were."""
        found = self.count(episode_id=episode_id)
        if found:
            self.store.delete(self.collection, filter={"episode_id": episode_id})
        return found

    def purge(self) -> None:
        """Remove the bytes of every row deleted or replaced so far from the store's files (:meth:`VectorStore.purge`):
        e.g. after re-adding episodes whose earlier rows held what must not stay on disk."""
        self.store.purge(self.collection)

    def _write(self, rows: list[dict[str, Any]]) -> int:
        if not rows:
            return 0
        vectors = self.embedder.encode([row["text"] for row in rows])  # (n, dim)
        for row, vector in zip(rows, vectors, strict=True):
            row["vector"] = vector
        return self.store.upsert(self.collection, rows)

    # -- reads --------------------------------------------------------------------------------------------------
    def search(self, query: str, k: int = 5, *, task: str | None = None, kind: str | None = "subgoal",
               source: str | None = None, where: dict[str, Any] | None = None) -> list[KnowledgeItem]:
        """The ``k`` stored rows most similar to ``query``, best first.

        Args:
            query: free text (a sub-goal, the current situation, the task).
            k: at most this many items; fewer only if fewer rows match the filters.
            task: only rows of this ScienceWorld task.
            kind: ``"subgoal"``, ``"trajectory"``, or None for both.
            source: ``"expert"``, ``"agent"``, or None for both.
            where: a further filter (:func:`~knowmap.kb.store_rows.build_filter`), e.g. a tenant's visibility
                (:func:`knowmap.tenancy.experience_filter`).

        Returns:
            items with ``score`` (cosine similarity) and ``provenance``: kind, episode_id, task, variation, split,
            source, and for sub-goals subgoal_id, index, steps and scores.

        Raises:
            ValueError: an unknown kind or source.
            VectorStoreError: the search failed.
        """
        return self.search_vector(self.embedder.encode([query])[0], k, task=task, kind=kind, source=source,
                                  where=where)

    def search_vector(self, vector: Any, k: int = 5, *, task: str | None = None, kind: str | None = "subgoal",
                      source: str | None = None, where: dict[str, Any] | None = None) -> list[KnowledgeItem]:
        """As :meth:`search`, for a query already embedded by this KB's embedder (a unit vector ``(dim,)``)."""
        return self.search_vectors(vector, k, task=task, kind=kind, source=source, where=where)[0]

    def search_vectors(self, vectors: Any, k: int = 5, *, task: str | None = None, kind: str | None = "subgoal",
                       source: str | None = None, where: dict[str, Any] | None = None) -> list[list[KnowledgeItem]]:
        """:meth:`search_vector` for several query vectors ``(n, dim)`` under the same filters, in one store call:
        one list of items per vector."""
        filters = {**(where or {}), **self._filters(task=task, kind=kind, source=source)}
        return [[_item(hit) for hit in hits] for hits in self.store.search(self.collection, vectors, k, filters)]

    def count(self, **filters: str | None) -> int:
        """Rows matching ``task=``, ``kind=``, ``episode_id=``, ``source=`` (None = any); no filters = all rows."""
        return self.store.count(self.collection, self._filters(**filters))

    def has_episode(self, episode_id: str) -> bool:
        """Whether any row of this episode is stored."""
        return self.count(episode_id=episode_id) > 0

    def get_subgoals(self, episode_id: str) -> list[Subgoal]:
        """The stored sub-goals of an episode, rebuilt from their rows, in order of ``index``."""
        rows = self.store.iterate(self.collection, {"episode_id": episode_id, "kind": "subgoal"})
        return sorted((Subgoal.model_validate(r["meta"]["subgoal"]) for r in rows), key=lambda g: g.index)

    def iter_subgoals(self) -> Iterator[Subgoal]:
        """Every stored sub-goal, rebuilt from its row (for training pairs and re-indexing)."""
        for row in self.store.iterate(self.collection, {"kind": "subgoal"}):
            yield Subgoal.model_validate(row["meta"]["subgoal"])

    def export_rows(self, kind: str | None = None) -> Iterator[dict[str, Any]]:
        """Every stored row without its vector: ``id, text, task, kind, episode_id, source, meta``.

        Args:
            kind: ``"subgoal"``, ``"trajectory"``, or None for all rows.
        """
        yield from self.store.iterate(self.collection, self._filters(kind=kind))

    def copy_from(self, other: ExperienceKB, batch_size: int = 256) -> int:
        """Re-index: copy every row of ``other`` (usually the KB of an older embedder) into this KB, re-embedding
        its text with this KB's embedder. Idempotent, like every write here.

        Returns:
            the number of rows copied.
        """
        copied, batch = 0, []
        for row in other.export_rows():
            batch.append(row)
            if len(batch) == batch_size:
                copied += self._write(batch)
                batch = []
        return copied + self._write(batch)

    @staticmethod
    def _filters(**filters: str | None) -> dict[str, str]:
        kind, source = filters.get("kind"), filters.get("source")
        if kind is not None and kind not in ROW_KINDS:
            raise ValueError(f"kind must be one of {ROW_KINDS} or None, got {kind!r}")
        if source is not None and source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES} or None, got {source!r}")
        return {key: value for key, value in filters.items() if value is not None}

    def __repr__(self) -> str:
        return f"ExperienceKB(collection={self.collection!r}, store={self.store.uri!r})"


def episode_rows(trajectory: Trajectory, subgoals: list[Subgoal]) -> list[dict[str, Any]]:
    """The rows an episode is stored as (``text`` is what gets embedded): one per sub-goal, then the trajectory's."""
    return [_subgoal_row(g, trajectory.tenant) for g in subgoals] + [_trajectory_row(trajectory)]


def _subgoal_row(goal: Subgoal, tenant: str = "") -> dict[str, Any]:
    return {
        "id": goal.subgoal_id, "text": _clip(goal.text()), "task": goal.task, "kind": "subgoal",
        "episode_id": goal.episode_id, "source": goal.source,
        "meta": {"variation": goal.variation, "split": goal.split, "index": goal.index, "tenant": tenant,
                 "subgoal": goal.model_dump(mode="json")},
    }


def _trajectory_row(trajectory: Trajectory) -> dict[str, Any]:
    actions = trajectory.actions
    text = (f"Task: {trajectory.task_description or trajectory.task}\nActions: {'; '.join(actions)}\n"
            f"Final score: {trajectory.final_score:g}")
    return {
        "id": stable_id(trajectory.episode_id, "trajectory"), "text": _clip(text), "task": trajectory.task,
        "kind": "trajectory", "episode_id": trajectory.episode_id, "source": trajectory.source,
        "meta": {"variation": trajectory.variation, "split": trajectory.split, "tenant": trajectory.tenant,
                 "contributor": trajectory.contributor, "simplifications": trajectory.simplifications,
                 "task_description": trajectory.task_description,
                 "actions": actions, "final_score": trajectory.final_score, "steps": len(trajectory.steps)},
    }


def _item(hit: Hit) -> KnowledgeItem:
    meta = hit.meta
    provenance: dict[str, Any] = {"kind": hit.kind, "episode_id": hit.episode_id, "task": hit.task,
                                  "variation": meta.get("variation"), "split": meta.get("split"),
                                  "source": hit.source, "tenant": meta.get("tenant")}
    if hit.kind == "subgoal":
        goal = meta.get("subgoal", {})
        provenance.update(subgoal_id=hit.id, index=meta.get("index"), start_step=goal.get("start_step"),
                          end_step=goal.get("end_step"), score_before=goal.get("score_before"),
                          score_after=goal.get("score_after"))
    else:
        provenance.update(final_score=meta.get("final_score"))
    return KnowledgeItem(id=hit.id, kind=hit.kind, text=hit.text, score=hit.score, provenance=provenance)


def _clip(text: str) -> str:
    data = text.encode("utf-8")
    return text if len(data) <= _MAX_TEXT_BYTES else data[:_MAX_TEXT_BYTES].decode("utf-8", "ignore")
