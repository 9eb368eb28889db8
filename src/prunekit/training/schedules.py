"""Sparsity schedules for pruning during training: pure functions of the step or round, validated.

- ``cubic_sparsity``: the gradual schedule of Zhu & Gupta 2017 (To prune, or not to prune: exploring the efficacy of
  pruning for model compression), s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3, where pruning starts at t0 and
  updates every dt steps until t0 + n dt.
- ``imp_density``: the density left after n rounds of iterative magnitude pruning that each remove a share `rate` of
  the remaining weights (Frankle & Carbin 2019), (1 - rate)^n.
"""

from __future__ import annotations

from typing import Any

from ..errors import ArgumentError, check_sparsity


def check_step(value: Any, argument: str, minimum: int = 0) -> int:
    """Validate a step count: an integer >= minimum (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(argument, value, f"an integer >= {minimum}")
    return value


def check_rate(value: Any, argument: str = "rate") -> float:
    """Validate a pruning rate per round: a real number in (0, 1)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not 0.0 < number < 1.0:
        raise ArgumentError(argument, value, "a number in (0, 1): the share of the remaining weights pruned per round")
    return number


def check_schedule(initial: Any, final: Any, start: Any, end: Any, frequency: Any,
                   names: tuple[str, str, str, str, str] = ("initial", "final", "start", "end", "frequency"),
                   ) -> tuple[float, float, int, int, int]:
    """Validate the arguments of a cubic schedule; errors name each argument as the caller spelled it."""
    initial_name, final_name, start_name, end_name, frequency_name = names
    initial = check_sparsity(initial, initial_name)
    final = check_sparsity(final, final_name)
    if final < initial:
        raise ArgumentError(final_name, final, f"a number in [{initial_name}={initial:g}, 1): sparsity only grows")
    start = check_step(start, start_name)
    end = check_step(end, end_name)
    if end <= start:
        raise ArgumentError(end_name, end, f"an integer > {start_name}={start}")
    frequency = check_step(frequency, frequency_name, minimum=1)
    return initial, final, start, end, frequency


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int, frequency: int = 1) -> float:
    """Zhu & Gupta's gradual sparsity at `step`: `initial` up to `start`, `final` from `end` on, cubic in between.

    The value changes only every `frequency` steps counted from `start` (the pruning steps t0 + k dt), so the
    sparsity used at step t is the one of the last pruning step at or before t; at `end` it is `final` exactly.
    """
    initial, final, start, end, frequency = check_schedule(initial, final, start, end, frequency)
    step = check_step(step, "step")
    if step <= start:
        return initial
    if step >= end:
        return final
    last_update = start + (step - start) // frequency * frequency
    progress = (last_update - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def imp_density(rounds: int, rate: float = 0.2) -> float:
    """Density left by `rounds` of iterative magnitude pruning at `rate` of the remaining weights: (1 - rate)^rounds."""
    rounds = check_step(rounds, "rounds")
    rate = check_rate(rate)
    return (1.0 - rate) ** rounds


def imp_sparsity(rounds: int, rate: float = 0.2) -> float:
    """Sparsity after `rounds` of iterative magnitude pruning: 1 - (1 - rate)^rounds."""
    return 1.0 - imp_density(rounds, rate)
