"""Re-indexing the experiential KB under a new embedder, on the real actor: searches answer throughout, and the
switch to the new collection happens only once it is complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from knowmap.actors.experience import get_experience_kb, release_experience_kb
from knowmap.config import KnowMapConfig
from knowmap.kb.segmentation import SubgoalSegmenter
from knowmap.models.embedder import embedder_version
from knowmap.schemas import Trajectory

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.usefixtures("ray_local")]
FIXTURES = Path(__file__).parents[1] / "fixtures" / "trajectories"


def test_searches_answer_during_reindex_and_the_switch_waits_for_completion(tmp_path: Path,
                                                                             model_dirs: dict) -> None:
    config = KnowMapConfig(data_dir=tmp_path, ray={"namespace": f"reindex-{tmp_path.name}"})
    kb = get_experience_kb(config)
    try:
        base = Trajectory.model_validate(json.loads((FIXTURES / "boil-0.json").read_text()))
        adds = []
        for i in range(12):  # enough rows that re-embedding them all takes seconds
            copy = base.model_copy(update={"episode_id": f"{base.episode_id}-copy{i}"})
            goals = [g.model_dump() for g in SubgoalSegmenter().segment(copy)]
            adds.append(kb.add_trajectory.remote(copy.model_dump(), goals))
        ray.get(adds)
        rows = ray.get(kb.count.remote())
        old = ray.get(kb.versions.remote())["current"]

        new = embedder_version(model_dirs["embedder_b"])
        reindex = kb.ensure_index.remote(model_dirs["embedder_b"], make_current=True)
        seen_old = 0
        while not ray.wait([reindex], timeout=0)[0]:
            hits = ray.get(kb.search.remote("heat the water on the stove", 3))
            assert len(hits) == 3  # searches keep answering while the new collection fills
            current = ray.get(kb.versions.remote())["current"]
            counted = ray.get(kb.count.remote())  # counts the current version's collection
            if current == new:  # switched (just before the re-index call returned): only once complete
                assert counted == rows
            else:
                assert current == old and counted == rows
                seen_old += 1
        result = ray.get(reindex)
        assert seen_old > 0, "the re-index finished before any search could run beside it"
        assert result["version"] == new and result["rows"] == rows and result["copied"] == rows
        assert ray.get(kb.versions.remote())["current"] == result["version"] != old
        assert ray.get(kb.count.remote()) == rows
        assert len(ray.get(kb.search.remote("heat the water on the stove", 3))) == 3
    finally:
        release_experience_kb(config)
