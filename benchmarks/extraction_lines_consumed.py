"""Lines fully consumed: the fraction of listed object lines the rule-based extractor parses with nothing left over.

Plays the gold path of every ScienceWorld task (train split, first train variation; ``--split`` for others)
with the real JVM, taking a free ``look around`` after every step, and runs
:func:`knowmap.kb.extraction.extract_line` on every object line of every ``look around``, ``look in`` and inventory
observation, door lines under ``You also see:`` included.

A line is *fully consumed* when it yields at least one fact and no clause of it is left unparsed (no residue).
This says nothing about whether the facts are right: a line split at the wrong comma is consumed all the same.
Correctness is measured against the simulator's own state by ``benchmarks/kb_fidelity.py`` (precision and
recall); this benchmark guards the other side, text the rules do not read at all. The baseline, measured in the
same run, is a one-regex extractor that only understands bare ``article + name`` lines. Run from the repository
root:

    .venv/bin/python benchmarks/extraction_lines_consumed.py [--tasks boil,melt] [--out PATH]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

from lib.results import write_result

from knowmap.environment.sciworld import ScienceWorld, info
from knowmap.kb.extraction import RuleBasedExtractor, extract_line, listing_container, object_lines
from knowmap.schemas import Trajectory

GOAL = 0.95
SPLIT = "train"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "extraction_lines_consumed.json"
_BARE_NAME = re.compile(r"^(?:a|an|the) [A-Za-z0-9 -]+$", re.IGNORECASE)


def listings(trajectory: Trajectory) -> list[str]:
    """Every listing text of a trajectory: each step's look and inventory, and feedback that is a listing."""
    out: list[str] = []
    for step in trajectory.steps:
        seen: set[str] = set()
        for text in (step.look, step.inventory, step.observation):
            if text and text.strip() not in seen and listing_container(text) is not None:
                seen.add(text.strip())
                out.append(text)
    return out


def measure(trajectory: Trajectory) -> dict[str, Any]:
    """Per-task counts: lines, covered, with a fact, baseline-covered, unique lines, uncovered examples."""
    lines = covered = with_fact = baseline = 0
    unique: dict[str, bool] = {}
    uncovered: dict[str, list[str]] = {}
    for text in listings(trajectory):
        container = listing_container(text) or ""
        for line in object_lines(text):
            facts = extract_line(line, container)
            lines += 1
            covered += facts.covered
            with_fact += bool(facts.triples)
            baseline += bool(_BARE_NAME.match(line))
            unique[line] = facts.covered
            if not facts.covered:
                uncovered.setdefault(line, facts.residue)
    return {"lines": lines, "covered": covered, "fraction": covered / lines if lines else 1.0,
            "with_fact": with_fact, "baseline_covered": baseline, "unique_lines": len(unique),
            "unique_covered": sum(unique.values()), "steps": len(trajectory.steps),
            "final_score": trajectory.final_score, "uncovered": uncovered}


def time_extraction(trajectories: list[Trajectory]) -> float:
    """Mean milliseconds for ``RuleBasedExtractor.extract`` over every step (feedback + look + inventory)."""
    extractor = RuleBasedExtractor()
    observations = [s.as_observation() for tr in trajectories for s in tr.steps]
    start = time.perf_counter()
    for obs in observations:
        extractor.extract(obs)
    return 1000 * (time.perf_counter() - start) / max(1, len(observations))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="", help="comma-separated task names (default: all 30)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default: {DEFAULT_OUT})")
    parser.add_argument("--split", default=SPLIT, choices=["train", "dev", "test"],
                        help="split whose first variation is replayed (the reported protocol is train; dev or "
                             "test checks the rules on variations they were not written from)")
    parser.add_argument("--step-limit", type=int, default=500, help="env step limit for gold replays")
    parser.add_argument("--sample", type=int, default=40, help="how many uncovered lines to list in the JSON")
    args = parser.parse_args(argv)

    per_task: dict[str, dict[str, Any]] = {}
    trajectories: list[Trajectory] = []
    variations: dict[str, int] = {}
    started = time.perf_counter()
    with ScienceWorld(step_limit=args.step_limit) as env:
        tasks = [env.check_task(t.strip()) for t in args.tasks.split(",") if t.strip()] or env.task_names
        for task in tasks:
            variations[task] = env.variations(task, args.split)[0]
            trajectory = env.play_gold(task, variations[task], args.split, look=True)
            trajectories.append(trajectory)
            per_task[task] = measure(trajectory)
        protocol = info(env)
    replay_s = time.perf_counter() - started

    total = {k: sum(r[k] for r in per_task.values())
             for k in ("lines", "covered", "with_fact", "baseline_covered", "unique_lines", "unique_covered")}
    value = total["covered"] / total["lines"] if total["lines"] else 0.0
    base = total["baseline_covered"] / total["lines"] if total["lines"] else 0.0
    unique_value = total["unique_covered"] / total["unique_lines"] if total["unique_lines"] else 0.0
    ms = time_extraction(trajectories)

    print(f"{'task':<50} {'lines':>7} {'consumed':>8} {'fraction':>9} {'baseline':>9}")
    for task, r in per_task.items():
        print(f"{task:<50} {r['lines']:>7} {r['covered']:>8} {r['fraction']:>9.4f} "
              f"{r['baseline_covered'] / max(1, r['lines']):>9.4f}")
    print(f"{'TOTAL':<50} {total['lines']:>7} {total['covered']:>8} {value:>9.4f} {base:>9.4f}")
    print(f"unique lines: {total['unique_covered']}/{total['unique_lines']} = {unique_value:.4f}")
    print(f"goal {GOAL}: value/goal = {value / GOAL:.3f}; baseline (bare 'article name' lines) {base:.4f}: "
          f"value/baseline = {value / base if base else float('inf'):.2f}")
    print(f"extraction: {ms:.3f} ms per observation (feedback + look + inventory); replay took {replay_s:.0f} s")

    uncovered = [{"task": task, "line": line, "residue": residue}
                 for task, r in per_task.items() for line, residue in r["uncovered"].items()]
    result = {
        "metric": "extraction_lines_fully_consumed",
        "value": round(value, 6),
        "goal": GOAL,
        "baseline": round(base, 6),
        "ratio_to_goal": round(value / GOAL, 6),
        "ratio_to_baseline": round(value / base, 6) if base else None,
        "details": {
            "definition": "fully consumed object lines / all object lines of look-around, look-in and inventory "
                          "observations; fully consumed = at least one fact and no unparsed clause. Not a measure "
                          "of correctness: see kb_fidelity.json for precision and recall against the simulator",
            "baseline_definition": "lines that are only an article and a name (what a one-regex extractor parses)",
            "totals": total,
            "unique_line_coverage": round(unique_value, 6),
            "lines_with_a_fact": round(total["with_fact"] / max(1, total["lines"]), 6),
            "extract_ms_per_observation": round(ms, 4),
            "per_task": {task: {k: v for k, v in r.items() if k != "uncovered"} for task, r in per_task.items()},
            "uncovered_sample": uncovered[: args.sample],
            "uncovered_unique_lines": len(uncovered),
            "protocol": {
                "tasks": list(per_task), "split": args.split,
                "variation": f"first {args.split} variation of each task",
                "variations": variations, "step_limit": args.step_limit, "look_after_every_step": True,
                "simplifications": protocol["simplifications"],
                "scienceworld_version": protocol["scienceworld_version"],
                "note": "gold paths come from ScienceWorld's generator; tasks with random processes (bees, "
                        "plant growth) can give slightly different paths between runs",
            },
        },
    }
    write_result(args.out, result)
    print(f"wrote {args.out}")
    return 0 if value >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
