import importlib
from pathlib import Path

import pytest

from trtcompress.errors import ModelError
from trtcompress.models import gguf_convert
from trtcompress.models.registry import PackagedModel


@pytest.fixture()
def fake_package(tmp_path, monkeypatch) -> tuple[PackagedModel, Path, list[bytes]]:
    """A package holding a 'GGUF' whose conversion copies its bytes; returns the spec, the file and a
    list of what each conversion read."""
    package = tmp_path / "site" / "trtcompress_fake_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    gguf = package / "model.gguf"
    gguf.write_bytes(b"first release")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setenv("TRTCOMPRESS_CACHE", str(tmp_path / "cache"))
    conversions: list[bytes] = []

    def convert(gguf_path: Path, out_dir: Path) -> None:
        conversions.append(gguf_path.read_bytes())
        (out_dir / "weights").write_bytes(gguf_path.read_bytes())

    monkeypatch.setattr(gguf_convert, "_convert", convert)
    spec = PackagedModel("fake", "trtcompress_fake_gguf_pkg", "fake-pkg", "model.gguf", "test")
    return spec, gguf, conversions


def test_conversion_is_cached_and_redone_when_the_gguf_changes(fake_package):
    spec, gguf, conversions = fake_package
    target = gguf_convert.ensure_converted(spec, log=lambda m: None)
    assert gguf_convert.ensure_converted(spec, log=lambda m: None) == target
    assert conversions == [b"first release"]
    gguf.write_bytes(b"second release")  # the package was upgraded: the cached weights are stale
    assert gguf_convert.ensure_converted(spec, log=lambda m: None) == target
    assert (target / "weights").read_bytes() == b"second release"
    assert conversions == [b"first release", b"second release"]


def test_older_conversion_and_killed_conversions_are_replaced(fake_package):
    spec, gguf, _ = fake_package
    target = gguf_convert.converted_dir(spec)
    target.mkdir(parents=True)
    (target / "weights").write_bytes(b"converted by an older trtcompress")
    (target / gguf_convert.COMPLETE_MARKER).write_text(f"{gguf}\n")  # the revision-1 marker
    partial = target.parent / f".{target.name}.partial-killed"
    partial.mkdir()
    (partial / "weights").write_bytes(b"half")
    gguf_convert.ensure_converted(spec, log=lambda m: None)
    assert (target / "weights").read_bytes() == b"first release"
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name, f"{target.name}.lock"]


def test_a_cache_that_cannot_be_written_is_an_error_naming_it(fake_package, tmp_path, monkeypatch):
    spec, _, conversions = fake_package
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("TRTCOMPRESS_CACHE", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(ModelError, match=r"a-file/cache/models: cannot write .*TRTCOMPRESS_CACHE"):
        gguf_convert.ensure_converted(spec, log=lambda m: None)
    assert conversions == []


@pytest.mark.model
def test_default_model_special_tokens_match_upstream(smollm2_dir):
    """SmolLM2-135M-Instruct ends a turn with <|im_end|> (id 2), which is also its padding token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.bos_token_id, tokenizer.unk_token_id) == (1, 0)
