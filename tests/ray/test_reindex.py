"""The experiential-KB actor, on Milvus Lite and on a Milvus server: re-indexing under a new embedder (searches
answer throughout, the switch happens only once the new collection is complete), and a kill mid-write that loses no
acknowledged row."""

from __future__ import annotations

import json
import time
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


def test_searches_answer_during_reindex_and_the_switch_waits_for_completion(tmp_path: Path, store_uri: str,
                                                                             model_dirs: dict) -> None:
    config = KnowMapConfig(data_dir=tmp_path, store={"uri": store_uri}, ray={"namespace": f"reindex-{tmp_path.name}"})
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


def test_killing_the_actor_mid_write_loses_no_acknowledged_row(tmp_path: Path, store_uri: str) -> None:
    config = KnowMapConfig(data_dir=tmp_path, store={"uri": store_uri},
                           ray={"namespace": f"kill-{tmp_path.name}", "max_restarts": 2, "max_task_retries": 0})
    kb = get_experience_kb(config)
    try:
        base = Trajectory.model_validate(json.loads((FIXTURES / "boil-0.json").read_text()))
        goals = {}
        pending = {}
        for i in range(16):
            copy = base.model_copy(update={"episode_id": f"{base.episode_id}-kill{i}"})
            goals[copy.episode_id] = [g.model_dump() for g in SubgoalSegmenter().segment(copy)]
            pending[kb.add_trajectory.remote(copy.model_dump(), goals[copy.episode_id])] = copy.episode_id
        acknowledged = []
        while len(acknowledged) < 3:  # some writes acknowledged, the rest queued or in flight
            done, _ = ray.wait(list(pending), num_returns=1)
            ray.get(done[0])
            acknowledged.append(pending.pop(done[0]))
        ray.kill(kb, no_restart=False)
        for ref, episode in pending.items():  # those that finished before the kill are acknowledged too
            try:
                ray.get(ref)
                acknowledged.append(episode)
            except ray.exceptions.RayError:
                pass
        assert 3 <= len(acknowledged) < 16, "the kill should have interrupted the writes"
        deadline = time.monotonic() + 120
        while True:  # the restarted actor reopens the store
            try:
                ray.get(kb.info.remote())
                break
            except ray.exceptions.RayActorError:
                assert time.monotonic() < deadline, "the experiential-KB actor did not come back"
                time.sleep(0.5)
        for episode in acknowledged:
            assert ray.get(kb.count.remote(kind="trajectory", episode_id=episode)) == 1, episode
            assert ray.get(kb.count.remote(kind="subgoal", episode_id=episode)) == len(goals[episode]), episode
    finally:
        release_experience_kb(config)
