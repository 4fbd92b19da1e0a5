"""The experiential KB on a real Milvus Lite file and a real Milvus server, with the real packaged MiniLM:
idempotent adds, filters, round-trips, and durability across closing and reopening the store."""

from __future__ import annotations

import pytest

from knowmap.kb.experience_kb import ExperienceKB
from knowmap.kb.vectorstore import VectorStore
from knowmap.models.embedder import Embedder
from knowmap.schemas import StepRecord, Subgoal, Trajectory, Triple, stable_id

pytestmark = pytest.mark.integration

BOIL = [("go to kitchen", "move the metal pot to the stove"), ("activate stove", "wait"),
        ("focus on water", "look at metal pot"), ("use thermometer in metal pot", "wait")]
GROW = [("go to greenhouse", "pick up seed"), ("move seed to flower pot 1", "water flower pot 1")]


def episode(task: str, variation: int, plan: list[tuple[str, str]], source: str = "expert",
            ) -> tuple[Trajectory, list[Subgoal]]:
    """A trajectory of ``plan`` (one sub-goal per pair of actions, each raising the score) and its sub-goals."""
    episode_id = stable_id(task, variation, "train", source)
    actions = [a for pair in plan for a in pair]
    steps = [StepRecord(step=0, action="look around", observation="You are in the hallway.", score=0.0)]
    steps += [StepRecord(step=i + 1, action=a, observation=f"did {a}", score=100.0 * (i // 2 + 1) / len(plan)
                         if i % 2 else 100.0 * (i // 2) / len(plan)) for i, a in enumerate(actions)]
    goals = [Subgoal(subgoal_id=stable_id(episode_id, i), episode_id=episode_id, task=task, variation=variation,
                     split="train", source=source, index=i, start_step=2 * i + 1, end_step=2 * i + 2,
                     actions=list(pair), objects=[pair[0].split()[-1]],
                     facts=[Triple(subject=pair[0].split()[-1], relation="location", object="kitchen")],
                     score_before=100.0 * i / len(plan), score_after=100.0 * (i + 1) / len(plan),
                     description=f"{task}: {pair[0]} then {pair[1]}", reflection="the score rose")
             for i, pair in enumerate(plan)]
    trajectory = Trajectory(episode_id=episode_id, task=task, variation=variation, split="train", source=source,
                            task_description=f"Your task is to {task}.", steps=steps)
    return trajectory, goals


@pytest.fixture
def kb(store_uri: str, embedder: Embedder) -> ExperienceKB:
    store = VectorStore(store_uri)
    yield ExperienceKB(store, embedder)
    store.close()


def test_collection_is_named_after_the_embedder_version(kb: ExperienceKB, embedder: Embedder) -> None:
    assert kb.collection == f"knowmap_{embedder.version}"
    assert kb.store.list_collections() == [kb.collection] and kb.count() == 0


def test_adding_a_trajectory_twice_creates_no_duplicates(kb: ExperienceKB) -> None:
    trajectory, goals = episode("boil", 0, BOIL)
    assert kb.add_trajectory(trajectory, goals) == len(goals) + 1
    assert kb.add_trajectory(trajectory, goals) == len(goals) + 1
    assert kb.count() == len(goals) + 1
    assert kb.count(kind="subgoal") == len(goals) and kb.count(kind="trajectory") == 1
    assert kb.has_episode(trajectory.episode_id) and not kb.has_episode("never-seen")


def test_fewer_subgoals_on_re_add_leave_no_stale_rows(kb: ExperienceKB) -> None:
    trajectory, goals = episode("boil", 0, BOIL)
    other, other_goals = episode("grow-plant", 1, GROW)
    kb.add_trajectory(trajectory, goals)
    kb.add_trajectory(other, other_goals)
    kb.add_trajectory(trajectory, goals[:2])
    assert kb.count(episode_id=trajectory.episode_id) == 3
    assert [g.index for g in kb.get_subgoals(trajectory.episode_id)] == [0, 1]
    assert kb.count(episode_id=other.episode_id) == len(other_goals) + 1  # other episodes untouched
    with pytest.raises(ValueError, match="pass each trajectory with its own sub-goals"):
        kb.add_trajectory(trajectory, other_goals)


def test_search_filters_by_task_kind_and_source(kb: ExperienceKB) -> None:
    for args in [("boil", 0, BOIL), ("grow-plant", 0, GROW), ("boil", 1, BOIL, "agent")]:
        kb.add_trajectory(*episode(*args))
    query = "put the seed into the flower pot and water it"
    anywhere = kb.search(query, k=3)
    assert anywhere[0].provenance["task"] == "grow-plant" and anywhere[0].score > anywhere[-1].score
    boil = kb.search(query, k=20, task="boil")
    assert len(boil) == 2 * len(BOIL) and {h.provenance["task"] for h in boil} == {"boil"}
    assert all(h.provenance["kind"] == "subgoal" for h in boil)
    agent = kb.search("heat the water", k=20, source="agent")
    assert len(agent) == len(BOIL) and {h.provenance["source"] for h in agent} == {"agent"}
    [summary] = kb.search("boil water", k=5, task="boil", kind="trajectory", source="expert")
    assert summary.provenance["kind"] == "trajectory" and summary.provenance["final_score"] == 100.0
    assert summary.text.startswith("Task: Your task is to boil.") and "activate stove" in summary.text
    top = boil[0].provenance
    assert {"episode_id", "task", "variation", "index", "subgoal_id", "source", "split"} <= top.keys()
    with pytest.raises(ValueError, match="kind must be one of"):
        kb.search(query, kind="fact")


def test_get_subgoals_round_trips(kb: ExperienceKB) -> None:
    trajectory, goals = episode("boil", 0, BOIL)
    kb.add_trajectory(trajectory, goals)
    assert kb.get_subgoals(trajectory.episode_id) == goals
    assert sorted(kb.iter_subgoals(), key=lambda g: g.index) == goals
    rows = list(kb.export_rows(kind="trajectory"))
    assert len(rows) == 1 and rows[0]["meta"]["actions"] == trajectory.actions


def test_rows_survive_closing_and_reopening_the_store(store_uri: str, embedder: Embedder) -> None:
    uri = store_uri
    trajectory, goals = episode("boil", 0, BOIL)
    store = VectorStore(uri)
    kb = ExperienceKB(store, embedder)
    kb.add_trajectory(trajectory, goals)
    before = [(h.id, round(h.score, 5)) for h in kb.search("heat the pot on the stove", k=3)]
    store.close()  # releases the Lite file lock, so the file can be opened again (here or by another process)
    with VectorStore(uri) as reopened:
        kb = ExperienceKB(reopened, embedder)
        assert kb.count() == len(goals) + 1
        assert kb.get_subgoals(trajectory.episode_id) == goals
        assert [(h.id, round(h.score, 5)) for h in kb.search("heat the pot on the stove", k=3)] == before


def test_copy_from_re_indexes_into_another_collection(kb: ExperienceKB, embedder: Embedder) -> None:
    for args in [("boil", 0, BOIL), ("grow-plant", 0, GROW)]:
        kb.add_trajectory(*episode(*args))
    target = ExperienceKB(kb.store, embedder, collection_prefix="reindexed")
    assert target.copy_from(kb, batch_size=4) == kb.count() == target.count()
    assert target.search("water the seed", k=1)[0].id == kb.search("water the seed", k=1)[0].id


def test_a_tenant_sees_shared_experience_and_its_own_never_another_tenants(kb: ExperienceKB) -> None:
    """The filter the service puts on every retrieve, on the real store: an old agent row without meta.tenant is
    seen by nobody, the deployment's own rows by everyone, a contribution by its tenant only; deletes are whole."""
    from knowmap.tenancy import experience_filter

    rows = {}
    for name, tenant, source in [("expert", "", "expert"), ("own", "", "agent"), ("acme", "acme", "agent"),
                                 ("beta", "beta", "agent")]:
        trajectory, goals = episode("boil", len(rows), BOIL, source)
        kb.add_trajectory(trajectory.model_copy(update={"tenant": tenant}), goals)
        rows[name] = trajectory.episode_id
    legacy, goals = episode("boil", 9, BOIL, "agent")
    kb.add_trajectory(legacy, goals)
    kb.store.upsert(kb.collection, [{**r, "meta": {k: v for k, v in r["meta"].items() if k != "tenant"}}
                                    for r in kb.store.iterate(kb.collection, {"episode_id": legacy.episode_id},
                                                              with_vectors=True)])

    def seen(tenant: str, **narrow: str) -> set[str]:
        hits = kb.search("boil the water in the metal pot", k=100, where=experience_filter(tenant, **narrow))
        return {next(n for n, e in rows.items() if e == h.provenance["episode_id"]) for h in hits}

    assert seen("acme") == {"expert", "own", "acme"} and seen("beta") == {"expert", "own", "beta"}
    assert seen("gamma") == {"expert", "own"} and seen("acme", owner="mine") == {"acme"}
    assert seen("acme", owner="shared") == {"expert", "own"} and seen("acme", source="agent") == {"own", "acme"}
    assert seen("acme", split="test") == set()
    assert kb.delete_episode(rows["acme"]) == len(BOIL) + 1 and seen("acme") == {"expert", "own"}
    assert kb.delete_episode(rows["acme"]) == 0
