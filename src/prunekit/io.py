"""Pickle-free save and load of pruned models: safetensors weights, bit-packed masks and a JSON manifest.

A saved model is a folder::

    model.safetensors   the full state dict, each storage once (tied weights are recorded as aliases)
    masks.safetensors   every attached mask, bit-packed into uint8 (numpy.packbits order)
    prunekit.json       the manifest: versions, method, arguments, seed, sparsity, masks, aliases, sha256 of each file

Nothing in the folder is ever executed or unpickled: the user builds the model class, `load` only copies tensors.
`save` builds the folder beside the destination and renames it into place, so a failed or interrupted save never
leaves a half-written folder and never removes a good one before its replacement is complete.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import masks as mask_engine
from .errors import ArgumentError, FormatError
from .report import LayerSparsity, Report, sparsity_report

FORMAT = "prunekit"
HF_FORMAT = "prunekit-hf"  # a transformers save_pretrained folder with prunekit.json beside it
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
MASKS_FILE = "masks.safetensors"
MANIFEST_FILE = "prunekit.json"
_OUR_FILES = frozenset({MODEL_FILE, MASKS_FILE, MANIFEST_FILE})
_SHOW = 5  # how many offending keys an error message lists


# ---------------------------------------------------------------------------------------------------------------
# Bit packing


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (flattened row-major) into ceil(n/8) uint8 bytes, first element in the high bit."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ArgumentError("mask", _describe(mask), "a bool tensor")
    flat = mask.detach().to("cpu").reshape(-1).numpy()
    return torch.from_numpy(np.packbits(flat))


def unpack_bits(packed: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    """Inverse of pack_bits: a bool tensor of `shape` from its packed uint8 bytes."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ArgumentError("packed", _describe(packed), "a 1-D uint8 tensor from pack_bits")
    if packed.numel() != _packed_size(numel):
        raise ArgumentError("packed", _describe(packed), f"{_packed_size(numel)} bytes for shape {list(shape)}")
    bits = np.unpackbits(packed.detach().to("cpu").numpy(), count=numel)
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def _packed_size(numel: int) -> int:
    """Bytes that pack_bits produces for `numel` elements."""
    return (numel + 7) // 8


def _describe(value: Any) -> str:
    """A short description of a value for error messages (never a whole tensor)."""
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)} {value.dtype}"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------------------------
# Save


def save(
    model: nn.Module,
    path: str | os.PathLike,
    report: Report | None = None,
    *,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    structure: Any = None,
) -> Path:
    """Save `model` (weights, masks, manifest) to the folder `path`, atomically; returns the folder.

    structure: the removal plan of a structured pruning run (`StructuredResult.plan` or the result itself); it goes
    into the manifest, and `load` replays it on a fresh instance of the original class before loading the weights.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentError("model", _describe(model), "a torch.nn.Module")
    if report is not None and not isinstance(report, Report):
        raise ArgumentError("report", _describe(report), "a prunekit.Report (from prune) or None")
    extra = _check_extra(extra)
    dest = Path(path)
    _check_destination(dest, overwrite)

    # Everything is computed before anything is written, so bad input fails with the disk untouched.
    stored, aliases = dedupe_state(model.state_dict())
    masked = _collect_masks(model)
    report = _refresh_counts(model, report) if report is not None else sparsity_report(model)
    structure_entries = _structure_entries(structure)

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        files = {
            MODEL_FILE: _write_safetensors(staging / MODEL_FILE, stored),
            MASKS_FILE: _write_safetensors(staging / MASKS_FILE, {key: packed for key, _, packed in masked}),
        }
        manifest = build_manifest(report, stored, aliases, [entry for _, entry, _ in masked], files, extra)
        if structure_entries is not None:
            manifest["structure"] = structure_entries
            manifest["removed_modules"] = list(getattr(structure, "removed_modules", []))
        _write_text(staging / MANIFEST_FILE, json.dumps(manifest, indent=2, default=str) + "\n")
        _fsync_dir(staging)
        move_into_place(staging, dest)
    except BaseException:
        # KeyboardInterrupt included: the staging folder must not outlive a failed save.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _structure_entries(structure: Any) -> list[dict[str, Any]] | None:
    """The JSON form of a removal plan (or of a StructuredResult's plan)."""
    if structure is None:
        return None
    from .graph.surgery import plan_to_json

    plan = getattr(structure, "plan", structure)
    if not isinstance(plan, dict):
        raise ArgumentError("structure", _describe(structure), "a removal plan or the result of prune_structured")
    return plan_to_json(plan)


def _check_extra(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """User metadata must be a JSON object, since it goes into the manifest verbatim."""
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise ArgumentError("extra", _describe(extra), "a dict of JSON-serialisable values")
    try:
        return json.loads(json.dumps(dict(extra)))
    except (TypeError, ValueError) as exc:
        raise ArgumentError("extra", _describe(extra), f"a dict of JSON-serialisable values ({exc})") from None


def _check_destination(dest: Path, overwrite: bool) -> None:
    """Refuse an existing folder with anything in it (an earlier save too) unless overwrite=True."""
    from .export import check_destination

    check_destination(dest, overwrite, argument="path")


def is_prunekit_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by save (a prunekit manifest and nothing but our files)."""
    folder = Path(path)
    try:
        names = {p.name for p in folder.iterdir()}
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT and names <= _OUR_FILES


def dedupe_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into tensors to store (each storage once, contiguous, on CPU) and alias -> stored key."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}  # exact view identity -> key stored for it
    storages: set[tuple] = set()
    for key, tensor in state.items():
        tensor = tensor.detach()
        if tensor.device.type == "meta":
            raise ArgumentError("model", f"{key} on the meta device", "a model whose weights are materialised")
        if tensor.numel() == 0:  # empty tensors have no storage worth sharing (all report data_ptr 0)
            stored[key] = tensor.to("cpu").contiguous()
            continue
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if view in views:
            aliases[key] = views[view]
            continue
        views[view] = key
        # Another view into a storage already stored (e.g. a slice of a fused weight): safetensors refuses shared
        # storage, so this one gets its own copy.
        copy = tensor.to("cpu").contiguous()
        if storage in storages and copy.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
            copy = copy.clone()
        storages.add(storage)
        stored[key] = copy
    return stored, aliases


def _collect_masks(model: nn.Module) -> list[tuple[str, dict[str, Any], torch.Tensor]]:
    """(state-dict key, manifest entry, packed bits) for every attached mask."""
    out = []
    for module_name, _, param_name, mask in mask_engine.masked_modules(model):
        key = f"{module_name}.{param_name}" if module_name else param_name
        kept = int(mask.sum())
        entry = dict(key=key, module=module_name, param=param_name, shape=list(mask.shape), numel=mask.numel(),
                     kept=kept, pruned=mask.numel() - kept)
        out.append((key, entry, pack_bits(mask)))
    return out


def _refresh_counts(model: nn.Module, report: Report) -> Report:
    """The report with each layer's zeros recounted, so the manifest describes the weights actually saved."""
    modules = dict(model.named_modules())
    layers = []
    for row in report.layers:
        weight = getattr(modules.get(row.name), "weight", None)
        if isinstance(weight, torch.Tensor) and list(weight.shape) == list(row.shape):
            row = LayerSparsity(row.name, row.kind, list(row.shape), weight.numel(), int((weight == 0).sum()),
                                row.pattern)
        layers.append(row)
    return Report(layers=layers, method=report.method, arguments=dict(report.arguments),
                  skipped=list(report.skipped), notes=list(report.notes), seconds=report.seconds,
                  extra=dict(report.extra))


def run_summary(report: Report) -> dict[str, Any]:
    """The manifest entries that describe the run: method, arguments, seed, sparsity, per-layer rows, notes."""
    summary = report.to_dict()
    return {
        "method": report.method,
        "arguments": summary["arguments"],
        "seed": report.arguments.get("seed"),
        "sparsity": summary["total"],
        "layers": summary["layers"],
        "report": {"skipped": summary["skipped"], "notes": summary["notes"], "seconds": summary["seconds"],
                   "extra": report.extra},
    }


def build_manifest(
    report: Report,
    stored: Mapping[str, torch.Tensor],
    aliases: Mapping[str, str],
    mask_entries: list[dict[str, Any]],
    files: Mapping[str, dict[str, Any]],
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """The prunekit.json content (a plain dict)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **_versions(),
        **run_summary(report),
        "masks": mask_entries,
        "tensors": {
            "stored": len(stored),
            "elements": sum(t.numel() for t in stored.values()),
            "bytes": sum(t.numel() * t.element_size() for t in stored.values()),
            "aliases": dict(aliases),
        },
        "totals": {
            "tensors": len(stored) + len(aliases),
            "masked_weights": len(mask_entries),
            "masked_elements": sum(e["numel"] for e in mask_entries),
            "masked_pruned": sum(e["pruned"] for e in mask_entries),
        },
        "files": dict(files),
        "extra": dict(extra),
    }


def _versions() -> dict[str, str]:
    """Library versions for the manifest; transformers only when installed (read from metadata, not imported)."""
    from . import __version__

    out = {"prunekit_version": __version__, "torch_version": torch.__version__}
    for package in ("safetensors", "transformers"):
        try:
            out[f"{package}_version"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Write one safetensors file durably; returns its size and sha256 for the manifest."""
    save_file(dict(tensors), str(path), metadata={"format": "pt", "writer": f"prunekit/{FORMAT_VERSION}"})
    _fsync_file(path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks so large checkpoints need no extra memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist a folder's entries (POSIX only; Windows cannot open folders, and needs no such step)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_into_place(staging: Path, dest: Path) -> None:
    """Rename the finished folder onto `dest`; an existing one is moved aside first and restored if that fails."""
    if not dest.exists():
        os.rename(staging, dest)
        _fsync_dir(dest.parent)
        return
    # rename() cannot replace a non-empty folder, so the old one steps aside for the moment between two renames.
    backup = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.rmdir(backup)
    os.rename(dest, backup)
    try:
        os.rename(staging, dest)
    except BaseException:
        os.rename(backup, dest)
        raise
    _fsync_dir(dest.parent)
    shutil.rmtree(backup, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Load


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a saved folder (or of the prunekit.json file itself), checked for format and version."""
    path = Path(path)
    file = path / MANIFEST_FILE if path.is_dir() else path
    if not file.is_file():
        raise FormatError(f"{path} is not a prunekit save: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{file}: not a readable JSON manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, HF_FORMAT):
        raise FormatError(f"{file}: not a prunekit manifest (no \"format\": \"{FORMAT}\" entry)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FormatError(f"{file}: format_version={version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{file}: format_version {version} is newer than this prunekit reads ({FORMAT_VERSION}); upgrade prunekit"
        )
    # A transformers folder (export.save_pretrained) keeps its weights in transformers' own files.
    required = (("files", dict),) if manifest["format"] == HF_FORMAT else (("files", dict), ("masks", list), ("tensors", dict))
    for key, kind in required:
        if not isinstance(manifest.get(key), kind):
            raise FormatError(f"{file}: the {key!r} entry is missing or not a {kind.__name__}")
    return manifest


def load(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> Report:
    """Load a saved folder into an already-built model of the same architecture; re-attaches masks.

    Everything is checked (hashes, file format, keys, shapes, masks) before the model is touched, so a failed load
    leaves the model as it was. strict=False tolerates missing and unexpected keys, never a shape mismatch.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentError("model", _describe(model), "a torch.nn.Module built with the saved architecture")
    folder = Path(path)
    if not folder.is_dir():
        raise FormatError(f"{folder} is not a folder written by prunekit.io.save")
    manifest = read_manifest(folder)
    if manifest["format"] == HF_FORMAT:
        raise FormatError(f"{folder} is a transformers folder: load it with from_pretrained, not prunekit.load")
    for name in (MODEL_FILE, MASKS_FILE):
        verify_file(folder, name, manifest)
    stored = _read_safetensors(folder / MODEL_FILE)
    packed = _read_safetensors(folder / MASKS_FILE)
    state = expand_aliases(stored, manifest["tensors"].get("aliases", {}))
    structure = _read_structure(manifest)
    removed = manifest.get("removed_modules") or []
    if structure is not None:
        # checked on a copy first, so a plan or weights that do not fit leave the model untouched
        from .graph.depth import replace_with_identity
        from .graph.surgery import apply_plan

        def rebuild(target: nn.Module) -> nn.Module:
            try:
                replace_with_identity(target, removed)
            except ArgumentError as error:
                raise FormatError(f"{MANIFEST_FILE}: removed_modules does not match this model ({error})") from None
            if structure:
                apply_plan(target, structure)
            # biases added by pruning (FLAP's bias compensation) exist in the saved weights, not in the class
            for name, module in target.named_modules():
                key = f"{name}.bias" if name else "bias"
                if isinstance(module, nn.Linear) and module.bias is None and key in state:
                    module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype))
            return target

        rehearsal = rebuild(copy.deepcopy(model))
        check_state(rehearsal, state, strict)
        _plan_masks(rehearsal, manifest["masks"], packed, strict)
        rebuild(model)
    check_state(model, state, strict)
    planned = _plan_masks(model, manifest["masks"], packed, strict)

    # From here on the model changes. Masks on weights being loaded go first, because their load hook would
    # otherwise zero the incoming values wherever the old mask had pruned.
    for module_name, module, param_name, _ in list(mask_engine.masked_modules(model)):
        key = f"{module_name}.{param_name}" if module_name else param_name
        if key in state:
            mask_engine.detach(module, param_name)
    model.load_state_dict(state, strict=strict)
    for module, param_name, mask in planned:
        mask_engine.attach(module, mask, param_name)
    return report_from_manifest(manifest) if manifest.get("layers") is not None else sparsity_report(model)


def _read_structure(manifest: Mapping[str, Any]) -> Any:
    """The removal plan stored by a structured save, validated; None for an unstructured one."""
    entries = manifest.get("structure")
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise FormatError(f"{MANIFEST_FILE}: the 'structure' entry is not a list of removals")
    from .graph.surgery import plan_from_json

    return plan_from_json(entries)


def verify_file(folder: Path, name: str, manifest: Mapping[str, Any]) -> None:
    """Raise FormatError naming the file if it is missing, or its size or sha256 differs from the manifest."""
    entry = manifest["files"].get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise FormatError(f"{MANIFEST_FILE} has no sha256 for {name}; the save is incomplete or was edited")
    file = folder / name
    if not file.is_file():
        raise FormatError(f"{name} is missing from {folder}")
    size = file.stat().st_size
    if isinstance(entry.get("bytes"), int) and size != entry["bytes"]:
        raise FormatError(f"{name} is {size} bytes but was saved as {entry['bytes']} bytes: truncated or replaced")
    actual = sha256_file(file)
    if actual != entry["sha256"]:
        raise FormatError(
            f"{name} is corrupted: sha256 {actual[:16]}... does not match the saved {entry['sha256'][:16]}..."
        )


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; any decoding failure becomes a FormatError naming the file."""
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FormatError(f"{file.name} is not a valid safetensors file (truncated or garbage?): {exc}") from None


def expand_aliases(stored: Mapping[str, torch.Tensor], aliases: Any) -> dict[str, torch.Tensor]:
    """The full state dict: stored tensors plus each alias pointing at the tensor it shares."""
    if not isinstance(aliases, dict):
        raise FormatError(f"{MANIFEST_FILE}: tensors.aliases is not a mapping")
    state = dict(stored)
    for alias, key in aliases.items():
        if key not in stored:
            raise FormatError(f"{MANIFEST_FILE}: alias {alias!r} points at {key!r}, which {MODEL_FILE} lacks")
        state[alias] = stored[key]
    return state


def check_state(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool) -> None:
    """FormatError listing the first missing, unexpected and shape-mismatched keys between file and model."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    mismatched = [k for k in expected if k in found and found[k] != expected[k]]  # in the model's order
    missing = [k for k in expected if k not in found] if strict else []
    unexpected = sorted(k for k in found if k not in expected) if strict else []
    if not (mismatched or missing or unexpected):
        return
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + _listing(
            [f"{k} saved {list(found[k])} vs model {list(expected[k])}" for k in mismatched]))
    if missing:
        problems.append(f"missing from {MODEL_FILE}: " + _listing([f"{k} {list(expected[k])}" for k in missing]))
    if unexpected:
        problems.append("not in the model: " + _listing([f"{k} {list(found[k])}" for k in unexpected]))
    hint = "" if not strict or mismatched else "; pass strict=False to load the keys that match"
    raise FormatError(f"{MODEL_FILE} does not match the model's architecture: " + "; ".join(problems) + hint)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def _plan_masks(model: nn.Module, entries: list[Any], packed: Mapping[str, torch.Tensor],
                strict: bool) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Unpack and check every saved mask against the model: (module, parameter name, bool mask) to attach."""
    listed = {e.get("key") for e in entries if isinstance(e, dict)}
    if listed != set(packed):
        odd = sorted(map(str, listed ^ set(packed)))
        raise FormatError(f"{MASKS_FILE} and {MANIFEST_FILE} disagree on which masks exist: {_listing(odd)}")
    modules = dict(model.named_modules())
    planned = []
    for entry in entries:
        try:
            key, module_name, param_name = entry["key"], entry["module"], entry["param"]
            shape = [int(s) for s in entry["shape"]]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{MANIFEST_FILE}: malformed mask entry {entry!r}") from None
        module = modules.get(module_name)
        param = getattr(module, param_name, None) if module is not None else None
        if not isinstance(param, nn.Parameter):
            if strict:
                raise FormatError(f"{MASKS_FILE}: mask for {key} {shape}, but the model has no parameter {key}")
            continue  # strict=False: a mask for a weight this model lacks is skipped like its weight
        if list(param.shape) != shape:
            raise FormatError(f"{MASKS_FILE}: mask for {key} is {shape} but the model's {key} is {list(param.shape)}")
        bits = packed[key]
        if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != _packed_size(math.prod(shape)):
            raise FormatError(f"{MASKS_FILE}: {key} holds {_describe(bits)}, not the packed bits of shape {shape}")
        planned.append((module, param_name, unpack_bits(bits, shape)))
    return planned


def report_from_manifest(manifest: Mapping[str, Any]) -> Report:
    """Rebuild the Report saved in a manifest."""
    try:
        layers = [LayerSparsity(name=row["name"], kind=row["kind"], shape=list(row["shape"]), total=int(row["total"]),
                                zeros=int(row["zeros"]), pattern=row.get("pattern", ""))
                  for row in manifest["layers"]]
        saved = manifest.get("report") or {}
        return Report(
            layers=layers, method=manifest.get("method", ""), arguments=dict(manifest.get("arguments") or {}),
            skipped=[(s["module"], s["reason"]) for s in saved.get("skipped", [])],
            notes=list(saved.get("notes", [])), seconds=float(saved.get("seconds", 0.0)),
            extra=dict(saved.get("extra") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{MANIFEST_FILE}: the saved report is malformed ({exc!r})") from None
