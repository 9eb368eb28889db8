"""Choose which examples to keep from per-example scores: the hardest or the easiest share, optionally the same
share of every class; and write the kept indices (.npy or .txt) atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArgumentError
from .checks import HARDNESS, check_choice, check_fraction, check_labels, keep_count

INDEX_SUFFIXES = (".npy", ".txt")


def _scores_array(scores: Any) -> np.ndarray:
    array = np.asarray(scores.detach().cpu().numpy() if hasattr(scores, "detach") else scores, dtype=np.float64)
    if array.ndim != 1 or len(array) == 0:
        raise ArgumentError("scores", f"an array of shape {array.shape}",
                            "a non-empty 1-D array, one score per example")
    nan = int(np.isnan(array).sum())
    if nan:
        raise ArgumentError("scores", f"an array with {nan} NaN scores", "a number for every example (inf allowed)")
    return array


def _ranked(scores: np.ndarray, hardness: str) -> np.ndarray:
    """Positions from the first to keep to the last: highest scores first for 'hard'; ties in index order."""
    return np.argsort(-scores if hardness == "hard" else scores, kind="stable")


def class_quotas(labels: np.ndarray, total: int) -> dict[int, int]:
    """Per-class counts proportional to class sizes that sum to `total` (largest remainders get the spare units)."""
    classes, sizes = np.unique(labels, return_counts=True)
    exact = sizes * (total / len(labels))
    quotas = np.minimum(np.floor(exact).astype(np.int64), sizes)
    spare = total - int(quotas.sum())
    for i in np.argsort(-(exact - quotas), kind="stable"):
        if spare <= 0:
            break
        if quotas[i] < sizes[i]:
            quotas[i] += 1
            spare -= 1
    return {int(c): int(q) for c, q in zip(classes, quotas)}


def select(scores: Any, keep: float, *, hardness: str = "hard", labels: Any = None,
           class_balanced: bool = False) -> np.ndarray:
    """Sorted int64 indices of the examples to keep: the `keep` share with the highest scores (hardness='hard') or
    the lowest ('easy'); with class_balanced, the same share of every class (needs labels)."""
    array = _scores_array(scores)
    fraction = check_fraction(keep)
    check_choice(hardness, "hardness", HARDNESS)
    total = keep_count(len(array), fraction)
    if not class_balanced:
        return np.sort(_ranked(array, hardness)[:total]).astype(np.int64)
    if labels is None:
        raise ArgumentError("labels", None, "class labels, one per score (class_balanced=True needs them)")
    y = check_labels(labels, len(array))
    kept: list[np.ndarray] = []
    for label, quota in class_quotas(y, total).items():
        members = np.flatnonzero(y == label)
        kept.append(members[_ranked(array[members], hardness)[:quota]])
    return np.sort(np.concatenate(kept)).astype(np.int64)


def write_indices(indices: Any, path: str | os.PathLike) -> Path:
    """Write kept indices to .npy (int64) or .txt (one per line) via a temp file and os.replace."""
    path = Path(path)
    if path.suffix not in INDEX_SUFFIXES:
        raise ArgumentError("out", str(path), "a file name ending in .npy or .txt")
    if not path.parent.is_dir():
        raise ArgumentError("out", str(path), f"a file in an existing folder ({path.parent} does not exist)")
    array = np.asarray(indices, dtype=np.int64)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        if path.suffix == ".npy":
            np.save(temp, array)
        else:
            temp.write_text("".join(f"{int(i)}\n" for i in array), encoding="utf-8")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def read_indices(path: str | os.PathLike) -> np.ndarray:
    """Indices written by write_indices (.npy or .txt)."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.int64)
    return np.array([int(line) for line in path.read_text(encoding="utf-8").split()], dtype=np.int64)


def write_json(payload: dict, path: str | os.PathLike) -> Path:
    """Write a JSON report via a temp file and os.replace."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ArgumentError("report", str(path), f"a file in an existing folder ({path.parent} does not exist)")
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path
