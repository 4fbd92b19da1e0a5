"""KB fidelity: the environmental KB's current facts against ScienceWorld's own object tree, after every step.

Plays, on the **test** split, the first ``--variations`` test variations of every task (``--tasks``): the gold path,
and an episode of the seeded random policy over the valid actions (``--random-steps`` steps) so off-path states
are covered too. Episodes run through :class:`knowmap.agent.rollout.EpisodeRunner` with a free ``look around`` and
inventory after every step, and every step's ``record.as_observation()`` goes into a fresh
:class:`knowmap.kb.environment_kb.EnvironmentKB`, exactly as the agents feed theirs.

After each step :class:`knowmap.evaluation.fidelity_tally.FidelityTally` compares ``kb.current()`` with
``env.getObjectTree()``
and ScienceWorld's referent table (the module docstring there defines names, scope, precision, recall and
staleness). Reported per relation and per task, with the extraction + KB-update time per observation against
the env step time (goal <= 5%), and the residue of the extractor's per-line parse.

Baseline, measured in the same run on the same steps: a KB fed by a one-regex extractor that only reads the
top-level object names of the look around (``room contains name``) and the agent's room. Run from the repository
root (one JVM):

    .venv/bin/python benchmarks/kb_fidelity.py [--tasks boil,melt] [--variations 3] [--random-steps 20] [--out PATH]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from lib.results import write_result

from knowmap.agent.rollout import EpisodeRunner, EpisodeSpec
from knowmap.environment.sciworld import check_tasks, info
from knowmap.evaluation.fidelity import CHECKED, TEMPERATURE_TOLERANCE_C, WorldState
from knowmap.evaluation.fidelity_tally import Counts, FidelityTally, total
from knowmap.kb.environment_kb import EnvironmentKB
from knowmap.kb.extraction import Extraction, extract_line, listing_container, object_lines
from knowmap.schemas import Observation, Relation, StepRecord, Trajectory, Triple

GOAL = 0.97  # min(precision, recall); the goals in full are GOALS
GOALS = {"precision_min": 0.99, "recall_min": 0.97, "per_task_min": 0.95, "staleness_max": 0.01,
         "ingest_fraction_max": 0.05}
SPLIT = "test"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "kb_fidelity.json"
_ROOM = re.compile(r"^This (?:room|outside location) is called the (.+?)\.")
_HEAD = re.compile(r"^(?:an?|the) ([^,.(]+)", re.IGNORECASE)
# What the object tree cannot judge, so the KB's facts of these kinds are counted but not checked.
UNCHECKABLE: dict[str, str] = {
    "portal": "'door to X' facts the KB could not name by both rooms (it did not know the agent's room) and drains "
              "(LiquidDrain portals, absent from the tree and not read from the JVM): not checked",
    "reading (ticks)": "a stopwatch's ticks are counted by the device, not stored in the tree (a thermometer's "
                       "reading is its own temperatureC, which is checked)",
    "focus": "the focused object is task state, not object state",
    "property (other)": "life stage, titles, pollen, positions on a plane, wiring and recipes are not in the "
                        "tree's JSON (LifeProperties.toJSON has isDead and isSickly, not the stage)",
}


class TopLevelNamesExtractor:
    """The baseline: ``(room, contains, name)`` for each top-level line of the look around, and the agent's room."""

    def extract(self, observation: Observation) -> Extraction:
        """Facts of the look around only; nested contents, states and feedback are ignored."""
        look = observation.look or ""
        room = _ROOM.match(look.strip())
        if room is None:
            return Extraction()
        name = room.group(1).lower()
        triples = [Triple(subject="agent", relation=Relation.LOCATION, object=name)]
        for line in object_lines(look):
            head = _HEAD.match(line)
            if head and head.group(1).strip().lower() != "agent" and not line.startswith("A door"):
                triples.append(Triple(subject=name, relation=Relation.CONTAINS, object=head.group(1).strip()))
        return Extraction(triples=triples, full_sets=[(name, Relation.CONTAINS)])


class Bench:
    """The counters of one run: both KBs' tallies, per-task counts, timings and the extractor's residue."""

    def __init__(self) -> None:
        self.kb = FidelityTally()
        self.baseline = FidelityTally(max_examples=0)
        self.per_task: dict[str, dict[str, Counts]] = {}
        self.per_policy: dict[str, Counts] = {"expert": Counts(), "random": Counts()}
        self.ingest_ms: dict[str, list[float]] = {"expert": [], "random": []}
        self.step_ms: dict[str, list[float]] = {"expert": [], "random": []}
        self.check_ms: list[float] = []
        self.lines = {"lines": 0, "with_residue": 0}
        self.residue: dict[str, list[str]] = {}
        self.episodes: list[dict[str, Any]] = []
        self._line_cache: dict[tuple[str, str], list[str]] = {}

    def residue_of(self, record: StepRecord) -> None:
        """Count the object lines of the step's listings and those the per-line parse left residue in."""
        for text in {t for t in (record.look, record.inventory, record.observation) if t}:
            container = listing_container(text)
            if container is None:
                continue
            for line in object_lines(text):
                key = (line, container)
                if key not in self._line_cache:
                    self._line_cache[key] = extract_line(line, container).residue
                self.lines["lines"] += 1
                if self._line_cache[key]:
                    self.lines["with_residue"] += 1
                    self.residue.setdefault(line, self._line_cache[key])

    def play(self, runner: EpisodeRunner, spec: EpisodeSpec) -> None:
        """Play one episode, checking both KBs against the tree after every step."""
        kb = EnvironmentKB(f"{spec.task}-{spec.variation}-{spec.policy}")
        base = EnvironmentKB(f"base-{spec.task}-{spec.variation}-{spec.policy}", extractor=TopLevelNamesExtractor())
        self.kb.new_episode()
        self.baseline.new_episode()
        task = self.per_task.setdefault(spec.task, {k: Counts() for k in CHECKED})
        last = [0.0]
        doors: dict[str, dict[str, Any]] = {}

        def on_step(trajectory: Trajectory, record: StepRecord) -> None:
            start = time.perf_counter()
            if record.step > 0:
                self.step_ms[spec.policy].append(1000 * (start - last[0]))
            observation = record.as_observation()
            kb.ingest(observation)
            self.ingest_ms[spec.policy].append(1000 * (time.perf_counter() - start))
            base.ingest(observation)
            checked = time.perf_counter()
            # Doors are read from the JVM: all of them once, then the agent's room's (only those can change).
            doors.update((d["uuid"], d) for d in runner.env.doors(everywhere=not doors))
            world = WorldState(runner.env.object_tree(), runner.env.object_referents(), doors.values())
            texts = [record.observation, record.look or "", record.inventory or ""]
            counts = self.kb.check(world, kb.current(), texts, record.step, spec.label())
            self.baseline.check(world, base.current(), texts, record.step, spec.label())
            for kind, c in counts.items():
                task[kind].add(c)
            self.per_policy[spec.policy].add(total(counts))
            self.residue_of(record)
            self.check_ms.append(1000 * (time.perf_counter() - checked))
            last[0] = time.perf_counter()

        started = time.perf_counter()
        row: dict[str, Any] = {"episode": spec.label()}
        try:
            runner.ensure_env()
            trajectory = runner.run(spec, on_step=on_step)
            row.update(steps=len(trajectory.steps) - 1, score=trajectory.final_score, facts=len(kb))
        except Exception as e:  # noqa: BLE001 - one broken episode is reported, the run goes on
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        row["seconds"] = round(time.perf_counter() - started, 2)
        self.episodes.append(row)


def _fraction(ingest: dict[str, Any], step: dict[str, Any]) -> float | None:
    return round(ingest["mean"] / step["mean"], 6) if ingest["mean"] and step["mean"] else None


def _brief(c: Counts) -> dict[str, Any]:
    s = c.summary()
    return {k: s[k] for k in ("checked", "precision", "truth", "recall", "stale", "ambiguous", "unmatched")}


def _ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None}
    return {"mean": round(statistics.fmean(values), 4), "median": round(statistics.median(values), 4), "n": len(values)}


def report(bench: Bench, args: argparse.Namespace, protocol: dict[str, Any], variations: dict[str, list[int]],
           seconds: float, complete: bool) -> dict[str, Any]:
    """The result JSON (also written while the run is in progress, with ``complete`` False)."""
    overall, base = total(bench.kb.per_relation).summary(), total(bench.baseline.per_relation).summary()
    value = min(overall["precision"] or 0.0, overall["recall"] or 0.0)
    base_value = min(base["precision"] or 0.0, base["recall"] or 0.0)
    ingest, step_all = _ms(bench.ingest_ms["expert"] + bench.ingest_ms["random"]), _ms(
        bench.step_ms["expert"] + bench.step_ms["random"])
    fractions = {p: _fraction(_ms(bench.ingest_ms[p]), _ms(bench.step_ms[p])) for p in ("expert", "random")}
    fraction = _fraction(ingest, step_all)
    return {
        "metric": "kb_fidelity_min_precision_recall",
        "value": round(value, 6),
        "goal": GOAL,
        "baseline": round(base_value, 6),
        "ratio_to_goal": round(value / GOAL, 6),
        "ratio_to_baseline": round(value / base_value, 6) if base_value else None,
        "details": {
            "complete": complete,
            "goals": GOALS,
            "goals_met": goals_met(overall, {k: total(c).summary() for k, c in bench.per_task.items()}, fraction),
            "precision": overall["precision"], "recall": overall["recall"], "staleness": overall["staleness"],
            "memory_precision": overall["memory_precision"],
            "totals": overall,
            "per_relation": {k: c.summary() for k, c in bench.kb.per_relation.items()},
            "per_task": {k: total(c).summary() for k, c in bench.per_task.items()},
            "per_task_relation": {k: {r: _brief(x) for r, x in c.items() if x.checked or x.truth}
                                  for k, c in bench.per_task.items()},
            "per_policy": {k: c.summary() for k, c in bench.per_policy.items()},
            "unchecked_fact_checks": dict(bench.kb.unchecked),
            "baseline_totals": base,
            "baseline_per_relation": {k: c.summary() for k, c in bench.baseline.per_relation.items()},
            "ms_per_observation": {**ingest, "expert": _ms(bench.ingest_ms["expert"]),
                                   "random": _ms(bench.ingest_ms["random"])},
            "step_ms": {"all": step_all, "expert": _ms(bench.step_ms["expert"]),
                        "random": _ms(bench.step_ms["random"])},
            "ingest_fraction_of_step": fraction, "ingest_fraction_by_policy": fractions,
            "ingest_fraction_goal": 0.05,
            "check_ms_per_step": _ms(bench.check_ms),
            "residue": {**bench.lines, "unique_lines_with_residue": len(bench.residue),
                        "sample": dict(list(bench.residue.items())[:20])},
            "false_facts_most_checked": bench.kb.examples(60),
            "false_facts_distinct": len(bench.kb.false_facts),
            "missed_facts_most_checked": [{"fact": f, "fact_steps": n} for f, n in bench.kb.missed.most_common(40)],
            "episodes": bench.episodes,
            "seconds": round(seconds, 1),
            "protocol": {
                "split": SPLIT, "tasks": list(variations), "variations": variations,
                "variations_per_task": args.variations,
                "policies": {"expert": "the gold path of ScienceWorld's generator, not cut at the step limit",
                             "random": f"RandomPolicy over the valid actions, {args.random_steps} steps, seeded "
                                       "by task/variation/seed 0"},
                "observation": "feedback + free look around + inventory after every step "
                               "(EpisodeRunner look_every_step=True), fed as record.as_observation()",
                "ground_truth": "env.getObjectTree() and get_all_object_ids_types_referents_LUTJSON() after the "
                                "step, read through ScienceWorld.object_tree() / object_referents(); doors (portals, "
                                "absent from the tree) from the JVM through ScienceWorld.doors(): every door at "
                                "the first step, the agent's room's after each step",
                "names": "a KB name matches a tree object whose tree name or referent normalises to it (article, "
                         "'substance called', state prefix and life stage dropped; generic referents like "
                         "'substance' ignored); several matches: true if any satisfies the fact, counted ambiguous",
                "scope": "in view = inside the agent's room at any depth (inventory included) and named, as whole "
                         "words, in the step's feedback, look or inventory text. Precision: current KB facts "
                         "whose subject or object is in view, the agent's location, and facts naming no object "
                         "at all ('unmatched', false). Facts only about objects out of view: memory_precision",
                "recall": "true facts of objects in view that the text reveals: containment (their parent), the "
                          "agent's room, the doors of the room the text names (state and connection), and "
                          "open/closed, on/off, state of matter, dead only where the display "
                          "template states them next to the object's name (regexes in "
                          "knowmap.evaluation.fidelity.revealed)",
                "staleness": "checked KB facts that were true at an earlier check of the same episode and are "
                             "false now (a change the KB did not see), over all checked facts",
                "relations": {"checked": list(CHECKED),
                              "containment": "contains facts and non-agent location facts (inverses in the KB), "
                                             "counted once; (S, contains, X #k) is true if an object S names "
                                             "holds at least k objects X names; recall counts each of n identical "
                                             "items apart",
                              "door_state": "a 'door between A and B' fact against the JVM's door joining A and B",
                              "connects_to": "(A, connects_to, B) is true if a door joins A and B",
                              "temperature": f"a measurement 'N degrees celsius at step s' is true if the object's "
                                             f"temperatureC after step s or s-1 was within "
                                             f"{TEMPERATURE_TOLERANCE_C} C of N",
                              "property": "only 'dead' (propLife.isDead), 'unwell' (isSickly) and 'on fire' "
                                          "(propMaterial.isCombusting)",
                              "uncheckable": UNCHECKABLE},
                "timing": "ms_per_observation: EnvironmentKB.ingest (extraction + update) of one observation; "
                          "step_ms: wall time from the end of one step's checks to the next observation (policy, "
                          "env.step with the look and inventory; the random policy also builds valid actions)",
                "random_step_limit": args.random_steps, "simplifications": protocol.get("simplifications", ""),
                "scienceworld_version": protocol.get("scienceworld_version"),
            },
        },
    }


def goals_met(overall: dict[str, Any], per_task: dict[str, dict[str, Any]], fraction: float | None
              ) -> dict[str, bool]:
    """Each of :data:`GOALS`, met or not, from the run's totals, its per-task totals and its ingest fraction."""
    worst = min((min(t["precision"] or 1.0, t["recall"] or 1.0) for t in per_task.values()), default=0.0)
    return {"precision_min": (overall["precision"] or 0.0) >= GOALS["precision_min"],
            "recall_min": (overall["recall"] or 0.0) >= GOALS["recall_min"],
            "per_task_min": worst >= GOALS["per_task_min"],
            "staleness_max": (overall["staleness"] or 0.0) <= GOALS["staleness_max"],
            "ingest_fraction_max": fraction is not None and fraction <= GOALS["ingest_fraction_max"]}


def _print(result: dict[str, Any]) -> None:
    d = result["details"]
    print(f"{'relation':<18} {'checked':>8} {'prec':>7} {'truth':>7} {'recall':>7} {'stale':>7} {'ambig':>6} "
          f"{'unmatch':>7} {'base P':>7} {'base R':>7}")
    for name, r in d["per_relation"].items():
        b = d["baseline_per_relation"][name]
        print(f"{name:<18} {r['checked']:>8} {_f(r['precision'])} {r['truth']:>7} {_f(r['recall'])} "
              f"{_f(r['staleness'])} {r['ambiguous']:>6} {r['unmatched']:>7} {_f(b['precision'])} {_f(b['recall'])}")
    print(f"{'task':<52} {'checked':>8} {'prec':>7} {'recall':>7} {'stale':>7}")
    for task, r in sorted(d["per_task"].items(), key=lambda kv: min(kv[1]["precision"] or 1, kv[1]["recall"] or 1)):
        print(f"{task:<52} {r['checked']:>8} {_f(r['precision'])} {_f(r['recall'])} {_f(r['staleness'])}")
    print(f"TOTAL precision {_f(d['precision'])} recall {_f(d['recall'])} staleness {_f(d['staleness'])} "
          f"memory precision {_f(d['memory_precision'])}")
    print(f"goal {result['goal']}: value {result['value']:.4f}, value/goal = {result['ratio_to_goal']:.3f}; "
          f"baseline (top-level names only) {result['baseline']:.4f}: value/baseline = {result['ratio_to_baseline']}")
    print(f"extraction + KB update {d['ms_per_observation']['mean']} ms per observation; env step "
          f"{d['step_ms']['all']['mean']} ms; fraction {d['ingest_fraction_of_step']} (goal <= 0.05; by policy "
          f"{d['ingest_fraction_by_policy']})")
    print(f"lines with residue: {d['residue']['with_residue']}/{d['residue']['lines']}; took {d['seconds']:.0f} s")


def _f(x: float | None) -> str:
    return f"{x:>7.4f}" if x is not None else f"{'-':>7}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="all", help="comma-separated task names (default: all 30)")
    parser.add_argument("--variations", type=int, default=3, help="first N test variations per task (default 3)")
    parser.add_argument("--random-steps", type=int, default=20, help="steps of the random-policy episode")
    parser.add_argument("--no-random", action="store_true", help="gold paths only")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    tasks = check_tasks(args.tasks.split(","))

    bench, variations = Bench(), {}
    started = time.perf_counter()
    runner = EpisodeRunner(step_limit=args.random_steps, look_every_step=True)
    try:
        for task in tasks:
            variations[task] = runner.env.variations(task, SPLIT)[: args.variations]
            for variation in variations[task]:
                for policy in ("expert",) if args.no_random else ("expert", "random"):
                    bench.play(runner, EpisodeSpec(task=task, variation=variation, split=SPLIT, policy=policy))
            partial = report(bench, args, info(runner.env), variations, time.perf_counter() - started, False)
            write_result(args.out, partial)
            print(f"{task}: precision {_f(partial['details']['per_task'][task]['precision'])} recall "
                  f"{_f(partial['details']['per_task'][task]['recall'])} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
        result = report(bench, args, info(runner.env), variations, time.perf_counter() - started, True)
    finally:
        runner.close()
    write_result(args.out, result)
    _print(result)
    print(f"wrote {args.out}")
    print(f"goals {GOALS}: met {result['details']['goals_met']}")
    return 0 if all(result["details"]["goals_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
