"""Write a pruned transformers model as an ordinary `save_pretrained` folder, plus prunekit's manifest.

The folder loads with plain ``AutoModelForCausalLM.from_pretrained`` on a machine without prunekit. It is built in
a staging folder beside the destination and renamed into place, so an interrupted run never leaves half of it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from .errors import ArgumentError
from .io import HF_FORMAT, MANIFEST_FILE, move_into_place, run_summary, sha256_file
from .report import Report, sparsity_report


def check_destination(dest: Path, overwrite: bool, argument: str = "out") -> None:
    """Refuse an existing output folder with anything in it (an earlier prunekit output too) unless overwrite=True:
    without it the folder is never touched. `argument` is the keyword the caller took the path as."""
    if not isinstance(overwrite, bool):
        raise ArgumentError("overwrite", overwrite, "True or False")
    if not dest.exists() and not dest.is_symlink():
        return
    if not dest.is_dir() or dest.is_symlink():
        raise ArgumentError(argument, str(dest), "a folder to write (it exists as a file or a symbolic link)")
    if overwrite or not any(dest.iterdir()):
        return
    what = "an earlier prunekit output" if (dest / MANIFEST_FILE).is_file() else "files"
    # a CLI flag (argument '--out') is answered with the flag that lifts the rule, a Python keyword with the keyword
    lift = "--overwrite" if argument.startswith("--") else "overwrite=True (--overwrite on the command line)"
    raise ArgumentError(argument, str(dest), f"a new folder or an empty one, unless {lift.split(' ')[0]}",
                        f"It holds {what}; pass {lift} to replace the whole folder.")


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for package in ("prunekit", "torch", "transformers", "safetensors"):
        try:
            versions[f"{package}_version"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def manifest_for(report: Report, files: Mapping[str, str], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The prunekit.json of a transformers folder: what was run, the sparsity reached, file checksums."""
    return {
        "format": HF_FORMAT,
        "format_version": 1,
        **_versions(),
        **run_summary(report),
        "files": {name: {"sha256": digest} for name, digest in files.items()},
        "extra": dict(extra or {}),
    }


def save_pretrained(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    tokenizer: Any = None,
    report: Report | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a (pruned) transformers model, its tokenizer and prunekit.json into `out`, atomically."""
    if not hasattr(model, "save_pretrained"):
        raise ArgumentError("model", type(model).__name__, "a transformers PreTrainedModel (use prunekit.save otherwise)")
    dest = Path(out)
    check_destination(dest, overwrite)
    report = report if report is not None else sparsity_report(model)
    # The counts are taken from the weights being written, not from what the report once said.
    recount = {row.name: row for row in sparsity_report(model).layers}
    for row in report.layers:
        if row.name in recount:
            row.zeros = recount[row.name].zeros
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        files = {p.name: sha256_file(p) for p in sorted(staging.glob("*.safetensors"))}
        manifest = manifest_for(report, files, extra)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
        move_into_place(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest
