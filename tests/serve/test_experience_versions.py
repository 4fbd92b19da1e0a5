"""The experiential-KB actor's plain class holding several embedder versions (no Ray): re-index, adds reaching
every held version, searches by version, rollback and release. Real models, on a Milvus Lite file and on a Milvus
server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knowmap.actors.experience import ExperienceKBActor
from knowmap.config import KnowMapConfig
from knowmap.errors import KnowMapError
from knowmap.kb.segmentation import SubgoalSegmenter
from knowmap.schemas import Trajectory

pytestmark = pytest.mark.integration
FIXTURES = Path(__file__).parents[1] / "fixtures" / "trajectories"


def _episode(name: str) -> tuple[dict, list[dict]]:
    trajectory = Trajectory.model_validate(json.loads((FIXTURES / name).read_text()))
    return trajectory.model_dump(), [g.model_dump() for g in SubgoalSegmenter().segment(trajectory)]


def test_reindex_keeps_versions_apart_and_adds_reach_all(tmp_path: Path, store_uri: str, model_dirs: dict[str, str],
                                                         embedder) -> None:  # noqa: ANN001
    kb = ExperienceKBActor(KnowMapConfig(data_dir=tmp_path, store={"uri": store_uri}).model_dump(mode="json"))
    try:
        old = kb.versions()["current"]
        first = kb.add_trajectory(*_episode("boil-0.json"))
        index = kb.ensure_index(model_dirs["embedder_b"])
        new = index["version"]
        assert new != old and index["copied"] == first and index["rows"] == first
        assert kb.ensure_index(model_dirs["embedder_b"])["copied"] == 0  # held: returns at once
        second = kb.add_trajectory(*_episode("find-living-thing-0.json"))  # reaches both versions
        from knowmap.models.embedder import Embedder

        vector_b = Embedder(model_dirs["embedder_b"]).encode(["find a living thing"])[0]
        hits = kb.search_vector(vector_b, 3, version=new)
        assert hits and hits[0]["provenance"]["task"] == "find-living-thing"
        hits_old = kb.search_vector(embedder.encode(["find a living thing"])[0], 50, version=old, kind=None)
        assert len(hits_old) == first + second
        with pytest.raises(KnowMapError, match="ensure_index"):
            kb.search_vector(vector_b, 3, version="nope_0000000000")
        with pytest.raises(KnowMapError, match="current"):
            kb.release_index(old)
        kb.set_current(new)
        assert kb.info()["rows"] == first + second and kb.release_index(old)
        assert set(kb.versions()["held"]) == {new}
    finally:
        kb.close()


def test_a_deleted_episode_is_gone_from_every_collection_and_no_reindex_brings_it_back(
        tmp_path: Path, store_uri: str, model_dirs: dict[str, str]) -> None:
    kb = ExperienceKBActor(KnowMapConfig(data_dir=tmp_path, store={"uri": store_uri}).model_dump(mode="json"))
    try:
        old = kb.versions()["current"]
        trajectory, goals = _episode("boil-0.json")
        kb.add_trajectory(trajectory, goals)
        kept = kb.add_trajectory(*_episode("find-living-thing-0.json"))
        new = kb.ensure_index(model_dirs["embedder_b"])["version"]
        kb.set_current(new)
        assert kb.release_index(old)  # no longer held, still on disk: a rollback could hold it again
        episode = trajectory["episode_id"]
        assert kb.delete_episode(episode) == len(goals) + 1
        assert kb.count(episode_id=episode) == 0 and kb.count() == kept
        kb.set_current(kb.ensure_index("")["version"])  # hold the old version's collection again
        assert kb.versions()["current"] == old and kb.count(episode_id=episode) == 0 and kb.count() == kept
    finally:
        kb.close()
