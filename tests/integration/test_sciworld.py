"""The typed ScienceWorld wrapper against the real JVM."""

from __future__ import annotations

import pytest

from knowmap.environment.sciworld import ScienceWorld
from knowmap.errors import ScienceWorldError, UnknownTaskError, VariationOutOfRangeError

pytestmark = [pytest.mark.integration, pytest.mark.jvm]


@pytest.fixture(scope="module")
def env():
    with ScienceWorld(step_limit=50) as env:
        yield env


def test_thirty_tasks_and_disjoint_splits(env: ScienceWorld) -> None:
    assert len(env.task_names) == 30
    train, dev, test = (set(env.variations("boil", s)) for s in ("train", "dev", "test"))
    assert train and dev and test and not (train & dev or train & test or dev & test)


def test_errors_list_the_valid_values(env: ScienceWorld) -> None:
    with pytest.raises(UnknownTaskError, match="valid tasks: boil, change-the-state-of-matter-of"):
        env.load("boyl", 0, "train")
    with pytest.raises(VariationOutOfRangeError, match=r"dev variations are 14-20 \(7 variations\)"):
        env.load("boil", 3, "dev")
    with pytest.raises(ScienceWorldError, match="unknown split 'val'"):
        env.variations("boil", "val")  # type: ignore[arg-type]


def test_gold_path_replays_to_full_score_with_typed_steps(env: ScienceWorld) -> None:
    first = env.load("find-living-thing", 0, "train", gold=True)
    assert first.step == 0 and first.score == 0.0 and "This room is called" in first.observation
    assert first.inventory and first.inventory.startswith("In your inventory")
    gold = env.gold_actions()
    records = [env.step(a, look=True) for a in gold]
    assert [r.step for r in records] == list(range(1, len(gold) + 1))
    assert records[-1].score == 100.0 and records[-1].done
    assert all(r.look and r.inventory for r in records) and records[0].valid_actions is None
    assert env.step("look around", valid_actions=True).valid_actions  # built only when asked for
    assert "living thing" in env.task_description


def test_closed_env_refuses_work() -> None:
    env = ScienceWorld()
    env.close()
    env.close()  # idempotent
    with pytest.raises(ScienceWorldError, match="closed|no task"):
        env.reset()
