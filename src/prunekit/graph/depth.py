"""Depth pruning of plain PyTorch models: remove whole residual blocks.

A residual block with an identity shortcut computes y = x + f(x) (possibly followed by an activation that leaves
its non-negative input unchanged); replacing it with nn.Identity removes f. Blocks are ranked by block influence
(ShortGPT's 1 - cos(x_in, x_out), measured on example inputs): the ones that change their input least go first.
"""

from __future__ import annotations

import operator
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from prunekit.errors import ArgumentError
from prunekit.graph.surgery import checked_edit, reference_shapes
from prunekit.graph.trace import TraceError


def has_identity_shortcut(module: nn.Module, name: str = "") -> bool:
    """Whether the module's traced forward adds its own input to something (x + f(x)).

    A module torch.fx cannot trace raises TraceError naming it: whether it is a residual block is then unknown.
    """
    if isinstance(module, (nn.Sequential, nn.ModuleList)) or not list(module.children()):
        return False
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception as error:  # fx raises many types; all mean "cannot be read statically"
        raise TraceError(f"module {name!r} ({type(module).__name__}) keeps its input's shape but cannot be traced "
                         f"with torch.fx ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}), "
                         "so whether it is a residual block is unknown. Pass skip_untraceable=True (CLI: "
                         "--skip-untraceable) to leave such modules out of the candidates; they are then listed "
                         "in the result") from None
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return False
    for node in graph.nodes:
        if node.op == "call_function" and node.target in (operator.add, torch.add) and inputs[0] in node.args:
            return True
        if node.op == "call_method" and node.target == "add" and inputs[0] in node.args:
            return True
    return False


def find_residual_blocks(model: nn.Module, example_inputs: Any,
                         skip_untraceable: bool = False) -> tuple[list[str], list[str]]:
    """(residual blocks with an identity shortcut that keep their input's shape, untraceable modules skipped).

    Only modules whose forward maps a tensor to a tensor of the same shape can be such blocks, so only those are
    traced; one that cannot be traced raises TraceError unless `skip_untraceable`, and is then returned as skipped.
    """
    if not isinstance(skip_untraceable, bool):
        raise ArgumentError("skip_untraceable", skip_untraceable, "True or False")
    shapes: dict[str, tuple[tuple, tuple]] = {}
    modules = {name: m for name, m in model.named_modules()
               if name and list(m.children()) and not isinstance(m, (nn.Sequential, nn.ModuleList))}

    def record(name: str, args: tuple, output: Any) -> None:  # returns None: a hook's return would replace the output
        if isinstance(output, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            shapes.setdefault(name, (tuple(args[0].shape), tuple(output.shape)))

    handles = [m.register_forward_hook(lambda mod, args, out, n=name: record(n, args, out))
               for name, m in modules.items()]
    try:
        with torch.no_grad():
            _forward(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    blocks, skipped = [], []
    for name, module in modules.items():
        if name not in shapes or shapes[name][0] != shapes[name][1]:
            continue
        try:
            if has_identity_shortcut(module, name):
                blocks.append(name)
        except TraceError:
            if not skip_untraceable:
                raise
            skipped.append(name)
    return blocks, skipped


def residual_blocks(model: nn.Module, example_inputs: Any) -> list[str]:
    """Names of the submodules that are residual blocks with an identity shortcut and keep their input's shape
    (an untraceable candidate raises TraceError; see find_residual_blocks to skip and list those)."""
    return find_residual_blocks(model, example_inputs)[0]


def _forward(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


@torch.no_grad()
def residual_block_influence(model: nn.Module, example_inputs: Any, names: Iterable[str]) -> dict[str, float]:
    """1 - mean over samples of cos(block input, block output), each flattened per sample."""
    names = list(names)
    totals: dict[str, list[float]] = {name: [] for name in names}

    def hook(module: nn.Module, args: tuple, output: torch.Tensor, name: str) -> None:
        x = args[0].flatten(1).float()
        y = output.flatten(1).float()
        totals[name] += torch.nn.functional.cosine_similarity(x, y, dim=1).tolist()

    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        _forward(model, example_inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {name: 1.0 - sum(values) / len(values) for name, values in totals.items() if values}


def replace_with_identity(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Swap the named blocks for nn.Identity (their parameters go with them)."""
    names = list(names)
    known = dict(model.named_modules())
    for name in names:
        if not name or name not in known:
            raise ArgumentError("blocks", name, "names of submodules of the model")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.Identity())
    return names


def drop_residual_blocks(model: nn.Module, example_inputs: Any, count: int, skip_untraceable: bool = False
                         ) -> tuple[list[str], dict[str, float], list[str]]:
    """Remove the `count` residual blocks of lowest block influence; the model then runs on `example_inputs` (on
    failure it is restored exactly and a ModelError names the module).

    Returns (removed names, every block's influence, untraceable modules skipped: only with skip_untraceable).
    """
    blocks, skipped = find_residual_blocks(model, example_inputs, skip_untraceable)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0 or (count and count >= len(blocks)):
        raise ArgumentError("count", count, f"an integer from 0 to {max(0, len(blocks) - 1)} "
                            f"(the model has {len(blocks)} removable residual blocks)")
    influence = residual_block_influence(model, example_inputs, blocks)
    chosen = sorted(blocks, key=lambda n: influence[n])[:count]
    # the model must still run without them (a parent may read a removed block's attributes): else restored, and
    # a ModelError names the module that failed
    checked_edit(model, lambda: replace_with_identity(model, chosen), example_inputs,
                 reference_shapes(model, example_inputs), "leave that block out of the removal")
    return chosen, influence, skipped
