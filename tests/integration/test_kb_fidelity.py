"""The KB-fidelity check against the real object tree: two short test-split episodes, gold and random."""

from __future__ import annotations

import pytest

from knowmap.agent.rollout import EpisodeRunner, EpisodeSpec
from knowmap.evaluation.fidelity import WorldState
from knowmap.evaluation.fidelity_tally import Counts, FidelityTally, total
from knowmap.kb.environment_kb import EnvironmentKB
from knowmap.schemas import StepRecord, Trajectory

pytestmark = [pytest.mark.integration, pytest.mark.jvm]


def test_fidelity_of_two_short_episodes_against_the_real_tree() -> None:
    tally, counts = FidelityTally(), Counts()
    with_referents = 0
    runner = EpisodeRunner(step_limit=8, look_every_step=True)
    try:
        for policy in ("expert", "random"):
            variation = runner.env.variations("find-living-thing", "test")[0]
            kb = EnvironmentKB(f"fidelity-{policy}")
            tally.new_episode()

            def on_step(trajectory: Trajectory, record: StepRecord, kb: EnvironmentKB = kb, label: str = policy
                        ) -> None:
                nonlocal with_referents
                kb.ingest(record.as_observation())
                referents = runner.env.object_referents()
                with_referents += bool(referents)
                world = WorldState(runner.env.object_tree(), referents, runner.env.doors())
                counts.add(total(tally.check(world, kb.current(), [record.observation, record.look, record.inventory],
                                      record.step, label)))

            runner.run(EpisodeSpec(task="find-living-thing", variation=variation, split="test", policy=policy),
                       on_step=on_step)
    finally:
        runner.close()
    summary = counts.summary()
    assert counts.checked > 20 and counts.truth > 10 and with_referents > 0
    assert 0.0 < summary["precision"] <= 1.0 and 0.0 < summary["recall"] <= 1.0
    assert 0.0 <= summary["staleness"] <= 1.0
    assert tally.per_relation["agent_location"].summary()["precision"] == 1.0
    # Doors come from the JVM (the tree leaves portals out); the KB names them by both rooms.
    doors = tally.per_relation["door_state"].summary()
    assert doors["checked"] > 0 and doors["precision"] == 1.0 and doors["recall"] == 1.0
