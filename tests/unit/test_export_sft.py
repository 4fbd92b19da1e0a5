"""``knowmap export-sft`` on stored trajectories (the committed real gold replay, stored as agent episodes)."""

from __future__ import annotations

import json
from pathlib import Path

from knowmap.jobs.export_sft import STUDENT_SYSTEM, export_sft, read_jsonl
from knowmap.kb.trajectory_store import save_trajectory
from knowmap.layout import DataLayout
from knowmap.schemas import Trajectory

FIXTURES = Path(__file__).parent.parent / "fixtures" / "trajectories"


def test_successes_become_chats_without_knowledge_and_failures_become_hints(tmp_path: Path) -> None:
    paths = DataLayout(root=tmp_path / "data")
    gold = Trajectory.model_validate_json((FIXTURES / "boil-0.json").read_text())
    assert gold.final_score == 100
    success = gold.model_copy(update={"episode_id": "win", "source": "agent", "policy": "llm-kb-finetuned"})
    failed_steps = gold.steps[:12]  # it stopped short of the goal
    failure = gold.model_copy(update={"episode_id": "loss", "source": "agent", "policy": "llm-kb-base",
                                      "steps": failed_steps})
    for trajectory in (success, failure, gold,  # the expert replay itself: not an agent episode
                       success.model_copy(update={"episode_id": "fewshot", "policy": "llm-none"}),
                       success.model_copy(update={"episode_id": "dev-win", "split": "dev"})):
        save_trajectory(paths, trajectory)
    summary = export_sft(paths, tmp_path / "sft.jsonl", tmp_path / "hints.jsonl")
    assert (summary.sft, summary.hints) == (1, 1)
    assert summary.skipped == {"not an agent episode": 1, "no knowledge retrieved (policy llm-none)": 1,
                               "split dev": 1}
    (record,) = read_jsonl(tmp_path / "sft.jsonl")
    messages = record["messages"]
    assert messages[0] == {"role": "system", "content": STUDENT_SYSTEM}
    assert messages[1]["content"].startswith(f"Task: {gold.task_description}\n\nObservation: ")
    assert [m["content"] for m in messages if m["role"] == "assistant"] == gold.actions
    assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * record["steps"]
    assert record["final_score"] == 100 and record["policy"] == "llm-kb-finetuned"
    text = json.dumps(messages)
    assert "Known facts" not in text and "Plan:" not in text and "Experience" not in text
    (hint,) = read_jsonl(tmp_path / "hints.jsonl")
    assert hint["episode_id"] == "loss" and hint["final_score"] == failed_steps[-1].score < 100
    assert hint["reflections"] and all(r in hint["hint"] for r in hint["reflections"])
    assert hint["hint"].startswith(f"An earlier attempt at '{gold.task_description}' failed (final score ")
    both = export_sft(paths, tmp_path / "all.jsonl", None, splits=("train", "dev"), min_score=0)
    assert both.sft == 3 and both.hints == 0  # every knowledge-guided episode counts at min score 0
