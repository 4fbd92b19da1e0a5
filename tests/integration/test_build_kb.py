"""Both KBs built from real gold trajectories: real ScienceWorld JVM, real MiniLM, a Milvus Lite file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from knowmap.config import load_config
from knowmap.jobs.build import build_knowledge_bases, open_experience_kb
from knowmap.kb.durable_kb import DurableEnvironmentKB
from knowmap.kb.storage import list_env_kbs
from knowmap.schemas import Trajectory

pytestmark = [pytest.mark.integration, pytest.mark.jvm]
TASKS = ["boil", "find-living-thing", "test-conductivity"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    config = load_config(data_dir=tmp_path_factory.mktemp("data"),
                         scienceworld={"tasks": TASKS, "variations": 1, "split": "train"})
    seen = []
    summary = build_knowledge_bases(config, 0, on_episode=lambda e, n, total: seen.append((n, total)))  # in-process
    return config, summary, seen


def test_counts_and_progress(built) -> None:
    _, summary, seen = built
    assert summary.episodes == 3 and seen == [(1, 3), (2, 3), (3, 3)]
    assert [e.task for e in summary.per_episode] == TASKS
    assert all(e.final_score == 100.0 for e in summary.per_episode)  # gold paths solve their tasks
    assert summary.steps == sum(e.steps for e in summary.per_episode) > 0
    assert summary.facts > 50 and summary.subgoals >= 3
    # One row per sub-goal plus one trajectory row per episode.
    assert summary.experience_rows == summary.subgoals + summary.episodes


def test_env_kbs_and_trajectories_on_disk_hold_each_episode(built) -> None:
    config, summary, _ = built
    assert sorted(list_env_kbs(summary.env_kb_dir)) == sorted(e.episode_id for e in summary.per_episode)
    for episode in summary.per_episode:
        with DurableEnvironmentKB(episode.episode_id, summary.env_kb_dir) as kb:
            assert len(kb) == episode.facts and len(kb.current()) == episode.current_facts
            trajectory = Trajectory.model_validate_json(
                (config.paths.trajectories / f"{episode.episode_id}.json").read_text())
            assert kb.last_step == trajectory.steps[-1].step == episode.steps
    with DurableEnvironmentKB(summary.per_episode[0].episode_id, summary.env_kb_dir) as boil:
        assert any(f.subject == "agent" and f.object == "kitchen" for f in boil.current())
        assert len(boil.history("metal pot", "location")) >= 2


def test_experience_kb_search_is_filtered_by_task(built) -> None:
    config, summary, _ = built
    with open_experience_kb(config) as experience:
        hits = experience.search("heat the water on the stove until it boils", k=3, task="boil")
        assert hits and all(h.provenance["task"] == "boil" for h in hits)
        anywhere = experience.search("heat the water on the stove until it boils", k=3)
        assert anywhere[0].provenance["task"] == "boil"


@pytest.mark.ray  # its own Ray, in the CLI's process
def test_cli_builds_through_the_ray_pool_and_rejects_bad_input(tmp_path) -> None:
    knowmap = [sys.executable, "-m", "knowmap.jobs.cli"]
    env = {**os.environ, "KNOWMAP_DATA_DIR": str(tmp_path)}
    done = subprocess.run([*knowmap, "build-kb", "--tasks", "find-living-thing,melt", "--variations", "1",
                           "--workers", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "episodes   2" in done.stdout and "sub-goals" in done.stdout
    summary = json.loads((tmp_path / "build_summary.json").read_text())
    assert summary["episodes"] == 2 and summary["experience_rows"] == summary["subgoals"] + 2
    assert sorted(list_env_kbs(tmp_path / "env_kb")) == sorted(e["episode_id"] for e in summary["per_episode"])
    assert len(list((tmp_path / "trajectories").glob("*.json"))) == 2
    bad = subprocess.run([*knowmap, "build-kb", "--tasks", "boyl"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2
    assert "unknown ScienceWorld task 'boyl'" in bad.stderr and "find-living-thing" in bad.stderr
    bad_variations = subprocess.run([*knowmap, "build-kb", "--variations", "0"], capture_output=True, text=True,
                                    env=env, timeout=120)
    assert bad_variations.returncode != 0 and "variations" in bad_variations.stderr
