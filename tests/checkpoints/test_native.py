import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from trtcompress.builders.compress import compress_model
from trtcompress.checkpoints import native
from trtcompress.errors import ArtifactError
from trtcompress.recipe import load_recipe


def _write(model, tokenizer, out, recipe_name="int4-g64-rtn", shard_bytes=1 << 30):
    recipe = load_recipe(recipe_name)
    compress_model(model, tokenizer, recipe)
    with native.atomic_directory(out) as tmp:
        content = native.write_weights(model, tokenizer, tmp, shard_bytes)
        manifest = native.new_manifest(
            recipe=recipe.model_dump(mode="json"),
            source={"model": "tiny"},
            model_config=model.config.to_dict(),
            content=content,
        )
        native.write_manifest(tmp, manifest)
    return out


@pytest.fixture()
def artifact(tiny_model, tmp_path):
    return _write(tiny_model.model, tiny_model.tokenizer, tmp_path / "art"), tiny_model.model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_roundtrip_gives_identical_outputs(artifact):
    path, model = artifact
    loaded = native.load_artifact(path)
    ids = torch.randint(0, 512, (2, 24))
    assert torch.equal(_logits(loaded.model, ids), _logits(model, ids))
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight  # tie restored
    assert loaded.tokenizer("hello").input_ids == loaded.tokenizer("hello").input_ids


def test_manifest_records_formats_bytes_and_checksums(artifact):
    path, _ = artifact
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == native.FORMAT_VERSION
    assert manifest["recipe"]["name"] == "int4-g64-rtn"
    assert manifest["tied_weights"] == {"lm_head.weight": "model.embed_tokens.weight"}
    layer = manifest["layers"]["model.layers.0.mlp.down_proj"]
    assert layer["format"] == "int4_g64_sym" and layer["shape"] == [96, 160]
    assert layer["bytes"] == 96 * 80 + 96 * 3 * 2  # 160 int4 codes = 80 bytes; groups 64, 64, 32
    assert set(manifest["files"]) >= {"model.safetensors", "tokenizer.json"}
    assert (
        manifest["bytes"]["tensors"] == manifest["bytes"]["compressed_linears"] + manifest["bytes"]["other"]
    )


def test_sharding_splits_and_reloads(tiny_model, tmp_path):
    path = _write(tiny_model.model, tiny_model.tokenizer, tmp_path / "sharded", shard_bytes=40_000)
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    ids = torch.randint(0, 512, (1, 16))
    assert torch.equal(_logits(native.load_artifact(path).model, ids), _logits(tiny_model.model, ids))


def test_tampered_manifest_is_refused(artifact):
    path, _ = artifact
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["layers"]["model.layers.0.mlp.down_proj"]["format"] = "int8_ch_sym"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="modified after the build"):
        native.load_artifact(path)


def test_truncated_weights_are_refused(artifact):
    path, _ = artifact
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"model\.safetensors: size .* \(truncated or modified\)"):
        native.load_artifact(path)
    with pytest.raises(ArtifactError, match="unreadable safetensors"):
        native.load_artifact(path, verify=False)


def test_flipped_byte_is_refused(artifact):
    path, _ = artifact
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        native.load_artifact(path)


def test_missing_file_and_missing_manifest(artifact, tmp_path):
    path, _ = artifact
    (path / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match=r"tokenizer\.json: missing artifact file"):
        native.load_artifact(path)
    (path / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        native.load_artifact(path)
    with pytest.raises(ArtifactError, match="no such artifact"):
        native.load_artifact(tmp_path / "nope")


def test_an_added_file_is_refused_but_reports_and_hidden_files_are_not(artifact):
    """A dropped-in chat_template.jinja passes no checksum but changes the loaded tokenizer."""
    path, _ = artifact
    for name in ("eval.json", "eval.png", ".eval.json.tmp"):  # written after the build; not content
        (path / name).write_text("{}")
    (path / "triton" / "native").mkdir(parents=True)  # `repo -o ARTIFACT/triton/native`
    (path / "triton" / "native" / "config.pbtxt").write_text("")
    native.load_artifact(path)
    (path / "chat_template.jinja").write_text("{{ messages[0]['content'] }} -- injected")
    with pytest.raises(ArtifactError, match=r"chat_template\.jinja: file not in the manifest"):
        native.load_artifact(path)


def test_newer_format_version_is_refused(artifact):
    path, _ = artifact
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = native.FORMAT_VERSION + 1
    manifest["checksum"] = native.manifest_checksum(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 2 is not supported"):
        native.read_manifest(path)


def test_a_broken_models_infinite_metrics_are_strict_json_and_read_back_as_floats(artifact):
    """A broken model's ppl is inf: manifest.json held a bare `Infinity`, which is not JSON (jq and most
    parsers refuse the whole file). Written as the string "Infinity", read back as the float."""
    import math

    path, _ = artifact
    manifest = native.read_manifest(path)
    manifest["eval"] = {"model": "NaN", "ppl": math.inf, "ppl_ratio": math.inf, "gsm8k_kl": math.nan}
    manifest["gates"] = [{"gate": "ppl_ratio <= 2", "passed": False, "value": math.inf}]
    native.write_manifest(path, manifest)
    native.write_json_atomic(path / "eval.json", manifest["eval"])

    def refuse(name: str):
        raise ValueError(f"bare {name} in the file")

    written = json.loads((path / "manifest.json").read_text(), parse_constant=refuse)
    assert written["eval"]["ppl"] == "Infinity" and written["gates"][0]["value"] == "Infinity"
    assert json.loads((path / "eval.json").read_text(), parse_constant=refuse)["gsm8k_kl"] == "NaN"
    back = native.read_manifest(path)  # the checksum holds, and the numbers are floats again
    assert back["eval"]["ppl"] == math.inf and math.isnan(back["eval"]["gsm8k_kl"])
    assert back["gates"][0]["value"] == math.inf and back["eval"]["model"] == "NaN"  # a name stays text


def _edit(manifest: dict, edit: str) -> None:
    layer = "model.layers.0.mlp.down_proj"
    if edit == "no files":
        del manifest["files"]
    elif edit == "layers a list":
        manifest["layers"] = list(manifest["layers"])
    elif edit == "unknown model_type":
        manifest["model_config"]["model_type"] = "no-such-model"
    elif edit == "layer not in the model":
        manifest["layers"]["model.layers.9.mlp.down_proj"] = manifest["layers"][layer]
    elif edit == "tied to nothing":
        manifest["tied_weights"]["lm_head.weight"] = "model.nope.weight"
    elif edit == "heads not dividing the width":
        manifest["model_config"]["num_attention_heads"] = 5
    elif edit == "generation_config refused":
        manifest["generation_config"] = {"max_new_tokens": "many"}
    elif edit == "10^5 layers":  # a real model of that size would exhaust the memory before any check
        manifest["model_config"]["num_hidden_layers"] = 100_000
    elif edit == "files entry without a size":
        manifest["files"]["model.safetensors"] = "model.safetensors"


@pytest.mark.parametrize(
    "edit, message",
    [
        ("no files", r"malformed manifest: `files` is missing"),
        ("layers a list", r"malformed manifest: `layers` is missing or not a dict"),
        ("unknown model_type", r"model_config is not a loadable model \(Unrecognized model"),
        ("layer not in the model", r"layer model\.layers\.9\.mlp\.down_proj does not match its manifest"),
        ("tied to nothing", r"tied tensor lm_head\.weight -> model\.nope\.weight is not in the model"),
        # transformers' config validators raise huggingface_hub's StrictDataclass*Error (not a ValueError)
        ("heads not dividing the width", r"model_config is not a loadable model \(.*not a multiple"),
        ("generation_config refused", r"generation_config is not a valid one"),
        ("files entry without a size", r"malformed manifest: `files` entry 'model\.safetensors'"),
        ("10^5 layers", r"model_config has num_hidden_layers 100000, the artifact stores 2 decoder layers"),
    ],
)
def test_a_consistent_but_malformed_manifest_is_an_artifact_error(artifact, edit, message):
    """A manifest edited with its checksum recomputed (a hand edit, another tool's writer) passes the
    checksum: what it describes must still fail with a message, not a KeyError/AttributeError traceback."""
    path, _ = artifact
    manifest = json.loads((path / "manifest.json").read_text())
    _edit(manifest, edit)
    manifest["checksum"] = native.manifest_checksum(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        native.load_artifact(path)


def test_corrupt_manifest_json(artifact):
    path, _ = artifact
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="invalid JSON"):
        native.read_manifest(path)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), native.atomic_directory(target) as tmp:
        (tmp / "half-written").write_text("x")
        raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_build_without_force_does_not_replace_a_concurrent_builds_artifact(tmp_path):
    """Two builds to one OUT: both found it free at the start; the one finishing second must not
    silently replace the first one's artifact."""
    target = tmp_path / "out"
    with pytest.raises(ArtifactError, match="already exists"), native.atomic_directory(target) as slow:
        (slow / "manifest.json").write_text("slow build")
        with native.atomic_directory(target) as fast:
            (fast / "manifest.json").write_text("fast build")
    assert (target / "manifest.json").read_text() == "fast build"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with native.atomic_directory(target, force=True) as forced:  # --force still replaces it
        (forced / "manifest.json").write_text("forced")
    assert (target / "manifest.json").read_text() == "forced"


def test_atomic_directory_refuses_existing_and_replaces_with_force(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(ArtifactError, match="not an artifact"), native.atomic_directory(target, force=True):
        pass  # --force replaces artifacts only
    assert (target / "old").read_text() == "old"
    (target / native.MANIFEST).write_text("{}")
    with pytest.raises(ArtifactError, match="already exists"), native.atomic_directory(target):
        pass
    with pytest.raises(RuntimeError), native.atomic_directory(target, force=True) as tmp:
        (tmp / "new").write_text("new")
        raise RuntimeError("failed build must not lose the old artifact")
    assert (target / "old").read_text() == "old"
    with native.atomic_directory(target, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes it, not mkdtemp's 0700


def test_artifact_files_get_the_permissions_of_a_plain_write(tmp_path):
    """safetensors writes 0600 files: an artifact built by one user must stay readable by another (the
    CPU container serves a host-built artifact as uid 1000), as the umask allows."""
    from safetensors.torch import save_file

    umask = os.umask(0)
    os.umask(umask)
    with native.atomic_directory(tmp_path / "out") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        (tmp / "sub").mkdir()
        (tmp / "sub" / "private.json").write_text("{}")
        os.chmod(tmp / "sub" / "private.json", 0o600)
    for path in ("model.safetensors", "sub/private.json"):
        assert (tmp_path / "out" / path).stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_qwen2_biases_survive_the_roundtrip(tiny_qwen2_dir, tmp_path):
    from trtcompress.models import load_model

    loaded = load_model(str(tiny_qwen2_dir), log=print)
    path = _write(loaded.model, loaded.tokenizer, tmp_path / "qwen", recipe_name="int8-rtn")
    manifest = native.read_manifest(path)
    assert "bias" in manifest["layers"]["model.layers.0.self_attn.q_proj"]["tensors"]
    ids = torch.randint(0, 512, (1, 16))
    assert torch.equal(_logits(native.load_artifact(path).model, ids), _logits(loaded.model, ids))


def test_an_unwritable_output_directory_is_an_artifact_error(tmp_path, monkeypatch):
    """A read-only mount or a directory without write permission: one `error:` line, not mkdtemp's
    traceback; the build's early check (`check_output_location`) says the same before any work."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(ArtifactError, match="cannot write the output there"):
        native.check_output_location(tmp_path / "out")
    refused = pytest.raises(ArtifactError, match="cannot write the output there")
    with refused, native.atomic_directory(tmp_path / "out"):
        raise AssertionError("the block ran without a temporary directory")


def test_a_config_with_int_keys_gives_a_manifest_that_reads_back(tiny_model, tmp_path):
    """model_config's id2label has int keys: checksummed as 0, 1, 2, ..., 10, 11 but read back as the
    strings "0", "1", "10", "11", "2", ..., which sort differently: a fresh build was refused as modified."""
    model = tiny_model.model
    model.config.id2label = {i: f"LABEL_{i}" for i in range(12)}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    path = _write(model, tiny_model.tokenizer, tmp_path / "labels")
    assert native.read_manifest(path)["model_config"]["id2label"]["11"] == "LABEL_11"
    native.load_artifact(path)


def test_an_unreadable_artifact_file_is_an_artifact_error(artifact, monkeypatch):
    """Another user's 0600 file (an artifact written by an older build, or copied): one `error:` line
    naming the file, not a PermissionError traceback."""
    from pathlib import Path

    path, _ = artifact

    def refuse(file):
        raise PermissionError(13, "Permission denied", str(file))

    with monkeypatch.context() as patch:
        patch.setattr(native, "sha256_file", refuse)
        with pytest.raises(ArtifactError, match=r"model\.safetensors: cannot read the artifact file"):
            native.load_artifact(path)
    read_text = Path.read_text
    monkeypatch.setattr(
        Path,
        "read_text",
        lambda self, *a, **k: refuse(self) if self.name == "manifest.json" else read_text(self),
    )
    with pytest.raises(ArtifactError, match=r"manifest\.json: cannot read the manifest \(Permission denied"):
        native.read_manifest(path)


def test_force_keeps_the_previous_artifact_when_the_final_rename_fails(tmp_path, monkeypatch):
    """The previous artifact was moved into a hidden `.out.old-*` directory before the new one was renamed
    into place: when that rename failed (or was interrupted), OUT was gone."""
    target = tmp_path / "out"
    with native.atomic_directory(target) as tmp:
        (tmp / native.MANIFEST).write_text("previous")
    replace = os.replace

    def failing(src, dst):
        if os.fspath(dst) == os.fspath(target.resolve()) and "partial" in os.fspath(src):
            raise OSError(28, "No space left on device")
        return replace(src, dst)

    monkeypatch.setattr(native.os, "replace", failing)
    with pytest.raises(OSError, match="No space left"), native.atomic_directory(target, force=True) as tmp:
        (tmp / native.MANIFEST).write_text("new")
    assert (target / native.MANIFEST).read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_terminated_build_leaves_no_partial_directory(tmp_path, signum):
    """SIGTERM's default action (`kill`, a container stop; SIGHUP: a closed terminal) ended `build` at once:
    the `finally` of atomic_directory never ran and the hidden `.OUT.partial-*` directory, a whole model's
    weights, stayed for good. The CLI's handler turns both into SystemExit(128 + signal)."""
    from trtcompress.cli import exit_on_terminate

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / native.MANIFEST).write_text("{}", encoding="utf-8")  # the previous artifact
    try:
        signal.signal(signum, signal.SIG_DFL)  # (pytest may run under nohup: SIGHUP ignored)
        exit_on_terminate()
        with pytest.raises(SystemExit) as exc, native.atomic_directory(tmp_path / "out", force=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), signum)
            time.sleep(10)  # (the handler raises as soon as the signal arrives)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert exc.value.code == 128 + signum
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / native.MANIFEST).read_text(encoding="utf-8") == "{}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_the_parent_ignores_stays_ignored(signum):
    """`nohup trtcompress build ...` (SIGHUP ignored) ended with status 129 when its terminal closed: the
    handler replaced the inherited SIG_IGN."""
    from trtcompress.cli import exit_on_terminate

    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        exit_on_terminate()
        assert signal.getsignal(signum) is signal.SIG_IGN
    finally:
        signal.signal(signum, previous)


# -------------------------------------------- damaged content behind recomputed checksums (helper audit)


def _reseal(path, *names, edit=None):
    """Recompute the manifest's records of `names` (and its own checksum) after a change: the checksums
    then pass, and what is left to catch the damage is the content check."""
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    for name in names:
        if (path / name).is_file():
            manifest["files"][name] = {
                "sha256": native.sha256_file(path / name),
                "bytes": (path / name).stat().st_size,
            }
    if edit is not None:
        edit(manifest)
    manifest["checksum"] = native.manifest_checksum(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def _verify(path, hashes=True):
    native.verify_files(path, native.read_manifest(path), hashes=hashes)


def _damage_header(path, how):
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if how == "truncated":
        data = data[:1000]
    elif how == "short by its last bytes":
        data = data[:-100]
    elif how == "header bytes":
        data[20:23] = b"\xff\xfe{"
    elif how == "header length 2^62":
        data[:8] = (2**62).to_bytes(8, "little")
    weights.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how", ["truncated", "short by its last bytes", "header bytes", "header length 2^62"]
)
def test_damaged_weights_with_recomputed_checksums_are_refused_without_loading(artifact, how):
    """`inspect` and `repo` read no weight: they used to accept these, only `eval` refused them."""
    path, _ = artifact
    _damage_header(path, how)
    _reseal(path, "model.safetensors")
    for hashes in (True, False):  # (inspect --no-verify too)
        with pytest.raises(ArtifactError, match=r"model\.safetensors: unreadable safetensors file"):
            _verify(path, hashes)


def _retensor(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": native.FORMAT_NAME})
    _reseal(path, "model.safetensors")


LAYER = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.update({f"{LAYER}.qweight": t[f"{LAYER}.qweight"][:-1].clone()}),
            rf"layer {LAYER} does not match.*qweight has shape",
        ),
        (
            lambda t: t.update({f"{LAYER}.scales": t[f"{LAYER}.scales"].float()}),
            rf"layer {LAYER} does not match.*bytes .*scales float32",
        ),
        (
            lambda t: t.pop(f"{LAYER}.scales"),
            rf"model\.safetensors: tensor {LAYER}\.scales listed in the manifest is not in",
        ),
        (
            lambda t: t.update({"model.layers.0.foo": torch.zeros(3)}),
            r"model\.safetensors: holds tensor model\.layers\.0\.foo, which the manifest",
        ),
        (
            lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:-1].clone()}),
            r"tensor model\.norm\.weight has shape \(95,\), the model expects \(96,\)",
        ),
        (
            lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)}),
            r"tensor model\.norm\.weight has dtype int32",
        ),
    ],
)
def test_a_tensor_of_the_wrong_shape_dtype_or_name_is_refused_before_and_at_load(artifact, edit, message):
    path, _ = artifact
    _retensor(path, edit)
    for hashes in (True, False):
        with pytest.raises(ArtifactError, match=message):
            _verify(path, hashes)
    with pytest.raises(ArtifactError, match=message):  # (fp32 scales used to load and run)
        native.load_artifact(path)


@pytest.mark.parametrize("name", [f"{LAYER}.scales", "model.embed_tokens.weight", "model.norm.weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_scales_embeddings_or_norms_is_refused(artifact, name, value):
    path, _ = artifact

    def edit(tensors):
        tensors[name].view(-1)[0] = value

    _retensor(path, edit)
    message = rf"model\.safetensors: tensor {re.escape(name)} holds NaN or infinite values"
    with pytest.raises(ArtifactError, match=message):
        _verify(path)  # inspect, repo: they read every byte for the sha256 anyway
    with pytest.raises(ArtifactError, match=message):  # eval evaluated it (NaN metrics, exit 0)
        native.load_artifact(path)


@pytest.mark.parametrize("name", ["../outside.json", "/etc/hostname", "sub/../../x", "a\\..\\b"])
def test_a_manifest_naming_a_file_outside_the_artifact_is_refused(artifact, name):
    """An artifact never makes trtcompress read (hash, load) a file outside its directory."""
    path, _ = artifact
    outside = path.parent / "outside.json"
    outside.write_text("{}", encoding="utf-8")

    def edit(manifest):
        manifest["files"][name] = {"sha256": native.sha256_file(outside), "bytes": 2}

    _reseal(path, edit=edit)
    with pytest.raises(ArtifactError, match=r"file name .* is not a path inside the artifact"):
        native.load_artifact(path)


def test_a_tensor_stored_in_an_unlisted_file_is_refused(artifact):
    path, _ = artifact

    def edit(manifest):
        manifest["tensors"]["model.norm.weight"] = "../elsewhere.safetensors"

    _reseal(path, edit=edit)
    with pytest.raises(ArtifactError, match=r"tensor 'model\.norm\.weight' is stored in '\.\./elsewhere"):
        native.load_artifact(path, verify=False)


def test_a_missing_or_garbage_tokenizer_is_named(artifact):
    path, _ = artifact
    (path / "tokenizer.json").write_text("garbage", encoding="utf-8")
    _reseal(path, "tokenizer.json")
    for check in (_verify, native.load_artifact):
        with pytest.raises(ArtifactError, match=r"tokenizer\.json: corrupt tokenizer file \(invalid JSON"):
            check(path)
    (path / "tokenizer.json").unlink()
    _reseal(path, edit=lambda manifest: manifest["files"].pop("tokenizer.json"))
    for check in (_verify, native.load_artifact):  # eval's message was cut before it named the file
        with pytest.raises(ArtifactError, match=r"tokenizer\.json: missing; the artifact has no tokenizer"):
            check(path)


def test_a_manifest_that_is_a_directory_is_named(artifact):
    path, _ = artifact
    (path / "manifest.json").unlink()
    (path / "manifest.json").mkdir()
    with pytest.raises(ArtifactError, match=r"manifest\.json: not a file"):
        native.read_manifest(path)


@pytest.mark.parametrize("version", [0, -1, True, "1"])
def test_a_format_version_that_is_not_one_is_refused(artifact, version):
    """0 and true (an int to isinstance) were read as version 1 artifacts."""
    path, _ = artifact
    _reseal(path, edit=lambda manifest: manifest.update(format_version=version))
    with pytest.raises(ArtifactError, match=r"malformed manifest: format version .* is not one"):
        native.read_manifest(path)


def test_the_finite_check_makes_no_full_size_copy(monkeypatch, tmp_path):
    """`torch.isfinite(t).all()` built a bool tensor as large as each weight at 0.4-0.7 GB/s (about 40 s
    per load / inspect of an 8B model's bf16 weights); min and max find NaN / inf in one pass."""
    isfinite = torch.isfinite

    def small_only(t):
        assert t.numel() <= 2, "isfinite over a whole tensor"
        return isfinite(t)

    monkeypatch.setattr(torch, "isfinite", small_only)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn):
        t = torch.randn(1000).to(dtype)
        native._finite(tmp_path, "t", t)
        for value in (float("nan"), float("inf"), float("-inf"))[: 1 if t.element_size() == 1 else 3]:
            bad = t.clone()  # (float8 e4m3fn has no inf)
            bad[617] = value
            with pytest.raises(ArtifactError, match="NaN or infinite"):
                native._finite(tmp_path, "t", bad)


# ---------------------------------------------------------------- the file system's failures (I/O audit)


def test_a_symbolic_link_out_of_the_artifact_is_refused(artifact, tmp_path):
    """A file of the artifact that is a link to a file elsewhere (or reached through a linked folder) was
    followed: checksums matched, and `inspect`, `repo` and `load` read outside the artifact (a container
    mounting only the artifact finds nothing there). Links between its own files, or to the whole
    artifact, stay allowed."""
    path, _ = artifact
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (path / "model.safetensors").rename(outside / "model.safetensors")
    (path / "model.safetensors").symlink_to(outside / "model.safetensors")
    checks = (native.read_manifest, _verify, lambda p: _verify(p, hashes=False), native.load_artifact)
    for check in (*checks, lambda p: native.load_artifact(p, verify=False)):
        with pytest.raises(ArtifactError, match=r"art/model\.safetensors: a symbolic link to .*elsewhere"):
            check(path)
    (path / "model.safetensors").unlink()
    (path / ".weights").mkdir()  # a link inside the artifact: allowed
    (outside / "model.safetensors").rename(path / ".weights" / "model.safetensors")
    (path / "model.safetensors").symlink_to(Path(".weights") / "model.safetensors")
    (tmp_path / "current").symlink_to(path)
    for check in checks:
        check(tmp_path / "current")
    (path / "manifest.json").rename(outside / "manifest.json")
    (path / "manifest.json").symlink_to(outside / "manifest.json")
    with pytest.raises(ArtifactError, match=r"art/manifest\.json: a symbolic link to .*elsewhere"):
        native.read_manifest(path)


@pytest.fixture()
def file_size_limit():
    """RLIMIT_FSIZE, as `ulimit -f` sets it: a write past it fails with EFBIG (Python ignores SIGXFSZ),
    as on a full disk."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    yield lambda limit: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_full_disk_mid_write_is_one_error_and_keeps_the_previous_artifact(
    tiny_model, tmp_path, file_size_limit
):
    """A full disk or a file size limit while writing the weights ended `build` with safetensors'
    traceback (or an OSError's): now one ArtifactError naming OUT, nothing left beside it, and with
    --force the previous artifact kept."""
    target = tmp_path / "out"
    with native.atomic_directory(target) as tmp:
        (tmp / native.MANIFEST).write_text("previous", encoding="utf-8")
    file_size_limit(64 << 10)
    kept = r"out: cannot write the artifact \(File too large\); nothing was written there \(the previous"
    with pytest.raises(ArtifactError, match=kept), native.atomic_directory(target, force=True) as tmp:
        native.write_weights(tiny_model.model, tiny_model.tokenizer, tmp, 1 << 30)  # (safetensors)
    with pytest.raises(ArtifactError, match=kept), native.atomic_directory(target, force=True) as tmp:
        native.write_json_atomic(tmp / "eval.json", {"x": "y" * (128 << 10)})  # (an OSError)
    new = pytest.raises(ArtifactError, match=r"new: cannot write the artifact \(File too large\); nothing")
    with new, native.atomic_directory(tmp_path / "new") as tmp:
        native.write_weights(tiny_model.model, tiny_model.tokenizer, tmp, 1 << 30)
    with pytest.raises(OSError, match="File too large"):  # and no half-written hidden file beside it
        native.write_json_atomic(tmp_path / "eval.json", {"x": "y" * (128 << 10)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / native.MANIFEST).read_text(encoding="utf-8") == "previous"


def test_a_build_that_finished_first_during_the_rename_is_not_replaced(tmp_path, monkeypatch):
    """Another build renaming its artifact to OUT after this one's last check: without --force it was
    moved aside and replaced all the same; with --force, landing between the two renames, it made
    rename(2) fail (ENOTEMPTY) with a traceback and left the previous artifact in a hidden directory."""
    target = tmp_path / "out"
    checks = []

    def fast_build():
        other = tmp_path / ".other"
        other.mkdir()
        (other / native.MANIFEST).write_text("fast", encoding="utf-8")
        os.rename(other, target)

    def check_then_race(target, force):
        native.check_output(target, force)
        checks.append(target)
        if len(checks) == 2:  # the other build finishes right after this one's last check
            fast_build()

    raced = pytest.raises(ArtifactError, match=r"another build wrote its artifact there meanwhile.*--force")
    with raced, native.atomic_directory(target, check=check_then_race) as slow:
        (slow / native.MANIFEST).write_text("slow", encoding="utf-8")
    assert (target / native.MANIFEST).read_text(encoding="utf-8") == "fast"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    replace = os.replace

    def racing(src, dst):
        replace(src, dst)
        if os.fspath(dst).endswith("previous"):  # between moving OUT aside and renaming into it
            fast_build()

    monkeypatch.setattr(native.os, "replace", racing)
    raced = pytest.raises(ArtifactError, match="another build wrote its artifact there meanwhile")
    with raced, native.atomic_directory(target, force=True) as slow:
        (slow / native.MANIFEST).write_text("slow", encoding="utf-8")
    assert (target / native.MANIFEST).read_text(encoding="utf-8") == "fast"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_unreadable_file_or_folder_says_permission_denied(artifact):
    """safetensors reports a weights file it may not open as "No such file or directory", which sent the
    user looking for a file that is there; an unsearchable artifact directory raised PermissionError."""
    import shutil
    import subprocess
    import sys

    path, _ = artifact
    prefix = []
    if os.geteuid() == 0:  # root reads any file: drop the capabilities that allow it
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]
    code = (
        "import sys\nfrom trtcompress.checkpoints import native\n"
        "from trtcompress.errors import ArtifactError\n"
        "try:\n    native.load_artifact(sys.argv[1], verify=sys.argv[2] == 'verify')\n"
        "except ArtifactError as exc:\n    print(exc)\n"
    )

    def load(verify):
        command = [*prefix, sys.executable, "-c", code, str(path), verify]
        done = subprocess.run(command, capture_output=True, text=True)
        return done.stdout + done.stderr

    os.chmod(path / "model.safetensors", 0)
    try:  # (without verify: the sha256 of every file, read first, has said so since before)
        assert "model.safetensors: cannot read the artifact file (Permission denied)" in load("no")
        os.chmod(path, 0o300)  # searchable, not listable
        assert f"{path}: cannot read the artifact folder (Permission denied)" in load("verify")
    finally:
        os.chmod(path, 0o755)
        os.chmod(path / "model.safetensors", 0o644)


def test_force_does_not_delete_an_artifact_built_inside_the_previous_one(artifact):
    """`build -o OUT/v2` puts an artifact inside OUT (its folder holds no listed file: OUT still verifies);
    `build --force -o OUT` then deleted it with OUT's previous artifact, without a word."""
    path, _ = artifact
    (path / "v2" / "deeper").mkdir(parents=True)
    (path / "v2" / "deeper" / native.MANIFEST).write_text(json.dumps({"format": native.FORMAT_NAME}))
    (path / "triton" / "model").mkdir(parents=True)  # (a repository's files, or an unrelated manifest)
    (path / "triton" / native.MANIFEST).write_text("{}")
    with pytest.raises(ArtifactError, match=r"art holds another artifact, .*art/v2/deeper, which --force"):
        native.check_output(path, force=True)
    (path / "v2" / "deeper" / native.MANIFEST).unlink()
    native.check_output(path, force=True)


def test_a_mount_point_output_is_refused_before_the_build(tmp_path, monkeypatch):
    """`docker run -v HOST/model:/artifacts/model ... build -o /artifacts/model --force`: the final rename
    of a mount point failed with EBUSY after the whole build (found by the deployment audit)."""
    out = tmp_path / "mounted"
    out.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or real(p))
    for force in (True, False):  # (without --force too: it could not help)
        with pytest.raises(ArtifactError, match=r"is a mount point.*mount the directory above it"):
            native.check_output(out, force=force)
    native.check_output(tmp_path / "elsewhere", force=True)
