"""How long the test suite takes on this machine, and whether it passes every time (issue 35's goals).

Runs what CI runs (``pytest`` with ``CI=true``, the whole suite) ``--runs`` times in a row, then the fast tier
(``pytest --fast``, what ``make test-fast`` runs) once, each in a fresh process, on a clean working tree (a result
must describe a commit: uncommitted changes make it refuse). For each run it records the wall time, pytest's
counts from its JUnit XML (passed, failed, errors, skipped) and the 15 slowest tests (setup, call and teardown).
The result is written after every run, so a cut run resumes where it stopped (same commit, same settings).

Goals: the full suite in at most 15 minutes with at least 396 tests, green in every run (three in a row); the fast
tier under 3 minutes. The baseline is the 22.5 minutes that issue 35 measured when it was filed (not re-measured
here: that commit's suite would take that long again). Run from the repository root, with nothing else heavy
running on the machine:

    .venv/bin/python benchmarks/suite_time.py [--runs 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from lib.results import Check, write_result

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "suite_time.json"
BASELINE_S = 22.5 * 60  # issue 35, measured when it was filed
FULL_GOAL_S, FAST_GOAL_S, MIN_TESTS = 15 * 60, 3 * 60, 396


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def run_suite(fast: bool) -> dict[str, Any]:
    """One pytest run in a fresh process: wall seconds, counts and the slowest tests from its JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
        started = time.perf_counter()
        done = subprocess.run(command + (["--fast"] if fast else []), cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "CI": "true"})
        seconds = time.perf_counter() - started
        suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    cases = [(float(c.get("time", 0)), f"{c.get('classname')}::{c.get('name')}") for c in suite.iter("testcase")]
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {"seconds": round(seconds, 1), "exit_code": done.returncode, **counts,
            "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed_tests": failed, "slowest": [[round(t, 1), n] for t, n in sorted(cases, reverse=True)[:15]],
            "summary": done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""}


def checks(full: list[dict[str, Any]], fast: dict[str, Any] | None) -> list[Check]:
    """The goal checks over the runs so far."""
    green = [r["exit_code"] == 0 and r["failures"] == 0 and r["errors"] == 0 for r in full]
    slowest = max((r["seconds"] for r in full), default=None)
    out = [Check("full_suite_seconds_max", slowest, FULL_GOAL_S, "<=", baseline=BASELINE_S,
                 result=[r["seconds"] for r in full],
                 conditions={"3 runs": len(full) >= 3, "green in every run": bool(green) and all(green),
                             f">= {MIN_TESTS} tests": all(r["tests"] >= MIN_TESTS for r in full)},
                 note="the slowest of the runs", details={"ratio_to_baseline": round(slowest / BASELINE_S, 3)
                                                          if slowest else None})]
    if fast is not None:
        out.append(Check("fast_tier_seconds", fast["seconds"], FAST_GOAL_S, "<",
                         conditions={"green": fast["exit_code"] == 0}))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="full-suite runs in a row (default 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    if _git("status", "--porcelain", "--untracked-files=no"):
        parser.error("the working tree has uncommitted changes: commit them first (a result describes a commit)")
    commit = _git("rev-parse", "HEAD")
    protocol = {"commit": commit, "runs": args.runs, "command": "CI=true pytest (the whole suite) / pytest --fast",
                "machine": f"{os.cpu_count()} cores", "python": sys.version.split()[0]}
    result: dict[str, Any] = {"metric": "full_suite_seconds_max", "protocol": protocol, "full": [], "fast": None}
    if args.out.is_file():  # resume a cut run of the same commit and settings
        earlier = json.loads(args.out.read_text())
        if earlier.get("protocol") == protocol:
            result.update(full=earlier.get("full", []), fast=earlier.get("fast"))
    while len(result["full"]) < args.runs:
        print(f"full suite, run {len(result['full']) + 1} of {args.runs} ...", flush=True)
        run = run_suite(fast=False)
        result["full"].append(run)
        print(f"  {run['seconds']:.0f} s: {run['summary']}", flush=True)
        _write(args.out, result)
    if result["fast"] is None:
        print("fast tier ...", flush=True)
        result["fast"] = run_suite(fast=True)
        print(f"  {result['fast']['seconds']:.0f} s: {result['fast']['summary']}", flush=True)
    _write(args.out, result)
    for check in checks(result["full"], result["fast"]):
        print(f"{check.metric}: baseline {check.baseline}, result {check.result}, value {check.value} "
              f"(goal {check.goal_text}) -> {'met' if check.met else 'MISSED'}")
    print(f"wrote {args.out}")
    return 0


def _write(path: Path, result: dict[str, Any]) -> None:
    found = checks(result["full"], result["fast"])
    write_result(path, {**result, "value": found[0].value, "goal": found[0].goal_text, "checks": found})


if __name__ == "__main__":
    sys.exit(main())
