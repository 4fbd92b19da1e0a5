"""Training-pair construction on the committed real gold trajectories (boil-0, find-living-thing-0)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from doubles import HashingEncoder  # tests/unit is on sys.path (pytest prepends it)

import knowmap.environment.episodes as data
from knowmap.environment.episodes import Episode, collect_episodes, load_episodes
from knowmap.environment.sciworld import check_split, check_tasks, episode_id
from knowmap.errors import KnowMapError, SplitError, UnknownTaskError
from knowmap.evaluation.moments import KINDS, eval_queries, subgoal_query
from knowmap.schemas import Subgoal
from knowmap.train.pairs import PairSet, build_pairs

FIXTURES = Path(__file__).parent.parent / "fixtures" / "trajectories"
THETA = 0.5  # the stand-in encoder's scale: gives experience positives between the two fixture tasks


@pytest.fixture(scope="module")
def episodes() -> list[Episode]:
    return load_episodes(FIXTURES, "train")


@pytest.fixture(scope="module")
def pairs(episodes: list[Episode]) -> PairSet:
    return build_pairs(episodes, HashingEncoder(), theta=THETA, max_negatives=3, seed=0)


def _mentions(text: str, action: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(action.lower())}(?!\w)", " ".join(text.lower().split())) is not None


def _subgoal_of(episodes: list[Episode], pair_episode: str, query: str) -> tuple[Episode, list[Subgoal]]:
    """The episode of a pair and its sub-goals whose query the pair's query is (joint: before the facts)."""
    base = query.split("\nKnown facts:")[0]
    episode = next(e for e in episodes if e.episode_id == pair_episode)
    matches = [sg for sg in episode.subgoals if subgoal_query(episode.trajectory, sg) == base]
    assert matches, f"no sub-goal of {pair_episode} has the query {base!r}"
    return episode, matches


def test_every_kind_gets_pairs_and_counts_match(pairs: PairSet) -> None:
    assert all(pairs.counts[kind] > 0 for kind in KINDS), pairs.counts
    assert pairs.counts == {kind: len(getattr(pairs, kind)) for kind in KINDS}
    assert len(pairs.pairs()) == sum(pairs.counts.values())
    assert PairSet.from_dict(pairs.to_dict()).data_hash == pairs.data_hash


def test_pairs_are_deterministic_under_the_seed(episodes: list[Episode], pairs: PairSet) -> None:
    again = build_pairs(list(reversed(episodes)), HashingEncoder(), theta=THETA, max_negatives=3, seed=0)
    assert again.data_hash == pairs.data_hash
    assert [p.model_dump() for p in again.pairs()] == [p.model_dump() for p in pairs.pairs()]
    other = build_pairs(episodes, HashingEncoder(), theta=THETA, max_negatives=3, seed=1)
    assert other.data_hash != pairs.data_hash  # another seed draws other hard negatives...
    assert [(p.query, p.positive) for p in other.pairs()] == [(p.query, p.positive) for p in pairs.pairs()]


def test_env_positives_are_facts_about_the_objects_the_subgoal_acts_on(episodes: list[Episode],
                                                                        pairs: PairSet) -> None:
    for pair in pairs.env:
        episode, subgoals = _subgoal_of(episodes, pair.episode_id, pair.query)
        matching = []
        for sg in subgoals:
            held = {f.text(): f for f in episode.env_kb.as_of(sg.start_step - 1)}
            fact = held.get(pair.positive)
            # The fact held when the query is asked, and names an object one of the sub-goal's actions acts on;
            # the hard negatives are other facts of the same KB at that step.
            if (fact is not None and any(_mentions(a, fact.subject) or _mentions(a, fact.object) for a in sg.actions)
                    and all(n in held for n in pair.negatives)):
                matching.append(sg)
        assert matching, f"{pair.positive!r} is not a fact about an object of the sub-goal's actions"
        assert pair.positive not in pair.negatives


def test_boil_env_pairs_point_at_the_pot_and_the_sink(pairs: PairSet) -> None:
    # Sub-goal 1 of boil-0 (deactivate sink, pick up metal pot, focus on its water) is asked after "activate sink".
    after_sink = {p.positive for p in pairs.env if "Last action: activate sink" in p.query}
    assert "sink contains metal pot" in after_sink
    assert all("sink" in text or "metal pot" in text for text in after_sink)


def test_no_query_contains_the_subgoals_own_actions(episodes: list[Episode], pairs: PairSet) -> None:
    for episode in episodes:
        for sg in episode.subgoals:
            query = subgoal_query(episode.trajectory, sg)
            assert episode.trajectory.task_description.split(".")[0] in query
            leaked = [a for a in sg.actions if _mentions(query, a)]
            assert not leaked, f"query of sub-goal {sg.index} of {episode.episode_id} leaks {leaked}"
    for pair in pairs.pairs():
        episode, subgoals = _subgoal_of(episodes, pair.episode_id, pair.query)
        assert any(not any(_mentions(pair.query, a) for a in sg.actions) for sg in subgoals)


def test_repeated_previous_action_is_left_out_of_the_query(episodes: list[Episode]) -> None:
    boil = next(e for e in episodes if e.task == "boil")
    last = boil.subgoals[-1]  # starts after a "use thermometer ..." that it repeats itself
    previous = boil.trajectory.steps[last.start_step - 1].action
    assert previous in last.actions
    assert "Last action:" not in subgoal_query(boil.trajectory, last)


def test_no_duplicates_or_empty_texts(pairs: PairSet) -> None:
    for kind in KINDS:
        keys = [(p.query, p.positive) for p in getattr(pairs, kind)]
        assert len(keys) == len(set(keys)), f"duplicate {kind} pairs"
    positives_of: dict[tuple[str, str], set[str]] = {}
    for p in pairs.pairs():
        positives_of.setdefault((p.kind, p.query), set()).add(p.positive)
    for p in pairs.pairs():
        assert p.query.strip() and p.positive.strip() and all(n.strip() for n in p.negatives)
        assert len(p.negatives) == len(set(p.negatives)) <= 3
        assert not positives_of[(p.kind, p.query)] & set(p.negatives)  # no positive is another's negative
        assert len(p.query.split()) <= 150


def test_experience_positives_come_from_other_trajectories(episodes: list[Episode], pairs: PairSet) -> None:
    own_texts = {e.episode_id: {sg.text() for sg in e.subgoals} for e in episodes}
    for p in pairs.experience + pairs.joint:
        assert any(p.positive in texts for eid, texts in own_texts.items() if eid != p.episode_id)
    assert all("\nKnown facts: " in p.query for p in pairs.joint)


def test_other_splits_are_refused(episodes: list[Episode]) -> None:
    dev = Episode(trajectory=episodes[0].trajectory.model_copy(update={"split": "dev"}),
                  env_kb=episodes[0].env_kb, subgoals=episodes[0].subgoals)
    with pytest.raises(SplitError, match="train-split episodes only"):
        build_pairs([episodes[1], dev], HashingEncoder())
    # The retrain controller trains on agent rollouts of dev variations its gate never evaluates on; never test.
    assert build_pairs([episodes[1], dev], HashingEncoder(), splits=("train", "dev")).counts["env"] > 0
    with pytest.raises(SplitError, match="test split is for reporting"):
        build_pairs([episodes[1]], HashingEncoder(), splits=("train", "test"))
    with pytest.raises(SplitError, match="allowed: train, dev, test"):
        check_split("validation")
    with pytest.raises(SplitError, match="allowed: train, dev, test"):
        load_episodes(FIXTURES, "eval")
    with pytest.raises(UnknownTaskError, match="valid tasks: .*boil"):
        check_tasks(["boill"])
    with pytest.raises(ValueError, match="theta"):
        build_pairs(episodes, HashingEncoder(), theta=1.5)
    assert load_episodes(FIXTURES, "dev") == []


def test_eval_queries_use_the_training_rules(episodes: list[Episode], pairs: PairSet) -> None:
    queries, corpora, qrels = eval_queries(episodes, "env")
    assert len(queries) == len(corpora) == len(qrels) > 0
    trained = {(p.query, p.positive) for p in pairs.env}
    for query, corpus, relevant in zip(queries, corpora, qrels, strict=True):
        assert relevant and max(relevant) < len(corpus) and len(corpus) == len(set(corpus))
        # Every trained positive of this query is relevant in evaluation.
        assert {pos for q, pos in trained if q == query.text} <= {corpus[i] for i in relevant}
    queries, corpora, qrels = eval_queries(episodes, "experience", embedder=HashingEncoder(), theta=THETA)
    for query, corpus in zip(queries, corpora, strict=True):
        own = next(e for e in episodes if e.episode_id == query.episode_id)
        assert not {sg.text() for sg in own.subgoals} & set(corpus)  # only other trajectories' sub-goals
    with pytest.raises(ValueError, match="pass embedder="):
        eval_queries(episodes, "experience")
    with pytest.raises(ValueError, match="allowed: env, experience, joint"):
        eval_queries(episodes, "facts")


def test_collect_episodes_loads_its_cache_without_a_jvm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_jvm(*args: object, **kwargs: object) -> None:
        raise AssertionError("a fully cached collect_episodes must not start ScienceWorld")

    monkeypatch.setattr(data, "EpisodeRunner", no_jvm)
    (tmp_path / "variations.json").write_text('{"boil/train": [0, 1, 2]}')
    shutil.copy(FIXTURES / "boil-0.json", tmp_path / f"{episode_id('boil', 0, 'train')}.json")
    [episode] = collect_episodes(["boil"], "train", 1, cache_dir=tmp_path)
    assert episode.task == "boil" and len(episode.subgoals) == 6 and len(episode.env_kb) > 0
    [again] = collect_episodes(["boil"], "train", [0], cache_dir=tmp_path)
    assert again.episode_id == episode.episode_id
    with pytest.raises(ValueError, match="variations must be >= 1"):
        collect_episodes(["boil"], "train", 0, cache_dir=tmp_path)
    with pytest.raises(KnowMapError, match="no trajectories folder"):
        load_episodes(tmp_path / "missing", "train")


def test_a_subgoal_that_did_not_raise_the_score_is_never_a_positive_or_a_query(episodes: list[Episode]) -> None:
    """An agent's failed attempt (here: the boil episode replayed with its score falling to -100 at every
    sub-goal) is a hard negative at most: never a positive, never the moment a pair is built from."""
    boil = next(e for e in episodes if e.task == "boil")
    steps = [s.model_copy(update={"score": -100.0 if s.step else 0.0}) for s in boil.trajectory.steps]
    failed_trajectory = boil.trajectory.model_copy(update={"episode_id": "boil-failed", "steps": steps})
    failed = Episode(trajectory=failed_trajectory, subgoals=[
        g.model_copy(update={"episode_id": "boil-failed", "subgoal_id": g.subgoal_id + "-failed",
                             "score_before": 0.0, "score_after": -100.0, "reflection": "the attempt failed"})
        for g in boil.subgoals], env_kb=boil.env_kb)
    result = build_pairs([*episodes, failed], HashingEncoder(), theta=THETA, max_negatives=3, seed=0)
    failed_texts = {g.text() for g in failed.subgoals}
    assert failed_texts and not failed_texts & {g.text() for g in boil.subgoals}
    assert any(failed_texts & set(p.negatives) for p in result.pairs())  # they are hard negatives
    assert result.counts == pairs_counts(episodes)
    for p in result.pairs():
        assert p.episode_id != "boil-failed" and p.positive not in failed_texts


def pairs_counts(episodes: list[Episode]) -> dict[str, int]:
    return build_pairs(episodes, HashingEncoder(), theta=THETA, max_negatives=3, seed=0).counts
