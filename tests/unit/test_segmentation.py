"""Sub-goal segmentation on real gold trajectories captured from ScienceWorld (tests/fixtures/trajectories)."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowmap.kb.environment_kb import build_env_kb
from knowmap.kb.segmentation import SubgoalSegmenter, action_objects
from knowmap.schemas import Relation, Trajectory

FIXTURES = Path(__file__).parent.parent / "fixtures" / "trajectories"


@pytest.fixture(scope="module")
def boil() -> Trajectory:
    return Trajectory.model_validate_json((FIXTURES / "boil-0.json").read_text())


def test_cuts_at_every_score_rise(boil: Trajectory) -> None:
    rises = [s.step for prev, s in zip(boil.steps, boil.steps[1:], strict=False) if s.score > prev.score]
    assert rises == [9, 12, 15, 16, 22, 36]
    subgoals = SubgoalSegmenter().segment(boil)
    assert [(g.start_step, g.end_step) for g in subgoals] == [(1, 9), (10, 12), (13, 15), (16, 16), (17, 22), (23, 36)]
    assert all(g.completed for g in subgoals)
    assert [g.score_after for g in subgoals] == [boil.steps[i].score for i in rises]
    # Every action of the trajectory is in exactly one sub-goal, in order.
    assert [a for g in subgoals for a in g.actions] == boil.actions
    assert subgoals[1].actions[-1] == "focus on substance in metal pot"


def test_tail_after_last_rise_is_its_own_segment(boil: Trajectory) -> None:
    cut = boil.model_copy(update={"steps": boil.steps[:30]})  # ends at score 75 after the rise at step 22
    subgoals = SubgoalSegmenter().segment(cut)
    assert (subgoals[-1].start_step, subgoals[-1].end_step) == (23, 29)
    assert not subgoals[-1].completed
    assert "without a score change" in subgoals[-1].description


def test_ids_and_descriptions_are_deterministic(boil: Trajectory) -> None:
    a, b = SubgoalSegmenter().segment(boil), SubgoalSegmenter().segment(boil)
    assert [g.model_dump() for g in a] == [g.model_dump() for g in b]
    assert len({g.subgoal_id for g in a}) == len(a)
    assert a[0].description.startswith("Towards 'Your task is to boil water': reach score 3.3333")


def test_facts_are_about_touched_objects_as_known_when_reached(boil: Trajectory) -> None:
    kb = build_env_kb(boil)
    first = SubgoalSegmenter().segment(boil, kb)[0]
    assert {"metal pot", "sink", "thermometer", "cupboard"} <= set(first.objects)
    facts = {(f.subject, f.relation, f.object) for f in first.facts}
    # At step 9 the pot had been moved to the sink and the sink switched on.
    assert ("metal pot", Relation.LOCATION, "sink") in facts
    assert ("sink", Relation.POWER_STATE, "activated") in facts
    assert all(f.subject in first.objects or f.object in first.objects for f in first.facts)
    assert "Facts: " in first.text()


def test_action_objects_without_a_kb() -> None:
    assert action_objects("move metal pot to sink") == ["metal pot", "sink"]
    assert action_objects("use thermometer in inventory on substance in metal pot") == ["thermometer", "metal pot"]
    assert action_objects("look around") == []
    assert action_objects("open door to kitchen") == ["door", "kitchen"]
