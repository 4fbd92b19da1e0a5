"""Rule-based fact extraction over real ScienceWorld strings (tests/fixtures/observations.json; no JVM, no Ray)."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from knowmap.kb.extraction import (
    Extraction,
    FactExtractor,
    RuleBasedExtractor,
    extract_line,
    listing_container,
    object_lines,
)
from knowmap.schemas import Observation, Relation, Triple

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "observations.json"
C, L, F = Relation.CONTAINS, Relation.LOCATION, Relation.FOCUS


@cache
def records() -> list[dict[str, Any]]:
    return json.loads(FIXTURE.read_text())["records"]


def record(task: str, *, action: str | None = None, text: str | None = None) -> dict[str, Any]:
    """The first captured step of ``task`` whose action equals ``action`` and whose feedback contains ``text``."""
    for r in records():
        if r["task"] == task and (action is None or r["action"] == action) and (text is None or text in r["text"]):
            return r
    raise LookupError(f"no fixture record for {task!r} action={action!r} text={text!r}: re-run "
                      "tests/fixtures/capture_observations.py or adjust the test")


def extract(r: dict[str, Any], *, feedback_only: bool = False) -> Extraction:
    obs = Observation(step=r["step"], action=r["action"], text=r["text"],
                      look=None if feedback_only else r["look"], inventory=None if feedback_only else r["inventory"])
    return RuleBasedExtractor().extract(obs)


def t(subject: str, relation: Relation, obj: str) -> Triple:
    return Triple(subject=subject, relation=relation, object=obj)


@pytest.fixture(scope="module")
def kitchen() -> Extraction:
    return extract(record("boil", action="look around", text="This room is called the kitchen"))


def test_rule_based_extractor_is_a_fact_extractor() -> None:
    assert isinstance(RuleBasedExtractor(), FactExtractor)


def test_look_around_gives_agent_location_and_full_room_contents(kitchen: Extraction) -> None:
    assert t("agent", L, "kitchen") in kitchen.triples
    assert kitchen.is_full("kitchen", C)
    assert kitchen.objects("kitchen", C) == [
        "air", "chair", "counter", "cupboard", "freezer", "fridge", "glass jar", "lighter", "oven", "painting",
        "sink", "soap", "stopwatch", "stove", "table", "thermometer"]


def test_no_inverse_facts_from_a_look_around(kitchen: Extraction) -> None:
    assert [x for x in kitchen.triples if x.relation is L] == [t("agent", L, "kitchen")]
    assert "agent" not in kitchen.objects("kitchen", C)


def test_nested_containers_are_full_sets(kitchen: Extraction) -> None:
    assert kitchen.objects("counter", C) == ["bowl", "drawer"]
    assert kitchen.objects("bowl", C) == ["red apple", "banana", "orange", "potato"]
    assert kitchen.objects("glass jar", C) == ["sodium chloride"]
    assert kitchen.objects("table", C) == ["glass cup"]
    assert all(kitchen.is_full(s, C) for s in ("counter", "bowl", "glass jar", "table"))


def test_nothing_is_an_observed_empty_set(kitchen: Extraction) -> None:
    for container in ("chair", "sink", "stove", "glass cup"):
        assert kitchen.is_full(container, C), container
        assert kitchen.objects(container, C) == [], container
    # A closed container's contents are unknown, not empty.
    assert not kitchen.is_full("cupboard", C)
    assert not kitchen.is_full("fridge", C)


def test_doors_give_open_state_and_room_connections(kitchen: Extraction) -> None:
    assert kitchen.objects("kitchen", Relation.CONNECTS_TO) == ["bathroom", "hallway", "outside"]
    assert kitchen.is_full("kitchen", Relation.CONNECTS_TO)
    # A listed door is named by the two rooms it joins (its room is the listing's).
    assert t("door between hallway and kitchen", Relation.OPEN_STATE, "open") in kitchen.triples
    assert t("door between bathroom and kitchen", Relation.OPEN_STATE, "closed") in kitchen.triples
    for container in ("cupboard", "freezer", "fridge", "oven"):
        assert t(container, Relation.OPEN_STATE, "closed") in kitchen.triples


def test_device_states(kitchen: Extraction) -> None:
    # "turned off", "off" and "deactivated" are one state, named as the actions name it.
    for device in ("oven", "sink", "stove", "stopwatch"):
        assert t(device, Relation.POWER_STATE, "deactivated") in kitchen.triples
    workshop = extract(record("power-component", action="look at red light bulb"))
    assert t("red light bulb", Relation.POWER_STATE, "activated") in workshop.triples  # "which is on"
    assert t("switch", Relation.POWER_STATE, "deactivated") in workshop.triples  # ", which is off" inside a list


def test_feedback_and_look_of_one_step_agree_on_power_state() -> None:
    r = record("boil", text="The sink is now activated.")
    assert "a sink, which is turned on." in r["look"]
    assert extract(r).objects("sink", Relation.POWER_STATE) == ["activated"]


def test_thermometer_reading(kitchen: Extraction) -> None:
    assert t("thermometer", Relation.READING, "10 degrees celsius") in kitchen.triples


def _measured(r: dict[str, Any]) -> str:
    """A measurement as the KB keeps it: the value and the step it was taken at (a temperature changes)."""
    value = re.search(r"(-?\d+ degrees celsius)", r["text"]).group(1)
    return f"{value} at step {r['step']}"


def test_thermometer_measurement_takes_its_subject_from_the_action() -> None:
    r = record("use-thermometer", text="the thermometer measures")
    assert r["action"] == "use thermometer in inventory on unknown substance B in inventory"
    assert extract(r, feedback_only=True).triples == [t("unknown substance b", Relation.TEMPERATURE, _measured(r))]
    r = record("measure-melting-point-unknown-substance", text="the thermometer measures")
    assert t("unknown substance c", Relation.TEMPERATURE, _measured(r)) in extract(r, feedback_only=True).triples
    # A generic referent keeps its place, or it would name every substance.
    r = record("boil", text="the thermometer measures")
    assert extract(r, feedback_only=True).triples == [t("substance in metal pot", Relation.TEMPERATURE,
                                                        _measured(r))]


def test_inventory_is_a_full_set() -> None:
    first = extract(record("boil", action="look around"))
    assert first.objects("inventory", C) == ["orange"]
    assert first.is_full("inventory", C)
    later = extract(record("boil", action="inventory"), feedback_only=True)
    assert later.objects("inventory", C) == ["orange", "thermometer"]
    assert t("thermometer", Relation.READING, "10 degrees celsius") in later.triples
    assert t("agent", L, "inventory") not in later.triples


def test_move_feedback() -> None:
    assert extract(record("boil", text="You move to the kitchen."), feedback_only=True).triples == [
        t("agent", L, "kitchen")]
    assert extract(record("boil", text="You move the thermometer to the inventory."),
                   feedback_only=True).triples == [t("thermometer", L, "inventory")]
    assert extract(record("boil", text="You move the metal pot to the sink."), feedback_only=True).triples == [
        t("metal pot", L, "sink")]
    r = record("test-conductivity", text="(disconnecting aluminum foil)")
    assert extract(r, feedback_only=True).triples == [t("aluminum foil", L, "red box")]


def test_open_and_device_feedback() -> None:
    r = record("boil", text="The door is now open.")
    assert r["action"] == "open door to kitchen"
    assert extract(r, feedback_only=True).triples == [t("door to kitchen", Relation.OPEN_STATE, "open")]
    r = record("mendelian-genetics-known-plant", text="The door is already closed.")
    assert extract(r, feedback_only=True).triples == [t("door to outside", Relation.OPEN_STATE, "closed")]
    assert extract(record("boil", text="The cupboard is now open."), feedback_only=True).triples == [
        t("cupboard", Relation.OPEN_STATE, "open")]
    assert extract(record("boil", text="The sink is now activated."), feedback_only=True).triples == [
        t("sink", Relation.POWER_STATE, "activated")]


def test_focus_feedback() -> None:
    r = record("boil", text="You focus on the water.")
    assert t("agent", F, "water") in extract(r, feedback_only=True).triples
    r = record("measure-melting-point-unknown-substance", text="You focus on the solid unknown substance C.")
    focus = extract(r, feedback_only=True)
    assert t("agent", F, "unknown substance c") in focus.triples
    assert t("unknown substance c", Relation.STATE_OF_MATTER, "solid") in focus.triples


def test_states_of_matter() -> None:
    melting = extract(record("measure-melting-point-known-substance", action="examine chocolate"))
    assert melting.objects("metal pot", C) == ["chocolate"]
    assert t("chocolate", Relation.STATE_OF_MATTER, "liquid") in melting.triples
    steam = extract(record("boil", action="look at stove"), feedback_only=True)
    assert steam.objects("stove", C) == ["metal pot"]
    assert steam.objects("metal pot", C) == ["steam"]
    assert t("steam", Relation.STATE_OF_MATTER, "gas") in steam.triples
    assert t("stove", Relation.POWER_STATE, "activated") in steam.triples


def test_animals_and_plants_with_life_stages() -> None:
    outside = extract(record("identify-life-stages-2", action="look around", text="called the outside"))
    assert t("agent", L, "outside") in outside.triples
    assert t("juvenile blue jay", Relation.PROPERTY, "in the juvenile stage") in outside.triples
    assert t("blue jay egg", Relation.PROPERTY, "in the egg stage") in outside.triples
    assert t("blue jay", Relation.PROPERTY, "dead") in outside.triples  # "a dead blue jay"
    # Four pots hold an apple tree each (and soil): four entities, each named by its pot.
    pot5 = "self watering flower pot 5"
    assert outside.objects(pot5, C) == [f"apple tree in {pot5}", f"soil in {pot5}", f"water in {pot5}"]
    assert outside.objects(f"apple tree in {pot5}", Relation.PROPERTY) == ["dead"]
    assert outside.is_full(f"apple tree in {pot5}", Relation.PROPERTY)
    seedling = "apple tree in self watering flower pot 6"
    assert outside.objects(seedling, Relation.PROPERTY) == ["in the seedling stage"]
    assert outside.objects("apple tree in self watering flower pot 7", Relation.PROPERTY) == ["in the adult stage"]

    greenhouse = extract(record("mendelian-genetics-known-plant", action="open bee hive"))
    assert t("bee hive", Relation.OPEN_STATE, "open") in greenhouse.triples
    # Three bees in the hive and two in the room: five entities, counted per container.
    assert greenhouse.objects("bee hive", C) == ["adult bee in bee hive", "adult bee #2 in bee hive",
                                                 "adult bee #3 in bee hive"]
    assert greenhouse.objects("greenhouse", C)[1:3] == ["adult bee in greenhouse", "adult bee #2 in greenhouse"]
    # Two pea plants (pots 5 and 8), one tall and one short: two entities, each with its own flower.
    tall, short = "pea plant in flower pot 5", "pea plant in flower pot 8"
    assert greenhouse.objects(tall, Relation.PROPERTY) == ["in the reproducing stage", "with a tall height"]
    assert greenhouse.objects(short, Relation.PROPERTY) == ["in the reproducing stage", "with a short height"]
    assert greenhouse.objects("flower pot 5", C) == [tall, "soil in flower pot 5"]
    assert greenhouse.objects(tall, C) == [f"purple flower in {tall}"]


def test_seeds_keep_their_traits_in_the_name() -> None:
    r = record("mendelian-genetics-known-plant", action="look at seed jar")
    jar = extract(r, feedback_only=True)
    # Two identical round seeds are two entities: counts are kept.
    assert jar.objects("seed jar", C) == ["round green pea seed", "round green pea seed #2", "wrinkly green pea seed"]
    assert jar.is_full("seed jar", C)


def test_inclined_plane_and_stopwatch() -> None:
    r = record("inclined-plane-determine-angle", action="look at inclined plane b", text="approximately")
    plane = extract(r, feedback_only=True)
    percent = re.search(r"(\d+)%", r["text"]).group(1)
    assert plane.objects("inclined plane b", C) == ["wood block"]
    assert plane.objects("wood block", Relation.PROPERTY) == [f"approximately {percent}% down the plane"]
    assert plane.is_full("wood block", Relation.PROPERTY)  # a new position replaces the old one
    r = record("inclined-plane-determine-angle", text="The time reads")
    ticks = re.search(r"(\d+) ticks", r["text"]).group(1)
    assert t("stopwatch", Relation.READING, f"{ticks} ticks") in extract(r, feedback_only=True).triples


def test_electrical_connections_from_feedback_and_look_at() -> None:
    r = record("power-component", text="anode on battery is now connected to terminal 1 on black wire")
    assert extract(r, feedback_only=True).triples == [
        t("battery", Relation.PROPERTY, "anode connected to terminal 1 on black wire"),
        t("black wire", Relation.PROPERTY, "terminal 1 connected to anode on battery")]
    bulb = extract(record("power-component", action="look at red light bulb"), feedback_only=True)
    assert bulb.objects("red light bulb", Relation.PROPERTY) == [
        "anode connected to terminal 2 on orange wire", "cathode connected to terminal 2 on black wire"]
    wire = extract(record("power-component", action="look at black wire"), feedback_only=True)
    assert wire.objects("black wire", Relation.PROPERTY) == [
        "terminal 1 connected to anode on battery", "terminal 2 connected to cathode on red light bulb"]


def test_mixing_pouring_and_recipes() -> None:
    mixed = extract(record("chemistry-mix", action="mix metal pot"), feedback_only=True)
    assert t("metal pot", C, "salt water") in mixed.triples
    assert t("salt water", Relation.PROPERTY, "made by mixing sodium chloride and water") in mixed.triples
    poured = extract(record("grow-plant", text="You pour the contents of the jug"), feedback_only=True)
    assert poured.triples == [] and poured.full_sets == [("jug", C)]  # the jug is now empty
    recipe = extract(record("chemistry-mix", text="The recipe reads:"), feedback_only=True)
    assert recipe.triples == [t("recipe", Relation.PROPERTY, "to make salt water, mix sodium chloride, water")]


def test_look_in_and_look_at_door() -> None:
    cupboard = extract(record("boil", action="look in cupboard"), feedback_only=True)
    assert cupboard.objects("cupboard", C) == ["ceramic cup", "drawer", "tin cup"]
    assert cupboard.is_full("cupboard", C) and cupboard.is_full("tin cup", C)
    door = extract(record("boil", action="look at door to hallway"), feedback_only=True)
    assert door.triples == [t("door to hallway", Relation.OPEN_STATE, "open")]


def test_feedback_without_facts_yields_nothing() -> None:
    waited = extract(record("grow-plant", text="You decide to wait"), feedback_only=True)
    assert waited == Extraction()


def test_object_lines_include_doors_and_every_line_yields_a_fact() -> None:
    r = record("boil", action="look around", text="This room is called the kitchen")
    lines = object_lines(r["look"])
    assert len(lines) == 20
    assert lines[0] == "the agent" and lines[-1] == "A door to the outside (that is closed)"
    assert listing_container(r["look"]) == "kitchen"
    assert object_lines("You move to the kitchen.") == []
    chair = extract_line("a chair. On the chair is: nothing.", "kitchen")
    assert chair.covered and chair.triples == [t("kitchen", C, "chair")] and chair.full_sets == [("chair", C)]


def test_every_captured_object_line_is_fully_parsed() -> None:
    """Every listed line in the fixture yields a fact with nothing left over (the benchmark's criterion)."""
    uncovered = []
    for r in records():
        for text in (r["look"], r["inventory"], r["text"]):
            container = listing_container(text or "")
            for line in object_lines(text or ""):
                facts = extract_line(line, container or "")
                if not facts.covered:
                    uncovered.append((line, facts.residue))
    assert uncovered == []


def test_unparsed_clauses_are_reported_as_residue() -> None:
    # A real line with an invented clause appended: the known part still yields facts, the rest is residue.
    facts = extract_line("a sink, which is turned off; it hums", "kitchen")
    assert t("kitchen", C, "sink") in facts.triples
    assert facts.residue and not facts.covered


def test_full_sets_must_be_set_valued() -> None:
    with pytest.raises(ValidationError, match="set-valued relations: contains, connects_to, property"):
        Extraction(full_sets=[("chair", Relation.LOCATION)])
