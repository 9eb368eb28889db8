"""Out-of-core LLM pruning: the model is never whole in memory.

The model is built as an empty skeleton from its config.json (parameters on the meta device; buffers such as rotary
frequencies computed for real). Weights are read from the folder's safetensors files, memory-mapped, one decoder
block at a time. Each block is pruned by the same code as an in-memory run (`llm.prune_block`), run on the
calibration samples to feed the next block, written to its own shard of the output folder and dropped again. The
embedding (and whatever else sits outside the blocks) is loaded only while the blocks' inputs are captured and while
the final perplexity is computed. Peak memory is therefore about one block, the calibration hidden states and their
statistics, plus the embedding: not the model.

Perplexity before and after is measured in the same single pass: the evaluation windows travel through every block
twice (the dense block, then the pruned one), and the output head runs on both at the end.

Resumable: the output is built in a staging folder beside `out` (`.<name>.partial`) that doubles as the checkpoint.
After each block it holds that block's shard, the hidden states entering the next block and progress.json; rerunning
the same job skips the finished blocks. Only the last step renames it to `out`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ArgumentError, ModelError, PruneError
from .merge.checkpoint import _CODES as SAFETENSORS_DTYPES
from .merge.checkpoint import TensorInfo, safetensors_header, shard_names
from .report import LayerSparsity, Report, layer_sparsity

# method name -> (solver, allocation): the calibration methods of prunekit.llm
STREAMED_METHODS = {"wanda": ("wanda", "uniform"), "sparsegpt": ("sparsegpt", "uniform"),
                    "owl": ("wanda", "owl"), "owl-sparsegpt": ("sparsegpt", "owl")}
PROGRESS_FILE = "progress.json"
STATE_FILE = "hidden.safetensors"
PROGRESS_VERSION = 1


# --------------------------------------------------------------------------------------------------------------------
# Reading: memory-mapped safetensors
# --------------------------------------------------------------------------------------------------------------------


# The merge engine's safetensors dtype codes, plus the float8 ones a model checkpoint may hold (read, then cast).
_DTYPES = {**SAFETENSORS_DTYPES, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _release_pages(mapping, start: int, end: int) -> None:
    """Take the pages of bytes [start, end) of a mapping out of this process (file data stays in the page cache)."""
    import mmap

    aligned = start // mmap.PAGESIZE * mmap.PAGESIZE  # madvise wants a page-aligned start
    if end > aligned and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lives: its file, dtype name, shape and byte range inside the file."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(the JSON header, the offset where tensor data begins) of a safetensors file, without reading any tensor."""
    import struct

    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ModelError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100_000_000 or length > path.stat().st_size:
            raise ModelError(f"{path} is not a safetensors file (header length {length})")
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            raise ModelError(f"{path} has an unreadable safetensors header ({error})") from None
    return header, 8 + length


class SafetensorsWeights:
    """The tensors of a model folder's safetensors files, memory-mapped (never pickle).

    `view` gives a tensor over the mapped file itself: only the pages actually touched become resident (an embedding
    lookup touches a few rows). `read` gives a private copy and drops the mapped pages from this process again, so
    reading block after block never accumulates the file in memory.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        import mmap

        self.folder = Path(folder)
        self._maps: dict[str, mmap.mmap] = {}
        self.entries: dict[str, _Entry] = {}
        for name in self._weight_files(self.folder):
            header, data_start = read_safetensors_header(self.folder / name)
            with open(self.folder / name, "rb") as handle:
                # ACCESS_COPY (private, copy-on-write): tensors over it are writable and never write to the file
                self._maps[name] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info.get("dtype") not in _DTYPES:
                    raise ModelError(f"{self.folder / name}: tensor {key!r} has dtype {info.get('dtype')!r}, which "
                                     f"prunekit cannot read (known: {', '.join(_DTYPES)})")
                begin, finish = info["data_offsets"]
                self.entries[key] = _Entry(name, info["dtype"], tuple(info["shape"]), data_start + begin,
                                           data_start + finish)

    @staticmethod
    def _weight_files(folder: Path) -> list[str]:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as error:
                raise ModelError(f"{index} is not a safetensors index ({error})") from None
            files = sorted(set(weight_map.values()))
            missing = [name for name in files if not (folder / name).is_file()]
            if missing:
                raise ModelError(f"{folder}: the index names shards that are not there: {', '.join(missing)}")
            return files
        files = sorted(path.name for path in folder.glob("*.safetensors"))
        if not files:
            pickled = sorted(path.name for path in folder.glob("*.bin"))
            hint = (f" (it has {', '.join(pickled)}: pickle files, which prunekit does not load; convert them to "
                    "safetensors first)") if pickled else ""
            raise ModelError(f"{folder} holds no .safetensors weights{hint}")
        return files

    def keys(self) -> list[str]:
        """Every tensor name in the folder."""
        return list(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def view(self, key: str) -> torch.Tensor:
        """The tensor over the mapped file (no copy; pages become resident only when touched)."""
        entry = self.entries[key]
        dtype = _DTYPES[entry.dtype]
        count = math.prod(entry.shape)
        if count == 0:
            return torch.empty(entry.shape, dtype=dtype)
        flat = torch.frombuffer(self._maps[entry.file], dtype=dtype, count=count, offset=entry.start)
        return flat.reshape(entry.shape)

    def read(self, key: str) -> torch.Tensor:
        """A private copy of the tensor; the mapped pages it touched are released from this process."""
        copy = self.view(key).clone()
        self.drop_pages(key)
        return copy

    def drop_pages(self, key: str) -> None:
        """Tell the kernel this process no longer needs the mapped pages of `key` (they stay in the page cache)."""
        entry = self.entries[key]
        _release_pages(self._maps[entry.file], entry.start, entry.end)

    def copy_bytes(self, key: str, handle) -> None:
        """Write the tensor's raw bytes to an open file, a few MiB at a time, straight from the mapping."""
        entry = self.entries[key]
        mapping = self._maps[entry.file]
        chunk = 16 << 20
        for offset in range(entry.start, entry.end, chunk):
            end = min(offset + chunk, entry.end)
            handle.write(mapping[offset:end])
            _release_pages(mapping, offset, end)  # drop what was just copied, not at the very end

    def fingerprint(self) -> str:
        """Names, shapes and dtypes of every tensor, plus the file sizes: tells one checkpoint from another cheaply."""
        import hashlib

        hasher = hashlib.sha256()
        for name in sorted(self._maps):
            hasher.update(f"{name}:{(self.folder / name).stat().st_size}".encode())
        for key in sorted(self.entries):
            entry = self.entries[key]
            hasher.update(f"{key}:{entry.dtype}:{entry.shape}:{entry.start}".encode())
        return hasher.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------------
# The skeleton and moving weights in and out of it
# --------------------------------------------------------------------------------------------------------------------


def empty_causal_lm(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The model of `folder`'s config.json with every parameter on the meta device (no memory, no code from the
    folder); buffers are real, so computed ones (rotary frequencies) are right."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .hf import check_causal_lm

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot build a causal LM from {folder}/config.json: {error}") from error
    check_causal_lm(model)
    return model.eval()


def _tied_sources(model: nn.Module) -> dict[str, str]:
    """Parameters that share another's tensor in this config (the output head tied to the embedding)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        return dict(tied)
    config = getattr(model, "config", None)
    declared = getattr(model, "_tied_weights_keys", None)
    if getattr(config, "tie_word_embeddings", False) and isinstance(declared, dict):
        return dict(declared)
    return {}


@dataclass
class WeightMover:
    """Loads named parts of a meta skeleton from memory-mapped weights, and drops them back to meta."""

    model: nn.Module
    weights: SafetensorsWeights
    device: torch.device = torch.device("cpu")
    tied: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tied = _tied_sources(self.model)
        self._dtype = next(self.model.parameters()).dtype

    def source_key(self, name: str) -> str:
        """The checkpoint's name for the model's tensor `name`."""
        if name in self.weights:
            return name
        if name in self.tied and self.tied[name] in self.weights:
            return self.tied[name]
        prefix = getattr(self.model, "base_model_prefix", "")
        for candidate in (name.removeprefix(f"{prefix}."), f"{prefix}.{name}"):
            if prefix and candidate in self.weights:
                return candidate
        raise ModelError(f"{self.weights.folder}: the checkpoint has no tensor {name!r} (out-of-core pruning expects "
                         "the checkpoint's tensor names to be the model's; load this model in memory instead)")

    def names(self, keep: Callable[[str], bool]) -> list[str]:
        """State-dict names chosen by `keep`; buffers the skeleton computed itself are left out."""
        chosen = []
        for name, value in self.model.state_dict(keep_vars=True).items():
            if keep(name) and (value.is_meta or name in self.weights):
                chosen.append(name)
        return chosen

    def load(self, names: Sequence[str], copy: bool = True) -> None:
        """Read `names` from the memory-mapped files into the model (in the model's dtype). With copy=False, tensors
        already in that dtype stay over the mapping (for weights that are only read, such as the embedding)."""
        expected = self.model.state_dict(keep_vars=True)
        state, read = {}, {}
        for name in names:
            key = self.source_key(name)
            if key not in read:  # tied tensors (head and embedding) are read once and shared
                same_dtype = _DTYPES[self.weights.entries[key].dtype] == expected[name].dtype
                read[key] = self.weights.view(key) if (same_dtype and not copy) else self.weights.read(key)
                read[key] = read[key].to(self.device)  # a no-op on the CPU
            value = read[key]
            if tuple(value.shape) != tuple(expected[name].shape):
                raise ModelError(f"{self.weights.folder}: tensor {name!r} has shape {tuple(value.shape)}, the config "
                                 f"says {tuple(expected[name].shape)}")
            state[name] = value.to(expected[name].dtype) if value.is_floating_point() else value
        self.model.load_state_dict(state, strict=False, assign=True)

    @contextmanager
    def dropping_pages_after_forward(self, module: nn.Module, names: Sequence[str]):
        """While inside: after each forward of `module` (the embedding lookup), its mapped pages are released, so a
        pass over many samples never holds more than one sample's rows of the embedding."""
        keys = {self.source_key(name) for name in names}

        def drop(_module, _args, _output):
            for key in keys:
                self.weights.drop_pages(key)

        handle = module.register_forward_hook(drop)
        try:
            yield
        finally:
            handle.remove()

    def release(self, names: Sequence[str]) -> None:
        """Drop the parameters `names` back to the meta device, freeing their memory (and their mapped pages)."""
        for name in names:
            self.weights.drop_pages(self.source_key(name))
            owner, _, attribute = name.rpartition(".")
            module = self.model.get_submodule(owner)
            if attribute in module._parameters:
                old = module._parameters[attribute]
                module._parameters[attribute] = nn.Parameter(torch.empty_like(old, device="meta"), requires_grad=False)


# --------------------------------------------------------------------------------------------------------------------
# Writing: one shard per block, staged and renamed into place
# --------------------------------------------------------------------------------------------------------------------


def write_safetensors(path: Path, items: Sequence[tuple[str, torch.dtype, tuple[int, ...], Callable[[Any], None]]]) -> None:
    """Write a safetensors file tensor by tensor, via a temp file and a rename (never half a file under `path`).

    `items`: (name, dtype, shape, a function writing exactly that tensor's bytes to a file handle); the header is the
    merge engine's. Nothing is gathered in memory first (safetensors' own save_file copies every tensor into one
    buffer).
    """
    header = safetensors_header([TensorInfo(name, path.name, dtype, tuple(shape)) for name, dtype, shape, _ in items],
                                {name: dtype for name, dtype, _, _ in items}, {"format": "pt"})
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as handle:
        handle.write(header)
        for _, _, _, write in items:
            write(handle)
    os.replace(temp, path)


def _tensor_item(name: str, tensor: torch.Tensor) -> tuple[str, torch.dtype, tuple[int, ...], Callable[[Any], None]]:
    tensor = tensor.detach().cpu().contiguous()

    def write(handle) -> None:
        if tensor.numel():
            handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))

    return name, tensor.dtype, tuple(tensor.shape), write


def write_shard(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors shard of in-memory tensors."""
    write_safetensors(folder / name, [_tensor_item(key, value) for key, value in tensors.items()])


def write_shard_from_source(folder: Path, name: str, keys: dict[str, str], weights: SafetensorsWeights,
                            dtype: torch.dtype) -> None:
    """A shard of tensors copied from the source checkpoint (`keys`: output name -> source name) in `dtype`, written
    tensor by tensor: tensors already in `dtype` go byte for byte from the mapping, never whole in memory."""
    items = []
    for out_key, source_key in keys.items():
        entry = weights.entries[source_key]
        stored = _DTYPES[entry.dtype]
        if stored == dtype or not stored.is_floating_point:
            items.append((out_key, stored, entry.shape,
                          lambda handle, key=source_key: weights.copy_bytes(key, handle)))
        else:
            items.append((out_key, dtype, entry.shape,
                          lambda handle, key=source_key: _tensor_item(key, weights.read(key).to(dtype))[3](handle)))
    write_safetensors(folder / name, items)


def _write_json(path: Path, payload: Any) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(temp, path)


# --------------------------------------------------------------------------------------------------------------------
# Perplexity from hidden states
# --------------------------------------------------------------------------------------------------------------------


def _returning(template: Any, hidden: torch.Tensor) -> Callable[..., Any]:
    """A stand-in block forward that returns `hidden` in the structure the real block returns."""
    rest = tuple(template[1:]) if isinstance(template, (tuple, list)) else None
    return lambda *args, **kwargs: hidden if rest is None else (hidden, *rest)


@torch.no_grad()
def head_nll(model: nn.Module, blocks: nn.ModuleList, template: Any, ids: torch.Tensor, final: torch.Tensor) -> float:
    """Summed next-token NLL of one window whose last block produced `final`: the model's own forward runs with the
    blocks stood in for, so the final norm and head are applied exactly as in a whole-model forward."""
    from .calibration import _passthrough_like
    from .evaluate import window_nll

    for block in blocks:
        block.forward = _passthrough_like(template)
    blocks[len(blocks) - 1].forward = _returning(template, final)
    try:
        ids = ids.to(final.device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
    finally:
        for block in blocks:
            del block.forward
    return window_nll(logits, ids[0, 1:])


# --------------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Stream:
    """Hidden states travelling through the blocks: calibration samples and, optionally, evaluation windows."""

    calibration: list[torch.Tensor]
    calibration_calls: list  # [sample][block] BlockCall
    dense_eval: list[torch.Tensor]
    pruned_eval: list[torch.Tensor]
    eval_calls: list


def _propagate(block: nn.Module, hidden: list[torch.Tensor], calls: list, index: int, desc: str,
               progress: bool, after: Callable[[int], None] | None = None) -> None:
    from .calibration import _check_finite, call_block

    for sample in tqdm(range(len(hidden)), desc=desc, disable=not progress, leave=False):
        output = call_block(block, hidden[sample], calls[sample][index])
        _check_finite([output], f"block {index}")  # per sample: offloaded states are never all resident
        if output.shape == hidden[sample].shape and output.dtype == hidden[sample].dtype:
            hidden[sample].copy_(output)  # in place: the hidden states keep one allocation for the whole run
        else:
            hidden[sample] = output
        if after is not None:
            after(sample)


class DiskActivations:
    """Calibration hidden states kept in a file this process maps, with one sample's pages resident at a time.

    The file is unlinked as soon as it is mapped: nothing is left behind whatever happens, and its space is freed
    when the mapping closes. Pages written through the shared mapping go to the page cache (written back to disk by
    the kernel); `drop(sample)` takes that sample's pages out of this process after each use.
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, folder: Path) -> None:
        import mmap
        import tempfile

        sizes = [math.prod(shape) * dtype.itemsize for shape in shapes]
        self.starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.ends = [start + size for start, size in zip(self.starts, sizes)]
        descriptor, name = tempfile.mkstemp(prefix=".prunekit-activations-", dir=folder)
        try:
            os.ftruncate(descriptor, max(1, sum(sizes)))
            self._map = mmap.mmap(descriptor, max(1, sum(sizes)))  # MAP_SHARED: writes land in the file
        finally:
            os.close(descriptor)
            os.unlink(name)
        self.views = [torch.frombuffer(self._map, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape)
                      for shape, start in zip(shapes, self.starts)]

    def store(self, sample: int, tensor: torch.Tensor) -> torch.Tensor:
        """Write one sample's hidden states to the file; returns the view that now holds them."""
        self.views[sample].copy_(tensor)
        self.drop(sample)
        return self.views[sample]

    def drop(self, sample: int) -> None:
        """Release this process's pages of one sample (the data stays in the file)."""
        _release_pages(self._map, self.starts[sample], self.ends[sample])

    def drop_all(self) -> None:
        for sample in range(len(self.views)):
            self.drop(sample)


def _activation_store(samples: Sequence[torch.Tensor], model: nn.Module, folder: Path,
                      device: torch.device) -> DiskActivations | None:
    """A file for the calibration hidden states (one (1, length, hidden) tensor per sample), or None on a GPU."""
    if device.type != "cpu":
        return None
    hidden_size = model.config.get_text_config().hidden_size
    dtype = next(model.parameters()).dtype
    return DiskActivations([(1, int(ids.shape[-1]), hidden_size) for ids in samples], dtype, folder)


def _in_one_buffer(hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """The hidden states as views of one tensor when they share a shape (moved one by one: no second full copy)."""
    if len(hidden) < 2 or any(h.shape != hidden[0].shape or h.dtype != hidden[0].dtype for h in hidden):
        return hidden
    buffer = torch.empty((len(hidden), *hidden[0].shape), dtype=hidden[0].dtype, device=hidden[0].device)
    for sample in range(len(hidden)):
        buffer[sample].copy_(hidden[sample])
        hidden[sample] = buffer[sample]
    return hidden


def check_streamed_method(method: str) -> tuple[str, str]:
    if method not in STREAMED_METHODS:
        raise ArgumentError("method", method, "one of " + ", ".join(STREAMED_METHODS) + " for out-of-core pruning "
                            "(the calibration methods; others need the whole model in memory)")
    return STREAMED_METHODS[method]


def resolve_folder(name_or_path: str | os.PathLike) -> Path:
    """A local folder for a model name, folder or hub id (hub ids: only config, tokenizer and safetensors files)."""
    from .zoo import resolve_model

    source = resolve_model(name_or_path)
    if os.path.isdir(source):
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja",
                                                              "*.txt", "*.tiktoken"]))
    except Exception as error:  # network, auth, missing repo: one clear message
        raise ModelError(f"cannot fetch {source!r} from the hub for out-of-core pruning: {error}") from None


def _progress_state(staging: Path) -> dict[str, Any] | None:
    path = staging / PROGRESS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise PruneError(f"{path} is unreadable ({error}); delete {staging} to start afresh") from None


def prune_out_of_core(
    model: str | os.PathLike,
    samples: Sequence[torch.Tensor],
    sparsity: float | Sequence[float] | None,
    out: str | os.PathLike,
    *,
    method: str = "wanda",
    pattern: str = "unstructured",
    include=None,
    ignore=None,
    blocksize: int = 128,
    dampening: float = 0.01,
    owl_m: float = 5.0,
    owl_lambda: float = 0.08,
    calibration: str = "sequential",
    eval_ids: torch.Tensor | None = None,
    eval_window: int = 512,
    bos_token_id: int | None = None,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    resume: bool = True,
    offload_activations: bool = True,
    extra: dict[str, Any] | None = None,
    progress: bool = True,
) -> Report:
    """Prune the causal LM in folder `model` block by block from its memory-mapped safetensors and write the pruned
    model to `out` (a `save_pretrained` folder with one shard per block, plus prunekit.json) without ever holding
    the whole model. Same masks and weights as `prunekit.prune(..., data=samples)` on the loaded model. Each block
    is moved to `device` ("auto": this rank's GPU when CUDA is available) to be pruned.

    With `offload_activations` (the default), the calibration hidden states live in a file beside `out` (mapped,
    unlinked at once, one sample resident at a time) instead of in memory; the results are the same.

    With `eval_ids` (1-D token ids of held-out text), the report's extra holds the dense and pruned perplexities over
    non-overlapping windows of `eval_window` tokens, as `prunekit.evaluate.perplexity` computes them.
    """
    from . import llm
    from .calibration import BlockFeed, capture_block_inputs, check_samples
    from .distributed import check_same_version, is_distributed, is_writer, rank_and_world, resolve_device, shard
    from .evaluate import _windows
    from .export import check_destination, manifest_for
    from .hf import find_decoder_blocks
    from .io import move_into_place, sha256_file

    import time

    started = time.perf_counter()
    solver, allocation = check_streamed_method(method)
    if calibration != "sequential":  # one-pass would hold every block's statistics: the opposite of out of core
        raise ArgumentError("calibration", calibration, "'sequential' out of core (one-pass calibration holds every "
                            "block's statistics at once; run it in memory)")
    limit_heap_fragmentation()
    dest = Path(out)
    check_destination(dest, overwrite)
    folder = resolve_folder(model)
    weights = SafetensorsWeights(folder)
    skeleton = empty_causal_lm(folder, dtype)
    mover = WeightMover(skeleton, weights, device=resolve_device(device))
    prefix, blocks = find_decoder_blocks(skeleton)
    settings = llm._settings(skeleton, solver, sparsity, pattern, allocation, blocksize, dampening, owl_m, owl_lambda,
                             len(blocks))
    targets = llm._block_targets(skeleton, blocks, include, ignore)
    for block_targets in targets:
        for t in block_targets:
            settings.pattern.validate(t.name, t.weight.shape, t.kind)
    samples = check_samples(skeleton, samples)
    all_samples = samples
    if is_distributed():
        check_same_version()
        samples = shard(samples, *rank_and_world())
    writer = is_writer()
    windows = []
    if eval_ids is not None and writer:
        windows = [w.unsqueeze(0) for w in _windows(torch.as_tensor(eval_ids, dtype=torch.long).reshape(-1),
                                                       eval_window, bos_token_id)]
        if not windows:
            raise ArgumentError("eval_ids", f"<{torch.as_tensor(eval_ids).numel()} tokens>",
                                f"at least one window of {eval_window} tokens")
        windows = check_samples(skeleton, windows)

    block_names = [mover.names(lambda n, i=i: n.startswith(f"{prefix}.{i}.")) for i in range(len(blocks))]
    outer_names = mover.names(lambda n: not n.startswith(f"{prefix}."))
    total_shards = len(blocks) + 1

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.partial")
    fingerprint = {
        "weights": weights.fingerprint(), "samples": _digest_ids(all_samples),
        "eval": _digest_ids(windows), "world": rank_and_world()[1], "dtype": str(dtype),
        "settings": dict(method=method, pattern=settings.pattern.name, sparsities=settings.sparsities,
                         blocksize=settings.blocksize, dampening=settings.dampening, owl_m=settings.owl_m,
                         owl_lambda=settings.owl_lambda, include=include, ignore=ignore),
    }
    done, saved = 0, _progress_state(staging) if (resume and writer) else None
    if saved is not None and saved.get("fingerprint") != json.loads(json.dumps(fingerprint, default=str)):
        raise PruneError(f"{staging} holds a run with other settings, weights or samples; delete it to start afresh "
                         "(or pass resume=False)")
    if is_distributed():
        saved = _broadcast_object(saved)
    if saved is not None:
        done = int(saved["blocks_done"])
    elif writer:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)

    mover.load(outer_names, copy=False)
    mover.load(block_names[0])
    with torch.no_grad(), mover.dropping_pages_after_forward(skeleton.get_input_embeddings(), outer_names):
        offload = _activation_store(samples, skeleton, dest.parent, mover.device) if offload_activations else None
        captured = capture_block_inputs(skeleton, samples, blocks, keep=offload.store if offload else None)
        captured_eval = capture_block_inputs(skeleton, windows, blocks) if windows else None
    template = captured.template
    # Two separate copies of the evaluation windows: the dense and the pruned blocks each update theirs in place.
    stream = _Stream(captured.hidden if offload else _in_one_buffer(captured.hidden), captured.calls,
                     [h.clone() for h in captured_eval.hidden] if captured_eval else [],
                     list(captured_eval.hidden) if captured_eval else [], captured_eval.calls if captured_eval else [])
    mover.release(outer_names + block_names[0])
    release_free_memory()

    sparsities = settings.sparsities
    ratios = saved.get("owl_outlier_ratios") if saved else None
    if settings.allocation == "owl" and ratios is None:
        ratios = _owl_pass(skeleton, blocks, block_names, mover, stream, targets, settings, progress,
                           _activation_store(samples, skeleton, dest.parent, mover.device) if offload else None)
        if offload:
            offload.drop_all()  # the OWL pass copied every sample
        sparsities = llm.owl_sparsities(ratios, sparsities[0], settings.owl_lambda)
    elif ratios is not None:
        sparsities = llm.owl_sparsities(ratios, sparsities[0], settings.owl_lambda)

    rows: list[LayerSparsity] = [LayerSparsity(**row) for row in (saved or {}).get("layers", [])]
    if done:
        _restore_hidden(staging, stream, rank_and_world(), offload)
    for index in tqdm(range(done, len(blocks)), desc="blocks (out of core)", initial=done, total=len(blocks),
                      disable=not progress):
        block = blocks[index]
        mover.load(block_names[index])
        with torch.no_grad():
            _propagate(block, stream.dense_eval, stream.eval_calls, index, f"block {index + 1} dense eval", progress)
            feed = BlockFeed(index, len(blocks), block, stream.calibration,
                             [calls[index] for calls in stream.calibration_calls], progress,
                             after_sample=offload.drop if offload else None)
            llm.prune_block(feed, targets[index], settings, sparsities[index])
            _propagate(block, stream.calibration, stream.calibration_calls, index, f"block {index + 1} propagate",
                       progress, after=offload.drop if offload else None)
            _propagate(block, stream.pruned_eval, stream.eval_calls, index, f"block {index + 1} pruned eval", progress)
        rows += [layer_sparsity(t, settings.pattern.name) for t in targets[index]]
        if writer:
            state = skeleton.state_dict()
            write_shard(staging, shard_names(total_shards)[index + 1], {n: state[n] for n in block_names[index]})
        mover.release(block_names[index])
        release_free_memory()
        _save_progress(staging, index + 1, fingerprint, rows, ratios, stream, samples)
        if offload:
            offload.drop_all()  # the checkpoint just read every sample

    if not writer:
        return _report(rows, method, settings, sparsity, apply="bake", extra={"world_size": rank_and_world()[1]},
                       seconds=time.perf_counter() - started)

    stream.calibration.clear()
    perplexities = {}
    if windows:
        mover.load(outer_names, copy=False)
        with torch.no_grad():
            for label, finals in (("dense_perplexity", stream.dense_eval), ("pruned_perplexity", stream.pruned_eval)):
                total = sum(head_nll(skeleton, blocks, template, ids, final) for ids, final in zip(windows, finals))
                perplexities[label] = math.exp(total / sum(w.shape[1] - 1 for w in windows))
        mover.release(outer_names)
    write_shard_from_source(staging, shard_names(total_shards)[0],
                            {name: mover.source_key(name) for name in outer_names if name not in mover.tied},
                            weights, dtype)

    extra_info = {"block_sparsities": sparsities, "calibration_samples": len(all_samples),
                  "calibration_tokens": sum(int(s.numel()) for s in all_samples), "world_size": rank_and_world()[1],
                  "out_of_core": True, **perplexities, **(extra or {})}
    if ratios is not None:
        extra_info["owl_outlier_ratios"] = ratios
    report = _report(rows, method, settings, sparsity, apply="bake", extra=extra_info,
                     seconds=time.perf_counter() - started)
    _finish_folder(staging, skeleton, folder, tokenizer, total_shards, report)
    for leftover in (PROGRESS_FILE, STATE_FILE):  # the checkpoint is not part of the result
        (staging / leftover).unlink(missing_ok=True)
    files = {path.name: sha256_file(path) for path in sorted(staging.glob("*.safetensors"))}
    _write_json(staging / "prunekit.json", manifest_for(report, files, {"job": extra_info}))
    move_into_place(staging, dest)
    return report


def release_free_memory() -> None:
    """Hand memory freed inside this process back to the system (glibc malloc_trim; a no-op elsewhere)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def limit_heap_fragmentation() -> bool:
    """Ask glibc to give large freed buffers (hidden states, block weights) straight back to the system.

    By default glibc raises its mmap threshold after the first large free, after which every freed block-sized buffer
    stays in the heap: a run that loads and drops blocks one by one would then keep growing. A fixed threshold
    (128 KiB) turns that off. Process-wide and harmless elsewhere; a no-op off glibc. Returns whether it applied."""
    import ctypes
    import ctypes.util

    M_MMAP_THRESHOLD = -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024))
    except (OSError, AttributeError):
        return False


# Files of a model folder that are neither weights nor config: copied as they are into the pruned folder.
AUXILIARY_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
                   "*.tiktoken", "chat_template.*", "generation_config.json", "preprocessor_config.json")


def copy_auxiliary_files(source: Path, staging: Path) -> list[str]:
    """Copy the tokenizer, chat template and generation config files of `source` (no code files, no weights)."""
    copied = []
    for pattern in AUXILIARY_FILES:
        for path in sorted(source.glob(pattern)):
            if path.is_file() and not (staging / path.name).exists():
                shutil.copyfile(path, staging / path.name)
                copied.append(path.name)
    return copied


def _digest_ids(samples: Sequence[torch.Tensor]) -> str:
    from .calibration import _samples_digest

    return _samples_digest(samples) if samples else ""


def _broadcast_object(value: Any) -> Any:
    """Rank 0's value on every rank (whether a run resumes is decided by the writer, who holds the folder)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _owl_pass(model, blocks, block_names, mover: WeightMover, stream: _Stream, targets, settings, progress,
              offload: DiskActivations | None = None) -> list[float]:
    """OWL's statistics-only pass over the dense blocks (each loaded and dropped again), on copies of the inputs."""
    from . import llm
    from .calibration import BlockFeed
    from .distributed import all_reduce_stats
    from .layout import to_matrix

    hidden = [offload.store(i, h) for i, h in enumerate(stream.calibration)] if offload else \
        [h.clone() for h in stream.calibration]
    ratios = []
    for index in tqdm(range(len(blocks)), desc="OWL outlier ratios", disable=not progress):
        mover.load(block_names[index])
        with torch.no_grad():
            feed = BlockFeed(index, len(blocks), blocks[index], hidden,
                             [calls[index] for calls in stream.calibration_calls], progress,
                             after_sample=offload.drop if offload else None)
            stats = llm.gather_stats(feed, {t.name: t.module for t in targets[index]}, hessian=False)
            all_reduce_stats(stats)
            scores = [llm.wanda_scores(to_matrix(t.weight, t.kind), stats[t.name].column_norm_sq).reshape(-1)
                      for t in targets[index]]
            ratios.append(llm.outlier_ratio(torch.cat(scores), settings.owl_m))
            _propagate(blocks[index], hidden, stream.calibration_calls, index, f"block {index + 1} OWL", progress,
                       after=offload.drop if offload else None)
        mover.release(block_names[index])
    return ratios


def _save_progress(staging: Path, blocks_done: int, fingerprint, rows, ratios, stream: _Stream, samples) -> None:
    """The writer's checkpoint after a block: the hidden states entering the next block, then progress.json."""
    from .distributed import is_distributed, is_writer

    if is_distributed() or not is_writer():
        return  # under torch.distributed each rank holds other hidden states: resume is for single-process runs
    tensors = {f"calibration.{i}": h for i, h in enumerate(stream.calibration)}
    tensors.update({f"dense_eval.{i}": h for i, h in enumerate(stream.dense_eval)})
    tensors.update({f"pruned_eval.{i}": h for i, h in enumerate(stream.pruned_eval)})
    write_shard(staging, STATE_FILE, tensors)
    _write_json(staging / PROGRESS_FILE, {
        "version": PROGRESS_VERSION, "blocks_done": blocks_done, "fingerprint": fingerprint,
        "layers": [row.__dict__ for row in rows], "owl_outlier_ratios": ratios,
    })


def _restore_hidden(staging: Path, stream: _Stream, rank_world, offload: DiskActivations | None) -> None:
    """Put the checkpoint's hidden states back into the stream, one tensor at a time."""
    from safetensors import safe_open

    if rank_world[1] > 1:
        raise PruneError(f"{staging}: resuming an out-of-core run is for single-process runs; delete it to restart")
    with safe_open(str(staging / STATE_FILE), framework="pt") as state:
        for sample, view in enumerate(stream.calibration):
            view.copy_(state.get_tensor(f"calibration.{sample}"))
            if offload:
                offload.drop(sample)
        for name, hidden in (("dense_eval", stream.dense_eval), ("pruned_eval", stream.pruned_eval)):
            hidden[:] = [state.get_tensor(f"{name}.{i}") for i in range(len(hidden))]


def _report(rows, method, settings, sparsity, apply, extra, seconds) -> Report:
    return Report(
        layers=rows, method=method,
        arguments=dict(solver=settings.solver, sparsity=list(sparsity) if isinstance(sparsity, (list, tuple)) else sparsity,
                       pattern=settings.pattern.name, allocation=settings.allocation, blocksize=settings.blocksize,
                       dampening=settings.dampening, owl_m=settings.owl_m, owl_lambda=settings.owl_lambda, apply=apply,
                       out_of_core=True),
        seconds=seconds, extra=extra,
    )


def _finish_folder(staging: Path, skeleton: nn.Module, source: Path, tokenizer: Any, total_shards: int,
                   report: Report) -> None:
    """config.json, generation config, tokenizer and the shard index: what `from_pretrained` needs besides weights."""
    from safetensors import safe_open

    skeleton.config.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    copy_auxiliary_files(source, staging)
    weight_map, total_size = {}, 0
    for name in shard_names(total_shards):
        with safe_open(str(staging / name), framework="pt") as handle:
            for key in handle.keys():
                weight_map[key] = name
                piece = handle.get_slice(key)
                total_size += math.prod(piece.get_shape()) * _DTYPES[piece.get_dtype()].itemsize
    _write_json(staging / "model.safetensors.index.json",
                {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})
