"""The knowledge bases as an agent sees them: interfaces, and their in-process implementation.

:class:`~knowmap.agent.worker.AgentWorker` plays episodes into both KBs through two small interfaces, so the same
episode code runs in this process (``--workers 0``: :class:`LocalKnowledgeBases`, plain objects) and as a Ray
actor (:class:`knowmap.actors.kb_handles.RayKnowledgeBases`, thin adapters over the KB actors' handles):

* :class:`EnvKBSlot`: the env KB of the episode being played, switched from episode to episode;
* :class:`ExperienceAccess`: the shared experiential KB, searched in the collection of one embedder version.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from knowmap.config import KnowMapConfig
from knowmap.kb.durable_kb import DurableEnvironmentKB
from knowmap.kb.experience_versions import VersionedExperienceKB
from knowmap.kb.segmentation import SubgoalSegmenter
from knowmap.schemas import Fact, KnowledgeItem, Observation, Subgoal, Trajectory
from knowmap.tenancy import DEPLOYMENT_VIEW


class EnvKBSlot(Protocol):
    """One agent's env KB, holding one episode's KB at a time."""

    def open(self, env_id: str) -> None:
        """Hold the KB of ``env_id``, emptied: a replayed or retried episode starts again from step 0."""
        ...

    def ingest(self, observation: Observation) -> None:
        """Send one observation; it may be acknowledged later (:meth:`flush` waits for every one)."""
        ...

    def flush(self) -> None:
        """Return once every observation sent is durably stored; raise the first error if one was refused."""
        ...

    def facts(self, step: int | None = None) -> list[Fact]:
        """The facts that hold now (or as of ``step``); none before :meth:`open`."""
        ...

    def segment(self, trajectory: Trajectory) -> list[Subgoal]:
        """Sub-goals of a finished trajectory, with the facts this KB holds about the objects they touched."""
        ...

    def close(self) -> dict[str, Any]:
        """Snapshot and release the episode's KB; its stats (``facts``, ``current_facts``, ``ingest_seconds``)."""
        ...

    def discard(self) -> None:
        """Drop whatever the slot holds after a failure; the next :meth:`open` starts afresh."""
        ...


class ExperienceAccess(Protocol):
    """The shared experiential KB."""

    def start_add(self, trajectory: Trajectory, subgoals: Sequence[Subgoal]) -> Any:
        """Begin storing a trajectory and its sub-goals in every indexed version (replacing the episode's earlier
        rows); returns what :meth:`finish_add` takes (on Ray, the pending acknowledgement, which the rollout pool
        awaits while the agent plays on)."""
        ...

    def finish_add(self, pending: Any) -> dict[str, Any]:
        """Wait for a :meth:`start_add`; returns ``rows`` written and ``seconds`` spent embedding and storing.

        Raises:
            whatever the add raised (a refused write, an experiential-KB actor out of restarts).
        """
        ...

    def ensure_index(self, embedder_path: str) -> str:
        """Make sure the collection of this embedder exists (re-embedding if new); returns its version."""
        ...

    def search(self, vector: np.ndarray, k: int, task: str | None, version: str) -> list[KnowledgeItem]:
        """The ``k`` sub-goals nearest ``vector`` in ``version``'s collection (``task`` = only that task), among
        those the default tenant sees (expert, the deployment's own rollouts and the default tenant's contributions;
        never another tenant's)."""
        ...


class KnowledgeBases(Protocol):
    """What an agent worker is given: how to reach its env KB slot and the experiential KB. Picklable, so a
    Ray actor receives it and opens what it needs inside its own process."""

    def env_slot(self) -> EnvKBSlot: ...

    def experience(self) -> ExperienceAccess: ...


class LocalEnvKBSlot:
    """:class:`EnvKBSlot` over a :class:`DurableEnvironmentKB` in this process."""

    def __init__(self, config: KnowMapConfig) -> None:
        self._config, self._kb = config, None

    def open(self, env_id: str) -> None:
        self.discard()
        self._kb = DurableEnvironmentKB(env_id, self._config.paths.env_kb,
                                        snapshot_every=self._config.ray.env_kb_snapshot_every)
        self._kb.reset()

    def ingest(self, observation: Observation) -> None:
        self._held().ingest(observation)

    def flush(self) -> None:
        """Every ingest was acknowledged when it returned."""

    def facts(self, step: int | None = None) -> list[Fact]:
        if self._kb is None:
            return []
        return self._kb.current() if step is None else self._kb.as_of(step)

    def segment(self, trajectory: Trajectory) -> list[Subgoal]:
        return SubgoalSegmenter().segment(trajectory, self._held().kb)

    def close(self) -> dict[str, Any]:
        kb = self._held()
        kb.close()
        return kb.stats()

    def discard(self) -> None:
        if self._kb is not None:
            self._kb.close()
            self._kb = None

    def _held(self) -> DurableEnvironmentKB:
        if self._kb is None:
            raise RuntimeError("no env KB is open in this slot: call open(env_id) first")
        return self._kb


class LocalExperience:
    """:class:`ExperienceAccess` over a :class:`VersionedExperienceKB` owned by this process."""

    def __init__(self, kb: VersionedExperienceKB) -> None:
        self.kb = kb

    def start_add(self, trajectory: Trajectory, subgoals: Sequence[Subgoal]) -> dict[str, Any]:
        """In this process the add is done when this returns."""
        return self.kb.add_trajectory_timed(trajectory, list(subgoals))

    def finish_add(self, pending: dict[str, Any]) -> dict[str, Any]:
        return pending

    def ensure_index(self, embedder_path: str) -> str:
        return self.kb.ensure_index(embedder_path)["version"]

    def search(self, vector: np.ndarray, k: int, task: str | None, version: str) -> list[KnowledgeItem]:
        rows = self.kb.search_vector(np.asarray(vector).tolist(), k, task=task, version=version,
                                     where=DEPLOYMENT_VIEW)
        return [KnowledgeItem.model_validate(row) for row in rows]


class LocalKnowledgeBases:
    """Both KBs in this process (no Ray): one env KB slot, and the experiential KB opened on first use.

    The Milvus Lite file admits one process, so :meth:`close` must run before another process opens the store.
    """

    def __init__(self, config: KnowMapConfig) -> None:
        self.config = config
        self._experience: LocalExperience | None = None

    def env_slot(self) -> LocalEnvKBSlot:
        return LocalEnvKBSlot(self.config)

    def experience(self) -> LocalExperience:
        if self._experience is None:
            self._experience = LocalExperience(VersionedExperienceKB(self.config.model_dump(mode="json")))
        return self._experience

    def info(self) -> dict[str, Any]:
        """The experiential KB's collection, store and row count."""
        return self.experience().kb.info()

    def close(self) -> None:
        """Close the vector store (releasing the Milvus Lite file)."""
        if self._experience is not None:
            self._experience.kb.close()
            self._experience = None
