"""Quality gates: `metric op threshold` checks on an evaluation report that can fail a build."""

from __future__ import annotations

import difflib
import operator
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_serializer, model_validator

from trtcompress.eval.harness import GATE_METRICS, EvalReport

OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}
_GATE = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")


class Gate(BaseModel):
    """Written in a recipe as a string, e.g. `ppl_ratio <= 1.05` or `gsm8k_top1 >= 0.9`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str
    op: Literal["<=", "<", ">=", ">"]
    value: float

    @model_validator(mode="before")
    @classmethod
    def _parse_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            match = _GATE.match(data)
            if not match:
                raise ValueError(f"gate {data!r} is not of the form 'metric <= value' (ops: <=, <, >=, >)")
            return {"metric": match[1], "op": match[2], "value": float(match[3])}
        return data

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in GATE_METRICS:
            hint = difflib.get_close_matches(v, GATE_METRICS, 1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"unknown gate metric {v!r}{did_you_mean}; known: {', '.join(GATE_METRICS)}")
        return v

    @model_serializer
    def _as_string(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


class GateResult(BaseModel):
    gate: str
    metric: str
    value: float | None
    passed: bool
    reason: str = ""


def check_gates(gates: list[Gate], report: EvalReport) -> list[GateResult]:
    values = report.model_dump()
    results = []
    for gate in gates:
        value = values.get(gate.metric)
        if value is None:
            results.append(
                GateResult(
                    gate=str(gate),
                    metric=gate.metric,
                    value=None,
                    passed=False,
                    reason="metric not measured (is the reference or that dataset disabled?)",
                )
            )
            continue
        passed = OPS[gate.op](float(value), gate.value)
        results.append(GateResult(gate=str(gate), metric=gate.metric, value=float(value), passed=passed))
    return results
