"""ScienceWorld, typed: one JVM per :class:`ScienceWorld`, closed deterministically, steps as ``StepRecord``.

ScienceWorld's ``env.step()`` spends ~90% of its time building the list of valid actions. Where they are not
needed (expert replay) :meth:`ScienceWorld.step` takes the cheap path (``env.server.step``), about 13x faster.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from knowmap.environment.action_types import type_action
from knowmap.errors import ScienceWorldError, SplitError, UnknownTaskError, VariationOutOfRangeError
from knowmap.schemas import Split, StepRecord, Trajectory, TrajectorySource, stable_id

SPLITS: tuple[Split, ...] = ("train", "dev", "test")
_env_lock = threading.Lock()  # JAVA_TOOL_OPTIONS is process-global while a JVM starts


@contextmanager
def _java_options(java_heap: str) -> Iterator[None]:
    with _env_lock:
        old = os.environ.get("JAVA_TOOL_OPTIONS")
        os.environ["JAVA_TOOL_OPTIONS"] = f"-Xmx{java_heap}"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("JAVA_TOOL_OPTIONS", None)
            else:
                os.environ["JAVA_TOOL_OPTIONS"] = old


def episode_id(task: str, variation: int, split: str, source: str = "expert", policy: str = "expert",
               seed: int = 0) -> str:
    """The stable id of an episode: the same spec always gives the same id (retries stay idempotent)."""
    return f"{task}-{split}-{variation}-{source}-{policy}-{seed}-" + stable_id(task, variation, split, source,
                                                                           policy, seed)[:8]


def check_split(split: str) -> Split:
    """Return ``split`` if it is one of ScienceWorld's splits.

    Raises:
        SplitError: anything else; the message lists the allowed splits.
    """
    if split not in SPLITS:
        raise SplitError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    return split  # type: ignore[return-value]


def task_names() -> list[str]:
    """ScienceWorld's 30 task names, read from the installed package (no JVM needed)."""
    from scienceworld.constants import ID2TASK

    return list(ID2TASK.values())


def task_topics() -> dict[str, str]:
    """Each task's topic family from ScienceWorld's ``tasks.json`` (Matter, Measurement, Electricity,
    Classification, Biology, Chemistry, Forces): what "unseen" is judged by."""
    import json
    from importlib import resources

    rows = json.loads(resources.files("scienceworld").joinpath("tasks.json").read_text(encoding="utf-8"))
    return {str(row["task_name"]): str(row["topic"]) for row in rows}


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """Validate task names; ``["all"]`` means every task.

    Raises:
        UnknownTaskError: a name ScienceWorld does not know (the message lists the valid ones), or no task.
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    valid = task_names()
    names = [t.strip() for t in tasks if t.strip()]
    if names == ["all"]:
        return valid
    unknown = [t for t in names if t not in valid]
    if unknown or not names:
        what = (f"unknown ScienceWorld task {unknown[0]!r}" if len(unknown) == 1 else
                f"unknown ScienceWorld tasks {unknown}" if unknown else "no task given")
        raise UnknownTaskError(f"{what}; valid tasks: {', '.join(valid)} (or 'all')")
    return list(dict.fromkeys(names))


class ScienceWorld:
    """A ScienceWorld environment backed by its own JVM. Use as a context manager, or call :meth:`close`.

    Args:
        step_limit: the episode ends after this many moves.
        simplifications: comma-separated ScienceWorld simplifications (``"easy"``, ``"openDoors"``, ...).
        java_heap: the JVM's maximum heap (``-Xmx``), e.g. ``"512m"``.

    Raises:
        ScienceWorldError: Java is not installed or the JVM did not start.
    """

    def __init__(self, step_limit: int = 100, simplifications: str = "", java_heap: str = "512m") -> None:
        if shutil.which("java") is None:
            raise ScienceWorldError("ScienceWorld needs Java 11+ on PATH: install it, e.g. `apt-get install "
                                    "openjdk-17-jre-headless`")
        from scienceworld import ScienceWorldEnv

        with _java_options(java_heap):
            try:
                self._env = ScienceWorldEnv("", envStepLimit=step_limit)
            except Exception as e:  # py4j raises plain Exceptions when the JVM fails to start
                raise ScienceWorldError(f"the ScienceWorld JVM did not start: {e}") from e
        self.step_limit = step_limit
        self.simplifications = simplifications
        self._task_names: list[str] = list(self._env.get_task_names())
        self._variations: dict[tuple[str, str], list[int]] = {}
        self.task: str | None = None
        self.variation: int | None = None
        self.split: Split | None = None
        self._gold = False
        self._step = 0
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Shut the JVM down. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):  # the JVM may already be gone; nothing is left to release
            self._env.close()

    @property
    def jvm_pid(self) -> int:
        """The process id of this env's JVM."""
        return int(self._env._gateway.java_process.pid)

    @property
    def alive(self) -> bool:
        """False once the env is closed or its JVM has exited (crashed, killed, out of memory)."""
        return not self._closed and self._env._gateway.java_process.poll() is None

    def __enter__(self) -> ScienceWorld:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tasks and variations --------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return list(self._task_names)

    def check_task(self, task: str) -> str:
        """Return ``task`` if ScienceWorld knows it; else raise :class:`UnknownTaskError` listing valid tasks."""
        if task not in self._task_names:
            raise UnknownTaskError(f"unknown ScienceWorld task {task!r}; valid tasks: {', '.join(self._task_names)}")
        return task

    def variations(self, task: str, split: Split) -> list[int]:
        """The variation indices of ``task`` in ``split`` (ScienceWorld's own train/dev/test partition)."""
        self.check_task(task)
        if split not in SPLITS:
            raise ScienceWorldError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        key = (task, split)
        if key not in self._variations:
            # The split lists are per loaded task, so load variation 0 (cheap, no gold path) to ask.
            self._env.load(task, 0, self.simplifications, generateGoldPath=False)
            getter = {"train": self._env.get_variations_train, "dev": self._env.get_variations_dev,
                      "test": self._env.get_variations_test}[split]
            self._variations[key] = sorted(int(v) for v in getter())
            self.task = None  # what is loaded is not what the caller loaded
        return list(self._variations[key])

    def check_variation(self, task: str, variation: int, split: Split) -> int:
        allowed = self.variations(task, split)
        if variation not in allowed:
            raise VariationOutOfRangeError(
                f"variation {variation} is not in the {split} split of {task!r}: "
                f"{split} variations are {allowed[0]}-{allowed[-1]} ({len(allowed)} variations)"
            )
        return variation

    # -- episodes --------------------------------------------------------------------------------------------
    def load(self, task: str, variation: int, split: Split, *, gold: bool = False) -> StepRecord:
        """Load (task, variation) after checking both against the split, reset, and return step 0.

        Args:
            gold: also generate the gold action sequence (:meth:`gold_actions`).

        Raises:
            UnknownTaskError, VariationOutOfRangeError: with the valid values in the message.
        """
        self.check_variation(task, variation, split)
        self._env.load(task, variation, self.simplifications, generateGoldPath=gold)
        self.task, self.variation, self.split, self._gold = task, variation, split, gold
        return self.reset()

    def reset(self) -> StepRecord:
        """Back to the first move; step 0 is the ``look around`` of the reset."""
        self._require_loaded()
        self._env.server.reset()
        self._step = 0
        # As ScienceWorld's own reset does: a real "look around" step, which also recomputes the score (the
        # score read before any step is stale, e.g. 100 after gold-path generation).
        obs = str(self._env.server.step("look around"))
        score = self._score()
        self._env.lastStepScore = score
        return StepRecord(step=0, action="look around", observation=obs, score=score, look=obs,
                          inventory=str(self._env.server.freeActionInventory()))

    @property
    def task_description(self) -> str:
        self._require_loaded()
        text = str(self._env.server.freeActionTaskDesc())
        return text.removeprefix("Task Description:").strip()

    def gold_actions(self) -> list[str]:
        """The gold action sequence of the loaded variation (load with ``gold=True``)."""
        self._require_loaded()
        if not self._gold:
            raise ScienceWorldError("no gold path was generated: call load(..., gold=True)")
        return [str(a) for a in self._env.server.getGoldActionSequence()]

    def step(self, action: str, *, valid_actions: bool = False, look: bool = False) -> StepRecord:
        """Take one action and return it typed.

        Args:
            valid_actions: also build the list of valid actions (costly: ~53 ms on this CPU).
            look: also record a free ``look around`` of the room and the inventory after the step.
        """
        self._require_loaded()
        obs = str(self._env.server.step(action))
        self._step += 1
        score = self._score()
        reward = score - self._env.lastStepScore
        self._env.lastStepScore = score
        moves = int(self._env.server.getNumMoves())
        done = bool(self._env.server.getCompleted()) or moves > self.step_limit or score < 0
        return StepRecord(
            step=self._step,
            action=action,
            observation=obs,
            score=score,
            reward=reward,
            done=done,
            look=str(self._env.server.freeActionLook()) if look else None,
            inventory=str(self._env.server.freeActionInventory()) if look else None,
            valid_actions=list(self._env.get_valid_action_object_combinations()) if valid_actions else None,
        )

    def object_tree(self) -> dict[str, Any]:
        """ScienceWorld's own state of the loaded episode: ``env.getObjectTree()``, parsed from its JSON.

        The root is the universe; every object has ``uuid``, ``name``, ``type``, ``isDeleted``, its property
        records (``propContainer``, ``propDevice``, ``propMaterial``, ``propLife``, ... or None) and ``contents``
        keyed ``"name-uuid"``. Doors are portals, which ScienceWorld keeps outside ``contents``: they are absent.

        Raises:
            ScienceWorldError: no task is loaded, or the JVM refused.
        """
        self._require_loaded()
        try:
            return dict(self._env.getObjectTree())
        except Exception as e:  # py4j and ScienceWorld raise plain Exceptions (RuntimeError when uninitialised)
            raise ScienceWorldError(f"ScienceWorld could not write its object tree: {e}") from e

    def object_referents(self) -> dict[str, list[str]]:
        """Every object's referents (the names an action may use for it, its display name among them), by uuid.

        From ScienceWorld's ``getAllObjectIdsTypesReferentsLUTJSON``; keys are the ``uuid`` of
        :meth:`object_tree` as strings.
        """
        self._require_loaded()
        try:
            table = self._env.get_all_object_ids_types_referents_LUTJSON()
        except Exception as e:  # py4j raises plain Exceptions
            raise ScienceWorldError(f"ScienceWorld could not list its object referents: {e}") from e
        return {str(uuid): [str(r) for r in row.get("referents", [])] for uuid, row in table.items()}

    def doors(self, everywhere: bool = True) -> list[dict[str, Any]]:
        """The doors of the loaded episode, read from the JVM: ``{"uuid", "rooms": [a, b] (sorted), "open"}``.

        Doors are portals, which :meth:`object_tree` leaves out; this walks the rooms' portals through the py4j
        gateway (``Room.getPortals``, ``PortalProperties.isOpen``, ``Portal.getConnectsTo``). Drains and other
        portals that are not doors are left out. Every room's (about 0.1 s), or with ``everywhere=False`` only
        those of the agent's room (the only ones an action can change).

        Raises:
            ScienceWorldError: no task is loaded, or the JVM refused.
        """
        self._require_loaded()
        try:
            here = self._env.server.agent().get().getContainer().get()
            rooms = _scala_items(here.getContainer().get().getContainedObjects(False)) if everywhere else [here]
            doors: dict[str, dict[str, Any]] = {}
            for room in rooms:
                for portal in _scala_items(room.getPortals(False)):
                    uuid = str(portal.uuid())
                    if uuid in doors or not portal.getClass().getName().endswith(".Door"):
                        continue
                    other = portal.getConnectsTo(room)
                    joins = [room] + ([other.get()] if other.isDefined() else [])
                    doors[uuid] = {"uuid": uuid, "rooms": sorted(str(r.name()).lower() for r in joins),
                                   "open": bool(portal.propPortal().get().isOpen())}
            return list(doors.values())
        except Exception as e:  # py4j raises plain Exceptions
            raise ScienceWorldError(f"ScienceWorld could not list its doors: {e}") from e

    def valid_actions(self) -> list[str]:
        self._require_loaded()
        return [str(a) for a in self._env.get_valid_action_object_combinations()]

    def play_gold(self, task: str, variation: int, split: Split, *, look: bool = False,
                  annotate: bool = False) -> Trajectory:
        """Replay the gold path of (task, variation) and return the whole expert trajectory.

        Args:
            annotate: also record, at every step, the valid actions after it and the type of the action taken
                from it (:class:`~knowmap.schemas.ActionType`, None where the gold action had no valid
                equivalent): what decision-support evaluation judges with. About 0.15 s a step.
        """
        first = self.load(task, variation, split, gold=True)
        actions = self.gold_actions()
        combos = self._typing_tables() if annotate else None
        if combos is not None:
            first = first.model_copy(update={"valid_actions": [str(c["action"]) for c in combos[0]]})
        traj = Trajectory(
            episode_id=episode_id(task, variation, split),
            task=task, variation=variation, split=split, source="expert",
            simplifications=self.simplifications, task_description=self.task_description, steps=[first],
        )
        for action in actions:
            typed = type_action(action, *combos) if combos is not None else None
            record = self.step(action, look=look)
            if combos is not None:
                combos = self._typing_tables(combos[1])
                record = record.model_copy(update={"action_type": typed,
                                                   "valid_actions": [str(c["action"]) for c in combos[0]]})
            traj.steps.append(record)
            if record.done:
                break
        return traj

    def _typing_tables(self, templates: dict[int, str] | None = None) -> tuple[list[dict[str, Any]], dict[int, str],
                                                                              dict[str, dict[str, Any]]]:
        """The state's valid actions with their templates and objects, the template texts, the object referents."""
        try:
            combos = [dict(c) for c in self._env.get_valid_action_object_combinations_with_templates()]
            if templates is None:
                templates = {int(t["template_id"]): str(t["action_example"])
                             for t in self._env.get_possible_actions_with_IDs()}
            referents = {str(k): dict(v) for k, v in self._env.get_all_object_ids_types_referents_LUTJSON().items()}
        except Exception as e:  # py4j raises plain Exceptions
            raise ScienceWorldError(f"ScienceWorld could not type its valid actions: {e}") from e
        return combos, templates, referents

    def new_trajectory(self, source: TrajectorySource, policy: str, seed: int = 0) -> Trajectory:
        """An empty trajectory for the loaded episode, with its stable id."""
        self._require_loaded()
        assert self.task is not None and self.variation is not None and self.split is not None
        return Trajectory(
            episode_id=episode_id(self.task, self.variation, self.split, source, policy, seed),
            task=self.task, variation=self.variation, split=self.split, source=source, policy=policy,
            simplifications=self.simplifications, task_description=self.task_description,
        )

    # -- internals -------------------------------------------------------------------------------------------
    def _score(self) -> float:
        return float(round(100 * float(self._env.server.getScore()), 4))

    def _require_loaded(self) -> None:
        if self._closed:
            raise ScienceWorldError("this ScienceWorld env is closed")
        if self.task is None:
            raise ScienceWorldError("no task is loaded: call load(task, variation, split) first")


def _scala_items(collection: Any) -> list[Any]:
    """The elements of a Scala collection returned through py4j."""
    items, it = [], collection.iterator()
    while it.hasNext():
        items.append(it.next())
    return items


def info(env: ScienceWorld) -> dict[str, Any]:
    """The protocol facts to report with any score: task, variation, split, step limit, simplifications, version."""
    from scienceworld.version import __version__

    return {"task": env.task, "variation": env.variation, "split": env.split, "step_limit": env.step_limit,
            "simplifications": env.simplifications, "scienceworld_version": __version__}
