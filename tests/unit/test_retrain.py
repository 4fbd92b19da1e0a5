"""The retrain controller's logic: the gate, when a cycle starts, the order of promotion, persisted state.

Training and evaluation are replaced by fixed scores here; the real thing (Ray Train on real pairs, real
evaluation) is tested in tests/ray/test_retrain_gate.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from knowmap.config import load_config
from knowmap.errors import KnowMapError
from knowmap.jobs.retrain import MEAN_COSINE, RetrainController, decide
from knowmap.schemas import ServingModels


def test_gate_promotes_only_a_better_mean() -> None:
    recall, support = "shortlist_recall@12", "support@3_experience"
    promote, reason = decide({recall: 0.6, support: 0.5}, {recall: 0.5, support: 0.5})
    assert promote and "0.550 vs serving 0.500" in reason and "gold next actions" in reason
    promote, reason = decide({recall: 0.6, support: 0.3}, {recall: 0.5, support: 0.5})
    assert not promote and "kept the serving model" in reason
    assert not decide({recall: 0.52}, {recall: 0.5}, min_gain=0.05)[0]  # a gain within the margin is not enough
    with pytest.raises(KnowMapError, match="same metrics"):
        decide({recall: 0.6}, {support: 0.5})


def test_gate_never_promotes_a_collapsed_embedder() -> None:
    recall = "shortlist_recall@12"
    promote, reason = decide({recall: 0.9, MEAN_COSINE: 0.9999}, {recall: 0.5, MEAN_COSINE: 0.41})
    assert not promote and "collapsed" in reason and "0.9999" in reason and "0.900 vs serving 0.500" in reason
    assert decide({recall: 0.9, MEAN_COSINE: 0.8}, {recall: 0.5, MEAN_COSINE: 0.41})[0]  # spread, and better
    promote, reason = decide({recall: 0.4, MEAN_COSINE: 0.5}, {recall: 0.6, MEAN_COSINE: 1.0})
    assert promote and "serving embedder has collapsed" in reason  # the serving model's scores were noise


class Scripted(RetrainController):
    """The controller with training and evaluation replaced by scripted candidates and scores."""

    def __init__(self, config, scores, **kwargs) -> None:
        self.scores, self.trained = list(scores), 0
        super().__init__(config, **kwargs)

    def gate_episodes(self):
        return [SimpleNamespace(task="boil", split="dev", episode_id="boil-dev-0", trajectory=SimpleNamespace(
            variation=0))]

    def training_episodes(self, held_out):
        assert held_out == {("boil", "dev", 0)}
        return ["episode"] * 3

    def _train(self, episodes):
        self.trained += 1
        return ServingModels(embedder=f"/models/embedder-{self.trained}", reranker=f"/models/reranker-{self.trained}")

    def _evaluate(self, gate, models):
        candidate, serving = self.scores.pop(0)
        return {"candidate": {"env": candidate}, "serving": {"env": serving}}


@pytest.fixture
def setup(tmp_path):
    config = load_config(data_dir=tmp_path, retrain={"every": 3})
    calls: list[tuple[str, str]] = []
    box = {"count": 0}
    make = lambda scores: Scripted(  # noqa: E731
        config, scores, count_trajectories=lambda: box["count"],
        reindex=lambda path: calls.append(("reindex", path)), swap=lambda m: calls.append(("swap", m.embedder)))
    return config, calls, box, make


def test_a_cycle_starts_after_k_new_trajectories_and_promotes_a_better_model(setup) -> None:
    config, calls, box, make = setup
    controller = make([(0.7, 0.5)])
    box["count"] = 2
    assert controller.maybe_retrain() is None and controller.trained == 0
    box["count"] = 3
    decision = controller.maybe_retrain()
    assert decision["promoted"] and decision["trigger"] == "new-trajectories"
    # The new collection is complete before the service switches to it.
    assert calls == [("reindex", "/models/embedder-1"), ("swap", "/models/embedder-1")]
    status = controller.status()
    assert status["serving"]["embedder"] == "/models/embedder-1" and status["previous"]["embedder"] == ""
    assert status["trajectories_at_last_cycle"] == 3 and controller.pending() == 0
    assert (config.paths.latest_models).read_text().count("/models/embedder-1") == 1


def test_a_worse_candidate_is_rejected_and_the_reason_kept_across_restarts(setup) -> None:
    config, calls, box, make = setup
    box["count"] = 5
    controller = make([(0.4, 0.5)])
    decision = controller.retrain()
    assert not decision["promoted"] and "kept the serving model" in decision["reason"] and calls == []
    reopened = make([])
    assert reopened.status()["last_decision"]["reason"] == decision["reason"]
    assert reopened.status()["serving"]["embedder"] == "" and reopened.pending() == 0


def test_rollback_serves_the_previous_model_again(setup) -> None:
    _, calls, box, make = setup
    box["count"] = 3
    controller = make([(0.7, 0.5)])
    with pytest.raises(KnowMapError, match="nothing to roll back"):
        controller.rollback()
    controller.retrain()
    status = controller.rollback()
    assert status["serving"]["embedder"] == "" and status["previous"]["embedder"] == "/models/embedder-1"
    assert calls[-2:] == [("reindex", ""), ("swap", "")]


def test_a_corrupt_state_file_is_an_error_not_a_fresh_start(setup) -> None:
    config, _, _, make = setup
    path = config.data_dir / "retrain" / "state.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(KnowMapError, match="corrupt"):
        make([])


def test_the_controller_reads_training_and_gate_results_by_attribute(setup, monkeypatch) -> None:
    """``_train`` and ``_evaluate`` on the typed results, with training and evaluation replaced by fixed values."""
    import knowmap.evaluation.decision
    import knowmap.jobs.training
    import knowmap.models.embedder
    from knowmap.results import DecisionEvaluation, TrainingReport

    config, *_ = setup
    report = TrainingReport(episodes=3, train_tasks=["boil"], pairs={"env": 5}, data_hash="h",
                            embedder={"model_dir": "/models/embedder-new"})  # retrain.reranker off: none trained
    calls: list[dict] = []
    monkeypatch.setattr(knowmap.jobs.training, "train_retriever", lambda *a, **k: calls.append(k) or report)
    # The dense pipeline (retrieval.hybrid off): the fixed evaluation below names each side's mode by its name alone.
    config = config.model_copy(update={"retrieval": config.retrieval.model_copy(update={"hybrid": False})})
    controller = RetrainController(config, count_trajectories=lambda: 0)
    controller.state.serving.reranker = "/models/reranker-serving"
    candidate = controller._train(["episode"])
    assert candidate.embedder == "/models/embedder-new" and candidate.reranker == "/models/reranker-serving"
    assert candidate.train_tasks == ["boil"]
    assert calls[-1]["start_embedder"] == "" and calls[-1]["tag"] == "r1"  # from the base model by default
    controller.config = config.model_copy(update={"retrain": config.retrain.model_copy(update={"warm_start": True})})
    controller.state.serving.embedder = "/models/embedder-serving"
    controller._train(["episode"])
    assert calls[-1]["start_embedder"] == "/models/embedder-serving" and calls[-1]["tag"] == "r1-warm"
    assert calls[-1]["start_reranker"] == "/models/reranker-serving"

    evaluation = DecisionEvaluation(protocol={}, modes={
        "none": {"shortlist_recall@12": 0.3, "steps": 4},
        "serving": {"shortlist_recall@12": 0.5, "support@3_experience": 0.25, "support@5_env": 0.5, "steps": 4},
        "candidate": {"shortlist_recall@12": 0.75, "support@5_env": 1.0, "steps": 4}})  # no experience step
    monkeypatch.setattr(knowmap.models.embedder, "Embedder", lambda path, device=None, traced_dir=None: path)
    monkeypatch.setattr(knowmap.evaluation.decision, "decision_steps", lambda *a, **k: [])
    monkeypatch.setattr(knowmap.evaluation.decision, "experience_corpus", lambda *a, **k: [])
    judged: list[dict] = []
    monkeypatch.setattr(knowmap.evaluation.decision, "evaluate_decision",
                        lambda *a, **k: judged.append(k) or evaluation)
    monkeypatch.setattr(RetrainController, "gate_episodes", lambda self, split="dev": [])
    scores = controller._evaluate([], {"serving": ServingModels(embedder=""),
                                       "candidate": ServingModels(embedder="/models/embedder-new")})
    assert scores == {"serving": {"shortlist_recall@12": 0.5, "support@3_experience": 0.25, "support@5_env": 0.5},
                      "candidate": {"shortlist_recall@12": 0.75, "support@5_env": 1.0}}
    assert [k["settings"] for k in judged] == [config.retrieval] * 2  # the gate ranks as the service does
    with pytest.raises(KnowMapError, match="same metrics"):  # a metric one model lacks is never compared
        decide(scores["candidate"], scores["serving"])


def test_a_watch_survives_a_failed_cycle_and_resumes_from_the_state_file(setup) -> None:
    config, calls, box, make = setup
    controller = make([(0.7, 0.5)])
    failures = {"left": 1}
    train = controller._train

    def flaky(episodes):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("a Ray Train worker died")
        return train(episodes)

    controller._train = flaky
    box["count"] = 3
    seen: list[tuple[int, object]] = []
    cycles = controller.watch(poll_seconds=0.01, max_cycles=1, progress=lambda n, d: seen.append((n, d)))
    assert cycles == 1 and failures["left"] == 0
    assert seen[0] == (3, None)  # the failed poll: nothing promoted, the trajectories still pending
    assert seen[-1][0] == 0 and seen[-1][1]["promoted"]
    assert make([]).status()["serving"]["embedder"] == "/models/embedder-1"  # a restarted watch resumes here


def test_retrain_watch_prints_progress_and_decisions(setup, monkeypatch) -> None:
    import contextlib

    from typer.testing import CliRunner

    import knowmap.jobs.retrain
    import knowmap.jobs.session
    from knowmap.jobs.cli import app

    config, calls, box, make = setup
    controller = make([(0.7, 0.5)])
    box["count"] = 3
    monkeypatch.setattr(knowmap.jobs.retrain, "RetrainController", lambda config: controller)
    monkeypatch.setattr(knowmap.jobs.session, "ray_session", lambda config: contextlib.nullcontext())
    result = CliRunner().invoke(app, ["retrain", "watch", "--max-cycles", "1", "--poll", "0.1",
                                      "--data-dir", str(config.data_dir)])
    assert result.exit_code == 0, result.output
    assert "promoted: candidate mean decision support 0.700 vs serving 0.500" in result.output
    assert "0/3 new trajectories towards the next cycle; serving embedder-1; 1 cycles so far" in result.output
    refused = CliRunner().invoke(app, ["retrain", "watch", "--detach", "--data-dir", str(config.data_dir)])
    assert refused.exit_code != 0 and "--detach needs a cluster" in str(refused.exception)
