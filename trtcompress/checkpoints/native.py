"""The native artifact: `manifest.json` + safetensors shards + tokenizer files.

- The manifest records the format version, the resolved recipe, the model config, every compressed
  layer's format and exact byte count, the sha256 of every file, the evaluation and gate results, and
  a checksum of itself, so a tampered or truncated artifact is refused with a message naming the file.
- Compressed layers store their CompressedLinearState tensors under `<layer>.<suffix>` (`qweight`,
  `scales`, `zeros`, `bias`); other tensors keep their Hugging Face names; tied tensors are stored once.
- Writers write into a directory that the build pipeline renames into place (see `atomic_directory`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import trtcompress
from trtcompress.compressed.linear import CompressedLinear, compressed_linears, set_module
from trtcompress.compressed.state import CompressedLinearState
from trtcompress.errors import ArtifactError, one_line
from trtcompress.ui import finite_or_named

FORMAT_NAME = "trtcompress-native"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT_FILES = ("eval.json", "eval.png")  # written after the build; not covered by checksums
# What readers index without asking: `read_manifest` refuses a manifest that lacks one.
MANIFEST_FIELDS = {
    "status": str, "recipe": dict, "model_config": dict, "layers": dict, "tied_weights": dict,
    "bytes": dict, "tensors": dict, "files": dict,
}  # fmt: skip


# ----------------------------------------------------------------------------------------- atomic dirs


@contextlib.contextmanager
def atomic_directory(
    target: Path, force: bool = False, check: Callable[[Path, bool], None] | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; rename it to `target` only if the block succeeds.

    An interrupted or failed build leaves at most a hidden `.NAME.partial-*` directory, never a `target`
    that looks complete. With `force`, an existing `target` is replaced only after the new one is ready.
    `check(target, force)` refuses a `target` that must not be replaced (default: `check_output`, which
    allows artifacts only), before the work and again just before the rename.
    """
    target = target.resolve()
    check = check or check_output
    check(target, force)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"{target.parent}: cannot create the output directory ({exc.strerror})") from None
    try:  # a read-only mount, a directory without write permission: one line, not a traceback
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as exc:
        raise ArtifactError(f"{target.parent}: cannot write the output there ({exc.strerror})") from None
    try:
        with _writing(target):  # a full disk or a file size limit: one line, not a writer's traceback
            yield tmp
            umask = os.umask(0)  # mkdtemp made it 0700: give the artifact the permissions of a mkdir
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            for path in tmp.rglob("*"):  # safetensors writes its files 0600: unreadable to a container's user
                if path.is_file() and not path.is_symlink():
                    os.chmod(path, stat.S_IMODE(path.stat().st_mode) | (0o666 & ~umask))
        check(target, force)  # again: a concurrent build may have finished `target` meanwhile
        old = None
        # (nothing but the two renames between moving it aside and replacing it). Only with `force`: an
        # artifact a concurrent build renamed there since `check` is not replaced (rename(2) refuses)
        if force and target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
        try:
            os.replace(tmp, target)
        except BaseException as exc:  # the previous artifact goes back to `target`, not left hidden
            # a concurrent build renamed its artifact to `target` after `check`: rename(2) refuses to
            # replace a non-empty directory (where a --force build moved the previous one aside, that
            # build's replaced it, as its --force asked)
            raced = isinstance(exc, OSError) and exc.errno in (errno.ENOTEMPTY, errno.EEXIST)
            if old is not None:
                try:
                    os.replace(old / "previous", target)
                except OSError as again:
                    if not (raced and again.errno in (errno.ENOTEMPTY, errno.EEXIST)):
                        raise
                shutil.rmtree(old, ignore_errors=True)
            if raced:
                raise ArtifactError(
                    f"{target}: another build wrote its artifact there meanwhile; this build's was not "
                    "kept (run it again" + ("" if force else " with --force") + " to replace that one)"
                ) from None
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# Errors of the storage, not of the code writing to it: reported as one line naming the output.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}


def storage_errno(exc: BaseException) -> int | None:
    """The storage errno (disk full, file too large, quota, read-only, I/O error) behind `exc`, an OSError
    or a writer library's own error that quotes it (safetensors: "I/O error: File too large (os error
    27)"), or None."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in _STORAGE_ERRNOS else None
    if isinstance(exc, SafetensorError) and (found := re.search(r"\(os error (\d+)\)", str(exc))):
        return int(found[1]) if int(found[1]) in _STORAGE_ERRNOS else None
    return None


@contextlib.contextmanager
def _writing(target: Path) -> Iterator[None]:
    """A write into `target`'s temporary directory that the storage refused, as one ArtifactError: the
    build's work is lost, nothing at `target` changed."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        if (failure := storage_failure(exc, target, "the artifact")) is None:
            raise
        raise failure from None


def storage_failure(exc: BaseException, target: Path, what: str) -> ArtifactError | None:
    """The one-line error for `exc` if the storage refused a write of `what` for `target` (see
    storage_errno), else None."""
    if (code := storage_errno(exc)) is None:
        return None
    return ArtifactError(
        f"{target}: cannot write {what} ({os.strerror(code)}); nothing was written there"
        + (" (the previous artifact is kept)" if target.exists() else "")
    )


def check_output(target: Path, force: bool) -> None:
    """Raise ArtifactError unless an artifact may be written to `target`: nothing there, or with
    `force` an artifact (a directory with a manifest) or an empty directory, never anything else (a
    directory holding other artifacts, a model, a file)."""
    if not target.exists():
        return
    if os.path.ismount(target):  # (a container's volume: the rename failed with EBUSY after the whole build)
        raise ArtifactError(  # (before --force: it cannot help; a bind mount of the same file system is
            # not seen by ismount and fails at the rename, still without losing the previous artifact)
            f"{target} is a mount point: a build writes beside it and renames its artifact into place, "
            "which a mount point refuses; mount the directory above it and write into a folder there"
        )
    if not force:
        raise ArtifactError(f"{target} already exists; pass --force to replace it")
    if not (target.is_dir() and ((target / MANIFEST).is_file() or not any(target.iterdir()))):
        raise ArtifactError(
            f"{target} exists and is not an artifact (no {MANIFEST}); --force replaces artifacts only, "
            "not other files or directories: choose another output path"
        )
    if (nested := _nested_artifact(target)) is not None:  # (`build -o OUT/v2`: a folder of OUT's)
        raise ArtifactError(
            f"{target} holds another artifact, {nested}, which --force would delete with it: move that "
            "one out first, or choose another output path"
        )


def _nested_artifact(target: Path) -> Path | None:
    """A trtcompress artifact in a folder below `target` (not following links), or None. An artifact's own
    folders (trtllm/, hf/, engine/, a repository in triton/) hold no manifest of this format."""
    for root, dirs, files in os.walk(target):
        dirs.sort()
        if Path(root) == target or MANIFEST not in files:
            continue
        with contextlib.suppress(OSError, ValueError):
            data = json.loads((Path(root) / MANIFEST).read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("format") == FORMAT_NAME:
                return Path(root)
    return None


def unwritable_reason(directory: Path) -> str | None:
    """Why `directory` (existing, or to be created) cannot take new entries, or None when it can: its
    nearest existing ancestor is a file, or refuses a new directory (read-only, permissions). Asked before
    minutes of work, without creating anything: the probe directory it makes is removed at once."""
    existing = directory.resolve()
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():  # a file (or a dangling link) in the way
        return f"{existing} is a file"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".trtcompress-probe-", dir=existing))
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def check_output_location(target: Path) -> None:
    """Raise ArtifactError unless `target` can be created. `atomic_directory` finds out only when the work
    is done (after minutes of compression), so the build asks first."""
    parent = target.resolve().parent
    try:  # the tokenizers and safetensors libraries take paths as UTF-8 text: a traceback after the work
        str(target.resolve()).encode("utf-8")
    except UnicodeEncodeError:
        raise ArtifactError(
            f"{str(target)!a}: the output path is not valid UTF-8 (a byte the file system name holds "
            "as is), which the tokenizer and safetensors writers cannot take: choose another output path"
        ) from None
    if (reason := unwritable_reason(parent)) is not None:
        raise ArtifactError(f"{parent}: cannot write the output there ({reason})")


def write_json_atomic(path: Path, data: Any) -> None:
    """Strict JSON (a broken model's ppl = inf is the string "Infinity": a bare Infinity, which Python
    writes by default, makes jq and most parsers refuse the whole file)."""
    text = json.dumps(finite_or_named(data), indent=2, sort_keys=False, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:  # a full disk: no half-written hidden file left beside `path`
        tmp.unlink(missing_ok=True)
        raise


_NAMED_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _restore_floats(manifest: dict[str, Any]) -> None:
    """The measured numbers `write_json_atomic` named back to floats: the eval section's metrics and the
    gates' measured values (nowhere else, and not the report's two text fields: a name may say "NaN")."""
    if isinstance(manifest.get("eval"), dict):
        for key, value in manifest["eval"].items():
            if key not in ("model", "recipe") and isinstance(value, str) and value in _NAMED_FLOATS:
                manifest["eval"][key] = _NAMED_FLOATS[value]
    for gate in manifest.get("gates") or []:
        if isinstance(gate, dict) and isinstance(gate.get("value"), str) and gate["value"] in _NAMED_FLOATS:
            gate["value"] = _NAMED_FLOATS[gate["value"]]


# ------------------------------------------------------------------------------------------------ write


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """state_dict with tied tensors kept once; returns (tensors, alias -> stored name)."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    by_storage: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in by_storage:
            tied[name] = by_storage[key]
            continue
        by_storage[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, tied


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_weights(model: nn.Module, tokenizer, out: Path, shard_size_bytes: int) -> dict[str, Any]:
    """Write tensors and tokenizer into `out`; return the manifest's content-describing part."""
    tensors, tied = _unique_tensors(model)
    shards = _shard(tensors, shard_size_bytes)
    index: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        filename = (
            "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        )
        save_file(shard, str(out / filename), metadata={"format": FORMAT_NAME})
        index.update(dict.fromkeys(shard, filename))
    tokenizer.save_pretrained(out)
    layers = {name: module.state.meta() for name, module in compressed_linears(model)}
    compressed_bytes = sum(meta["bytes"] for meta in layers.values())
    total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(out.iterdir())
        if p.is_file() and p.name not in (MANIFEST, *REPORT_FILES)
    }
    return {
        "layers": layers,
        "tied_weights": tied,
        "bytes": {
            "tensors": total_bytes,
            "compressed_linears": compressed_bytes,
            "other": total_bytes - compressed_bytes,
        },
        "tensors": index,
        "files": files,
    }


def manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def new_manifest(
    *, recipe: dict, source: dict, model_config: dict, content: dict, generation_config: dict | None = None
) -> dict[str, Any]:
    """`generation_config`: the model's generation defaults that differ from transformers' (its EOS ids,
    where the runtime stops as HF `generate` does), restored by `load_artifact`."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "trtcompress_version": trtcompress.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "status": "not_evaluated",
        "source": source,
        "recipe": recipe,
        "model_config": model_config,
        "generation_config": generation_config or {},
        **content,
        "eval": None,
        "gates": [],
    }


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    # Checksummed as `read_manifest` will read it: strict JSON, and JSON's own keys (model_config's
    # id2label has int keys, which sort 2 < 10 where the strings read back sort "10" < "2").
    manifest = json.loads(json.dumps(finite_or_named(dict(manifest)), allow_nan=False))
    manifest["checksum"] = manifest_checksum(manifest)
    write_json_atomic(out / MANIFEST, manifest)


# ------------------------------------------------------------------------------------------------- read


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and authenticate `manifest.json`; raise ArtifactError naming what is wrong."""
    manifest_path = path / MANIFEST
    try:  # (a directory without search permission: is_file raises, as reading would)
        if not path.exists():
            raise ArtifactError(f"{path}: no such artifact directory")
        if not path.is_dir():
            raise ArtifactError(
                f"{path}: not a directory; an artifact is a directory written by `trtcompress build`"
            )
        if manifest_path.exists() and not manifest_path.is_file():
            raise ArtifactError(f"{manifest_path}: not a file; a trtcompress manifest is a JSON file")
        if not manifest_path.is_file():
            raise ArtifactError(
                f"{path}: no {MANIFEST}; not a trtcompress artifact (or a build that did not finish)"
            )
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read the artifact directory ({exc.strerror})") from None
    _check_inside(path, manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: corrupt manifest (invalid JSON: {exc})") from None
    except OSError as exc:  # e.g. another user's 0600 file
        raise ArtifactError(f"{manifest_path}: cannot read the manifest ({exc.strerror})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{manifest_path}: not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if type(version) is not int or version < 1:  # (a bool is an int to isinstance)
        raise ArtifactError(f"{manifest_path}: malformed manifest: format version {version!r} is not one")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path}: format version {version!r} is not supported by trtcompress "
            f"{trtcompress.__version__} (reads up to {FORMAT_VERSION}); upgrade trtcompress"
        )
    if manifest.get("checksum") != manifest_checksum(manifest):
        raise ArtifactError(
            f"{manifest_path}: manifest was modified after the build (checksum mismatch); rebuild"
        )
    for key, kind in MANIFEST_FIELDS.items():  # the checksum says unchanged, not well-formed
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(
                f"{manifest_path}: malformed manifest: `{key}` is missing or not a {kind.__name__}; rebuild"
            )
    _check_names(manifest_path, manifest)
    for name in manifest["files"]:
        _check_inside(path, path / name)
    _restore_floats(manifest)
    return manifest


def _check_inside(path: Path, file: Path) -> None:
    """`file` (of the artifact at `path`) is inside the artifact's directory, not a symbolic link (or in a
    linked folder) leading outside it: the checksums vouch for the bytes of the artifact's own files,
    and an artifact must not make trtcompress (or a container that mounts only the artifact) read a
    file elsewhere. Links between the artifact's own files are allowed; a link to the whole artifact is
    the user's own choice."""
    try:
        real, root = file.resolve(), path.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop (RuntimeError before Python 3.13)
        raise ArtifactError(f"{file}: cannot resolve the artifact file ({one_line(exc, 120)})") from None
    if not real.is_relative_to(root):
        raise ArtifactError(
            f"{file}: a symbolic link to {real}, outside the artifact; an artifact's files must be inside "
            "its directory (copy the artifact with its links resolved, e.g. `cp -rL`)"
        )


def _check_names(manifest_path: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest names is a relative path inside the artifact (no `..`, not absolute): an
    artifact never makes trtcompress read or hash a file outside its own directory; and every tensor's
    file is one the manifest lists (so its size and sha256 are checked)."""
    for name in manifest["files"]:
        parts = PurePosixPath(name).parts
        if not name or "\0" in name or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
            raise ArtifactError(
                f"{manifest_path}: malformed manifest: file name {name!r} is not a path inside the "
                "artifact; rebuild"
            )
    for tensor, filename in manifest["tensors"].items():
        if not isinstance(filename, str) or filename not in manifest["files"]:
            raise ArtifactError(
                f"{manifest_path}: malformed manifest: tensor {tensor!r} is stored in {filename!r}, "
                "which is not one of the artifact's files; rebuild"
            )


def verify_files(path: Path, manifest: dict[str, Any], hashes: bool = True, structure: bool = True) -> None:
    """Every file the manifest lists is there with its size and (unless `hashes` is false: `inspect
    --no-verify`, which skips only the slow part) its sha256; and no unlisted file beside them: loaders
    read whatever is there (a dropped-in `chat_template.jinja` or `added_tokens.json` changes the
    tokenizer). Hidden files, and folders holding no listed file, are not the artifact's.

    With `structure` (all but `load_artifact`, which does the same on the data itself) the content is
    checked too, from the headers (only sparse and W4A4 layers' tensors are read: their masks and
    activation scales are part of the format): each safetensors header (valid, holding exactly the
    tensors the manifest places in that file), every tensor's shape and dtype against its compressed
    layer's manifest entry or the model's own parameter, the tokenizer's JSON files, and, with `hashes`
    (which already reads every byte once; this is a second, faster read), that no floating-point
    tensor holds NaN or inf. A sha256 recomputed into the manifest after damaging a file passes the
    checksums, not this."""
    listed = set(manifest["files"])
    for folder in sorted({Path(name).parent for name in listed}):
        try:  # (a folder without read permission)
            files = sorted((path / folder).iterdir()) if (path / folder).is_dir() else []
        except OSError as exc:
            raise ArtifactError(
                f"{path / folder}: cannot read the artifact folder ({exc.strerror})"
            ) from None
        for file in files:
            rel = (folder / file.name).as_posix()
            if file.name.startswith(".") or not file.is_file() or rel in listed:
                continue
            if folder == Path(".") and file.name in (MANIFEST, *REPORT_FILES):
                continue
            raise ArtifactError(f"{file}: file not in the manifest (added after the build); remove it")
    for name, info in manifest["files"].items():
        file = path / name
        if not (
            isinstance(info, dict)
            and isinstance(info.get("bytes"), int)
            and isinstance(info.get("sha256"), str)
        ):
            raise ArtifactError(
                f"{path / MANIFEST}: malformed manifest: `files` entry {name!r} lacks bytes or sha256; "
                "rebuild"
            )
        if not file.is_file():
            raise ArtifactError(f"{file}: missing artifact file")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise ArtifactError(
                f"{file}: size {size} bytes, manifest says {info['bytes']} (truncated or modified)"
            )
        try:
            digest = sha256_file(file) if hashes else None
        except OSError as exc:  # e.g. a 0600 file written by another user (older builds, a copy)
            raise ArtifactError(f"{file}: cannot read the artifact file ({exc.strerror})") from None
        if hashes and digest != info["sha256"]:
            raise ArtifactError(f"{file}: sha256 mismatch with the manifest (corrupt or modified)")
    if structure:
        headers = _read_headers(path, manifest, values=hashes)
        _assemble(path, manifest, headers, on_meta=True, read=lambda name: _read_one(path, manifest, name))
        _check_tokenizer_files(path)


@dataclass
class LoadedArtifact:
    model: nn.Module
    tokenizer: Any
    manifest: dict[str, Any]
    path: Path

    @property
    def status(self) -> str:
        return self.manifest["status"]


def _file_tensors(manifest: dict[str, Any]) -> dict[str, set[str]]:
    by_file: dict[str, set[str]] = {}
    for tensor, filename in manifest["tensors"].items():
        by_file.setdefault(filename, set()).add(tensor)
    return by_file


def _compare_names(file: Path, held: set[str], listed: set[str]) -> None:
    if missing := sorted(listed - held):
        raise ArtifactError(
            f"{file}: tensor {missing[0]} listed in the manifest is not in the file"
            + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if extra := sorted(held - listed):
        raise ArtifactError(
            f"{file}: holds tensor {extra[0]}, which the manifest does not place there"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )


_SAFETENSORS_DTYPES = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
        "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32",
        "U64": "uint64",
    }.items()
    if hasattr(torch, attr)
}  # fmt: skip


@contextlib.contextmanager
def _safetensors_read(file: Path) -> Iterator[None]:
    """A safetensors file the library cannot read (bad header, truncated, missing) as one ArtifactError."""
    try:
        yield
    except (SafetensorError, OSError) as exc:
        try:  # the library reports any failure to open (permission denied too) as "No such file"
            with open(file, "rb"):
                pass
        except OSError as cause:
            raise ArtifactError(f"{file}: cannot read the artifact file ({cause.strerror})") from None
        raise ArtifactError(f"{file}: unreadable safetensors file ({one_line(exc, 200)})") from None


def _finite(file: Path, name: str, tensor: torch.Tensor) -> None:
    """NaN / inf scales, embeddings or norms: a corrupt artifact (a build never writes them: its source
    model's are refused, and its quantizers' scales are finite)."""
    if tensor.is_floating_point() and tensor.numel():
        # min and max (NaN propagates): 20-50x faster than isfinite(...).all(), which built a bool copy at
        # 0.4-0.7 GB/s, about 40 s for an 8B model's bf16 weights at every load and inspect
        values = tensor if tensor.element_size() > 1 else tensor.float()  # (no aminmax for float8)
        if not bool(torch.isfinite(torch.stack(torch.aminmax(values))).all()):
            raise ArtifactError(f"{file}: tensor {name} holds NaN or infinite values (corrupt)")


def _read_headers(path: Path, manifest: dict[str, Any], values: bool = False) -> dict[str, torch.Tensor]:
    """The stored tensors as meta tensors (shape and dtype, no data) from the safetensors headers, which
    the library validates (header length and JSON, offsets covering the file exactly). With `values`,
    each floating-point tensor is also read, one at a time, and checked finite."""
    tensors: dict[str, torch.Tensor] = {}
    for filename, names in sorted(_file_tensors(manifest).items()):
        file = path / filename
        with _safetensors_read(file), safe_open(str(file), framework="pt") as f:
            headers = {
                key: (f.get_slice(key).get_dtype(), f.get_slice(key).get_shape())
                for key in f.keys()  # noqa: SIM118 (not iterable)
            }
        _compare_names(file, set(headers), names)
        for key, (dtype, shape) in headers.items():
            if dtype not in _SAFETENSORS_DTYPES:
                raise ArtifactError(f"{file}: tensor {key} has dtype {dtype}, which trtcompress never stores")
            tensors[key] = torch.empty(shape, dtype=_SAFETENSORS_DTYPES[dtype], device="meta")
        if values:
            with _safetensors_read(file), safe_open(str(file), framework="pt") as f:
                for key, tensor in tensors.items():
                    if key in headers and tensor.is_floating_point():
                        _finite(file, key, f.get_tensor(key))
    return tensors


def _read_one(path: Path, manifest: dict[str, Any], name: str) -> torch.Tensor:
    file = path / manifest["tensors"][name]
    with _safetensors_read(file), safe_open(str(file), framework="pt") as f:
        return f.get_tensor(name)


def _read_tensors(path: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for filename, names in sorted(_file_tensors(manifest).items()):
        file = path / filename
        with _safetensors_read(file):
            held = load_file(str(file))
        _compare_names(file, set(held), names)
        for name, tensor in held.items():
            _finite(file, name, tensor)
        tensors.update(held)
    return tensors


def _check_tokenizer_files(path: Path) -> None:
    """The tokenizer's JSON files parse (a garbage one is named here, not in a transformers message
    several hundred characters long), and the artifact has a tokenizer at all."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        file = path / name
        if not file.exists():
            continue
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{file}: corrupt tokenizer file (invalid JSON: {exc})") from None
        except OSError as exc:
            raise ArtifactError(f"{file}: cannot read the tokenizer file ({exc.strerror})") from None
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise ArtifactError(f"{path / 'tokenizer.json'}: missing; the artifact has no tokenizer")


_LAYER_FIELDS = ("format", "shape", "bytes", "weight_bytes", "tensors")


def _assemble(
    path: Path,
    manifest: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    on_meta: bool,
    read: Callable[[str], torch.Tensor] | None = None,
) -> nn.Module:
    """The model the manifest describes, holding `tensors` (real ones, or meta tensors from the headers:
    `on_meta` builds the model on the meta device, a structural check that reads no weight but the
    tensors of sparse layers, whose masks are counted, and of W4A4 layers, whose activation scale sets
    the format's exponent bias: `read(name)` gives one stored tensor)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config_dict = dict(manifest["model_config"])
    layers = config_dict.get("num_hidden_layers")
    layer_ids = {name.split(".")[2] for name in manifest["tensors"] if name.startswith("model.layers.")}
    if isinstance(layers, int) and layers > len(layer_ids):  # before building (allocating) 10^5 layers
        raise ArtifactError(
            f"{path}: the manifest's model_config has num_hidden_layers {layers}, the artifact stores "
            f"{len(layer_ids)} decoder layers"
        )
    try:
        config = AutoConfig.for_model(config_dict.pop("model_type", None), **config_dict)
        with no_init_weights(), torch.device("meta") if on_meta else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # an unknown model_type, a config transformers refuses (its validators raise huggingface_hub's
    # StrictDataclass*Error, which derive from Exception only)
    except Exception as exc:
        raise ArtifactError(
            f"{path}: the manifest's model_config is not a loadable model ({one_line(exc, 160)})"
        ) from None
    tensors = dict(tensors)
    for name, meta in manifest["layers"].items():
        try:
            parts = {suffix: tensors.pop(f"{name}.{suffix}") for suffix in meta["tensors"]}
            try:
                state = CompressedLinearState.from_tensors(meta, parts)
                module = CompressedLinear(state)
            except (RuntimeError, NotImplementedError):  # a format that looks at values (masks, scales)
                if read is None or not any(t.is_meta for t in parts.values()):
                    raise
                parts = {suffix: read(f"{name}.{suffix}") for suffix in parts}
                state = CompressedLinearState.from_tensors(meta, parts)
                module = CompressedLinear(state)
            set_module(model, name, module)
        except (ValueError, KeyError, TypeError, AttributeError, NotImplementedError, RuntimeError) as exc:
            raise ArtifactError(f"{path}: layer {name} does not match its manifest entry ({exc!r})") from None
        stored = state.meta()
        for key in _LAYER_FIELDS:  # a tensor of another dtype (fp32 scales) changes the byte counts
            if stored.get(key) != meta.get(key):
                held = ", ".join(
                    f"{s} {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}" for s, t in parts.items()
                )
                raise ArtifactError(
                    f"{path}: layer {name} does not match its manifest entry ({key} {stored.get(key)!r}, "
                    f"manifest says {meta.get(key)!r}; stored tensors: {held})"
                )
    # Dense tensors keep the dtype they were stored in (the recipe's dtype).
    for name, tensor in tensors.items():
        module_name, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        current = getattr(module, attr, None) if module is not None else None
        if not isinstance(current, torch.Tensor):
            raise ArtifactError(f"{path}: tensor {name} does not belong to a {config.model_type} model")
        if tuple(current.shape) != tuple(tensor.shape):
            raise ArtifactError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(current.shape)}"
            )
        if current.is_floating_point() != tensor.is_floating_point():
            raise ArtifactError(
                f"{path}: tensor {name} has dtype {str(tensor.dtype).removeprefix('torch.')}, the model "
                f"expects a floating-point one"
            )
        if isinstance(current, nn.Parameter):
            current.data = tensor
        else:
            setattr(module, attr, tensor)
    for alias, stored_name in manifest["tied_weights"].items():  # share, as when the model was built
        module_name, _, attr = alias.rpartition(".")
        source_name, _, source_attr = stored_name.rpartition(".")
        try:
            shared = getattr(model.get_submodule(source_name), source_attr)
            setattr(model.get_submodule(module_name), attr, shared)
        except (AttributeError, TypeError) as exc:
            raise ArtifactError(
                f"{path}: tied tensor {alias} -> {stored_name} is not in the model ({exc})"
            ) from None
    stored = set(manifest["tensors"]) | set(manifest["tied_weights"])
    missing = set(model.state_dict()) - stored
    if missing:
        raise ArtifactError(
            f"{path}: the artifact lacks tensors the model needs: {', '.join(sorted(missing)[:5])}"
        )
    return model


def load_artifact(path: Path | str, verify: bool = True) -> LoadedArtifact:
    """Rebuild the compressed model from an artifact (checksums verified first unless `verify=False`)."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest, structure=False)  # (the values are checked on the data below)
    # On the meta device first: a model_config that does not match the tensors (a vocab_size of 10^12)
    # is refused before the real model is allocated. The layers whose format reads values (masks,
    # activation scales) take them from the tensors read once here, not from the files again.
    headers = _read_headers(path, manifest)
    tensors = _read_tensors(path, manifest)
    _assemble(path, manifest, headers, on_meta=True, read=tensors.__getitem__)
    model = _assemble(path, manifest, tensors, on_meta=False)
    if manifest.get("generation_config"):  # (older artifacts have none: transformers' defaults)
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_dict(manifest["generation_config"])
        except (ValueError, TypeError, AttributeError) as exc:
            raise ArtifactError(
                f"{path}: the manifest's generation_config is not a valid one ({one_line(exc, 160)})"
            ) from None
    model.eval()
    _check_tokenizer_files(path)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: cannot load the tokenizer ({one_line(exc)})") from None
    return LoadedArtifact(model=model, tokenizer=tokenizer, manifest=manifest, path=path)
