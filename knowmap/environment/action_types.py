"""Actions typed by ScienceWorld's own tables, so that a judgement made on one variation holds on another.

A gold action such as ``move metal pot to stove`` is, to ScienceWorld, a template (``move OBJ to OBJ``) applied
to objects whose types come from the simulator (``getAllObjectIdsTypesReferentsLUTJSON``, the type ids of
``object_type_ids.tsv``): ``containers.MetalPot`` and ``devices.Stove``. Two actions with the same template on
the same types are the same behaviour whatever the objects are called. Rooms and doors are one class each
(``location.Room``, ``portal.Door``); they are told apart by the name the action uses, which is the same in every
variation (``location.Room:kitchen``, ``portal.Door:door to kitchen``).

Gold paths name objects by any of their referents (``thermometer in inventory``, ``substance in metal pot``) and
use verbs the enumerator does not list (``examine``), so a gold action is often not, letter for letter, in the
step's valid-action list; :func:`type_action` finds the valid action that means the same (same template, same
object ids) by matching the gold text against each template with the objects' referents.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

from knowmap.schemas import ActionType

NAMED_FAMILIES = ("location.", "portal.")
_PREFIX = "scienceworld.objects."
# Verbs ScienceWorld's parser accepts that its action enumerator never writes, and the template they stand for.
_WHERE = re.compile(r" (?:in|on) ")
_VERB_ALIASES = {"examine ": "look at ", "drop ": "put down "}


@lru_cache(maxsize=1)
def type_classes() -> dict[int, str]:
    """ScienceWorld's object type ids -> class names without the package root (``containers.MetalPot``)."""
    text = resources.files("scienceworld").joinpath("object_type_ids.tsv").read_text(encoding="utf-8")
    out: dict[int, str] = {}
    for line in text.splitlines():
        name, _, number = line.partition("\t")
        if number.strip().isdigit():
            out[int(number)] = name.strip().removeprefix(_PREFIX)
    return out


def _object_key(type_id: int, slot: str | None) -> str:
    """The object's type class; for rooms and doors with the name the action used (``go to kitchen`` ->
    ``location.Room:kitchen``; ScienceWorld's referent table has no usable names for portals)."""
    cls = type_classes().get(int(type_id), f"type{type_id}")
    if cls.startswith(NAMED_FAMILIES) and slot:
        return f"{cls}:{slot.removeprefix('to ')}"
    return cls


@lru_cache(maxsize=64)
def _template_pattern(example: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in example.split("OBJ")]
    return re.compile("^" + "(.+?)".join(parts) + "$")


def type_action(action: str, combos: Sequence[Mapping[str, Any]], templates: Mapping[int, str],
                referents: Mapping[str, Mapping[str, Any]]) -> ActionType | None:
    """``action`` typed in the state where ``combos`` (``get_valid_action_object_combinations_with_templates``)
    were enumerated. ``valid_as`` is the valid action that means the same, None where there is none (the action
    has no effect in that state, or the enumerator leaves it out); the type is then read from the referents
    alone. None where the text fits no template or names no object ScienceWorld knows.

    Args:
        combos: the valid actions with ``template_id``, ``obj_ids`` and ``type_ids``.
        templates: template id -> its text with ``OBJ`` slots (``get_possible_actions_with_IDs``).
        referents: object id (str) -> ``{"type_id", "referents"}`` (``getAllObjectIdsTypesReferentsLUTJSON``).
    """
    text = " ".join(action.lower().split())
    for alias, verb in _VERB_ALIASES.items():
        if text.startswith(alias):
            text = verb + text[len(alias):]
    exact = next((c for c in combos if c["action"] == text), None)
    if exact is not None:
        return _typed(int(exact["template_id"]), list(exact["obj_ids"]), templates, referents, str(exact["action"]),
                      text)
    for template_id, example in templates.items():
        found = _template_pattern(example).match(text) if "OBJ" in example else None
        if found is None:
            continue
        slots = [s.strip() for s in found.groups()]
        for combo in combos:
            if int(combo["template_id"]) == template_id and len(combo["obj_ids"]) == len(slots) and all(
                    _names(slot, o, referents) for slot, o in zip(slots, combo["obj_ids"], strict=True)):
                return _typed(template_id, list(combo["obj_ids"]), templates, referents, str(combo["action"]), text)
        objects = [next((o for o in referents if _names(slot, o, referents)), None) for slot in slots]
        if all(o is not None for o in objects):
            return _typed(template_id, objects, templates, referents, None, text)
    return None


def _names(slot: str, obj_id: Any, referents: Mapping[str, Mapping[str, Any]]) -> bool:
    """True if ``slot`` names the object: one of its referents, or one followed by where it is (ScienceWorld's
    parser takes ``stopwatch in inventory``, ``pea seed in seed jar`` for the stopwatch and the seed)."""
    names = {str(n).lower() for n in referents.get(str(obj_id), {}).get("referents") or []}
    slot = slot.removeprefix("to ") if slot not in names else slot
    if slot in names:
        return True
    return any(slot[:m.start()] in names for m in _WHERE.finditer(slot))


def _typed(template_id: int, obj_ids: Sequence[Any], templates: Mapping[int, str],
           referents: Mapping[str, Mapping[str, Any]], valid_as: str | None, text: str) -> ActionType:
    template = templates.get(template_id, str(template_id))
    found = _template_pattern(template).match(valid_as or text) if "OBJ" in template else None
    slots: list[str | None] = [g.strip() for g in found.groups()] if found else [None] * len(obj_ids)
    if len(slots) != len(obj_ids):
        slots = [None] * len(obj_ids)
    objects = [_object_key(int(referents.get(str(o), {}).get("type_id", -1)), slot)
               for o, slot in zip(obj_ids, slots, strict=True)]
    return ActionType(template=template, objects=objects, valid_as=valid_as)
