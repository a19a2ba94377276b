import json
import shutil

import pytest

from trtcompress.errors import ModelError
from trtcompress.models import load_model, resolve_model, validate_model_dir


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def test_local_llama_and_qwen2_dirs_load(tiny_model_dir, tiny_qwen2_dir):
    for path in (tiny_model_dir, tiny_qwen2_dir):
        loaded = load_model(str(path), log=print)
        assert loaded.config.num_hidden_layers == 2
        assert resolve_model(str(path)) == path.resolve()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: shutil.rmtree(p), "no such model directory"),
        (lambda p: (p / "config.json").unlink(), "missing config.json"),
        (lambda p: (p / "config.json").write_text("{oops"), "malformed JSON"),
        (lambda p: (p / "model.safetensors").unlink(), r"no weight files"),
        (lambda p: (p / "tokenizer.json").unlink(), "no tokenizer"),
        (
            lambda p: (p / "config.json").write_text(json.dumps({"model_type": "bert"})),
            "model_type 'bert' is not",
        ),
        (lambda p: (p / "model.safetensors").write_bytes(b"garbage"), "cannot load the checkpoint"),
        # the cause, not only the heading transformers puts on the first line of its message
        (lambda p: _edit_config(p, num_attention_heads=5), r"config\.json: invalid config .*not a multiple"),
        (lambda p: (p / "generation_config.json").write_text("{oops"), r"generation_config\.json: malformed"),
        (lambda p: (p / "tokenizer.json").write_text("oops"), r"tokenizer\.json: malformed JSON"),
        (
            lambda p: ((p / "tokenizer.json").unlink(), (p / "vocab.json").write_text("{}")),
            r"cannot load the tokenizer \(.*sentencepiece or tiktoken",
        ),
        # `build --export hf` writes this layout; transformers reported its packed tensors as misplaced
        (
            lambda p: _edit_config(p, quantization_config={"quant_method": "modelopt", "quant_algo": "FP8"}),
            r"ModelOpt-quantized checkpoint .*FP8\), which transformers cannot load",
        ),
    ],
)
def test_broken_model_dirs_name_the_problem(tiny_model_dir, tmp_path, damage, message):
    path = _copy(tiny_model_dir, tmp_path / "m")
    damage(path)
    with pytest.raises(ModelError, match=message) as err:
        load_model(str(path), log=print)
    assert str(path) in str(err.value)


def test_a_file_is_not_a_model_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ModelError, match="not a directory"):
        validate_model_dir(tmp_path / "f")


def test_tensors_the_config_has_no_place_for_are_refused(tiny_model_dir, tmp_path):
    """q_proj biases in the weights but not in the config (attention_bias false): transformers would drop
    them and the model would compute something else, so the load fails naming the tensor."""
    import torch
    from safetensors.torch import load_file, save_file

    path = _copy(tiny_model_dir, tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.ones(96)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"no place for .*model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_model(str(path), log=print)


def test_legacy_rotary_buffers_still_load(tiny_model_dir, tmp_path):
    """Old LLaMA checkpoints carry rotary_emb.inv_freq buffers: harmless, not refused."""
    import torch
    from safetensors.torch import load_file, save_file

    path = _copy(tiny_model_dir, tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(12)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    assert load_model(str(path), log=print).config.num_hidden_layers == 2


def test_a_model_directory_named_like_a_known_model_is_that_directory(tiny_model_dir, tmp_path, monkeypatch):
    """`huggingface-cli download HuggingFaceTB/SmolLM2-135M --local-dir SmolLM2-135M` then `build
    SmolLM2-135M`: the base model in that directory, not the packaged Instruct model."""
    from trtcompress.models import loading

    def packaged(spec, log):
        raise AssertionError(f"resolved to the packaged {spec.name}")

    monkeypatch.setattr(loading, "ensure_converted", packaged)
    local = _copy(tiny_model_dir, tmp_path / "SmolLM2-135M")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("SmolLM2-135M") == local.resolve()
    (tmp_path / "smollm2-135m").mkdir()  # a directory that is no model (an artifact `-o smollm2-135m`)
    with pytest.raises(AssertionError, match="packaged smollm2-135m"):
        resolve_model("smollm2-135m")


def test_special_tokens_missing_from_the_tokenizer_come_from_the_config(tiny_model_dir, tmp_path):
    """tokenizer.json alone (no tokenizer_config.json) names no EOS/PAD; config.json has their ids. Without
    them a padded batch (bench serve's HF baseline) fails and an exported tokenizer has no end id."""
    path = _copy(tiny_model_dir, tmp_path / "m")
    (path / "tokenizer_config.json").unlink()
    tokenizer = load_model(str(path), log=print).tokenizer
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", 0)
    assert tokenizer.pad_token_id == 0
    assert tokenizer(["a", "a b c"], padding=True).input_ids[0][-1] == 0


def test_unreadable_or_unnameable_model_files_are_model_errors(tiny_model_dir, tmp_path, monkeypatch):
    """An unreadable config.json (PermissionError for a non-root user) and a name too long for the file
    system (pathlib raises ENAMETOOLONG from exists()) were OSError tracebacks."""
    from pathlib import Path

    with pytest.raises(ModelError, match=r"cannot read the model directory .*too long"):
        resolve_model("m" * 300)
    path = _copy(tiny_model_dir, tmp_path / "m")
    read_text = Path.read_text

    def unreadable(self, *args, **kwargs):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(ModelError, match=r"config\.json: cannot read it \(Permission denied\)"):
        validate_model_dir(path)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_config_value_is_refused(tiny_model_dir, tmp_path, value):
    """Python's json reads NaN / Infinity (not JSON): `rms_norm_eps: NaN` loaded, and every logit was NaN."""
    path = _copy(tiny_model_dir, tmp_path / "m")
    text = (path / "config.json").read_text()
    (path / "config.json").write_text(text.replace('"rms_norm_eps"', f'"rms_norm_eps": {value}, "x"', 1))
    with pytest.raises(ModelError, match=rf"config\.json: holds a non-finite number \({value}\)"):
        load_model(str(path), log=print)


def test_a_model_directory_reads_as_utf8_under_an_ascii_locale(tiny_model_dir, tmp_path):
    """JSON was read in the locale's encoding: under an ASCII one (tritonserver's python stub, a C-locale
    container without coercion) every tokenizer.json with non-ASCII tokens was "malformed JSON"."""
    import os
    import subprocess
    import sys

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    for name in ("config.json", "tokenizer.json"):
        data = json.loads((model / name).read_text(encoding="utf-8"))
        data["_note"] = "Ġcafé ✓"
        (model / name).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    code = (
        "import locale, pathlib, sys\n"
        "assert locale.getpreferredencoding(False).lower() in ('ascii', 'ansi_x3.4-1968')\n"
        "from trtcompress.models import validate_model_dir\n"
        "validate_model_dir(pathlib.Path(sys.argv[1]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONUTF8"))}
    env |= {"LC_ALL": "C", "PYTHONCOERCECLOCALE": "0"}
    result = subprocess.run(
        [sys.executable, "-X", "utf8=0", "-c", code, str(model)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
