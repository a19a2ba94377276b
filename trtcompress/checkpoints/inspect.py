"""`trtcompress inspect`: what an artifact holds, layer by layer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.table import Table
from rich.text import Text

from trtcompress.checkpoints import native
from trtcompress.errors import RecipeError
from trtcompress.eval.report import measured_text
from trtcompress.recipe import recorded_recipe
from trtcompress.ui import UI, json_text


def inspect_artifact(path: Path, verify: bool, as_json: bool, ui: UI) -> dict:
    """Print what the artifact holds; raise if its files do not verify, or (after printing, since this is
    where a user looks) if its recorded recipe is one eval / repo / serve refuse."""
    manifest = native.read_manifest(path)
    native.verify_files(path, manifest, hashes=verify)  # --no-verify: files and sizes still checked
    try:
        recorded_recipe(manifest["recipe"], f"{path}/{native.MANIFEST}")
        refused = None
    except RecipeError as exc:
        refused = exc
    _print(path, manifest, verify, as_json, ui)
    if refused is not None:
        raise refused
    return manifest


def _print(path: Path, manifest: dict, verify: bool, as_json: bool, ui: UI) -> None:
    if as_json:
        ui.out.print_json(json_text(manifest))
        return
    table = Table(  # Text: the path and the recipe name are the user's, not rich markup ("[/v2]")
        title=Text(f"{path} · recipe {manifest['recipe'].get('name', '?')} · status {manifest['status']}"),
        title_justify="left",
    )
    for column in ("layer", "format", "shape", "bytes", "bits/weight"):
        table.add_column(column, justify="right" if column in ("bytes", "bits/weight") else "left")
    for name, meta in manifest["layers"].items():
        out_f, in_f = meta["shape"]
        weight_bytes = meta["weight_bytes"]
        table.add_row(
            name,
            meta["format"],
            f"{out_f}x{in_f}",
            f"{meta['bytes']:,}",
            f"{8 * weight_bytes / (out_f * in_f):.3f}",
        )
    ui.out.print(table)
    formats = Counter(meta["format"] for meta in manifest["layers"].values())
    summary = ", ".join(f"{n}x {f}" for f, n in formats.items()) or "none"
    b = manifest["bytes"]
    ui.out.print(
        f"{len(manifest['layers'])} compressed layers ({summary}); "
        f"tensors {b['tensors'] / 1e6:.2f} MB = compressed linears {b['compressed_linears'] / 1e6:.2f} MB "
        f"+ other {b['other'] / 1e6:.2f} MB"
    )
    if manifest.get("eval"):
        e = manifest["eval"]
        ref = f" (reference {e['ppl_ref']:.3f}, ratio {e['ppl_ratio']:.4f})" if e.get("ppl_ref") else ""
        ui.out.print(f"eval at build: ppl {e['ppl']:.3f}{ref}")
    for gate in manifest.get("gates", []):
        reason = gate.get("reason") if not gate["passed"] else None  # (which metrics were not finite)
        ui.out.print(
            Text(
                f"gate {gate['gate']}: {'pass' if gate['passed'] else 'FAIL'} "
                f"(measured {measured_text(gate['value'], gate['gate'], gate['passed'])})"
                + (f": {reason}" if reason else "")
            )
        )
    ui.out.print("checksums verified" if verify else "sizes checked, sha256 not verified (--no-verify)")
