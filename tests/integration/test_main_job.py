"""`knowmap run --quick` end to end, as a user runs it: real Ray, ScienceWorld, Ray Train, Serve, llama.cpp.

One run checks that every stage ran and that every section of the report is filled from what the run measured. It
runs the quick preset on one of its two tasks (every stage, half the episodes: about 6 minutes on 2 cores instead
of 10).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.ray, pytest.mark.jvm, pytest.mark.training]
pytest.importorskip("llama_cpp", reason="the local-llm extra (llama-cpp-python) is not installed")


def test_quick_run_writes_a_complete_report(tmp_path: Path) -> None:
    import ray

    if ray.is_initialized():  # one Ray per machine: the run starts its own, as a user's would
        ray.shutdown()
    knowmap = Path(sys.executable).with_name("knowmap")
    command = [str(knowmap), "run", "--quick", "--tasks", "find-living-thing", "--data-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "RAY_DEDUP_LOGS": "1", "KNOWMAP_SERVE__DRAIN_S": "1"})
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-4000:]
    out = done.stdout
    report_md = tmp_path / "report" / "report.md"
    assert f"report  {report_md}" in out and "nDCG@10 env (bm25 / base / fine-tuned)" in out

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["errors"] == []
    for section in ("build", "training", "retrieval", "agents", "retrain", "throughput", "serve"):
        assert report[section], f"section {section} is empty"
    assert list(report["stages"]) == ["build", "train", "evaluate", "serve", "agents", "retrain"]
    assert report["build"]["episodes"] == 2 and report["build"]["steps"] > 0
    assert sum(report["training"]["pairs"].values()) > 0
    assert report["retrieval"]["kinds"]["env"]["queries"] > 0
    assert report["retrieval"]["kinds"]["experience"]["queries"] > 0
    modes = report["agents"]["modes"]
    assert set(modes) == {"none", "kb-base", "kb-finetuned"}
    assert all(m["episodes"] == 1 and m["failed"] == 0 and m["tokens"] > 0 for m in modes.values())
    assert report["retrain"]["gate_episodes"] and "decision support" in report["retrain"]["reason"]
    decision = report["retrieval"]["decision"]  # judged by gold next actions
    assert {"none", "bm25", "kb-base", "kb-finetuned", "kb-finetuned+rerank"} <= set(decision["modes"])
    assert decision["modes"]["none"]["steps"] > 0 and 0 <= decision["modes"]["kb-finetuned"]["shortlist_recall@12"] <= 1
    assert report["serve"]["retrieve p50 ms"] > 0 and report["serve"]["retrieve items (last)"] > 0
    assert "last decision" in report["serve"]["models after retrain"]
    assert all(v > 0 for v in report["throughput"].values())

    text = report_md.read_text()
    assert "Not reached" not in text and "missing sections" not in text
    for png in ("loss.png", "retrieval.png", "agents.png", "throughput.png"):
        assert (tmp_path / "report" / png).stat().st_size > 0 and f"({png})" in text
    # The controller's state is where `knowmap retrain status` and GET /v1/models read it.
    state = json.loads((tmp_path / "retrain" / "state.json").read_text())
    assert state["last_decision"]["promoted"] == report["retrain"]["promoted"]
