"""The env KB's entity model on real ScienceWorld text (tests/fixtures/observations.json, captured by
tests/fixtures/capture_observations.py): each defect the KB-fidelity benchmark found, as it reads in the game."""

from __future__ import annotations

import json
import logging
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from knowmap.kb.environment_kb import EnvironmentKB
from knowmap.kb.extraction import Extraction, RuleBasedExtractor
from knowmap.schemas import Observation, Relation, Triple

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "observations.json"
C, P, OPEN = Relation.CONTAINS, Relation.PROPERTY, Relation.OPEN_STATE


@cache
def records() -> list[dict[str, Any]]:
    return json.loads(FIXTURE.read_text())["records"]


def step(task: str, number: int) -> dict[str, Any]:
    for r in records():
        if r["task"] == task and r["step"] == number:
            return r
    raise LookupError(f"no fixture record for {task} step {number}: re-run tests/fixtures/capture_observations.py")


def observation(r: dict[str, Any]) -> Observation:
    return Observation(step=r["step"], action=r["action"], text=r["text"], look=r["look"], inventory=r["inventory"])


def extract(r: dict[str, Any]) -> Extraction:
    return RuleBasedExtractor().extract(observation(r))


def first_look(task: str, *needles: str) -> dict[str, Any]:
    for r in records():
        if r["task"] == task and all(n in (r["look"] or "") for n in needles):
            return r
    raise LookupError(f"no captured look of {task} with {needles}")


def test_a_nested_list_belongs_to_its_item_not_to_the_container() -> None:
    """``a flower pot 8 (containing a pea plant ... On the pea plant you see: a flower, a seed, ... . , soil)``:
    the seeds are on the plant, and the soil is in the pot."""
    r = first_look("mendelian-genetics-known-plant", "On the pea plant you see: a wilting purple flower, a round")
    facts = extract(r)
    plant = "pea plant in flower pot 8"
    assert facts.objects("flower pot 8", C) == [plant, "soil in flower pot 8"]
    assert facts.objects(plant, C) == ["purple flower", f"round green pea seed in {plant}",
                                       f"wrinkly green pea seed in {plant}", f"wrinkly green pea seed #2 in {plant}"]
    assert facts.is_full(plant, C)  # the plant's own list, complete


def test_namesakes_in_different_pots_are_different_entities() -> None:
    """An adult tall plant in pot 5 and a seedling in pot 8 were one ``pea plant`` in two stages at once."""
    facts = extract(first_look("mendelian-genetics-known-plant", "adult stage with a tall height", "seedling stage"))
    adult, seedling = "pea plant in flower pot 5", "pea plant in flower pot 8"
    assert facts.objects(adult, P) == ["in the adult stage", "with a tall height"]
    assert facts.objects(seedling, P) == ["in the seedling stage"]
    assert not facts.objects("pea plant", P)
    kb = EnvironmentKB("pots")
    kb.ingest(observation(first_look("mendelian-genetics-known-plant", "adult stage with a tall height",
                                     "seedling stage")))
    stages = {f.subject: f.object for f in kb.current() if f.relation is P and "stage" in f.object}
    assert stages == {adult: "in the adult stage", seedling: "in the seedling stage"}


def test_identical_items_are_counted() -> None:
    """``In the bee hive is: a adult bee, a adult bee, a adult bee`` is three bees, not one."""
    facts = extract(first_look("mendelian-genetics-known-plant",
                               "In the bee hive is: a adult bee, a adult bee, a adult bee."))
    assert facts.objects("bee hive", C) == ["adult bee in bee hive", "adult bee #2 in bee hive",
                                            "adult bee #3 in bee hive"]


def test_a_door_is_named_by_the_two_rooms_it_joins() -> None:
    """"door to kitchen" seen from the hallway and from the outside are two doors with two states."""
    kb = EnvironmentKB("doors")
    for number in range(5):  # hallway: open door to kitchen; go to kitchen; open door to outside; go outside
        kb.ingest(observation(step("identify-life-stages-2", number)))
    doors = {f.subject: f.object for f in kb.current() if f.relation is OPEN and f.subject.startswith("door")}
    assert doors["door between hallway and kitchen"] == "open"
    assert doors["door between kitchen and outside"] == "open"
    assert doors["door between foundry and outside"] == "closed"
    assert not any(name.startswith("door to") for name in doors)
    # "The door is now open." names no room: the KB places it in the agent's room.
    history = kb.history("door between hallway and kitchen", OPEN)
    assert [f.object for f in history] == ["closed", "open"] and history[1].valid_from == 1


def test_a_look_at_another_room_lists_that_rooms_doors() -> None:
    kb = EnvironmentKB("look-at-room")
    kb.ingest_triples(0, [Triple(subject="agent", relation=Relation.LOCATION, object="living room")])
    kb.ingest(Observation(step=1, action="look at hallway", text=(
        "This room is called the hallway. In it, you see: \n\ta substance called air\nYou also see:\n\t"
        "A door to the art studio (that is closed)\n\tA door to the living room (that is open)")))
    doors = {f.subject for f in kb.current() if f.relation is OPEN}
    assert doors == {"door between art studio and hallway", "door between hallway and living room"}


def test_a_temperature_is_a_measurement_with_its_step() -> None:
    r = next(r for r in records() if "the thermometer measures" in r["text"])
    [fact] = [f for f in extract(r).triples if f.relation is Relation.TEMPERATURE]
    assert fact.object.endswith(f" at step {r['step']}")


def test_a_dead_plants_seeds_are_in_its_pot() -> None:
    """Seeds listed on a living plant fall into the pot when it dies; the plant shows no list any more."""
    kb = EnvironmentKB("dead")
    kb.ingest(observation(first_look("mendelian-genetics-known-plant", "On the pea plant you see: a wilting purple "
                                                                       "flower, a round")))
    assert kb.about(["pea plant in flower pot 8"])
    dead = first_look("mendelian-genetics-known-plant", "flower pot 8 (containing a dead pea plant")
    kb.ingest(observation(dead))
    on_plant = [f for f in kb.current() if f.relation is C and f.subject.startswith("pea plant in flower pot 8")]
    assert on_plant == []
    in_pot = [f.object for f in kb.current() if f.relation is C and f.subject == "flower pot 8"]
    assert sum("pea seed" in name for name in in_pot) == 5


def test_an_object_gone_from_a_listed_container_loses_its_other_facts() -> None:
    """Water the soil absorbed: gone from the fully listed pot and seen nowhere, so its state closes too."""
    kb = EnvironmentKB("vanish")
    water = "water in flower pot 8"
    kb.ingest_triples(0, [Triple(subject="flower pot 8", relation=C, object=water),
                          Triple(subject=water, relation=Relation.STATE_OF_MATTER, object="liquid")],
                      [("flower pot 8", C)])
    kb.ingest_triples(1, [Triple(subject="flower pot 8", relation=C, object="soil")], [("flower pot 8", C)])
    assert not kb.about([water])
    assert [f.valid_to for f in kb.history(water, Relation.STATE_OF_MATTER)] == [1]
    # Moved, not gone: seen in another container in the same step, its facts stay.
    kb.ingest_triples(2, [Triple(subject="flower pot 8", relation=C, object="orange"),
                          Triple(subject="orange", relation=Relation.STATE_OF_MATTER, object="solid")],
                      [("flower pot 8", C)])
    kb.ingest_triples(3, [Triple(subject="inventory", relation=C, object="orange")], [("flower pot 8", C)])
    assert {f.relation for f in kb.about(["orange"])} == {C, Relation.LOCATION, Relation.STATE_OF_MATTER}


def test_unexpected_text_never_raises_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    kb = EnvironmentKB("residue")
    odd = ("This room is called the kitchen. In it, you see: \n\tthe agent\n\ta sink, which hums a tune; it glows"
           "\n\ta chair. On the chair is: nothing.")
    with caplog.at_level(logging.WARNING, logger="knowmap.kb.environment_kb"):
        for number in range(3):
            kb.ingest(Observation(step=number, action="look around", text=odd))
    logged = [rec for rec in caplog.records if "no extraction rule understood" in rec.getMessage()]
    assert len(logged) == 1 and "hums a tune" in logged[0].getMessage()
    assert {f.object for f in kb.current() if f.subject == "kitchen"} == {"agent", "sink", "chair"}


def test_a_display_name_finds_the_namesakes() -> None:
    """An action names "pea plant"; the KB's facts are about "pea plant in flower pot 5" and "... 8"."""
    kb = EnvironmentKB("display")
    kb.ingest(observation(first_look("mendelian-genetics-known-plant", "adult stage with a tall height",
                                     "seedling stage")))
    assert "pea plant" in kb.entities()
    subjects = {f.subject for f in kb.about(["pea plant"]) if f.relation is P}
    assert subjects == {"pea plant in flower pot 5", "pea plant in flower pot 8"}


def test_no_mangled_observation_raises_out_of_ingest() -> None:
    """Real texts cut, spliced and sprinkled with brackets, colons and commas: ingest keeps what it can, and the
    rest is residue, never an exception."""
    import random

    rng = random.Random(17)
    texts = [t for r in records()[:60] for t in (r["text"], r["look"] or "") if t]
    kb = EnvironmentKB("mangled")
    for number in range(400):
        text = rng.choice(texts)
        cut = rng.randrange(len(text) + 1)
        other = rng.choice(texts)
        junk = "".join(rng.choice("(),.:;\n\t ") for _ in range(rng.randrange(6)))
        mangled = text[:cut] + junk + other[rng.randrange(len(other) + 1):]
        kb.ingest(Observation(step=number, action=rng.choice(["look around", "open door to kitchen", "mix cup",
                                                             "use thermometer on x", ""]), text=mangled,
                              look=rng.choice([None, mangled[::-1], text])))
    assert kb.last_step == 399
