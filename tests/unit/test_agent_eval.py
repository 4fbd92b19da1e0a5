"""The evaluation harness's pure parts: per-mode aggregation, the table, the plot, and embedder resolution."""

from __future__ import annotations

import json

import pytest

from knowmap.agent.llm_policy import embedder_path
from knowmap.agent.rollout import EpisodeSpec
from knowmap.config import load_config
from knowmap.errors import KnowMapError
from knowmap.jobs.agent_eval import agent_table, plot_results, protocol_lines, summarise
from knowmap.results import AgentEvalProtocol, AgentRounds, EpisodeResult


def result(mode: str, task: str, score: float, ok: bool = True) -> EpisodeResult:
    return EpisodeResult(spec=EpisodeSpec(task=task, variation=1, split="test", policy=f"llm-{mode}"), ok=ok,
                         final_score=score, steps=5, prompt_tokens=100, completion_tokens=10, llm_calls=6,
                         error="" if ok else "LLMError: boom")


def test_summary_table_and_plot(tmp_path) -> None:
    results = [result("none", "boil", 10), result("none", "melt", -100), result("kb-base", "boil", 30),
               result("kb-base", "melt", 50), result("kb-base", "melt", 0, ok=False)]
    protocol = AgentEvalProtocol(
        split="test", tasks=["boil", "melt"], variations={"boil": [1], "melt": [1]}, variations_per_task=1,
        step_limit=5, simplifications="none", scienceworld_version="1.2.3", model="m", endpoint="http://x/v1",
        constraint_style="grammar", temperature=0.0, modes=["none", "kb-base"], embedders={}, agent={}, score="s",
        workers="cores", seconds=1.0)
    report = summarise(results, ["none", "kb-base"], protocol)
    assert report.modes["none"].mean == 5.0  # -100 counts as 0
    assert report.modes["kb-base"].per_task == {"boil": 30.0, "melt": 50.0}
    assert report.modes["kb-base"].failed == 1 and report.modes["kb-base"].tokens.calls == 18
    assert [e.error for e in report.failed_episodes()] == ["LLMError: boom"]
    table = agent_table(report)
    assert "mean" in table and "40.00" in table and "5.00" in table
    assert "scienceworld_version: 1.2.3" in protocol_lines(report)
    plot_results(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    json.dumps(report.model_dump(mode="json"))

    # knowmap run keeps no protocol of its own here; its report gets one round per mode, tokens summed.
    rounds = AgentRounds.from_evaluation(summarise(results, ["none", "kb-base"]), {"boil": [1]}, step_limit=5)
    assert rounds.modes["kb-base"].mean_score == 40.0 and rounds.modes["kb-base"].tokens == 330
    assert rounds.modes["none"].failed == 0 and len(rounds.episodes) == 5


def test_finetuned_mode_needs_a_trained_embedder(tmp_path) -> None:
    config = load_config(data_dir=tmp_path)
    assert embedder_path(config, "kb-base") == ""
    with pytest.raises(KnowMapError, match="knowmap train"):
        embedder_path(config, "kb-finetuned")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "latest.json").write_text(json.dumps({"embedder": str(tmp_path)}))
    assert embedder_path(config, "kb-finetuned") == str(tmp_path)
