"""Decision support on the real simulator: annotated gold replays from ScienceWorld's JVM, actions typed by its own
tables, judged steps, and every knowledge mode measured with the real MiniLM."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowmap.environment.episodes import collect_episodes
from knowmap.evaluation.decision import decision_steps, evaluate_decision, experience_corpus

pytestmark = [pytest.mark.integration, pytest.mark.jvm]


def test_annotated_replays_judge_every_step_by_its_gold_action(tmp_path: Path, embedder) -> None:
    held = collect_episodes(["find-animal"], "dev", 1, cache_dir=tmp_path, annotate=True)
    train = collect_episodes(["find-animal", "find-living-thing"], "train", 1, cache_dir=tmp_path, annotate=True)
    steps = held[0].trajectory.steps
    assert all(s.valid_actions for s in steps)  # the actions valid after every step, step 0 included
    typed = [s for s in steps[1:] if s.action_type is not None and s.action_type.valid_as is not None]
    assert len(typed) >= 0.8 * (len(steps) - 1)  # the rest are gold actions with no effect (an open door opened)
    for before, step in zip(steps, steps[1:], strict=False):
        if step.action_type is not None and step.action_type.valid_as is not None:
            assert step.action_type.valid_as in before.valid_actions  # what the agent could have picked
    doors = [o for s in typed for o in s.action_type.objects if o.startswith("portal.Door")]
    assert doors and all(o.startswith("portal.Door:door to ") for o in doors)
    animals = {o for s in typed for o in s.action_type.objects if o.startswith("livingthing.animals.")}
    assert animals  # the animal to find is typed by its class, whatever it is called in this variation

    # Cached with the annotations: a plain request reuses them and starts no JVM.
    again = collect_episodes(["find-animal"], "dev", 1, cache_dir=tmp_path)
    assert again[0].trajectory == held[0].trajectory

    judged = decision_steps(held)
    corpus = experience_corpus(train)
    assert len(judged) == len(steps) - 1 and corpus
    assert sum(s.gold is not None for s in judged) == len(typed)
    # Across tasks and variations, sub-goals that did the same thing to the same kind of object are relevant.
    assert any(d.keys & s.answer_keys for s in judged for d in corpus)
    result = evaluate_decision(judged, corpus, embedders={"kb-base": embedder}, train_tasks=["find-animal"])
    for mode in ("none", "bm25", "kb-base"):
        values = result.modes[mode]
        assert values["steps"] == len(typed) and 0.0 <= values["shortlist_recall@12"] <= 1.0
        assert values["gold_rank_mean"] >= 1.0
    assert 0.0 <= result.modes["kb-base"]["support@5_env"] <= 1.0
    assert result.unseen is None and result.unseen_families == []  # find-animal's family was trained on
