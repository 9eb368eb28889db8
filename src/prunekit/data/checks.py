"""Argument checks shared by the data-pruning functions: keep fractions, label arrays, counts, choices."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import ArgumentError, unknown_choice

HARDNESS = ("hard", "easy")


def check_fraction(value: Any, argument: str = "keep") -> float:
    """A share of the data set to keep: a real number in (0, 1]."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not math.isfinite(number) or not 0.0 < number <= 1.0:
        raise ArgumentError(argument, value, "a fraction of the data set to keep, in (0, 1]")
    return number


def check_count(value: Any, argument: str, minimum: int = 1) -> int:
    """An integer >= minimum (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ArgumentError(argument, value, f"an integer >= {minimum}")
    return int(value)


def check_positive(value: Any, argument: str) -> float:
    """A finite real number > 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise ArgumentError(argument, value, "a finite number > 0")
    return number


def check_choice(value: Any, argument: str, valid: tuple[str, ...]) -> str:
    """One of `valid`, else an ArgumentError suggesting the closest."""
    if value not in valid:
        raise unknown_choice(argument, value, valid)
    return value


def check_labels(labels: Any, n: int, argument: str = "labels", other: str = "scores") -> np.ndarray:
    """Integer class labels, one per example: a 1-D array of length n."""
    array = np.asarray(labels.detach().cpu().numpy() if hasattr(labels, "detach") else labels)
    if array.ndim != 1:
        raise ArgumentError(argument, f"an array of shape {array.shape}", "a 1-D array of integer class labels")
    if len(array) != n:
        raise ArgumentError(argument, f"{len(array)} labels", f"one label per row of {other} ({n} rows)")
    if array.dtype.kind not in "iub":
        if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
            array = array.astype(np.int64)
        else:
            raise ArgumentError(argument, f"an array of dtype {array.dtype}", "integer class labels")
    return array.astype(np.int64, copy=False)


def keep_count(n: int, fraction: float) -> int:
    """How many of n examples a keep fraction means: rounded, at least one."""
    return max(1, min(n, int(round(n * fraction))))
