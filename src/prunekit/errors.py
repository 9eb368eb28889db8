"""The error family: every message names the argument, the bad value and what is allowed."""

from __future__ import annotations

import difflib
from typing import Any, Iterable


class PruneError(ValueError):
    """Base class of every error prunekit raises on purpose."""


class ArgumentError(PruneError):
    """An argument has a value prunekit cannot use."""

    def __init__(self, argument: str, value: Any, allowed: str, hint: str = "") -> None:
        self.argument, self.value, self.allowed, self.hint = argument, value, allowed, hint
        message = f"{argument}={value!r} is not valid: {allowed}"
        if hint:
            message += f". {hint}"
        super().__init__(message)


class SelectionError(PruneError):
    """A selection of layers (by type, name pattern or ignore list) is empty or misses."""


class ModelError(PruneError):
    """The model cannot be pruned as asked (shared, integer or quantised weights, wrong kind of model)."""


class FormatError(PruneError):
    """A saved file is corrupt, truncated or does not match the model it is loaded into."""


def unknown_choice(argument: str, value: Any, valid: Iterable[str]) -> ArgumentError:
    """An ArgumentError for a name not among `valid`, listing them and suggesting the closest."""
    valid = sorted(valid)
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f"Did you mean {close[0]!r}?" if close else ""
    return ArgumentError(argument, value, "choose one of " + ", ".join(valid), hint)


def check_sparsity(value: Any, argument: str = "sparsity") -> float:
    """Validate one sparsity: a real number in [0, 1)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ArgumentError(argument, value, "a number in [0, 1)") from None
    if not 0.0 <= number < 1.0 or number != number:
        raise ArgumentError(argument, value, "a number in [0, 1) (1 would remove every weight)")
    return number
