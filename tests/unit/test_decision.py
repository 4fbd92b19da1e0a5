"""Decision support's pure logic: actions typed by ScienceWorld's tables, relevance from the gold answer, and the
metrics. The simulator's tables and the annotations are written out here; tests/integration/test_decision_support.py
reads them from the real JVM."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from knowmap.agent.scaffold import actuator_query, rank_actions, shortlist
from knowmap.config import RetrievalConfig
from knowmap.environment.action_types import type_action, type_classes
from knowmap.environment.episodes import Episode
from knowmap.evaluation.decision import (
    DecisionStep,
    ExperienceDoc,
    decision_steps,
    evaluate_decision,
    experience_corpus,
)
from knowmap.schemas import ActionType, Trajectory

FIXTURE = Path(__file__).parents[1] / "fixtures" / "trajectories" / "find-living-thing-0.json"
TEMPLATES = {0: "open OBJ", 2: "go OBJ", 3: "look around", 4: "look at OBJ", 9: "move OBJ to OBJ", 11: "focus on OBJ",
             13: "use OBJ on OBJ", 21: "pick up OBJ"}
# Object id -> ScienceWorld's type id and referents (getAllObjectIdsTypesReferentsLUTJSON).
REFERENTS = {"1": {"type_id": 47, "referents": ["thermometer"]}, "2": {"type_id": 10, "referents": ["metal pot"]},
             "3": {"type_id": 167, "referents": ["water", "substance in metal pot"]},
             "4": {"type_id": 140, "referents": ["ERROR: SHOULD USE OVERRIDE FOR PORTAL."]},
             "5": {"type_id": 132, "referents": ["kitchen"]}}
COMBOS = [{"action": "pick up thermometer", "template_id": 21, "obj_ids": [1], "type_ids": [47]},
          {"action": "use thermometer on water", "template_id": 13, "obj_ids": [1, 3], "type_ids": [47, 167]},
          {"action": "look at water", "template_id": 4, "obj_ids": [3], "type_ids": [167]},
          {"action": "open door to kitchen", "template_id": 0, "obj_ids": [4], "type_ids": [140]},
          {"action": "go to kitchen", "template_id": 2, "obj_ids": [5], "type_ids": [132]},
          {"action": "look around", "template_id": 3, "obj_ids": [], "type_ids": []}]


def test_type_classes_come_from_the_package_table() -> None:
    classes = type_classes()
    assert classes[10] == "containers.MetalPot" and classes[140] == "portal.Door" and len(classes) > 200


def test_an_action_is_typed_by_template_and_object_types() -> None:
    typed = type_action("pick up thermometer", COMBOS, TEMPLATES, REFERENTS)
    assert typed == ActionType(template="pick up OBJ", objects=["devices.Thermometer"], valid_as="pick up thermometer")
    # Rooms and doors are one class each: the name the action used tells them apart (the portal's referent is junk).
    assert type_action("open door to kitchen", COMBOS, TEMPLATES, REFERENTS).objects == ["portal.Door:door to kitchen"]
    assert type_action("go to kitchen", COMBOS, TEMPLATES, REFERENTS).objects == ["location.Room:kitchen"]
    assert type_action("look around", COMBOS, TEMPLATES, REFERENTS).key() is None  # acts on nothing: judges nothing


def test_a_gold_action_in_other_words_finds_the_valid_action_it_means() -> None:
    # Another referent, a location qualifier, and a verb the enumerator never writes.
    typed = type_action("use thermometer in inventory on substance in metal pot", COMBOS, TEMPLATES, REFERENTS)
    assert typed is not None and typed.valid_as == "use thermometer on water"
    assert typed.objects == ["devices.Thermometer", "substance.Water"]
    assert type_action("examine substance in metal pot", COMBOS, TEMPLATES, REFERENTS).valid_as == "look at water"
    # Valid in the parser, absent from the list (no effect there): typed from the referents, no valid equivalent.
    typed = type_action("pick up metal pot", COMBOS, TEMPLATES, REFERENTS)
    assert typed == ActionType(template="pick up OBJ", objects=["containers.MetalPot"], valid_as=None)
    assert type_action("dance wildly", COMBOS, TEMPLATES, REFERENTS) is None


def _annotated(path: Path = FIXTURE) -> Episode:
    """The fixture with annotations as an annotated replay has them: every step's valid actions (the gold actions
    plus distractors) and each action typed by its verb and its last word as a stand-in type."""
    trajectory = Trajectory.model_validate_json(path.read_text())
    actions = [s.action for s in trajectory.steps]
    distractors = [f"{verb} {thing}" for verb in ("pick up", "look at", "open") for thing in
                   ("table", "chair", "lamp", "sofa", "painting", "bed", "drawer", "cupboard")]
    steps = []
    for s in trajectory.steps:
        words = s.action.split()
        typed = ActionType(template=words[0], objects=[words[-1]] if len(words) > 1 else [], valid_as=s.action)
        steps.append(s.model_copy(update={"valid_actions": sorted(set(actions + distractors)),
                                          "action_type": typed if s.step > 0 else None}))
    return Episode.from_trajectory(trajectory.model_copy(update={"steps": steps, "split": "dev"}))


def test_relevance_comes_from_the_gold_next_action_and_its_subgoal() -> None:
    episode = _annotated()
    steps = decision_steps([episode])
    assert len(steps) == len(episode.trajectory.steps) - 1
    by_step = {s.step: s for s in steps}
    nxt = {s.step - 1: s for s in episode.trajectory.steps[1:]}
    for t, judged in by_step.items():
        assert judged.gold == nxt[t].action  # the gold next action, as it is written in the valid list
        assert nxt[t].action_type.key() is None or nxt[t].action_type.key() in judged.answer_keys
        sg = next(g for g in episode.subgoals if g.start_step <= t + 1 <= g.end_step)
        answer = " ".join(a for n, a in zip(range(sg.start_step, sg.end_step + 1), sg.actions, strict=True)
                          if n > t)
        for i in judged.relevant_facts:  # a relevant fact names an object the answer's actions use
            assert set(re.findall(r"[a-z]{3,}", judged.facts[i])) & set(re.findall(r"[a-z]{3,}", answer)) - {"contains"}
    assert any(s.relevant_facts for s in steps)
    # What the agent knows at the step never includes the action it is about to take (when that is new text).
    assert "focus on dove" not in by_step[5].query


def test_unannotated_train_and_held_out_episodes_are_refused() -> None:
    plain = Episode.from_trajectory(Trajectory.model_validate_json(FIXTURE.read_text()))
    with pytest.raises(ValueError, match="not annotated"):
        decision_steps([Episode.from_trajectory(plain.trajectory.model_copy(update={"split": "dev"}))])
    with pytest.raises(ValueError, match="held-out"):
        decision_steps([plain])  # a train-split episode
    with pytest.raises(ValueError, match="train-split"):
        experience_corpus([_annotated()])  # a dev-split episode is no experience


class Words:
    """A bag-of-words encoder (a test double for an embedder in a unit test of pure logic)."""

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), 4096), dtype=np.float32)
        for row, text in enumerate(texts):
            for w in re.findall(r"[a-z]+", text.lower()):
                out[row, zlib.crc32(w.encode()) % 4096] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def _step(**overrides) -> DecisionStep:
    base = dict(episode_id="e", task="boil", task_description="Boil water.", step=3,
                query="Task: heat it on the stove. Last action: look around",
                facts=("stove is in kitchen", "sofa is red"),
                relevant_facts=frozenset({0}), answer_keys=frozenset({("activate OBJ", "devices.Stove")}),
                gold="activate stove", valid=("activate stove", "activate sink", "go to hallway", "look around"),
                recent=("look around",))
    return DecisionStep(**{**base, **overrides})


def test_metrics_count_only_the_steps_each_can_judge() -> None:
    corpus = [ExperienceDoc(text="Turn the stove on\nActions: activate stove", keys=frozenset({
                  ("activate OBJ", "devices.Stove")})),
              ExperienceDoc(text="Water the plant\nActions: move water to flower pot", keys=frozenset())]
    steps = [_step(), _step(step=4, gold=None, relevant_facts=frozenset(), answer_keys=frozenset())]
    result = evaluate_decision(steps, corpus, embedders={"kb-base": Words()}, k_env=1, k_experience=1,
                               shortlist_size=2, train_tasks=["boil"], protocol={"split": "dev"})
    base = result.modes["kb-base"]
    # Step 4 has no valid gold action and nothing relevant: it judges nothing but is counted in the protocol.
    assert base["steps"] == 1 and base["steps_env"] == 1 and base["steps_experience"] == 1
    assert base["support@1_env"] == 1.0 and base["support@1_experience"] == 1.0
    assert "support@1_env" not in result.modes["none"]  # no knowledge, no support
    # The retrieved sub-goal's action is preferred: it heads the shortlist; with nothing, the rarest overlap wins.
    assert base["shortlist_recall@2"] == 1.0 and base["gold_rank_mean"] == 1.0
    assert result.protocol["split"] == "dev" and result.protocol["steps"] == 2
    assert result.seen is not None and result.unseen is None and result.unseen_families == []


def test_the_shortlist_is_the_actuators_own() -> None:
    step = _step(valid=tuple(f"pick up thing {i}" for i in range(30)) + ("activate stove",))
    result = evaluate_decision([step], [ExperienceDoc(text="x\nActions: look around", keys=frozenset())],
                               embedders={}, shortlist_size=12)
    query = actuator_query("", step.task_description, [])
    ranked = rank_actions(step.valid, query, recent=step.recent)
    listed = shortlist(step.valid, query, size=12, recent=step.recent)
    assert result.modes["none"]["shortlist_recall@12"] == float(step.gold in listed)
    assert result.modes["none"]["gold_rank_mean"] == ranked.index(step.gold) + 1
    assert listed == shortlist(step.valid, query, size=12, recent=step.recent, ranked=ranked)


def test_unseen_is_a_topic_family_not_a_task() -> None:
    corpus = [ExperienceDoc(text="a\nActions: activate stove", keys=frozenset())]
    steps = [_step(task="melt"), _step(task="use-thermometer")]  # melt: Matter, like boil; use-thermometer: not
    result = evaluate_decision(steps, corpus, embedders={}, train_tasks=["boil"])
    assert result.unseen_families == ["Measurement"]
    assert result.seen["none"]["steps"] == 1 and result.unseen["none"]["steps"] == 1
    with pytest.raises(ValueError, match="no step"):
        evaluate_decision([], corpus, embedders={})


class LengthReranker:
    """Prefers short documents: a scorer whose order differs from the first stage's, to see the fusion."""

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []

    def predict(self, pairs):
        self.pairs.extend(pairs)
        return [-len(doc) for _, doc in pairs]


def test_hybrid_and_rerank_modes_fuse_with_the_first_stage_and_score_each_pair_once() -> None:
    corpus = [ExperienceDoc(text="Turn the stove on\nActions: activate stove", keys=frozenset({
                  ("activate OBJ", "devices.Stove")})),
              ExperienceDoc(text="Water the plant\nActions: move water to flower pot", keys=frozenset())]
    reranker = LengthReranker()
    result = evaluate_decision([_step()], corpus, embedders={"kb-base": Words()}, reranker=reranker,
                               settings=RetrievalConfig(rerank_candidates=2),
                               rerank_modes=["kb-base", "kb-base+bm25"], hybrid_modes=["kb-base"], k_env=1,
                               k_experience=1, shortlist_size=2, train_tasks=["boil"])
    assert set(result.modes) == {"none", "bm25", "kb-base", "kb-base+bm25", "kb-base+rerank", "kb-base+bm25+rerank"}
    assert len(reranker.pairs) == len(set(reranker.pairs))  # a pair two modes re-rank is scored once
    # Two candidates: fusing two orders of two items keeps the first stage's winner (1/61 + 1/62 both, tie ->
    # first stage), so no fused mode loses what kb-base found.
    for mode in ("kb-base+bm25", "kb-base+rerank", "kb-base+bm25+rerank"):
        assert result.modes[mode]["support@1_env"] == result.modes["kb-base"]["support@1_env"]
        assert result.modes[mode]["support@1_experience"] == result.modes["kb-base"]["support@1_experience"]
    assert "fusion" in result.protocol
    with pytest.raises(ValueError, match="name no embedder"):
        evaluate_decision([_step()], corpus, embedders={}, hybrid_modes=["kb-base"])
