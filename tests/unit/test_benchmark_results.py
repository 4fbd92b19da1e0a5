"""The benchmarks' shared result shape: a :class:`Check` derives ``met`` from its value, goal and direction and writes
the fields the committed result files hold; ``write_result`` writes Checks anywhere in a payload. The benchmark
programs import their helpers from ``benchmarks/lib`` as ``lib`` (``python benchmarks/X.py`` puts ``benchmarks/``
on ``sys.path``), never by editing ``sys.path``."""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
FIELDS = ["metric", "baseline", "result", "value", "goal", "met"]


@pytest.fixture
def results(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``lib.results`` as the benchmark programs import it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("lib.results")


def test_met_follows_from_value_goal_and_direction(results: ModuleType) -> None:
    Check = results.Check
    assert Check("ratio", value=1.3, goal=1.25).met and not Check("ratio", value=1.2, goal=1.25).met
    assert Check("ratio", value=1.25, goal=1.25).met and not Check("ratio", value=1.25, goal=1.25, direction=">").met
    assert Check("p50", value=1.2, goal=1.25, direction="<=").met
    assert not Check("p50", value=1.3, goal=1.25, direction="<=").met
    assert not Check("p50", value=1.25, goal=1.25, direction="<").met
    assert not Check("ratio", value=None, goal=0.0).met  # not measured: never met
    assert not Check("ratio", value=None, goal=1.0, direction="<=").met


def test_every_named_condition_must_hold_too(results: ModuleType) -> None:
    check = results.Check("swap_p99_ratio", value=1.5, goal=2.0, direction="<=", conditions={"0 failures": False})
    assert not check.met and check.goal_text == "<= 2 and 0 failures"
    assert results.Check("swap_p99_ratio", value=1.5, goal=2.0, direction="<=", conditions={"0 failures": True}).met


def test_an_unknown_direction_is_refused_naming_the_allowed_ones(results: ModuleType) -> None:
    with pytest.raises(ValueError, match="allowed: >=, >, <=, <"):
        results.Check("ratio", value=1.0, goal=1.0, direction="=>")


def test_a_check_writes_the_committed_fields_in_their_order(results: ModuleType) -> None:
    committed = json.loads((BENCHMARKS / "results" / "serve_latency.json").read_text())["details"]["checks"][0]
    check = results.Check(committed["metric"], value=committed["value"], goal=1.25, direction="<=",
                          baseline=committed["baseline"], result=committed["result"])
    assert json.dumps(check.to_json()) == json.dumps(committed)  # same keys, order, values, goal text and met
    written = results.Check("env_support", value=1.5, goal=1.2, note="fine-tuned over base",
                            details={"by_mode": {"a": 1.0}}).to_json()
    assert list(written) == [*FIELDS, "by_mode"]
    assert written["goal"] == ">= 1.2 (fine-tuned over base)" and written["met"] is True


def _committed_checks() -> list[tuple[str, dict]]:
    """Every goal check in the committed result files: ``details.checks`` lists and ``details.goals`` dicts."""
    found = []
    for path in sorted((BENCHMARKS / "results").glob("*.json")):
        details = json.loads(path.read_text()).get("details") or {}
        checks = details.get("checks") or []
        goals = details.get("goals")
        if isinstance(goals, dict):
            checks = checks + [g for g in goals.values() if isinstance(g, dict) and "met" in g]
        found += [(path.name, check) for check in checks]
    return found


def test_a_check_writes_every_field_that_the_committed_checks_hold(results: ModuleType) -> None:
    committed = _committed_checks()
    assert {name for name, _ in committed} >= {"decision_support.json", "env_actors.json", "retrain_loop.json",
                                               "serve_latency.json", "service_robustness.json"}
    for name, check in committed:
        extra = {k: v for k, v in check.items() if k not in FIELDS}  # e.g. decision_support's "best", "by_mode"
        written = results.Check("m", value=1.0, goal=1.0, details=extra).to_json()
        assert set(check) <= set(written), (name, check)


def test_write_result_writes_checks_anywhere_in_the_payload(results: ModuleType, tmp_path: Path) -> None:
    check = results.Check("lost_facts", value=0, goal=0, direction="<=", baseline=12, result=0)
    out = results.write_result(tmp_path / "results" / "x.json", {
        "metric": "m", "value": 0.5, "goal": 1.0, "details": {"checks": [check], "goals": {"lost": check}}})
    text = out.read_text()
    assert out == tmp_path / "results" / "x.json" and text.endswith("}\n")
    written = json.loads(text)
    assert written["details"]["checks"] == [check.to_json()] == [written["details"]["goals"]["lost"]]
    assert written["details"]["checks"][0] == {"metric": "lost_facts", "baseline": 12, "result": 0, "value": 0,
                                               "goal": "<= 0", "met": True}


def test_write_result_refuses_what_is_not_json_and_leaves_the_file_alone(results: ModuleType,
                                                                         tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    out.write_text("{}\n")
    with pytest.raises(TypeError, match="plain JSON values and Checks, not object"):
        results.write_result(out, {"details": {"thing": object()}})
    assert out.read_text() == "{}\n"


def _local_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return {n for n in names if (BENCHMARKS / f"{n.split('.')[0]}.py").exists() or n.split(".")[0] == "lib"}


@pytest.mark.parametrize("program", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_programs_import_helpers_from_lib_without_touching_sys_path(program: str) -> None:
    path = BENCHMARKS / program
    assert "sys.path" not in path.read_text()
    for name in _local_imports(path):
        module = BENCHMARKS / (name.replace(".", "/") + ".py")
        assert name.startswith("lib.") or name == "monolith_service", (program, name)  # the monolith is a program
        assert module.exists(), (program, name)
