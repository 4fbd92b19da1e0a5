"""Replacement and history semantics of the environmental KB, on triples (no extractor, no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from knowmap.errors import KnowMapError, SnapshotError
from knowmap.kb.environment_kb import EnvironmentKB
from knowmap.models.retrieval import Retriever
from knowmap.schemas import Relation, Triple


def t(s: str, r: str, o: str) -> Triple:
    return Triple(subject=s, relation=Relation(r), object=o)


def objects(facts) -> list[tuple[str, str, str]]:
    return sorted((f.subject, f.relation.value, f.object) for f in facts)


def test_door_opened_then_closed_keeps_history_with_step_ranges() -> None:
    kb = EnvironmentKB("env-1")
    kb.ingest_triples(0, [t("door to kitchen", "open_state", "closed")])
    kb.ingest_triples(1, [t("door to kitchen", "open_state", "open")])
    kb.ingest_triples(5, [t("door to kitchen", "open_state", "closed")])

    history = kb.history("door to kitchen", "open_state")
    assert [(f.object, f.valid_from, f.valid_to) for f in history] == [
        ("closed", 0, 1), ("open", 1, 5), ("closed", 5, None)]
    assert [f.object for f in kb.current() if f.subject == "door to kitchen"] == ["closed"]
    assert [f.object for f in kb.as_of(3) if f.subject == "door to kitchen"] == ["open"]
    assert [f.object for f in kb.as_of(0) if f.subject == "door to kitchen"] == ["closed"]


def test_object_moved_twice_updates_location_and_both_containers() -> None:
    kb = EnvironmentKB("env-1")
    kb.ingest_triples(2, [t("cupboard", "contains", "metal pot")])
    kb.ingest_triples(3, [t("metal pot", "location", "inventory")])
    kb.ingest_triples(6, [t("metal pot", "location", "sink")])

    assert [(f.object, f.valid_from, f.valid_to) for f in kb.history("metal pot", "location")] == [
        ("cupboard", 2, 3), ("inventory", 3, 6), ("sink", 6, None)]
    now = objects(kb.current())
    assert ("sink", "contains", "metal pot") in now
    assert ("cupboard", "contains", "metal pot") not in now
    assert ("inventory", "contains", "metal pot") not in now
    assert ("inventory", "contains", "metal pot") in objects(kb.as_of(4))
    assert [(f.valid_from, f.valid_to) for f in kb.history("inventory", "contains")] == [(3, 6)]


def test_full_set_replaces_contents_and_empty_set_closes_all() -> None:
    kb = EnvironmentKB("env-1")
    kb.ingest_triples(1, [t("table", "contains", "glass cup"), t("table", "contains", "apple")],
                      full_sets=[("table", "contains")])
    kb.ingest_triples(4, [t("table", "contains", "apple")], full_sets=[("table", "contains")])
    assert objects(kb.about(["table"])) == [("apple", "location", "table"), ("table", "contains", "apple")]
    # The glass cup left the table: its location there is closed too, not silently dropped.
    assert [(f.object, f.valid_from, f.valid_to) for f in kb.history("glass cup", "location")] == [("table", 1, 4)]
    kb.ingest_triples(7, [], full_sets=[("table", "contains")])
    assert kb.about(["table"]) == []
    assert len(kb.history("table", "contains")) == 2


def test_partial_observation_adds_to_a_set_without_closing() -> None:
    kb = EnvironmentKB("env-1")
    kb.ingest_triples(1, [t("kitchen", "connects_to", "hallway")])
    kb.ingest_triples(2, [t("kitchen", "connects_to", "outside")])
    assert {f.object for f in kb.current() if f.relation is Relation.CONNECTS_TO} == {"hallway", "outside"}


def test_one_name_is_one_object_so_its_last_container_wins() -> None:
    """Namesakes in two containers get two names from the extractor ("drawer in counter", "drawer in cupboard");
    given one name twice, the KB keeps one object in one place."""
    kb = EnvironmentKB("env-1")
    kb.ingest_triples(1, [t("counter", "contains", "drawer"), t("cupboard", "contains", "drawer")])
    now = objects(kb.current())
    assert ("cupboard", "contains", "drawer") in now and ("counter", "contains", "drawer") not in now
    kb.ingest_triples(2, [t("counter", "contains", "drawer in counter"),
                          t("cupboard", "contains", "drawer in cupboard")])
    now = objects(kb.current())
    assert ("counter", "contains", "drawer in counter") in now and ("cupboard", "contains", "drawer in cupboard") in now


def test_repeated_observation_changes_nothing() -> None:
    kb = EnvironmentKB("env-1")
    assert kb.ingest_triples(1, [t("stove", "power_state", "off")]) == 1
    assert kb.ingest_triples(2, [t("stove", "power_state", "off")]) == 0
    assert len(kb) == 1


def test_going_back_in_time_is_refused() -> None:
    kb = EnvironmentKB("env-1")
    kb.ingest_triples(5, [t("stove", "power_state", "off")])
    with pytest.raises(KnowMapError, match="before the last ingested step 5"):
        kb.ingest_triples(4, [t("stove", "power_state", "on")])


def test_full_set_on_single_valued_relation_is_refused() -> None:
    with pytest.raises(KnowMapError, match="single-valued"):
        EnvironmentKB("env-1").ingest_triples(1, [], full_sets=[("stove", "power_state")])


def test_snapshot_round_trip(tmp_path) -> None:
    kb = EnvironmentKB("env-1")
    kb.ingest_triples(0, [t("door to kitchen", "open_state", "closed")])
    kb.ingest_triples(1, [t("door to kitchen", "open_state", "open"), t("cupboard", "contains", "pot")])
    path = kb.save(tmp_path / "kb.json")
    restored = EnvironmentKB.load(path)
    assert restored.env_id == "env-1" and restored.last_step == 1
    assert objects(restored.current()) == objects(kb.current())
    assert restored.history("door to kitchen", "open_state") == kb.history("door to kitchen", "open_state")
    # The restored KB goes on applying the replacement rule to its open facts.
    restored.ingest_triples(2, [t("door to kitchen", "open_state", "closed")])
    assert [f.object for f in restored.current() if f.subject == "door to kitchen"] == ["closed"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_snapshot_raises_and_never_loads_empty(tmp_path, damage: str) -> None:
    kb = EnvironmentKB("env-1")
    kb.ingest_triples(1, [t("cupboard", "contains", "pot")])
    path = kb.save(tmp_path / "kb.json")
    raw = path.read_text()
    if damage == "truncate":
        path.write_text(raw[: len(raw) // 2])
    elif damage == "flip":
        path.write_text(raw.replace("cupboard", "cupbeard", 1))
    elif damage == "garbage":
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        path.write_text("")
    with pytest.raises(SnapshotError):
        EnvironmentKB.load(path)


def test_snapshot_with_valid_checksum_but_bad_facts_is_refused(tmp_path) -> None:
    import hashlib
    body = json.dumps({"format": 1, "env_id": "e", "last_step": 0, "facts": [{"subject": ""}]})
    (tmp_path / "kb.json").write_text(json.dumps({"sha256": hashlib.sha256(body.encode()).hexdigest(), "body": body}))
    with pytest.raises(SnapshotError, match="malformed"):
        EnvironmentKB.load(tmp_path / "kb.json")


def test_missing_snapshot_raises(tmp_path) -> None:
    with pytest.raises(SnapshotError, match="no env KB snapshot"):
        EnvironmentKB.load(tmp_path / "absent.json")


def _bag_of_words(texts: list[str]) -> np.ndarray:
    """A deterministic stand-in encoder for the ranking logic (the real model is tested in integration)."""
    vocab = ["pot", "sink", "stove", "door", "kitchen", "open", "closed", "thermometer", "water"]
    m = np.array([[float(w in text) for w in vocab] for text in texts], dtype=np.float32) + 1e-3
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def test_retriever_ranks_an_env_kbs_current_facts_and_answers_as_of() -> None:
    kb = EnvironmentKB("env-1")
    kb.ingest_triples(1, [t("metal pot", "location", "sink"), t("door to kitchen", "open_state", "closed")])
    kb.ingest_triples(2, [t("metal pot", "location", "stove")])
    retriever = Retriever(_bag_of_words,
                          env_facts=lambda env_id, step: kb.current() if step is None else kb.as_of(step))

    def search(query: str, k: int, step: int | None = None) -> list:
        return retriever.retrieve(query, env_id="env-1", k=k, kbs=("env",), step=step)

    hits = search("where is the pot on the stove", k=2)
    assert hits[0].text == "metal pot is in the stove" and hits[0].kind == "env_fact"
    assert hits[0].provenance["env_id"] == "env-1"
    assert all("sink" not in h.text for h in search("pot sink", k=5))
    past = search("pot sink", k=1, step=1)
    assert "sink" in past[0].text
    with pytest.raises(KnowMapError):
        search("x", k=0)
