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


def has_identity_shortcut(module: nn.Module) -> bool:
    """Whether the module's traced forward adds its own input to something (x + f(x))."""
    if isinstance(module, (nn.Sequential, nn.ModuleList)) or not list(module.children()):
        return False
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # untraceable blocks are simply not candidates
        return False
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return False
    for node in graph.nodes:
        if node.op == "call_function" and node.target in (operator.add, torch.add) and inputs[0] in node.args:
            return True
        if node.op == "call_method" and node.target == "add" and inputs[0] in node.args:
            return True
    return False


def residual_blocks(model: nn.Module, example_inputs: Any) -> list[str]:
    """Names of the submodules that are residual blocks with an identity shortcut and keep their input's shape."""
    shapes: dict[str, tuple[tuple, tuple]] = {}
    candidates = {name: m for name, m in model.named_modules() if name and has_identity_shortcut(m)}

    def record(name: str, args: tuple, output: Any) -> None:  # returns None: a hook's return would replace the output
        if isinstance(output, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            shapes.setdefault(name, (tuple(args[0].shape), tuple(output.shape)))

    handles = [m.register_forward_hook(lambda mod, args, out, n=name: record(n, args, out))
               for name, m in candidates.items()]
    try:
        with torch.no_grad():
            _forward(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return [name for name in candidates if name in shapes and shapes[name][0] == shapes[name][1]]


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


def drop_residual_blocks(model: nn.Module, example_inputs: Any, count: int) -> tuple[list[str], dict[str, float]]:
    """Remove the `count` residual blocks of lowest block influence; returns (removed names, every block's influence)."""
    blocks = residual_blocks(model, example_inputs)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0 or (count and count >= len(blocks)):
        raise ArgumentError("count", count, f"an integer from 0 to {max(0, len(blocks) - 1)} "
                            f"(the model has {len(blocks)} removable residual blocks)")
    influence = residual_block_influence(model, example_inputs, blocks)
    chosen = sorted(blocks, key=lambda n: influence[n])[:count]
    replace_with_identity(model, chosen)
    return chosen, influence
