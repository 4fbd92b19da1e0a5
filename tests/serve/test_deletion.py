"""DELETE removes the bytes, through the running service: after ``DELETE /v1/trajectories/{id}`` and
``DELETE /v1/envs/{id}`` return, a unique marker that only the deleted data held is found in no file under the
data dir (the Milvus Lite store, the env KBs' logs and snapshots, the training store, anything else there).

Its own module, so its own service and data dir: nothing another test stored can hide or hold the marker.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from knowmap.serve.client import KnowMapClient

pytestmark = [pytest.mark.ray, pytest.mark.integration]
FIXTURES = Path(__file__).parents[1] / "fixtures"


def occurrences(root: Path, needle: bytes) -> dict[str, int]:
    """How often ``needle`` occurs in each file under ``root`` (recursively, raw bytes); files without it left out."""
    found = {}
    for path in root.rglob("*"):
        try:
            if path.is_file() and (n := path.read_bytes().count(needle)):
                found[str(path.relative_to(root))] = n
        except FileNotFoundError:  # removed while we looked (a log rotated, a segment compacted)
            continue
    return found


def _trajectory(episode_id: str, marker: str = "") -> dict:
    trajectory = json.loads((FIXTURES / "trajectories" / "boil-0.json").read_text())
    trajectory["episode_id"] = episode_id
    if marker:
        trajectory["task_description"] = f"Your task is to boil water ({marker})."
        trajectory["steps"][3]["action"] = f"look at {marker}"
    return trajectory


def test_a_deleted_trajectory_is_in_no_file_under_the_data_dir(service: dict) -> None:
    client, data_dir = KnowMapClient(service["url"], service["key"]), Path(service["config"].data_dir)
    marker = f"purgemark{uuid.uuid4().hex}"
    client.add_trajectory(_trajectory("keep-1"))
    client.add_trajectory(_trajectory("gone-1", marker))
    client.add_trajectory(_trajectory("keep-2"))
    assert occurrences(data_dir, marker.encode())  # the grep finds it: in the store and the training store
    started = time.perf_counter()
    deleted = client.delete_trajectory("gone-1")
    seconds = time.perf_counter() - started
    assert deleted.deleted["rows"] > 0 and deleted.deleted["files"] == 1
    assert occurrences(data_dir, marker.encode()) == {}, f"still on disk after the DELETE ({seconds:.1f} s)"
    assert {t.episode_id for t in client.trajectories()} == {"keep-1", "keep-2"}
    assert client.retrieve("boil water", kbs=["experience"], k=3).items  # the others are still served


def test_an_env_deleted_leaves_its_facts_in_no_file_not_even_in_the_sub_goals_it_lent_them_to(service: dict) -> None:
    client, data_dir = KnowMapClient(service["url"], service["key"]), Path(service["config"].data_dir)
    marker = f"purgemark{uuid.uuid4().hex}"
    client.add_facts("lender", 0, [{"subject": "metal pot", "relation": "contains", "object": marker}])
    for step in range(1, 4):  # a few writes more: the env KB's log holds them all
        client.add_facts("lender", step, [{"subject": "metal pot", "relation": "location", "object": f"sink {step}"}])
    assert client.add_trajectory(_trajectory("borrower-1"), env_id="lender").subgoals > 0
    held = occurrences(data_dir, marker.encode())
    assert any(name.startswith("env_kb") for name in held) and any("experience.db" in name for name in held)
    gone = client.delete_env("lender")
    assert gone.deleted["files"] > 0 and gone.deleted["subgoals_rewritten"] > 0
    assert occurrences(data_dir, marker.encode()) == {}
    assert {t.episode_id for t in client.trajectories()} >= {"borrower-1"}
