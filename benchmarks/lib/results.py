"""The result file every benchmark writes, and the goal checks in it.

A result is a JSON object ``{"metric", "value", "goal", "details"}`` (some add ``baseline`` and ratios to it). A
goal check is a :class:`Check`, written as ``{"metric", "baseline", "result", "value", "goal", "met"}``: ``met``
follows from ``value``, ``goal`` and the check's direction (and any further condition the goal names), so no
program writes it by hand.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Direction = Literal[">=", ">", "<=", "<"]
_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


@dataclass(frozen=True)
class Check:
    """One goal of a benchmark: a measured ``value`` (usually result / baseline of the same run) against ``goal``.

    Attributes:
        metric: what is measured, e.g. ``retrieve_p50_ratio``.
        value: the measured value; None (not measured) never meets the goal.
        goal: the bar.
        direction: how ``value`` must compare with ``goal``: ``>=`` (at least), ``>``, ``<=`` (at most) or ``<``.
        baseline: the measurement ``value`` is compared with (the denominator of a ratio), where there is one.
        result: the measurement under test, where ``value`` is not itself it.
        conditions: further conditions the goal names, each by its wording and whether it holds
            (``{"0 failed requests": failed == 0}``); every one must hold for the goal to be met.
        note: what the bar means where the number alone does not say it; part of the written goal.
        details: further fields of the check's JSON (e.g. the modes a ratio was taken over).

    Raises:
        ValueError: ``direction`` is not one of the four allowed.
    """

    metric: str
    value: float | None
    goal: float
    direction: Direction = ">="
    baseline: Any = None
    result: Any = None
    conditions: dict[str, bool] = field(default_factory=dict)
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.direction not in _COMPARE:
            raise ValueError(f"Check {self.metric!r}: direction {self.direction!r} is not allowed; allowed: "
                             + ", ".join(_COMPARE))

    @property
    def met(self) -> bool:
        """Whether ``value`` compares with ``goal`` as ``direction`` says and every condition holds."""
        return (self.value is not None and bool(_COMPARE[self.direction](self.value, self.goal))
                and all(self.conditions.values()))

    @property
    def goal_text(self) -> str:
        """The goal as it reads, e.g. ``<= 2 and 0 failed requests``."""
        text = f"{self.direction} {self.goal:.6g}" + (f" ({self.note})" if self.note else "")
        return " and ".join([text, *self.conditions])

    def to_json(self) -> dict[str, Any]:
        """The check as its result file holds it: ``metric``, ``baseline``, ``result``, ``value``, ``goal`` (its
        text), ``met``, then ``details``."""
        return {"metric": self.metric, "baseline": self.baseline, "result": self.result, "value": self.value,
                "goal": self.goal_text, "met": self.met, **self.details}


def write_result(path: Path | str, payload: dict[str, Any]) -> Path:
    """Write a benchmark's result as JSON (2-space indented, a final newline), making the folder if needed.

    Args:
        path: the result file, usually ``benchmarks/results/<benchmark>.json``.
        payload: plain JSON values; a :class:`Check` anywhere in it is written as :meth:`Check.to_json`.

    Returns:
        ``path``.

    Raises:
        TypeError: ``payload`` holds something that is neither plain JSON nor a Check.
    """
    path = Path(path)
    text = json.dumps(payload, indent=2, default=_to_json) + "\n"  # encode before touching the file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _to_json(value: Any) -> Any:
    if isinstance(value, Check):
        return value.to_json()
    raise TypeError(f"a benchmark result holds plain JSON values and Checks, not {type(value).__name__}: "
                    "convert it first (e.g. model_dump(mode='json'))")
