"""Model cost: parameters, multiply-accumulates and latency, measured the same way for every structured-pruning report.

MACs come from torch's FlopCounterMode (FLOPs / 2, counting matmuls, linear layers, convolutions and attention as
that counter does). Latency follows one protocol: eval mode, torch.no_grad, `warmup` untimed passes, then the median
of `repeats` forward passes timed with time.perf_counter.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from .errors import ArgumentError

Inputs = Union[torch.Tensor, Sequence[Any], Mapping[str, Any]]

INPUTS_ALLOWED = "a tensor, a tuple of tensors (positional arguments) or a dict of keyword arguments"


def _check_int(argument: str, value: Any, minimum: int) -> int:
    """Validate an integer argument >= minimum (bools are refused: True is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(argument, value, f"an integer >= {minimum}")
    return value


def _check_inputs(example_inputs: Any) -> Inputs:
    """Validate the form of example inputs before any forward pass."""
    if not isinstance(example_inputs, (torch.Tensor, tuple, list, Mapping)):
        raise ArgumentError("example_inputs", type(example_inputs).__name__, INPUTS_ALLOWED)
    return example_inputs


def _forward(model: nn.Module, example_inputs: Inputs) -> Any:
    """Call the model on a tensor, on positional arguments or on keyword arguments."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for the block; each submodule's own training flag is restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def count_params(model: nn.Module) -> int:
    """Number of parameter elements, each tied (shared) weight counted once."""
    seen_storage: set[tuple] = set()
    total = 0
    for param in model.parameters():  # already one entry per Parameter object, however often it is registered
        # Distinct Parameter objects can still view one storage (tied by hand): count such a view once.
        if param.device.type != "meta" and param.numel():
            key = (param.device, param.untyped_storage().data_ptr(), param.storage_offset(), tuple(param.shape),
                   param.stride())
            if key in seen_storage:
                continue
            seen_storage.add(key)
        total += param.numel()
    return total


def _sdpa_cpu_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                   **kwargs: Any) -> int:
    """FLOPs of the CPU flash-attention kernel, by the formula torch uses for its GPU attention kernels."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_flop_formulas() -> dict[Any, Any]:
    """Kernels FlopCounterMode leaves out: without them attention on CPU would count as free."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_cpu_flop} if op is not None else {}


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    """Turn off nn.MultiheadAttention's fused inference kernel, whose matmuls the FLOP counter cannot see."""
    backend = getattr(torch.backends, "mha", None)
    if backend is None or not hasattr(backend, "set_fastpath_enabled"):
        yield
        return
    previous = backend.get_fastpath_enabled()
    backend.set_fastpath_enabled(False)
    try:
        yield
    finally:
        backend.set_fastpath_enabled(previous)


def count_macs(model: nn.Module, example_inputs: Inputs) -> int:
    """Multiply-accumulates of one forward pass on example_inputs (FlopCounterMode FLOPs / 2), in eval mode."""
    from torch.utils.flop_counter import FlopCounterMode

    _check_inputs(example_inputs)
    counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
    with _evaluating(model), _no_mha_fastpath(), counter:
        _forward(model, example_inputs)
    return int(counter.get_total_flops()) // 2


@dataclass
class LatencyResult:
    """Forward-pass wall time in seconds over the timed repeats (median, fastest and 90th percentile)."""

    median: float
    min: float
    p90: float
    repeats: int
    warmup: int
    batch_size: int | None = None


def _device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock measures the forward pass and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch_size(example_inputs: Inputs) -> int | None:
    """The leading dimension of the first tensor in the inputs, if any."""
    values = example_inputs.values() if isinstance(example_inputs, Mapping) else (
        example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,))
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim():
            return int(value.shape[0])
    return None


def measure_latency(model: nn.Module, example_inputs: Inputs, warmup: int = 3, repeats: int = 20) -> LatencyResult:
    """Time forward passes: eval mode, no_grad, `warmup` untimed passes, then `repeats` timed with perf_counter."""
    _check_int("warmup", warmup, 0)
    _check_int("repeats", repeats, 1)
    _check_inputs(example_inputs)
    device = _device_of(model)
    times: list[float] = []
    with _evaluating(model):
        for _ in range(warmup):
            _forward(model, example_inputs)
        for _ in range(repeats):
            _synchronize(device)
            started = time.perf_counter()
            _forward(model, example_inputs)
            _synchronize(device)
            times.append(time.perf_counter() - started)
    ordered = sorted(times)
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]  # nearest-rank percentile: always a measured time
    return LatencyResult(statistics.median(ordered), ordered[0], p90, repeats, warmup, _batch_size(example_inputs))


def batch_of(example: Inputs, batch_size: int) -> Inputs:
    """A batch of `batch_size` copies of a batch-1 example (a tensor, a tuple of tensors or a dict of tensors).

    The copies are real memory (repeat, not a stride-0 expand), so timings see the memory traffic of a real batch.
    Non-tensor values (flags in a kwargs dict) pass through unchanged.
    """
    _check_int("batch_size", batch_size, 1)
    _check_inputs(example)
    if isinstance(example, Mapping):
        return {key: _repeat(value, batch_size, f"example_inputs[{key!r}]") for key, value in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(_repeat(value, batch_size, f"example_inputs[{i}]") for i, value in enumerate(example))
    return _repeat(example, batch_size, "example_inputs")


def _repeat(value: Any, batch_size: int, argument: str) -> Any:
    """Repeat one batch-1 tensor along its first dimension; other values are returned as they are."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.dim() == 0 or value.shape[0] != 1:
        raise ArgumentError(argument, f"tensor of shape {tuple(value.shape)}", "a batch-1 tensor (first dimension 1)")
    return value.repeat(batch_size, *([1] * (value.dim() - 1)))


@dataclass
class CostReport:
    """Parameters, MACs of one forward pass on the example, and latency per batch size (empty when not timed)."""

    params: int
    macs: int
    latency: dict[int, LatencyResult] = field(default_factory=dict)

    @property
    def latency_b1(self) -> LatencyResult | None:
        """Latency at batch 1, or None when not measured."""
        return self.latency.get(1)

    @property
    def latency_b16(self) -> LatencyResult | None:
        """Latency at batch 16, or None when not measured."""
        return self.latency.get(16)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (batch sizes become string keys)."""
        return {"params": self.params, "macs": self.macs,
                "latency": {str(batch): asdict(result) for batch, result in self.latency.items()}}


def cost_report(model: nn.Module, example_inputs: Inputs, latency_batches: Sequence[int] = (1, 16), warmup: int = 3,
                repeats: int = 20, measure_time: bool = True) -> CostReport:
    """Params, MACs on the (batch-1) example and, with measure_time, latency at each batch in latency_batches."""
    _check_inputs(example_inputs)
    if not isinstance(latency_batches, (tuple, list)):
        raise ArgumentError("latency_batches", latency_batches, "a tuple of batch sizes, e.g. (1, 16)")
    batches = [_check_int("latency_batches", batch, 1) for batch in latency_batches]
    _check_int("warmup", warmup, 0)
    _check_int("repeats", repeats, 1)
    report = CostReport(count_params(model), count_macs(model, example_inputs))
    if measure_time:
        for batch in batches:
            report.latency[batch] = measure_latency(model, batch_of(example_inputs, batch), warmup, repeats)
    return report


def _si(value: float) -> str:
    """A count with a K/M/G/T suffix: 25557032 -> '25.56M'."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}"
    return f"{value:g}"


def _ratio(before: float | None, after: float | None) -> str:
    """after / before as 'x', or '-' where either is missing or before is zero."""
    if before is None or after is None or before == 0:
        return "-"
    return f"{after / before:.3f}x"


def compare(before: CostReport, after: CostReport) -> str:
    """A table of params, MACs and median latency per batch: before, after and after/before."""
    rows = [("params", _si(before.params), _si(after.params), _ratio(before.params, after.params)),
            ("MACs", _si(before.macs), _si(after.macs), _ratio(before.macs, after.macs))]
    for batch in sorted(set(before.latency) | set(after.latency)):
        old, new = before.latency.get(batch), after.latency.get(batch)
        old_s, new_s = (old.median if old else None), (new.median if new else None)
        rows.append((f"latency b{batch}", _ms(old_s), _ms(new_s), _ratio(old_s, new_s)))
    header = ("metric", "before", "after", "ratio")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
             for row in (header, *rows)]
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    """Seconds as milliseconds ('12.34 ms'), or '-' when not measured."""
    return "-" if seconds is None else f"{1000 * seconds:.2f} ms"
