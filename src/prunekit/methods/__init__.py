"""Named methods: each a short recipe choosing a score, a budget and (by default) a pattern.

Adding a paper means adding one small file here that calls ``register``; the core does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import unknown_choice


@dataclass(frozen=True)
class Method:
    """A named pruning recipe and the paper it comes from."""

    name: str
    summary: str
    paper: str
    score: str = "magnitude"
    budget: str = "uniform"
    rounds: int = 1  # > 1: iterative pruning on an exponential schedule (SynFlow)
    # Methods that are not "score -> budget -> mask" (calibration-driven LLM methods) bring their own runner.
    runner: Callable | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (names are unique)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """Look a method up by name; unknown names list the valid ones and suggest the closest."""
    if isinstance(name, Method):
        return name
    if name not in METHODS:
        raise unknown_choice("method", name, METHODS)
    return METHODS[name]


from . import classic, wanda  # noqa: E402,F401  (registration side effects)
