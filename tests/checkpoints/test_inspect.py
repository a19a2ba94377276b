"""`inspect` and the failed-gates refusal of `repo` / `serve` say why a gate failed."""

from tests.checkpoints.conftest import edited_copy
from trtcompress.checkpoints.inspect import inspect_artifact
from trtcompress.errors import ArtifactError
from trtcompress.ui import UI

BROKEN = {
    "gate": "every metric finite",
    "metric": "ppl",
    "value": float("inf"),
    "passed": False,
    "reason": "non-finite ppl, ppl_ratio: the model's outputs overflowed or are broken",
}


def _failed(manifest):
    manifest["status"] = "failed_gates"
    manifest["gates"] = [{"gate": "ppl_ratio <= 2", "metric": "ppl_ratio", "value": 1.5, "passed": True,
                          "reason": ""}, BROKEN]  # fmt: skip


def test_inspect_prints_a_failed_gates_reason(small_artifact, tmp_path, capsys):
    """The implicit finiteness gate printed "FAIL (measured inf)" without naming the metrics that were
    not finite, which the manifest records."""
    artifact = edited_copy(small_artifact, tmp_path, _failed)
    inspect_artifact(artifact, verify=True, as_json=False, ui=UI())
    out = capsys.readouterr().out
    assert "gate every metric finite: FAIL (measured inf): non-finite ppl, ppl_ratio" in " ".join(out.split())
    assert "gate ppl_ratio <= 2: pass (measured 1.500)\n" in out


def test_the_failed_gates_refusal_names_the_reason(small_artifact, tmp_path):
    import pytest

    from trtcompress.cli_serve import _refuse_failed_gates

    artifact = edited_copy(small_artifact, tmp_path, _failed)
    with pytest.raises(ArtifactError, match=r"every metric finite \(measured inf: non-finite ppl, ppl_ratio"):
        _refuse_failed_gates(artifact, allow=False)
    _refuse_failed_gates(artifact, allow=True)
