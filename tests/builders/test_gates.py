import pytest

from trtcompress.builders.gates import Gate, check_gates
from trtcompress.eval.harness import EvalReport


def _report(**values):
    base = dict(
        model="m",
        recipe="r",
        ppl=20.0,
        weight_bytes=1,
        bits_per_param=4.0,
        eval_seconds=1.0,
        protocol={},
        details={},
    )
    return EvalReport(**(base | values))


@pytest.mark.parametrize(
    ("gate", "passed"),
    [
        ("ppl_ratio <= 1.05", True),
        ("ppl_ratio < 1.04", False),
        ("gsm8k_top1 >= 0.9", True),
        ("gsm8k_kl > 0.1", False),
    ],
)
def test_gate_verdicts(gate, passed):
    report = _report(ppl_ratio=1.04, gsm8k_top1=0.95, gsm8k_kl=0.05)
    [result] = check_gates([Gate.model_validate(gate)], report)
    assert result.passed is passed


def test_unmeasured_metric_fails_with_a_reason():
    [result] = check_gates([Gate.model_validate("gsm8k_kl <= 0.1")], _report())
    assert not result.passed and "not measured" in result.reason


def test_gate_serialises_as_its_string():
    gate = Gate.model_validate("ppl_ratio<=1.5")
    assert gate.model_dump() == "ppl_ratio <= 1.5"
    assert Gate.model_validate({"metric": "ppl", "op": ">", "value": 2}).metric == "ppl"
