"""Trace a model with torch.fx and find its groups of coupled channels.

Every channel a layer produces gets an integer id. Operations couple ids: a residual add says channel i of one
operand is channel i of the other, a depthwise conv ties its input and output channel, BatchNorm and the next
layer's input columns attach tensor slices to the ids that flow into them. Connected ids form one *unit* (removed
together); units that touch the same tensors form a *group*. Model inputs and outputs, and everything flowing
through an operation the tracer does not understand, are tied to a frozen id and are never pruned: an unknown op
is a barrier, named in the result, never a crash.

The graph comes from torch.fx symbolic tracing (a static program, stable across torch versions), with torch.nn
layers kept as leaves; shapes come from running the traced program once on the example input.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from prunekit.errors import ArgumentError, ModelError, unknown_choice
from prunekit.graph.groups import ATTRIBUTE, Barrier, DependencyGraph, Group, Member

FROZEN = 0  # the id every unprunable channel is tied to

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
    nn.Softplus, nn.Mish, nn.PReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
)
# Elementwise functions of one tensor (extra arguments are scalars or keyword options).
_PASS_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu, F.elu, F.softplus,
    F.mish, F.dropout, torch.relu, torch.sigmoid, torch.tanh, torch.abs, torch.neg, torch.exp, torch.sqrt,
    torch.square, torch.clamp, torch.clip, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
    F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
    F.interpolate, operator.neg, operator.pos, torch.nn.functional.dropout2d,
}
_PASS_METHODS = {
    "relu", "sigmoid", "tanh", "abs", "neg", "exp", "sqrt", "square", "clamp", "clip", "contiguous", "clone",
    "float", "double", "half", "to", "type_as", "detach", "requires_grad_", "relu_", "sigmoid_", "clamp_", "pow",
}
_BINARY = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul, operator.isub,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_", "sub_", "div_", "maximum", "minimum", "where"}
_SHAPE_QUERIES = {"size", "dim", "numel"}


@dataclass
class Chan:
    """Where the channel ids of a tensor live: dimension `dim` (non-negative) holds `ids` (one per position)."""

    dim: int
    ids: np.ndarray


@dataclass
class Heads:
    """Channel ids split over several dimensions (attention heads x head width, or q/k/v x heads x width): `dims`
    (ascending) hold the axes of `ids` in order."""

    dims: tuple[int, ...]
    ids: np.ndarray


@dataclass
class SizeOf:
    """A size the program reads at run time from a dimension that holds channels (x.shape[-1], x.size(1)); `exact`
    until arithmetic is done on it. After pruning it reads the new size, right only where that dimension lands."""

    ids: np.ndarray
    exact: bool = True


@dataclass
class ShapeOf:
    """x.shape (or x.size()) of a tensor carrying channels."""

    value: Any
    ndim: int


_SIZE_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
                    operator.neg}


@dataclass
class ShapeConstant:
    """An int a reshape or view baked in as the size of a dimension that holds channels: `grid[i]` are the ids of
    position i along it. After pruning the size must follow, through an attribute the forward reads it from."""

    node: str
    module: str  # the module whose forward made the call ("" for the root)
    position: int  # which argument of the target shape
    value: int
    grid: np.ndarray  # [value, k]


@dataclass
class ParamRef:
    """A parameter or buffer read by get_attr, not yet tied to any channel."""

    module: str
    param: str
    shape: tuple[int, ...]


class TraceError(ModelError):
    """A module's forward cannot be traced symbolically."""


class _Tracer(fx.Tracer):
    """torch.nn layers and the user's barrier modules stay leaves; remembers where tracing is, to name failures."""

    def __init__(self, barriers: set[str]) -> None:
        super().__init__()
        self.barriers = barriers
        self.stack: list[str] = []
        self.failed_in: str | None = None  # innermost module whose forward raised

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.barriers or super().is_leaf_module(module, qualified_name)

    def call_module(self, module: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        self.stack.append(self.path_of_module(module))
        try:
            return super().call_module(module, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def symbolic_trace(model: nn.Module, barriers: Iterable[str] = ()) -> fx.GraphModule:
    """torch.fx trace with torch.nn layers (and `barriers`) as leaves; a failure names the module and the way out."""
    names = dict(model.named_modules())
    barrier_set = set(barriers)
    for name in barrier_set:
        if name not in names:
            raise ArgumentError("barriers", name, "names of submodules of the model (see model.named_modules())")
    tracer = _Tracer(barrier_set)
    try:
        graph = tracer.trace(model)
    except Exception as error:  # fx raises many types; all mean the same to the user
        where = tracer.failed_in or ""
        module = names.get(where, model)
        label = f"module {where!r} ({type(module).__name__})" if where else f"{type(model).__name__}.forward"
        hint = (f"pass barriers=[{where!r}] (CLI: --barrier {where}) to treat it as an opaque block that nothing is "
                "pruned through" if where else "mark the submodules whose forward uses data-dependent control flow "
                "as barriers")
        raise TraceError(f"{label} cannot be traced with torch.fx: {type(error).__name__}: {error}. {hint}") from None
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


# --- shapes ---------------------------------------------------------------------------------------------------------


def _shape_tree(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, torch.Size):
        return None  # a shape read by the program (x.shape), not a tensor
    if isinstance(value, (tuple, list)):
        return type(value)(_shape_tree(v) for v in value)
    return None


def _describe_inputs(example_inputs: Sequence[Any]) -> str:
    return ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs)


# Modules whose output has the shape of their input (checked against the module's own sizes where it has them).
_SAME_SHAPE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
               nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


_BROADCASTING = {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul}


def _conv_shape(module: nn.modules.conv._ConvNd, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Output shape of a convolution, or None when the input does not fit it (the module itself then says why)."""
    spatial = len(module.kernel_size)
    if (len(shape) != spatial + 2 or shape[1] != module.in_channels or isinstance(module.padding, str)
            or isinstance(module, nn.modules.conv._ConvTransposeNd)):
        return None
    sizes = [(size + 2 * pad - dil * (k - 1) - 1) // stride + 1 for size, pad, dil, k, stride in
             zip(shape[2:], module.padding, module.dilation, module.kernel_size, module.stride)]
    return None if min(sizes) < 1 else (shape[0], module.out_channels, *sizes)


def _module_shape(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The output shape of the common modules from their sizes alone; None for anything else."""
    if isinstance(module, _SAME_SHAPE):
        return shape
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return shape if len(shape) >= 2 and shape[1] == module.num_features else None
    if isinstance(module, nn.LayerNorm):
        n = len(module.normalized_shape)
        return shape if tuple(shape[len(shape) - n:]) == tuple(module.normalized_shape) else None
    if isinstance(module, nn.Linear):
        return (*shape[:-1], module.out_features) if shape and shape[-1] == module.in_features else None
    if isinstance(module, nn.modules.conv._ConvNd):
        return _conv_shape(module, shape)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) and len(shape) == 4 and not module.ceil_mode:
        if getattr(module, "return_indices", False):
            return None
        pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
        kernel, stride, pad = pair(module.kernel_size), pair(module.stride or module.kernel_size), pair(module.padding)
        dilation = pair(getattr(module, "dilation", 1))
        sizes = [(size + 2 * p - d * (k - 1) - 1) // st + 1
                 for size, p, d, k, st in zip(shape[2:], pad, dilation, kernel, stride)]
        return None if min(sizes) < 1 else (*shape[:2], *sizes)
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and len(shape) == 4:
        if isinstance(module, nn.AdaptiveMaxPool2d) and module.return_indices:
            return None
        size = module.output_size if isinstance(module.output_size, tuple) else (module.output_size,) * 2
        return (*shape[:2], *(s if o is None else o for s, o in zip(shape[2:], size)))
    return None


class _ShapeRecorder(fx.Interpreter):
    """Runs the program and records every node's output shape. With shapes_only (meta tensors), the common modules'
    outputs are made from their sizes instead of being run: meta kernels are Python, so this is what makes the pass
    cheap on deep CNNs."""

    def __init__(self, module: fx.GraphModule, shapes_only: bool = False) -> None:
        super().__init__(module)
        self.shapes: dict[fx.Node, Any] = {}
        self.shapes_only = shapes_only

    def run_node(self, node: fx.Node) -> Any:
        result = None
        if self.shapes_only and node.op == "call_module":
            result = self._from_sizes(node)
        elif self.shapes_only and node.op == "call_function" and node.target in _BROADCASTING:
            result = self._broadcast(node)
        if result is None:
            result = super().run_node(node)
        self.shapes[node] = _shape_tree(result)
        return result

    def _broadcast(self, node: fx.Node) -> torch.Tensor | None:
        """x + y (residual adds): the broadcast shape of two same-dtype tensors; anything else runs."""
        if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
            return None
        a, b = (self.env.get(arg) for arg in node.args)
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype != b.dtype:
            return None
        try:
            shape = torch.broadcast_shapes(a.shape, b.shape)
        except RuntimeError:
            return None  # the real op raises the user-facing error
        return torch.empty(shape, dtype=a.dtype, device="meta")

    def _from_sizes(self, node: fx.Node) -> torch.Tensor | None:
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return None
        value = self.env.get(node.args[0])
        if not isinstance(value, torch.Tensor):
            return None
        shape = _module_shape(self.module.get_submodule(str(node.target)), tuple(value.shape))
        return None if shape is None else torch.empty(shape, dtype=value.dtype, device="meta")


SHAPE_PASSES = ("meta", "real", "fake")


def record_shapes(traced: fx.GraphModule, example_inputs: Sequence[Any], shape_pass: str = "meta") -> dict[fx.Node, Any]:
    """Run the traced program once; the output shape of every node. A wrong example input is named.

    "meta" (default) runs on meta tensors: shapes only, no arithmetic, so it costs the same whatever the model's size
    (a ViT-B at 224x224: 4x cheaper than computing). An op without a meta kernel, or data-dependent control flow,
    falls back to one real no-grad pass. "real" always computes; "fake" uses torch's FakeTensorMode (more dispatch
    overhead than meta, kept for ops whose fake rule exists but whose meta kernel does not).
    """
    if shape_pass not in SHAPE_PASSES:
        raise unknown_choice("shape_pass", shape_pass, SHAPE_PASSES)
    was_training = traced.training
    traced.eval()
    try:
        if shape_pass == "real":
            return _run_recorder(traced, example_inputs, "real")
        try:
            return _run_recorder(traced, example_inputs, shape_pass)
        except Exception:  # an op the shape-only pass cannot run, or a bad input: the real pass tells which
            return _run_recorder(traced, example_inputs, "real")
    except _ModelFailure as failure:
        raise ArgumentError(
            "example_inputs", _describe_inputs(example_inputs),
            f"inputs the model accepts; running it failed at {failure.where}: {failure.message}",
        ) from None
    finally:
        traced.train(was_training)


class _ModelFailure(Exception):
    """The model itself rejected the example input (a shape error at a named node)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where, self.message = where, message


@torch.no_grad()
def _run_recorder(traced: fx.GraphModule, example_inputs: Sequence[Any], shape_pass: str) -> dict[fx.Node, Any]:
    recorder = _ShapeRecorder(traced, shapes_only=shape_pass == "meta")
    if shape_pass == "real":
        _run_checked(recorder, traced, example_inputs, real=True)
    elif shape_pass == "meta":
        # Parameters and buffers are swapped for meta tensors of the same shape for the duration of the pass only.
        from torch.nn.utils.stateless import _reparametrize_module

        state = {name: torch.empty_like(value, device="meta")
                 for name, value in [*traced.named_parameters(), *traced.named_buffers()]}
        inputs = [x.to("meta") if isinstance(x, torch.Tensor) else x for x in example_inputs]
        with _reparametrize_module(traced, state):
            _run_checked(recorder, traced, inputs, real=False)
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
            _run_checked(recorder, traced, inputs, real=False)
    return recorder.shapes


def _run_checked(recorder: "_ShapeRecorder", traced: fx.GraphModule, inputs: Sequence[Any], real: bool) -> None:
    try:
        recorder.run(*inputs)
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as error:
        failed = next((n for n in traced.graph.nodes if n not in recorder.shapes and n.op != "placeholder"), None)
        where = (str(failed.target) if failed.op == "call_module" else failed.name) if failed is not None else "?"
        text = str(error).split("\n")[0]
        # shape mismatches are the model's verdict on the input; anything else on fake tensors may be the fake
        # machinery, so it is retried for real before being blamed on the input
        if real or "size" in text or "shape" in text or "channels" in text or "mat1" in text:
            raise _ModelFailure(where, f"{type(error).__name__}: {text}") from None
        raise


# --- the channel analysis -------------------------------------------------------------------------------------------


class _Analysis:
    """Walks the fx graph once, giving channel ids to tensors and collecting couplings and tensor slices."""

    def __init__(self, traced: fx.GraphModule, shapes: dict[fx.Node, Any], barrier_modules: set[str]) -> None:
        self.traced = traced
        self.modules = dict(traced.named_modules())
        self.shapes = shapes
        self.barrier_modules = barrier_modules
        self.next_id = 1
        self.edges_a: list[np.ndarray] = []
        self.edges_b: list[np.ndarray] = []
        # member rows: id, key number, index, role
        self.member_ids: list[np.ndarray] = []
        self.member_keys: list[np.ndarray] = []
        self.member_index: list[np.ndarray] = []
        self.keys: dict[tuple[str, str, int], int] = {}
        self.key_roles: dict[int, str] = {}
        self.frozen_params: set[tuple[str, str]] = set()
        self.barriers: list[Barrier] = []
        self.values: dict[fx.Node, Any] = {}
        self.heads: set[str] = set()  # modules whose units are attention heads
        self.constants: list[ShapeConstant] = []
        self.head_ids: list[np.ndarray] = []  # ids of channels contracted per head (attention products)
        # filled by _assemble: the label of every unit (sorted), its group's number and its place in the group
        self.unit_labels = self.unit_groups = self.unit_positions = np.zeros(0, np.int64)
        self.numbered_groups: list[Group] = []
        self.labels: np.ndarray = np.zeros(0, np.int64)

    # ids, couplings, members

    def fresh(self, count: int) -> np.ndarray:
        ids = np.arange(self.next_id, self.next_id + count, dtype=np.int64)
        self.next_id += count
        return ids

    def tie(self, a: np.ndarray, b: np.ndarray | int) -> None:
        a = np.asarray(a, dtype=np.int64).reshape(-1)
        b = np.broadcast_to(np.asarray(b, dtype=np.int64), a.shape)
        self.edges_a.append(a)
        self.edges_b.append(np.array(b))

    def freeze(self, value: Any, where: str = "", reason: str = "") -> None:
        """Tie every id in `value` (a Chan, or a nested structure of them) to FROZEN; record a barrier."""
        chans = list(_chans_in(value))
        params = list(_params_in(value))
        for chan in chans:
            self.tie(chan.ids, FROZEN)
        for ref in params:
            self.frozen_params.add((ref.module, ref.param))
        if reason and (chans or params):
            self.barriers.append(Barrier(where, reason))

    def member(self, ids: np.ndarray, module: str, param: str, dim: int, index: np.ndarray, role: str) -> None:
        key = self.keys.setdefault((module, param, dim), len(self.keys))
        self.key_roles[key] = role
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.member_ids.append(ids)
        self.member_keys.append(np.full(len(ids), key, dtype=np.int64))
        self.member_index.append(np.asarray(index, dtype=np.int64).reshape(-1))

    def members_of_module(self, ids: np.ndarray, name: str, names: Sequence[str], dim: int, role: str,
                          index: np.ndarray | None = None) -> None:
        module = self.modules[name]
        index = np.arange(len(ids)) if index is None else index
        for param in names:
            if isinstance(getattr(module, param, None), torch.Tensor):
                self.member(ids, name, param, dim, index, role)

    # values

    def value(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return self.values.get(arg)
        if isinstance(arg, (tuple, list)):
            return type(arg)(self.value(a) for a in arg)
        return None

    def shape(self, node: Any) -> Any:
        return self.shapes.get(node) if isinstance(node, fx.Node) else None

    def run(self) -> None:
        for node in self.traced.graph.nodes:
            handler = getattr(self, f"_{node.op}")
            try:
                sizes = [v for v in _flat(self.value(list(node.args) + list(node.kwargs.values())))
                         if isinstance(v, SizeOf)]
                if sizes and not _size_aware(node):
                    for size in sizes:  # a channel count read at run time feeds something not followed: keep it
                        self.freeze(size, node.name, "a size read from pruned channels is used by this operation")
                if node.op.startswith("call_") and not _heads_aware(node) and any(
                        isinstance(v, Heads) for v in _flat(self.value(list(node.args) + list(node.kwargs.values())))):
                    raise _Unsupported("an operation on attention heads the tracer has no rule for")
                self.values[node] = handler(node)
            except _Unsupported as reason:
                where = str(node.target) if node.op == "call_module" else node.name
                self.freeze([self.value(a) for a in node.args] + [self.value(v) for v in node.kwargs.values()],
                            where, str(reason))
                self.values[node] = None

    # node kinds

    def _placeholder(self, node: fx.Node) -> Any:
        return None  # model inputs: fixed channels (an operand without ids freezes what it meets)

    def _output(self, node: fx.Node) -> Any:
        self.freeze(self.value(node.args[0]))  # outputs keep their shape
        return None

    def _get_attr(self, node: fx.Node) -> Any:
        owner, _, param = str(node.target).rpartition(".")
        tensor = getattr(self.modules[owner], param) if owner in self.modules else getattr(self.traced, str(node.target))
        if not isinstance(tensor, torch.Tensor) or not (tensor.is_floating_point() or tensor.is_complex()):
            return None  # integer buffers (index tables) are constants, never sliced
        return ParamRef(owner, param, tuple(tensor.shape))

    def _call_module(self, node: fx.Node) -> Any:
        name = str(node.target)
        module = self.modules[name]
        inputs = [self.value(a) for a in node.args]
        if name in self.barrier_modules:
            raise _Unsupported(f"marked as a barrier ({type(module).__name__})")
        if isinstance(module, nn.Linear):
            return self._linear(node, name, module, inputs[0])
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            return self._conv(node, name, module, inputs[0])
        if isinstance(module, _NORMS):
            return self._channel_norm(node, name, inputs[0], dim=1, params=("weight", "bias", "running_mean", "running_var"))
        if isinstance(module, nn.LayerNorm):
            if len(module.normalized_shape) != 1:
                raise _Unsupported("LayerNorm over several dimensions")
            return self._channel_norm(node, name, inputs[0], dim=len(self.shape(node)) - 1, params=("weight", "bias"))
        if isinstance(module, nn.GroupNorm):
            return self._group_norm(node, name, module, inputs[0])
        if isinstance(module, nn.Embedding):
            ids = self.fresh(module.embedding_dim)
            self.members_of_module(ids, name, ("weight",), 1, "out")
            return Chan(len(self.shape(node)) - 1, ids)
        if isinstance(module, nn.MultiheadAttention):
            return self._multihead_attention(node, name, module)
        if isinstance(module, nn.Flatten):
            return self._flatten(node, inputs[0], module.start_dim, module.end_dim)
        if isinstance(module, nn.Softmax | nn.LogSoftmax):
            return self._reduce_like(node, inputs[0], [module.dim], keeps_dims=True)
        if isinstance(module, _PASS_MODULES):
            return self._pass(node, inputs[0])
        raise _Unsupported(f"no channel rule for {type(module).__name__}")

    def _call_function(self, node: fx.Node) -> Any:
        target = node.target
        if target in _BINARY:
            return self._elementwise(node)
        if target in _PASS_FUNCTIONS:
            return self._pass(node, self.value(node.args[0]))
        if target in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            return self._reduce_like(node, self.value(node.args[0]), [dim], keeps_dims=True)
        if target is torch.flatten:
            return self._flatten(node, self.value(node.args[0]), *self._flatten_args(node))
        if target is torch.cat or target is torch.concat:
            return self._cat(node)
        if target is operator.getitem:
            return self._getitem(node)
        if target in (torch.split, torch.chunk, torch.tensor_split):
            return self._split(node)
        if target in (torch.mean, torch.sum, torch.amax, torch.amin):
            return self._reduction(node)
        if target in (torch.transpose, torch.permute, torch.swapaxes):
            return self._reorder(node)
        if target in (torch.reshape,):
            return self._reshape(node)
        if target in (operator.matmul, torch.matmul, torch.bmm):
            return self._matmul(node)
        if target is torch.einsum:
            return self._einsum(node)
        if target in (torch.roll, torch.flip):
            return self._shift(node)
        if target is torch.unbind:
            return self._unbind(node)
        if target in (torch.unsqueeze, torch.squeeze):
            return self._reshape(node)
        if target is getattr and len(node.args) == 2 and node.args[1] == "shape":
            return self._shape_of(node.args[0])
        if target in _SIZE_ARITHMETIC:
            sizes = [v for v in (self.value(a) for a in node.args) if isinstance(v, SizeOf)]
            if sizes:
                return SizeOf(np.concatenate([v.ids for v in sizes]), exact=False)
        if target in (getattr, len):
            return None
        raise _Unsupported(f"no channel rule for {getattr(target, '__name__', target)}")

    def _call_method(self, node: fx.Node) -> Any:
        method = node.target
        source = self.value(node.args[0])
        if method == "size":
            shape = self._shape_of(node.args[0])
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return shape if dim is None else _size_at(shape, dim)
        if method in _SHAPE_QUERIES:
            return None
        if method in _BINARY_METHODS:
            return self._elementwise(node)
        if method in _PASS_METHODS:
            if method == "pow" and not isinstance(node.args[1] if len(node.args) > 1 else 2, (int, float)):
                raise _Unsupported("pow with a tensor exponent")
            return self._pass(node, source)
        if method in ("softmax", "log_softmax"):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            return self._reduce_like(node, source, [dim], keeps_dims=True)
        if method == "flatten":
            return self._flatten(node, source, *self._flatten_args(node))
        if method in ("view", "reshape", "unsqueeze", "squeeze", "view_as", "reshape_as"):
            return self._reshape(node)
        if method in ("transpose", "permute", "swapaxes", "t"):
            return self._reorder(node)
        if method in ("mean", "sum", "amax", "amin"):
            return self._reduction(node)
        if method in ("split", "chunk", "tensor_split"):
            return self._split(node)
        if method in ("expand", "expand_as"):
            return self._expand(node, source)
        if method in ("matmul", "bmm"):
            return self._matmul(node)
        if method in ("roll", "flip"):
            return self._shift(node)
        if method == "unbind":
            return self._unbind(node)
        raise _Unsupported(f"no channel rule for Tensor.{method}")

    # layers

    def _linear(self, node: fx.Node, name: str, module: nn.Linear, source: Any) -> Chan:
        last = len(self.shape(node)) - 1
        if isinstance(source, Chan):
            if source.dim != len(self.shape(node.args[0])) - 1 or len(source.ids) != module.in_features:
                self.freeze(source, name, "input channels are not on the last dimension")
            else:
                self.members_of_module(source.ids, name, ("weight",), 1, "in")
        out = self.fresh(module.out_features)
        self.members_of_module(out, name, ("weight", "bias"), 0, "out")
        return Chan(last, out)

    def _conv(self, node: fx.Node, name: str, module: nn.modules.conv._ConvNd, source: Any) -> Chan:
        groups, cin, cout = module.groups, module.in_channels, module.out_channels
        out = self.fresh(cout)
        self.members_of_module(out, name, ("weight", "bias"), 0, "out")
        usable = isinstance(source, Chan) and source.dim == 1 and len(source.ids) == cin
        if isinstance(source, Chan) and not usable:
            self.freeze(source, name, "input channels are not on dimension 1")
        if groups == 1:
            if usable:
                self.members_of_module(source.ids, name, ("weight",), 1, "in")
            return Chan(1, out)
        per_group_out, per_group_in = cout // groups, cin // groups
        if per_group_in == 1:
            # depthwise (with channel multiplier m): a group is one input channel and its m outputs, removed whole
            group_of_out = np.arange(cout) // per_group_out
            self.tie(out, out[group_of_out * per_group_out])
            if usable:
                self.tie(source.ids, out[:: per_group_out])
            else:
                self.tie(out, FROZEN)
            return Chan(1, out)
        # grouped: slot p of every group goes together, so every group keeps the same width
        self.tie(out, out[np.arange(cout) % per_group_out])
        if usable:
            slots = np.arange(cin) % per_group_in
            self.tie(source.ids, source.ids[slots])
            self.member(source.ids, name, "weight", 1, slots, "in")
        return Chan(1, out)

    def _channel_norm(self, node: fx.Node, name: str, source: Any, dim: int, params: Sequence[str]) -> Any:
        if not isinstance(source, Chan):
            return source
        if source.dim != dim:
            raise _Unsupported("normalised dimension holds no channels")
        self.members_of_module(source.ids, name, params, 0, "norm")
        return source

    def _group_norm(self, node: fx.Node, name: str, module: nn.GroupNorm, source: Any) -> Any:
        if not isinstance(source, Chan):
            return source
        if source.dim != 1:
            raise _Unsupported("GroupNorm channels are not on dimension 1")
        # whole groups only: removing part of a group would change the statistics of the rest
        per_group = module.num_channels // module.num_groups
        self.tie(source.ids, source.ids[(np.arange(module.num_channels) // per_group) * per_group])
        self.members_of_module(source.ids, name, ("weight", "bias"), 0, "norm")
        return source

    def _multihead_attention(self, node: fx.Node, name: str, module: nn.MultiheadAttention) -> Any:
        # PyTorch ties the internal width to embed_dim, so hidden slot j *is* internal slot j of q, k and v.
        # Units are whole heads: the head's slots in the hidden size, in q/k/v rows and in out_proj.
        args = list(node.args) + [node.kwargs.get(k) for k in ("query", "key", "value") if k in node.kwargs]
        query, key, value = (self.value(a) for a in args[:3])
        if len(node.args) > 3 or any(k not in ("query", "key", "value", "need_weights") for k in node.kwargs):
            raise _Unsupported("nn.MultiheadAttention called with masks or extra arguments")
        embed, heads = module.embed_dim, module.num_heads
        if not module._qkv_same_embed_dim or not all(isinstance(v, Chan) and len(v.ids) == embed for v in (query, key, value)):
            raise _Unsupported("nn.MultiheadAttention with kdim/vdim or unknown input channels")
        head_dim = embed // heads
        if query.dim != len(self.shape(args[0])) - 1:
            raise _Unsupported("embedding dimension is not the last one")
        self.tie(query.ids, key.ids)
        self.tie(query.ids, value.ids)
        ids = query.ids
        self.tie(ids, ids[(np.arange(embed) // head_dim) * head_dim])
        slots = np.arange(embed)
        for block in range(3):
            self.member(ids, name, "in_proj_weight", 0, slots + block * embed, "out")
            if module.in_proj_bias is not None:
                self.member(ids, name, "in_proj_bias", 0, slots + block * embed, "out")
        self.member(ids, name, "in_proj_weight", 1, slots, "in")
        out_proj = f"{name}.out_proj"
        self.members_of_module(ids, out_proj, ("weight",), 1, "in")
        self.members_of_module(ids, out_proj, ("weight", "bias"), 0, "out")
        self.heads.add(name)
        return (Chan(query.dim, ids), None)

    # tensor plumbing

    def _pass(self, node: fx.Node, source: Any) -> Any:
        extra = [self.value(a) for a in node.args[1:]] + [self.value(v) for v in node.kwargs.values()]
        if any(_chans_in(extra)) or any(_params_in(extra)):
            raise _Unsupported("elementwise op with a second tensor operand it does not know")
        if isinstance(source, ParamRef):
            return source
        return source if isinstance(source, (Chan, Heads)) else None

    def _elementwise(self, node: fx.Node) -> Any:
        out_shape = self.shape(node)
        if not isinstance(out_shape, tuple):
            return None
        ndim = len(out_shape)
        operands = list(node.args) + list(node.kwargs.values())
        if any(isinstance(self.value(arg), Heads) for arg in operands):
            return self._elementwise_heads(node, operands, ndim)
        chans = []
        for arg in operands:
            value = self.value(arg)
            if isinstance(value, Chan):
                offset = ndim - len(self.shape(arg))
                chans.append(Chan(value.dim + offset, value.ids))
        if not chans:
            for arg in operands:  # parameters combined with fixed tensors cannot be sliced
                self.freeze(self.value(arg))
            return None
        dim, ids = chans[0].dim, chans[0].ids
        if any(c.dim != dim or len(c.ids) != len(ids) for c in chans):
            raise _Unsupported("operands carry channels on different dimensions")
        for chan in chans[1:]:
            self.tie(ids, chan.ids)
        for arg in operands:
            value = self.value(arg)
            shape = self.shape(arg)
            if isinstance(value, Chan) or not isinstance(shape, tuple):
                continue  # channels handled above; scalars broadcast
            aligned = dim - (ndim - len(shape))
            size = shape[aligned] if aligned >= 0 else 1
            if size == 1:
                continue  # broadcasts along the channels: untouched by pruning
            if isinstance(value, ParamRef) and size == len(ids):
                self.member(ids, value.module, value.param, aligned, np.arange(len(ids)), "norm")
                continue
            self.tie(ids, FROZEN)  # a fixed tensor (input, buffer in another layout) meets these channels
            self.freeze(value)
            self.barriers.append(Barrier(node.name, "channels meet a tensor that cannot be pruned"))
        return Chan(dim, ids)

    def _elementwise_heads(self, node: fx.Node, operands: list[Any], ndim: int) -> Heads:
        """Heads combined with scalars, with tensors broadcast along every head dimension, or with the same heads."""
        first: Heads | None = None
        for arg in operands:
            value, shape = self.value(arg), self.shape(arg)
            if isinstance(value, Heads):
                aligned = Heads(tuple(d + ndim - len(shape) for d in value.dims), value.ids)
                if first is None:
                    first = aligned
                elif aligned.dims != first.dims or aligned.ids.shape != first.ids.shape:
                    raise _Unsupported("attention heads combined in different layouts")
                else:
                    self.tie(first.ids.reshape(-1), aligned.ids.reshape(-1))
            elif isinstance(value, (Chan, ParamRef)):
                raise _Unsupported("attention heads combined with other channels")
            elif isinstance(shape, tuple):
                if any(d - (ndim - len(shape)) >= 0 and shape[d - (ndim - len(shape))] != 1 for d in first.dims if first):
                    raise _Unsupported("attention heads meet a tensor that cannot be pruned")
        return first

    def _expand(self, node: fx.Node, source: Any) -> Any:
        shape = self.shape(node)
        before = self.shape(node.args[0])
        if isinstance(source, ParamRef):
            return ParamRef(source.module, source.param, source.shape) if len(shape) == len(before) else self._bad(source)
        if isinstance(source, Chan):
            return Chan(source.dim + len(shape) - len(before), source.ids)
        return None

    def _bad(self, value: Any) -> None:
        raise _Unsupported("expand that adds dimensions to a parameter")

    def _cat(self, node: fx.Node) -> Any:
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        out_shape = self.shape(node)
        dim = dim % len(out_shape)
        values = [self.value(t) for t in tensors]
        if dim in [v.dim for v in values if isinstance(v, Chan)]:
            # along the channel dimension: ids concatenate
            parts = []
            for tensor, value in zip(tensors, values):
                if isinstance(value, Chan) and value.dim == dim:
                    parts.append(value.ids)
                else:
                    self.freeze(value)
                    parts.append(np.full(self.shape(tensor)[dim], FROZEN, dtype=np.int64))
            return Chan(dim, np.concatenate(parts))
        # along another dimension (tokens): every operand's channels are the same channels
        reference = next((v for v in values if isinstance(v, Chan)), None)
        if reference is None:
            self.freeze(values)
            return None
        for tensor, value in zip(tensors, values):
            if isinstance(value, Chan):
                if value.dim != reference.dim or len(value.ids) != len(reference.ids):
                    raise _Unsupported("concatenated tensors carry channels on different dimensions")
                self.tie(reference.ids, value.ids)
            elif isinstance(value, ParamRef) and len(value.shape) == len(out_shape):
                self.member(reference.ids, value.module, value.param, reference.dim, np.arange(len(reference.ids)), "norm")
            else:
                self.tie(reference.ids, FROZEN)
                self.freeze(value)
        return reference

    def _split(self, node: fx.Node) -> Any:
        source = self.value(node.args[0])
        shape = self.shape(node.args[0])
        pieces = self.shape(node)
        name = node.target if isinstance(node.target, str) else node.target.__name__
        default_dim = 0
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else default_dim)
        if not isinstance(source, Chan):
            return tuple(None for _ in pieces) if isinstance(pieces, (tuple, list)) else None
        dim = dim % len(shape)
        if dim != source.dim:
            return tuple(source for _ in pieces)
        result, start = [], 0
        for piece in pieces:
            length = piece[dim]
            result.append(Chan(dim, source.ids[start:start + length]))
            start += length
        del name
        return tuple(result)

    def _shape_of(self, arg: Any) -> Any:
        value = self.value(arg)
        shape = self.shape(arg)
        if isinstance(value, (Chan, Heads)) and isinstance(shape, tuple):
            return ShapeOf(value, len(shape))
        return None

    def _getitem(self, node: fx.Node) -> Any:
        container, index = node.args
        value = self.value(container)
        if isinstance(value, ShapeOf):
            if isinstance(index, int):
                return _size_at(value, index)
            raise _Unsupported("a slice of the shape of a tensor that holds channels")
        if isinstance(value, (tuple, list)):
            return value[index] if isinstance(index, int) and index < len(value) else None
        if isinstance(value, Heads):
            return self._index_heads(node, value, index)
        if not isinstance(value, Chan):
            if isinstance(value, ParamRef):
                return self._gather_rows(node, value, index)
            return None
        # tensor indexing: ints drop dimensions, slices keep them, None adds one, Ellipsis expands
        in_shape, out_shape = self.shape(container), self.shape(node)
        items = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, fx.Node) or isinstance(i, (list, torch.Tensor)) for i in items):
            raise _Unsupported("advanced indexing")
        explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
        expanded: list[Any] = []
        for item in items:
            if item is Ellipsis:
                expanded += [slice(None)] * (len(in_shape) - explicit)
            else:
                expanded.append(item)
        expanded += [slice(None)] * (len(in_shape) - sum(1 for i in expanded if i is not None))
        source_dim, out_dim = 0, 0
        for item in expanded:
            if item is None:
                out_dim += 1
                continue
            if source_dim == value.dim:
                if item != slice(None) and not (isinstance(item, slice) and item.step in (None, 1) and
                                                 (item.start in (None, 0)) and (item.stop is None or item.stop >= in_shape[source_dim])):
                    raise _Unsupported("indexing into the channel dimension")
                return Chan(out_dim, value.ids)
            if not isinstance(item, int):
                out_dim += 1
            source_dim += 1
        del out_shape
        return None

    def _reduction(self, node: fx.Node) -> Any:
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        return self._reduce_like(node, self.value(node.args[0]), dims, keeps_dims=bool(keepdim))

    def _reduce_like(self, node: fx.Node, source: Any, dims: Any, keeps_dims: bool) -> Any:
        if isinstance(source, Heads):
            ndim = len(self.shape(node.args[0]))
            reduced = [d % ndim for d in (dims if isinstance(dims, (tuple, list)) else [dims])] if dims is not None else []
            if dims is None or set(reduced) & set(source.dims):
                raise _Unsupported("reduction or softmax over a dimension of attention heads")
            return Heads(tuple(d - (0 if keeps_dims else sum(1 for r in reduced if r < d)) for d in source.dims),
                         source.ids)
        if not isinstance(source, Chan):
            if isinstance(source, ParamRef):
                raise _Unsupported("reduction over a parameter")
            return None
        ndim = len(self.shape(node.args[0]))
        if dims is None:
            raise _Unsupported("reduction over every dimension, channels included")
        dims = [d % ndim for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
        if source.dim in dims:
            raise _Unsupported("reduction or softmax over the channel dimension")
        shift = 0 if keeps_dims else sum(1 for d in dims if d < source.dim)
        return Chan(source.dim - shift, source.ids)

    def _reorder(self, node: fx.Node) -> Any:
        source = self.value(node.args[0])
        if isinstance(source, ParamRef):
            raise _Unsupported("reordering a parameter's dimensions")
        if not isinstance(source, (Chan, Heads)):
            return None
        ndim = len(self.shape(node.args[0]))
        target = node.target if isinstance(node.target, str) else node.target.__name__
        rest = list(node.args[1:])
        if target == "t":
            order = list(range(ndim))[::-1]
        elif target in ("transpose", "swapaxes"):
            a, b = (d % ndim for d in rest[:2])
            order = list(range(ndim))
            order[a], order[b] = order[b], order[a]
        else:  # permute(*dims) or permute(dims)
            order = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            order = [d % ndim for d in order]
        if isinstance(source, Heads):
            return _heads([order.index(d) for d in source.dims], source.ids)
        return Chan(order.index(source.dim), source.ids)

    def _flatten_args(self, node: fx.Node) -> tuple[int, int]:
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
        return start, end

    def _flatten(self, node: fx.Node, source: Any, start: int, end: int) -> Any:
        if isinstance(source, ParamRef):
            raise _Unsupported("flattening a parameter")
        if not isinstance(source, Chan):
            return None
        in_shape = self.shape(node.args[0])
        ndim = len(in_shape)
        start, end = start % ndim, end % ndim
        if not start <= source.dim <= end:
            shift = (end - start) if source.dim > end else 0
            return Chan(source.dim - shift, source.ids)
        return Chan(start, _flattened_ids(source, in_shape, start, end))

    def _reshape(self, node: fx.Node) -> Any:
        result = self._reshape_value(node)
        self._check_sizes(node, result)
        return result

    def _check_sizes(self, node: fx.Node, result: Any) -> None:
        """A size read at run time (x.shape[-1]) follows the pruned size where channels of the same count land: they
        are tied position by position (so both keep the same number). Arithmetic on it, or a size standing where no
        channels land, ties widths the tracer cannot relate: both are kept."""
        target = self._target(node)
        if not target:
            return
        for position, arg in enumerate(target):
            size = self.value(arg) if isinstance(arg, fx.Node) else None
            if not isinstance(size, SizeOf):
                continue
            here = None
            if isinstance(result, Chan) and result.dim == position:
                here = result.ids
            elif isinstance(result, Heads) and position in result.dims:
                here = np.moveaxis(result.ids, result.dims.index(position), 0)[:, *([0] * (result.ids.ndim - 1))]
            if not (size.exact and here is not None and len(here) == len(size.ids)):
                raise _Unsupported("reshape with a size computed at run time from the size of pruned channels")
            self.tie(here, size.ids)

    def _reshape_value(self, node: fx.Node) -> Any:
        source = self.value(node.args[0])
        if isinstance(source, ParamRef):
            raise _Unsupported("reshaping a parameter")
        if isinstance(source, Heads):
            return self._reshape_heads(node, source)
        if not isinstance(source, Chan):
            return None
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        # The channel dimension survives a reshape when the sizes before it and after it still multiply out to the
        # same numbers and it keeps its size; merging it with trailing dimensions is a flatten.
        before = int(np.prod(in_shape[: source.dim]))
        after = int(np.prod(in_shape[source.dim + 1:]))
        size = in_shape[source.dim]
        for dim in range(len(out_shape)):
            if int(np.prod(out_shape[:dim])) == before and out_shape[dim] == size and int(np.prod(out_shape[dim + 1:])) == after:
                self._record_constants(node, [dim], source.ids, [0])
                return Chan(dim, source.ids)
        for dim in range(len(out_shape)):
            if int(np.prod(out_shape[:dim])) == before and out_shape[dim] == size * after and int(np.prod(out_shape[dim + 1:])) == 1:
                if after > 1 and self._literal(node, dim) is not None:
                    raise _Unsupported("reshape merges channels with other dimensions into a constant size")
                return Chan(dim, _flattened_ids(source, in_shape, source.dim, len(in_shape) - 1))
        # the channel dimension split into consecutive dimensions (heads x head width, or q/k/v x heads x width)
        for start in range(len(out_shape)):
            if int(np.prod(out_shape[:start])) != before or out_shape[start] == 1:
                continue
            for stop in range(start + 2, len(out_shape) + 1):
                if int(np.prod(out_shape[start:stop])) == size and int(np.prod(out_shape[stop:])) == after:
                    dims = list(range(start, stop))
                    ids = source.ids.reshape(out_shape[start:stop])
                    self._record_constants(node, dims, ids, list(range(len(dims))))
                    return Heads(tuple(dims), ids)
        raise _Unsupported("reshape that splits the channel dimension in a way the tracer cannot follow")

    def _reshape_heads(self, node: fx.Node, source: Heads) -> Any:
        """Heads through a reshape: every head dimension kept (with its neighbours' products), or all merged into one."""
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        prefix = lambda shape, d: int(np.prod(shape[:d]))  # noqa: E731
        suffix = lambda shape, d: int(np.prod(shape[d + 1:]))  # noqa: E731
        mapped = []
        for d in source.dims:
            match = [e for e in range(len(out_shape)) if prefix(out_shape, e) == prefix(in_shape, d) and
                     out_shape[e] == in_shape[d] and suffix(out_shape, e) == suffix(in_shape, d)]
            mapped.append(match[0] if match else None)
        if None not in mapped:
            self._record_constants(node, mapped, source.ids, list(range(len(mapped))))
            return _heads(mapped, source.ids)
        first, last = source.dims[0], source.dims[-1]
        if list(source.dims) == list(range(first, last + 1)):
            size = int(np.prod(source.ids.shape))
            for e in range(len(out_shape)):
                if prefix(out_shape, e) == prefix(in_shape, first) and out_shape[e] == size and \
                        suffix(out_shape, e) == suffix(in_shape, last):
                    ids = source.ids.reshape(-1)
                    self._record_constants(node, [e], ids, [0])
                    return Chan(e, ids)
        raise _Unsupported("reshape of attention heads the tracer cannot follow")

    # shape constants

    def _target(self, node: fx.Node) -> list[Any] | None:
        """The target shape a view/reshape was called with, as written (ints, proxies' nodes, -1)."""
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if target not in ("view", "reshape"):
            return None
        rest = list(node.args[1:]) if node.op == "call_method" else list(node.args[1:2])
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            rest = list(rest[0])
        if "shape" in node.kwargs:
            rest = list(node.kwargs["shape"])
        return rest

    def _literal(self, node: fx.Node, position: int) -> int | None:
        target = self._target(node)
        if target is None or len(target) != len(self.shape(node)):
            return None
        value = target[position]
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    def _record_constants(self, node: fx.Node, positions: Sequence[int], ids: np.ndarray, axes: Sequence[int]) -> None:
        """Remember every int literal written where channels land (axis `axes[i]` of ids at output `positions[i]`)."""
        stack = node.meta.get("nn_module_stack") or {}
        module = str(list(stack.values())[-1][0]) if stack else ""
        if module not in self.modules:
            module = ""
        for position, axis in zip(positions, axes):
            value = self._literal(node, position)
            if value is None:
                continue
            grid = np.moveaxis(ids, axis, 0).reshape(ids.shape[axis], -1)
            self.constants.append(ShapeConstant(node.name, module, position, value, grid))

    # attention heads

    def _index_heads(self, node: fx.Node, value: Heads, index: Any) -> Any:
        in_shape = self.shape(node.args[0])
        items = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, (fx.Node, list, torch.Tensor)) or i is Ellipsis for i in items):
            raise _Unsupported("advanced indexing of attention heads")
        items = list(items) + [slice(None)] * (len(in_shape) - sum(1 for i in items if i is not None))
        ids, dims, source_dim, out_dim, axis = value.ids, [], 0, 0, 0
        for item in items:
            if item is None:
                out_dim += 1
                continue
            if source_dim in value.dims:
                if isinstance(item, int):
                    ids = np.take(ids, item, axis=axis)
                elif item == slice(None):
                    dims.append(out_dim)
                    axis += 1
                    out_dim += 1
                else:
                    raise _Unsupported("slicing a dimension of attention heads")
            elif not isinstance(item, int):
                out_dim += 1
            source_dim += 1
        return _heads(dims, ids)

    def _unbind(self, node: fx.Node) -> Any:
        source = self.value(node.args[0])
        ndim = len(self.shape(node.args[0]))
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % ndim
        count = self.shape(node.args[0])[dim]
        if isinstance(source, Heads):
            if dim in source.dims:
                axis = source.dims.index(dim)
                rest = [d - (d > dim) for d in source.dims if d != dim]
                return tuple(_heads(rest, np.take(source.ids, i, axis=axis)) for i in range(count))
            return tuple(Heads(tuple(d - (d > dim) for d in source.dims), source.ids) for _ in range(count))
        if isinstance(source, Chan):
            if source.dim == dim:
                raise _Unsupported("unbinding the channel dimension")
            return tuple(Chan(source.dim - (source.dim > dim), source.ids) for _ in range(count))
        if isinstance(source, ParamRef):
            raise _Unsupported("unbinding a parameter")
        return tuple(None for _ in range(count))

    def _gather_rows(self, node: fx.Node, table: ParamRef, index: Any) -> Any:
        """table[index] with an integer index tensor (a relative position bias table indexed by a buffer): the
        table's columns (one per head) become channels of the result's last dimension."""
        if not isinstance(index, fx.Node) or self.value(index) is not None or not isinstance(self.shape(index), tuple) \
                or len(table.shape) != 2:
            raise _Unsupported("indexing into a parameter")
        ids = self.fresh(table.shape[1])
        self.member(ids, table.module, table.param, 1, np.arange(table.shape[1]), "norm")
        return Chan(len(self.shape(node)) - 1, ids)

    def _shift(self, node: fx.Node) -> Any:
        """torch.roll / flip: channels pass when the shifted dimensions hold none."""
        source = self.value(node.args[0])
        ndim = len(self.shape(node.args[0]))
        name = node.target if isinstance(node.target, str) else node.target.__name__
        dims = node.kwargs.get("dims", node.args[2] if name == "roll" and len(node.args) > 2 else
                               node.args[1] if name == "flip" and len(node.args) > 1 else None)
        if isinstance(source, ParamRef):
            raise _Unsupported(f"{name} of a parameter")
        if not isinstance(source, (Chan, Heads)):
            return None
        if dims is None:
            raise _Unsupported(f"{name} over the flattened tensor")
        dims = {d % ndim for d in (dims if isinstance(dims, (tuple, list)) else [dims])}
        held = set(source.dims) if isinstance(source, Heads) else {source.dim}
        if dims & held:
            raise _Unsupported(f"{name} along the channel dimension")
        return source

    def _matmul(self, node: fx.Node) -> Any:
        a, b = node.args[:2]
        sa, sb = self.shape(a), self.shape(b)
        if not (isinstance(sa, tuple) and isinstance(sb, tuple)) or len(sa) < 2 or len(sb) < 2:
            raise _Unsupported("matmul of vectors")
        ndim = max(len(sa), len(sb))
        batch = [f"b{i}" for i in range(ndim - 2)]
        la = batch[len(batch) - (len(sa) - 2):] + ["n", "k"] if len(sa) > 2 else ["n", "k"]
        lb = batch[len(batch) - (len(sb) - 2):] + ["k", "m"] if len(sb) > 2 else ["k", "m"]
        return self._contract(node, [a, b], [la, lb], batch + ["n", "m"])

    def _einsum(self, node: fx.Node) -> Any:
        equation = node.args[0]
        operands = list(node.args[1][0] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
                        else node.args[1:])
        if not isinstance(equation, str) or "..." in equation or "->" not in equation:
            raise _Unsupported("einsum without an explicit output")
        inputs, output = equation.replace(" ", "").split("->")
        return self._contract(node, operands, [list(t) for t in inputs.split(",")], list(output))

    def _contract(self, node: fx.Node, operands: list[Any], labels: list[list[str]], out: list[str]) -> Any:
        """Products of tensors by labelled dimensions (matmul, einsum): channels on a shared label are one set of
        channels; a contracted label's channels go together (a whole head)."""
        values = [self.value(o) for o in operands]
        if any(isinstance(v, ParamRef) for v in values):
            raise _Unsupported("product with a parameter")
        sizes: dict[str, int] = {}
        carried: list[dict[str, int]] = []  # label -> ids axis, per operand
        for operand, value, names in zip(operands, values, labels):
            shape = self.shape(operand)
            for name, size in zip(names, shape):
                sizes[name] = max(sizes.get(name, 1), size)
            dims = [] if value is None else ([value.dim] if isinstance(value, Chan) else list(value.dims))
            carried.append({names[d]: axis for axis, d in enumerate(dims)})
        channel_labels = sorted({name for c in carried for name in c}, key=lambda n: (n not in out, n))
        if not channel_labels:
            return None
        for operand, value, names, c in zip(operands, values, labels, carried):
            for name, size in zip(names, self.shape(operand)):
                if name in channel_labels and name not in c and size > 1:
                    raise _Unsupported("channels multiplied with a tensor that holds none")
        grid_shape = [sizes[n] for n in channel_labels]
        grids = []
        for value, c in zip(values, carried):
            if not c:
                continue
            ids = value.ids if isinstance(value, Heads) else value.ids.reshape(-1)
            mine = [n for n in channel_labels if n in c]
            ids = np.transpose(ids, [c[n] for n in mine]) if ids.ndim > 1 else ids
            ids = ids.reshape([sizes[n] if n in c else 1 for n in channel_labels])
            grids.append((len(c), np.broadcast_to(ids, grid_shape)))
        grids.sort(key=lambda item: -item[0])
        reference = grids[0][1]
        for _, grid in grids[1:]:
            self.tie(reference.reshape(-1), grid.reshape(-1))
        kept = [n for n in channel_labels if n in out]
        for axis, name in enumerate(channel_labels):
            if name not in out:  # contracted: the channels along it leave together
                self.tie(reference.reshape(-1), np.broadcast_to(np.take(reference, [0], axis=axis), reference.shape).reshape(-1))
        self.head_ids.append(reference.reshape(-1)[:1].copy())
        result = reference[tuple(slice(None) if n in out else 0 for n in channel_labels)]
        return _heads([out.index(n) for n in kept], np.ascontiguousarray(result))

def _heads(dims: Sequence[int], ids: np.ndarray) -> Any:
    """Heads with dims ascending (ids axes reordered to match); one dimension left is a Chan, none is nothing."""
    if not len(dims):
        return None
    order = np.argsort(dims)
    ids = np.transpose(ids, order) if ids.ndim > 1 else ids
    dims = [dims[i] for i in order]
    return Chan(dims[0], ids.reshape(-1)) if len(dims) == 1 else Heads(tuple(dims), ids)


def _flat(value: Any) -> Iterable[Any]:
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _flat(item)
    else:
        yield value


_HEADS_FUNCTIONS = {operator.getitem, operator.mul, operator.truediv, operator.add, operator.sub, torch.mul,
                    torch.div, torch.add, operator.matmul, torch.matmul, torch.einsum, F.softmax, torch.softmax,
                    F.dropout, torch.roll, torch.flip, torch.unbind, getattr, torch.reshape, torch.transpose,
                    torch.permute}
_HEADS_METHODS = {"view", "reshape", "permute", "transpose", "contiguous", "unbind", "mul", "div", "add", "softmax",
                  "size", "matmul", "roll", "flip", "clone", "to", "float", "type_as", "dim"}


def _size_at(shape: Any, dim: int) -> Any:
    """The size of dimension `dim` of a ShapeOf: a SizeOf where it holds channels."""
    if not isinstance(shape, ShapeOf) or not isinstance(dim, int):
        return None
    dim %= shape.ndim
    value = shape.value
    if isinstance(value, Chan):
        return SizeOf(value.ids) if value.dim == dim else None
    if dim in value.dims:
        return SizeOf(np.moveaxis(value.ids, value.dims.index(dim), 0).reshape(value.ids.shape[value.dims.index(dim)], -1)[:, 0], exact=False)
    return None


def _size_aware(node: fx.Node) -> bool:
    """Whether the node follows SizeOf arguments (arithmetic on sizes, reshapes that are checked)."""
    if node.op == "call_method":
        return node.target in ("view", "reshape")
    return node.op == "call_function" and (node.target in _SIZE_ARITHMETIC or node.target in (torch.reshape,))


def _heads_aware(node: fx.Node) -> bool:
    """Whether the node's handler follows Heads values (everything else meets them as a barrier)."""
    if node.op == "call_method":
        return node.target in _HEADS_METHODS
    if node.op == "call_module":
        return False
    return node.target in _HEADS_FUNCTIONS


class _Unsupported(Exception):
    """An operation the channel analysis has no rule for: its operands become a barrier."""


def _flattened_ids(source: Chan, shape: tuple[int, ...], start: int, end: int) -> np.ndarray:
    """Ids of dims start..end flattened together (row-major), the channel dimension among them."""
    block = list(shape[start:end + 1])
    grid = np.broadcast_to(
        source.ids.reshape([len(source.ids) if d == source.dim - start else 1 for d in range(len(block))]), block
    )
    return np.ascontiguousarray(grid).reshape(-1)


def _chans_in(value: Any) -> Iterable[Chan | Heads | SizeOf]:
    if isinstance(value, (Chan, Heads, SizeOf)):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _chans_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _chans_in(item)


def _params_in(value: Any) -> Iterable[ParamRef]:
    if isinstance(value, ParamRef):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _params_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _params_in(item)


# --- connected components -----------------------------------------------------------------------------------------


def connected_components(count: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Label of each of `count` nodes (the smallest node id in its component), edges a[i] -- b[i]; vectorised."""
    labels = np.arange(count, dtype=np.int64)
    if len(a) == 0:
        return labels
    while True:
        low = np.minimum(labels[a], labels[b])
        before = labels.copy()
        np.minimum.at(labels, a, low)
        np.minimum.at(labels, b, low)
        while True:  # pointer jumping: follow labels to their roots
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
        if np.array_equal(labels, before):
            return labels


# --- assembling groups ----------------------------------------------------------------------------------------------


def _combined_key(*columns: np.ndarray) -> np.ndarray:
    """One int64 per row that sorts like the rows of the non-negative integer columns (first column most significant),
    so one argsort replaces a lexsort (several times faster); the rank among distinct rows where it would overflow."""
    key = np.zeros(len(columns[0]), dtype=np.int64)
    span = 1
    for column in reversed(columns):
        top = int(column.max()) + 1 if len(column) else 1
        if span * top >= 2**62:  # equal rows share a rank, and ranks sort like the rows
            return np.unique(np.stack(columns, axis=1), axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)
        key += column.astype(np.int64) * span
        span *= top
    return key


def _same_signature_groups(pair_keys: np.ndarray, unit_start: np.ndarray, n_keys: int) -> tuple[np.ndarray, int]:
    """Group number of every unit: units touching the same set of tensors share one. Numbered by first appearance.

    A unit's set of tensor keys (sorted, without repeats: pair_keys[unit_start[u]:unit_start[u + 1]]) is compared by
    two independent 64-bit random sums plus its size, vectorised; a collision needs 2^-128 luck.
    """
    rng = np.random.default_rng(0x5EED)
    salts = rng.integers(0, 2**63, size=(2, max(n_keys, 1)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        first = np.add.reduceat(salts[0][pair_keys], unit_start)
        second = np.add.reduceat(salts[1][pair_keys], unit_start)
    sizes = np.diff(np.r_[unit_start, len(pair_keys)]).astype(np.uint64)
    signature = np.stack([first, second, sizes], axis=1)
    _, first_index, inverse = np.unique(signature, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    # renumber groups in order of their first unit, as the dictionary this replaced did
    renumber = np.empty(len(first_index), dtype=np.int64)
    renumber[np.argsort(first_index, kind="stable")] = np.arange(len(first_index))
    return renumber[inverse], len(first_index)


def _assemble(analysis: _Analysis) -> tuple[list[Group], int]:
    """Components -> units -> groups (units touching the same tensors)."""
    ids = np.concatenate(analysis.member_ids) if analysis.member_ids else np.zeros(0, np.int64)
    keys = np.concatenate(analysis.member_keys) if analysis.member_keys else np.zeros(0, np.int64)
    index = np.concatenate(analysis.member_index) if analysis.member_index else np.zeros(0, np.int64)
    edges_a = list(analysis.edges_a)
    edges_b = list(analysis.edges_b)
    # the same slice of the same tensor reached twice (a layer called twice, shared weights): one unit
    if len(ids):
        slice_key = _combined_key(keys, index)
        order = np.argsort(slice_key)
        same = slice_key[order][1:] == slice_key[order][:-1]
        edges_a.append(ids[order][1:][same])
        edges_b.append(ids[order][:-1][same])
    # tensors read by an op without a rule must not be sliced at all
    key_names = {number: key for key, number in analysis.keys.items()}
    frozen_keys = [n for n, (module, param, _) in key_names.items() if (module, param) in analysis.frozen_params]
    if frozen_keys:
        hit = np.isin(keys, frozen_keys)
        edges_a.append(ids[hit])
        edges_b.append(np.zeros(int(hit.sum()), np.int64))
    a = np.concatenate(edges_a) if edges_a else np.zeros(0, np.int64)
    b = np.concatenate(edges_b) if edges_b else np.zeros(0, np.int64)
    labels = connected_components(analysis.next_id, a, b)
    analysis.labels = labels
    unit_labels = labels[ids]
    live = unit_labels != labels[FROZEN]
    frozen_units = len(np.unique(unit_labels[~live]))
    ids, keys, index, unit_labels = ids[live], keys[live], index[live], unit_labels[live]
    if not len(ids):
        return [], frozen_units
    # one row per distinct (unit, tensor, index): a slice reached twice is still one slice
    row_key = _combined_key(unit_labels, keys, index)
    order = np.argsort(row_key)
    row_key, unit_labels, keys, index = row_key[order], unit_labels[order], keys[order], index[order]
    fresh = np.r_[True, row_key[1:] != row_key[:-1]]
    unit_labels, keys, index = unit_labels[fresh], keys[fresh], index[fresh]
    # signature of a unit: the sorted set of tensors it touches (rows are sorted by unit, then tensor)
    pair_start = np.ones(len(keys), dtype=bool)
    pair_start[1:] = (unit_labels[1:] != unit_labels[:-1]) | (keys[1:] != keys[:-1])
    pair_units, pair_keys = unit_labels[pair_start], keys[pair_start]
    unit_start = np.flatnonzero(np.r_[True, pair_units[1:] != pair_units[:-1]])
    units = pair_units[unit_start]
    group_of_unit, n_groups = _same_signature_groups(pair_keys, unit_start, len(analysis.keys))
    # position of each unit inside its group: units are sorted by label, so count within each group in order
    by_group = np.argsort(group_of_unit, kind="stable")
    position = np.empty(len(units), dtype=np.int64)
    counts = np.bincount(group_of_unit, minlength=n_groups)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    position[by_group] = np.arange(len(units)) - np.repeat(starts, counts)
    row_unit = np.searchsorted(units, unit_labels)
    row_group, row_position = group_of_unit[row_unit], position[row_unit]
    # rows grouped by (group, tensor), indices ascending inside each
    order = np.argsort(_combined_key(row_group, keys, index))
    row_group, keys, index, row_position = row_group[order], keys[order], index[order], row_position[order]
    cut = np.flatnonzero(np.r_[True, (row_group[1:] != row_group[:-1]) | (keys[1:] != keys[:-1])])
    bounds = list(zip(cut.tolist(), np.r_[cut[1:], len(keys)].tolist()))
    members_of: list[list[Member]] = [[] for _ in range(n_groups)]
    for begin, stop in bounds:
        module, param, dim = key_names[int(keys[begin])]
        members_of[int(row_group[begin])].append(Member(
            module, param, dim, torch.from_numpy(index[begin:stop].copy()),
            torch.from_numpy(row_position[begin:stop].copy()), analysis.key_roles[int(keys[begin])],
        ))
    groups = []
    head_labels = labels[np.concatenate(analysis.head_ids)] if analysis.head_ids else np.zeros(0, np.int64)
    heads_groups = set(group_of_unit[np.isin(units, head_labels)].tolist())
    for group_number, members in enumerate(members_of):
        members.sort(key=lambda m: analysis.keys[m.key])
        modules = list(dict.fromkeys(m.module for m in members))
        is_heads = any(m.module in analysis.heads for m in members) or group_number in heads_groups
        name = " -> ".join(modules[:4]) + (f" (+{len(modules) - 4} more)" if len(modules) > 4 else "")
        groups.append(Group(name, "head" if is_heads else "channel", int(counts[group_number]), members))
    # keys are numbered in graph order, so this lists groups from the input side to the output side
    analysis.unit_labels, analysis.unit_groups, analysis.unit_positions = units, group_of_unit, position
    analysis.numbered_groups = list(groups)
    groups.sort(key=lambda g: min(analysis.keys[m.key] for m in g.members))
    return groups, frozen_units


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ArgumentError("example_inputs", type(example_inputs).__name__, "a tensor or a tuple of tensors")


def build_graph(model: nn.Module, example_inputs: Any, barriers: Iterable[str] = (),
                shape_pass: str = "meta") -> DependencyGraph:
    """Trace `model` on `example_inputs` and return its groups of coupled channels and the barriers met.

    shape_pass: how node shapes are recorded -- "meta" (no arithmetic; falls back to "real" where an op cannot run
    on meta tensors), "real" (one no-grad pass) or "fake" (torch's FakeTensorMode).
    """
    barrier_set = set(barriers)
    traced = symbolic_trace(model, barrier_set)
    shapes = record_shapes(traced, _as_tuple(example_inputs), shape_pass)
    analysis = _Analysis(traced, shapes, barrier_set)
    analysis.run()
    groups, frozen = _assemble(analysis)
    _tie_shape_constants(model, traced, analysis, barrier_set)
    return DependencyGraph(groups, analysis.barriers, frozen)


# --- shape constants ------------------------------------------------------------------------------------------------


def _int_attributes(module: nn.Module) -> dict[str, int]:
    return {k: v for k, v in vars(module).items() if isinstance(v, int) and not isinstance(v, bool) and
            not k.startswith("_") and k != "training"}


def _literal_of(node: fx.Node, position: int) -> Any:
    rest = list(node.args[1:]) if node.op == "call_method" else list(node.args[1:2])
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = list(rest[0])
    return rest[position] if position < len(rest) else None


def _dependencies(model: nn.Module, traced: fx.GraphModule, barriers: set[str],
                  candidates: dict[tuple[str, str], list[ShapeConstant]]) -> set[tuple[str, str, str]]:
    """(module, attribute, node) triples: the constant at that node changes when the attribute does. Found by
    tracing again with each candidate attribute moved to a value nothing else has (one trace per attribute name)."""
    original = {n.name: n for n in traced.graph.nodes}
    found: set[tuple[str, str, str]] = set()
    by_name: dict[str, list[tuple[str, str]]] = {}
    for module, attribute in candidates:
        by_name.setdefault(attribute, []).append((module, attribute))
    for attribute, pairs in by_name.items():
        saved = []
        try:
            for module, _ in pairs:
                owner = model.get_submodule(module) if module else model
                saved.append((owner, getattr(owner, attribute)))
                setattr(owner, attribute, getattr(owner, attribute) + 7919)
            try:
                graph = symbolic_trace(model, barriers).graph
            except Exception:  # a forward that refuses the moved value: this attribute cannot be followed
                continue
            moved = {n.name: n for n in graph.nodes}
            for pair in pairs:
                for constant in candidates[pair]:
                    node = moved.get(constant.node)
                    if node is None or node.target != original[constant.node].target:
                        continue
                    if _literal_of(node, constant.position) != constant.value:
                        found.add((pair[0], attribute, constant.node))
        finally:
            for owner, value in saved:
                setattr(owner, attribute, value)
    return found


def _unit_of(analysis: _Analysis, label: int) -> tuple[Group, int] | None:
    """(group, unit) of a component label; None for a frozen one."""
    at = int(np.searchsorted(analysis.unit_labels, label))
    if at >= len(analysis.unit_labels) or analysis.unit_labels[at] != label:
        return None
    return analysis.numbered_groups[int(analysis.unit_groups[at])], int(analysis.unit_positions[at])


def _tie_shape_constants(model: nn.Module, traced: fx.GraphModule, analysis: _Analysis, barriers: set[str]) -> None:
    """Every int a reshape bakes in as the size of a prunable dimension becomes an attribute member of its group
    (the attribute the forward reads it from, found by tracing again); a group whose constant has no such attribute
    is kept whole, with the reason."""
    pending = []
    for constant in analysis.constants:
        labels = analysis.labels[constant.grid]
        frozen_label = analysis.labels[FROZEN]
        rows = [set(row.tolist()) for row in labels]
        if all(row == rows[0] for row in rows):
            continue  # every position holds the same units (q/k/v, head width): the size never changes
        found_units = {label: _unit_of(analysis, label) for row in rows for label in row}
        if any(unit is None and label != frozen_label for label, unit in found_units.items()):
            continue  # channels outside every group (frozen): nothing to follow
        groups = list({id(u[0]): u[0] for u in found_units.values() if u is not None}.values())
        where = f"{constant.node} in {constant.module or type(model).__name__}"
        if len(groups) != 1 or any(len(row) != 1 for row in rows):
            for group in groups:
                group.kept_whole = group.kept_whole or (f"{where} reshapes with the constant {constant.value} over "
                                                        "channels of several groups")
            continue
        group = groups[0]
        units = [found_units[next(iter(row))][1] if next(iter(row)) != frozen_label else -1 for row in rows]
        distinct = sorted(set(units) - {-1})
        owner = model.get_submodule(constant.module) if constant.module else model
        attributes = _int_attributes(owner)
        names = [k for k, v in attributes.items() if v == constant.value or (v == len(distinct) and -1 not in units)]
        pending.append((constant, group, units, distinct, names, where))
    candidates: dict[tuple[str, str], list[ShapeConstant]] = {}
    for constant, _, _, _, names, _ in pending:
        for name in names:
            candidates.setdefault((constant.module, name), []).append(constant)
    found = _dependencies(model, traced, barriers, candidates) if candidates else set()
    for constant, group, units, distinct, names, where in pending:
        owner = model.get_submodule(constant.module) if constant.module else model
        hits = [name for name in names if (constant.module, name, constant.node) in found]
        if not hits:
            group.kept_whole = group.kept_whole or (
                f"{where} reshapes with the constant {constant.value} on this group's dimension, and no int "
                f"attribute of that module ({type(owner).__name__}) that its forward reads holds it")
            continue
        for name in hits:
            value = getattr(owner, name)
            if value == constant.value:
                index, unit = np.arange(len(units)), np.asarray(units)
                keep = unit >= 0
                index, unit = index[keep], unit[keep]
            else:
                index, unit = np.arange(len(distinct)), np.asarray(distinct)
            member = Member(constant.module, ATTRIBUTE + name, 0, torch.from_numpy(index.astype(np.int64)),
                            torch.from_numpy(unit.astype(np.int64)), "attr")
            if all(m.key != member.key for m in group.attributes):
                group.attributes.append(member)
