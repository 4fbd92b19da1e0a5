"""The typed job results write exactly the JSON the jobs wrote as plain dicts: committed result files, the README and
``report.json`` readers depend on its keys, their order, and ints staying ints. Each test starts from a dict in the
old shape (or a committed file), validates it, dumps it and compares the JSON text."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from doubles import HashingEncoder  # tests/unit is on sys.path (pytest prepends it)

from knowmap.environment.episodes import load_episodes
from knowmap.evaluation.retrieval import evaluate_retrieval
from knowmap.jobs.build import BuildSummary, EpisodeSummary
from knowmap.jobs.report import RunReport
from knowmap.results import AgentEvaluation, RetrievalEvaluation, RetrievalProtocol, TrainingReport
from knowmap.schemas import RetrainDecision

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
FIXTURES = ROOT / "tests" / "fixtures" / "trajectories"

METRICS = {"recall@1": 0.25, "recall@5": 0.5, "recall@10": 1.0, "mrr": 0.4166666666666667, "ndcg@10": 0.5,
           "queries": 4}
SEEN = {**METRICS, "queries": 3}
RETRIEVAL = {  # what evaluate_split wrote before the results were typed
    "protocol": {"splits": ["dev"], "episodes": ["boil-dev-14-expert", "melt-dev-14-expert"], "tasks": ["boil", "melt"],
                 "train_tasks": ["boil"], "unseen_tasks": ["melt"], "theta": 0.8, "rerank_top": 20,
                 "relevance_embedder": "all_minilm_l6_v2_08446e8ea8", "systems": ["bm25", "base", "finetuned"],
                 "embedder": "/d/models/embedder-a9ec", "reranker": None, "variations": 1},
    "kinds": {
        "env": {"queries": 4, "systems": {
            "bm25": {"all": METRICS, "seen": SEEN, "unseen": {**METRICS, "queries": 1},
                     "per_task": {"boil": SEEN, "melt": {**METRICS, "queries": 1}}},
            "finetuned": {"all": {**METRICS, "ndcg@10": 0.75}, "seen": SEEN, "unseen": None,
                          "per_task": {"boil": SEEN}}}},
        "experience": {"queries": 0, "systems": {
            "bm25": {"all": {**METRICS, "recall@1": 0.0, "queries": 0}, "seen": None, "unseen": None, "per_task": {}}}},
    },
}
HISTORY = [{"epoch": 1, "loss": 1.25, "samples_per_s": 40.5, "run_id": "r1", "step_losses": [1.5, 1.0]}]
TRAINING = {"episodes": 2, "train_tasks": ["boil", "find-living-thing"], "pairs": {"env": 12, "experience": 0,
                                                                                   "joint": 3},
            "data_hash": "0123456789abcdef", "embedder": {"model_dir": "/d/models/e", "history": HISTORY,
                                                          "epochs_run": 1},
            "reranker": {"model_dir": "/d/models/r", "history": HISTORY, "epochs_run": 0}}


def same_json(model: object, old: dict) -> None:
    """``model`` dumps to ``old``: equal, and the same text (so key order and int-vs-float agree too)."""
    dumped = model.model_dump(mode="json")
    assert dumped == old
    assert json.dumps(dumped, indent=2) == json.dumps(old, indent=2)


def test_retrieval_evaluation_round_trips_the_old_json() -> None:
    evaluation = RetrievalEvaluation.model_validate(RETRIEVAL)
    same_json(evaluation, RETRIEVAL)
    assert evaluation.ndcg("env", "finetuned") == 0.75 and evaluation.ndcg("env", "finetuned", "unseen") is None
    assert evaluation.metric("env", "bm25", "queries", subset="unseen") == 1
    assert evaluation.ndcg_by_kind("bm25") == {"env": 0.5, "experience": 0.5}
    with pytest.raises(KeyError, match="evaluated: bm25, finetuned"):
        evaluation.ndcg("env", "base")
    with pytest.raises(KeyError, match="evaluated: env, experience"):
        evaluation.ndcg("joint", "bm25")
    with pytest.raises(ValueError, match="allowed: all, seen, unseen"):
        evaluation.ndcg("env", "bm25", subset="dev")


def test_protocol_leaves_out_the_models_until_they_are_recorded() -> None:
    old = copy.deepcopy(RETRIEVAL["protocol"])
    for key in ("embedder", "reranker", "variations"):
        del old[key]  # what evaluate_retrieval alone produced
    protocol = RetrievalProtocol.model_validate(old)
    same_json(protocol, old)
    protocol.record_models(embedder=None, reranker=None, variations=2)
    assert protocol.model_dump(mode="json") == old | {"embedder": None, "reranker": None, "variations": 2}


def test_evaluate_retrieval_dumps_json_that_validates_back_to_itself(tmp_path: Path) -> None:
    episodes = load_episodes(FIXTURES, "train")
    evaluation = evaluate_retrieval(episodes, embedders={"hashing": HashingEncoder()}, train_tasks=["boil"])
    written = json.loads(json.dumps(evaluation.model_dump(mode="json")))
    same_json(RetrievalEvaluation.model_validate(written), written)
    assert list(written["protocol"])[-1] == "systems"  # nothing recorded by eval-retrieval: keys left out
    assert isinstance(written["kinds"]["env"]["systems"]["bm25"]["all"]["queries"], int)


def test_the_committed_protocol_validates_to_the_same_keys() -> None:
    protocol = json.loads((RESULTS / "retrieval_quality.json").read_text())["details"]["protocol"]
    own = {k: v for k, v in protocol.items() if k not in ("epochs", "train_variations", "train_split", "eval_split")}
    same_json(RetrievalProtocol.model_validate(protocol), own)  # the benchmark adds the other four itself


def test_training_report_round_trips_with_and_without_a_reranker() -> None:
    report = TrainingReport.model_validate(TRAINING)
    same_json(report, TRAINING)
    assert report.reranker_dir == "/d/models/r" and list(report.models()) == ["embedder", "reranker"]
    assert report.embedder.final_loss == 1.25
    without = {k: v for k, v in TRAINING.items() if k != "reranker"}  # `train --no-reranker`: no key at all
    report = TrainingReport.model_validate(without)
    same_json(report, without)
    assert report.reranker_dir == "" and list(report.models()) == ["embedder"]


def test_the_committed_agent_evaluation_round_trips_byte_for_byte() -> None:
    text = (RESULTS / "agent_eval_smollm2.json").read_text()
    evaluation = AgentEvaluation.model_validate_json(text)
    assert json.dumps(evaluation.model_dump(mode="json"), indent=2) == text
    assert evaluation.modes["kb-base"].tokens.total == 52603 + 1844
    assert evaluation.tasks == ["find-living-thing", "find-non-living-thing", "find-plant"]


def test_run_report_json_keeps_its_sections_shape() -> None:
    build = {"episodes": 1, "steps": 12, "facts": 80, "subgoals": 3, "env_kb_dir": "/d/env_kb",
             "experience_store": "/d/kb.db", "experience_collection": "exp_x", "experience_rows": 4, "seconds": 9.5}
    agents = {"modes": {"none": {"mean_score": None, "per_task": {}, "episodes": 1, "failed": 1, "steps": 0,
                                 "tokens": 0}},
              "episodes": [{"mode": "none", "task": "boil", "variation": 14, "ok": False, "score": None,
                            "raw_score": 0.0, "steps": 0, "episode_id": "", "prompt_tokens": 0,
                            "completion_tokens": 0, "llm_calls": 0, "replans": 0, "invalid_answers": 0, "plan": [],
                            "facts_retrieved": 0, "experience_retrieved": 0, "seconds": 0.5, "error": "LLMError: x"}],
              "variations": {"boil": [16]}, "step_limit": 10}
    models = {"embedder": "/d/models/e", "reranker": "", "train_tasks": ["boil"],
              "scores": {"shortlist_recall@12": 0.5}, "since": ""}
    retrain = {"at": "2026-01-01T00:00:00+00:00", "trigger": "knowmap run", "trajectories": 3, "train_episodes": 2,
               "candidate": models, "serving": models, "candidate_scores": {"shortlist_recall@12": 0.5},
               "serving_scores": {"shortlist_recall@12": 0.5},
               "gate_episodes": ["boil-dev-14"], "promoted": False, "reason": "kept the serving model", "seconds": 3.5}
    old = {"protocol": {"preset": "quick", "cpus": 2}, "stages": {"build": 9.5, "train": 30.0}, "build": build,
           "training": TRAINING, "retrieval": RETRIEVAL, "agents": agents, "retrain": retrain,
           "throughput": {"expert replay steps/s (pool, incl. KB writes)": 1.25},
           "serve": {"url": "http://127.0.0.1:8000", "retrieve p50 ms": 12.5, "retrieve items (last)": 5},
           "errors": []}
    report = RunReport.model_validate(old)
    same_json(report, old)
    # A decision written when the gate compared nDCG@10 still loads: its numbers under the new names.
    before = {**retrain, "candidate_ndcg": {"env": 0.4}, "serving_ndcg": {"env": 0.41},
              "candidate": {**models, "ndcg": {"env": 0.4}}}
    for name in ("candidate_scores", "serving_scores"):
        before.pop(name)
    before["candidate"].pop("scores")
    loaded = RetrainDecision.model_validate(before)
    assert loaded.candidate_scores == {"env": 0.4} and loaded.candidate.scores == {"env": 0.4}
    assert report.missing == [] and report.retrieval.ndcg("env", "bm25") == 0.5

    # The run holds the whole build summary; report.json keeps its counts, not every episode.
    summary = BuildSummary.model_validate(build)
    summary.per_episode.append(EpisodeSummary(episode_id="e", task="boil", variation=0, steps=12, final_score=100.0,
                                              facts=80, current_facts=40, subgoals=3, seconds=9.0))
    same_json(RunReport(build=summary), {**RunReport().model_dump(mode="json"), "build": build})
