"""Checkpoints read and written one tensor at a time (safetensors), so memory stays at a few tensors.

Reading uses ``safe_open`` on each shard (memory-mapped; a tensor is materialised only when asked for). Writing lays
out every shard's header from the tensor shapes known up front, then streams each merged tensor's bytes into place,
so neither side ever holds a whole model.
"""

from __future__ import annotations

import json
import os
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from safetensors import safe_open

from ..errors import ArgumentError, FormatError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype codes <-> torch dtypes (the ones a checkpoint of a trained network holds)
_CODES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: code for code, dtype in _CODES.items()}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, read from a shard header without loading it."""

    name: str
    shard: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def weight_files(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file name of a transformers folder (one model.safetensors or an index)."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError) as error:
            raise FormatError(f"{index} is not a safetensors index (no weight_map): {error}") from error
        return dict(weight_map)
    single = folder / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), "pt") as handle:
            return {name: SINGLE_FILE for name in handle.keys()}
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (it holds {', '.join(others)})" if others else (
        " (pytorch_model.bin is not read: pickle files can run code; convert it to safetensors)"
        if (folder / "pytorch_model.bin").exists() else "")
    raise ArgumentError("model", str(folder), f"a folder with {SINGLE_FILE} or {INDEX_FILE}{hint}")


class Checkpoint:
    """A safetensors checkpoint folder opened for tensor-by-tensor reads."""

    def __init__(self, folder: str | os.PathLike, stack: ExitStack) -> None:
        self.folder = Path(folder)
        self.shards = weight_files(self.folder)
        self._handles: dict[str, Any] = {}
        for shard in sorted(set(self.shards.values())):
            path = self.folder / shard
            if not path.is_file():
                raise FormatError(f"{self.folder}: the index names {shard}, which does not exist")
            self._handles[shard] = stack.enter_context(safe_open(str(path), "pt"))

    def names(self) -> list[str]:
        """Tensor names in index order."""
        return list(self.shards)

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of one tensor, from its shard header."""
        shard = self.shards[name]
        tensor_slice = self._handles[shard].get_slice(name)
        code = tensor_slice.get_dtype()
        if code not in _CODES:
            raise FormatError(f"{self.folder}: tensor {name!r} has dtype {code}, which prunekit does not merge")
        return TensorInfo(name, shard, _CODES[code], tuple(tensor_slice.get_shape()))

    def get(self, name: str) -> torch.Tensor:
        """Materialise one tensor."""
        return self._handles[self.shards[name]].get_tensor(name)

    def config(self) -> dict[str, Any]:
        """The folder's config.json ({} when there is none)."""
        path = self.folder / "config.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def safetensors_header(infos: Sequence[TensorInfo], dtypes: Mapping[str, torch.dtype], metadata: Mapping[str, str]) -> bytes:
    """A safetensors header: every tensor's dtype, shape and byte range, padded to 8 bytes."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for info in infos:
        dtype = dtypes[info.name]
        size = _numel(info.shape) * torch.empty((), dtype=dtype).element_size()
        header[info.name] = {"dtype": _NAMES[dtype], "shape": list(info.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def plan_shards(infos: Sequence[TensorInfo], dtypes: Mapping[str, torch.dtype], max_bytes: int) -> list[list[TensorInfo]]:
    """Group tensors, in order, into shards of at most `max_bytes` (a bigger single tensor gets a shard alone)."""
    shards: list[list[TensorInfo]] = [[]]
    used = 0
    for info in infos:
        size = _numel(info.shape) * torch.empty((), dtype=dtypes[info.name]).element_size()
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(info)
        used += size
    return shards


class ShardWriter:
    """Writes one safetensors file whose header is known in advance; tensors arrive one at a time, in order."""

    def __init__(self, path: Path, infos: Sequence[TensorInfo], dtypes: Mapping[str, torch.dtype],
                 metadata: Mapping[str, str]) -> None:
        self.path, self.dtypes = path, dtypes
        self._expected: Iterator[TensorInfo] = iter(infos)
        self._handle = open(path, "wb")
        self._handle.write(safetensors_header(infos, dtypes, metadata))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor's bytes (it must be the next one in the header, with its shape)."""
        info = next(self._expected)
        if info.name != name or tuple(tensor.shape) != info.shape:
            raise FormatError(f"writing {name!r} {tuple(tensor.shape)} where {info.name!r} {info.shape} was planned")
        data = tensor.detach().to(self.dtypes[name]).contiguous().cpu()
        # A uint8 view is the raw little-endian bytes safetensors stores (CPU tensors are little-endian here).
        self._handle.write(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")

    def close(self) -> None:
        """Flush to disk; the file is complete only when every planned tensor was written."""
        if next(self._expected, None) is not None:
            self._handle.close()
            raise FormatError(f"{self.path.name} was closed before all its tensors were written")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()

    def abort(self) -> None:
        """Close without checks (the staging folder is removed by the caller)."""
        self._handle.close()


def shard_names(count: int) -> list[str]:
    """transformers' shard file names."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def parse_size(value: Any, argument: str = "max_shard_size") -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(value, int) and value > 0:
        return value
    text = str(value).strip().upper()
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                number = float(text[: -len(unit)])
            except ValueError:
                break
            if number > 0:
                return int(number * factor)
            break
    raise ArgumentError(argument, value, "a positive size such as 5GB, 500MB, 2GiB or a byte count")
