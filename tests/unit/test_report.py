"""The run report: every section rendered from the numbers given, a section not reached named as missing."""

from __future__ import annotations

from knowmap.jobs.report import RunReport, render_markdown, write_report


def test_sections_not_reached_are_named_not_filled(tmp_path) -> None:
    report = RunReport(protocol={"tasks": ["boil"]}, stages={"build": 12.5},
                       build={"episodes": 2, "steps": 40, "facts": 300, "subgoals": 9, "experience_rows": 11},
                       errors=["train: TrainingError: out of memory"])
    assert report.missing == ["training", "retrieval", "agents", "retrain", "throughput"]
    text = render_markdown(report)
    assert "| steps | 40 |" in text and text.count("*Not reached in this run") == 5
    assert "missing sections | training, retrieval, agents, retrain, throughput" in text
    assert "TrainingError: out of memory" in text


def test_full_report_with_plots(tmp_path) -> None:
    metrics = {"recall@1": 0.2, "recall@5": 0.5, "recall@10": 0.7, "mrr": 0.35, "ndcg@10": 0.41, "queries": 3}
    systems = {s: {"all": metrics, "seen": metrics, "unseen": None, "per_task": {}} for s in ("bm25", "base",
                                                                                             "finetuned")}
    protocol = {"splits": ["dev"], "episodes": ["boil-dev-14"], "tasks": ["boil", "melt"], "train_tasks": ["boil"],
                "unseen_tasks": ["melt"], "theta": 0.8, "rerank_top": None, "relevance_embedder": "minilm",
                "systems": ["bm25", "base", "finetuned"]}
    models = {"embedder": "/m", "reranker": ""}
    report = RunReport(
        stages={"build": 10.0, "train": 20.0},
        build={"episodes": 2, "steps": 40},
        training={"episodes": 2, "train_tasks": ["boil"], "pairs": {"env": 10}, "data_hash": "abc",
                  "embedder": {"model_dir": "/m", "history": [{"epoch": 1, "loss": 1.5}], "epochs_run": 1}},
        retrieval={"protocol": protocol, "kinds": {"env": {"queries": 3, "systems": systems}}},
        agents={"modes": {"none": {"mean_score": 4.0, "per_task": {"boil": 4.0}, "episodes": 1, "tokens": 900}}},
        retrain={"at": "2026-01-01T00:00:00+00:00", "trigger": "run", "trajectories": 4, "train_episodes": 4,
                 "candidate": models, "serving": models, "promoted": False, "reason": "kept the serving model: ...",
                 "candidate_scores": {"shortlist_recall@12": 0.4}, "serving_scores": {"shortlist_recall@12": 0.41}},
        throughput={"expert steps/s": 3.2},
    )
    path = write_report(report, tmp_path)
    text = path.read_text()
    assert report.missing == [] and "Not reached" not in text and "missing sections" not in text
    assert "never seen in training: melt" in text and "| none | 4.0 | 4.0 | 1 | 900 |" in text
    assert "| env | finetuned | 0.200 | 0.500 | 0.700 | 0.350 | 0.410 |" in text
    assert "| nDCG@10 env (bm25 / base / fine-tuned) | 0.410 / 0.410 / 0.410 |" in text
    assert "| retrain decision | kept serving model |" in text and "| embedder loss, first → last epoch" in text
    for png in ("loss.png", "retrieval.png", "agents.png", "throughput.png"):
        assert (tmp_path / png).stat().st_size > 0 and f"({png})" in text
    assert (tmp_path / "report.json").is_file()
