"""Quality gates: `metric op threshold` checks on an evaluation report that can fail a build."""

from __future__ import annotations

import difflib
import math
import operator
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from trtcompress.errors import RecipeError
from trtcompress.eval.config import EvalConfig
from trtcompress.eval.harness import GATE_METRICS, EvalReport, measured_metrics

OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}
# Loose on the metric and the value, so that a misspelt metric or a non-numeric threshold gets its own
# error (unknown metric with a suggestion; "not a number") instead of "not of the form" or a bare
# "could not convert string to float".
_GATE = re.compile(r"^\s*([^\s<>=!]+)\s*(<=|>=|<|>)\s*(\S+)\s*$")


class Gate(BaseModel):
    """Written in a recipe as a string, e.g. `ppl_ratio <= 1.05` or `gsm8k_top1 >= 0.9`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str
    op: Literal["<=", "<", ">=", ">"]
    # Finite only: a NaN threshold can never pass, an infinite one (`<= 1e999`) can never fail.
    value: float = Field(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _parse_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            match = _GATE.match(data)
            if not match:
                raise ValueError(f"gate {data!r} is not of the form 'metric <= value' (ops: <=, <, >=, >)")
            try:
                value = float(match[3])
            except ValueError:
                raise ValueError(f"gate {data!r}: the threshold {match[3]!r} is not a number") from None
            return {"metric": match[1], "op": match[2], "value": value}
        return data

    @field_validator("value", mode="before")
    @classmethod
    def _not_a_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):  # YAML `value: yes` would otherwise become the threshold 1.0
            raise ValueError(f"gate value must be a number, not {v!r}")
        return v

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
        # repr: the shortest text that parses back to the same float. `:g` kept 6 digits, so a gate
        # re-read from its string (manifest, `--gate` appending to a recipe's gates) moved its
        # threshold: `weight_bytes <= 70123456` became 70123500.
        value = repr(self.value)
        return f"{self.metric} {self.op} {value.removesuffix('.0')}"


class GateResult(BaseModel):
    gate: str
    metric: str
    value: float | None
    passed: bool
    reason: str = ""


def _needs(metric: str) -> list[tuple[str, str]]:
    """The settings that measure a metric: (the EvalConfig field or "kv_codec", how to set it)."""
    needs = []
    if metric.startswith("kv_"):
        needs.append(("kv_codec", "a KV-cache codec (kv_cache.codec in the recipe, or eval --kv)"))
    if metric.startswith("gsm8k_exact_match"):
        needs.append(("gsm8k_generate", "eval.gsm8k_generate > 0"))
    elif metric.startswith("gsm8k_"):
        needs.append(("gsm8k_problems", "eval.gsm8k_problems > 0"))
    elif metric.startswith("gsm_symbolic_"):
        needs.append(("gsm_symbolic_problems", "eval.gsm_symbolic_problems > 0"))
    if metric.endswith(("_ref", "_ratio", "_kl", "_top1")) and metric != "kv_bytes_per_token_ref":
        needs.append(("reference", "the reference model (eval.reference)"))
    return needs


def _not_measured(metric: str, met: frozenset[str] = frozenset()) -> str:
    """Why a metric has no value: the settings that would have measured it, less those already `met`
    (`gsm8k_exact_match_ref` with eval.gsm8k_generate 2 and no reference asked for the generate setting
    it had)."""
    needs = [text for setting, text in _needs(metric) if setting not in met]
    return "metric not measured" + (f": it needs {' and '.join(needs)}" if needs else "")


def _settings_met(config: EvalConfig, kv_codec: bool) -> frozenset[str]:
    fields = ("gsm8k_generate", "gsm8k_problems", "gsm_symbolic_problems", "reference")
    return frozenset(name for name in fields if getattr(config, name)) | ({"kv_codec"} if kv_codec else set())


def check_measurable(gates: list[Gate], config: EvalConfig, *, kv_codec: bool) -> None:
    """Refuse gates on metrics the recipe's evaluation will not measure, before minutes of compression:
    such a gate can only fail (a gate on `gsm8k_exact_match` with `eval.gsm8k_generate: 0` failed the
    build after the whole compression and evaluation had run)."""
    measured = measured_metrics(config, reference=config.reference, kv_codec=kv_codec)
    met = _settings_met(config, kv_codec)
    unmeasured = [
        f"{gate} ({_not_measured(gate.metric, met)})" for gate in gates if gate.metric not in measured
    ]
    if unmeasured:
        raise RecipeError(
            "gate(s) on metrics this recipe's evaluation does not measure, so they could only fail: "
            + "; ".join(unmeasured)
        )


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
                    reason=_not_measured(gate.metric),
                )
            )
            continue
        value = float(value)
        # NaN compares false with everything, so it already fails; say why rather than leave it blank.
        reason = "metric is NaN (the model's outputs overflowed or are broken)" if math.isnan(value) else ""
        passed = OPS[gate.op](value, gate.value)
        results.append(
            GateResult(gate=str(gate), metric=gate.metric, value=value, passed=passed, reason=reason)
        )
    broken = _non_finite(values)
    if broken:  # a gate of its own, whatever the recipe declares (the default preset declares none)
        results.append(
            GateResult(
                gate=FINITE_GATE,
                metric=broken[0],
                value=float(values[broken[0]]),
                passed=False,
                reason=f"non-finite {', '.join(broken)}: the model's outputs overflowed or are broken",
            )
        )
    return results


FINITE_GATE = "every metric finite"


def _non_finite(values: dict) -> list[str]:
    """The measured metrics that are NaN or infinite: a build whose model is broken never passes, even
    with no gate on the metric (a NaN perplexity with no gates was written as a good artifact)."""
    return [
        name
        for name in GATE_METRICS
        if isinstance(values.get(name), int | float) and not math.isfinite(values[name])
    ]
