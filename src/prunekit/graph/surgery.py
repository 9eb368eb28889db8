"""Physical removal: slice tensors, then bring every module's attributes in line with its new shapes.

The removal is recorded as a *plan* (which indices each tensor keeps), so a pruned model can be rebuilt from the
original class plus the plan, without pickling modules: `apply_plan(fresh_model, plan)` then `load_state_dict`.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from prunekit.errors import FormatError, ModelError

# (module, param, dim) -> sorted LongTensor of the indices kept along dim
Plan = dict[tuple[str, str, int], torch.Tensor]

# Functions that bring a module's attributes in line with its (sliced) tensors. Each returns True when it
# recognised the module. Adapters (transformers attention, ...) add theirs with `register_refresher`.
_REFRESHERS: list[Callable[[str, nn.Module, nn.Module], bool]] = []


def register_refresher(refresher: Callable[[str, nn.Module, nn.Module], bool]) -> None:
    """Add `refresher(name, module, root)`, called on every module after a removal."""
    if refresher not in _REFRESHERS:
        _REFRESHERS.append(refresher)


def merge_removals(parts: Iterable[dict[tuple[str, str, int], torch.Tensor]]) -> dict[tuple[str, str, int], torch.Tensor]:
    """Union of several removal maps (indices may repeat across groups that share a tensor)."""
    merged: dict[tuple[str, str, int], torch.Tensor] = {}
    for part in parts:
        for key, index in part.items():
            merged[key] = index if key not in merged else torch.cat([merged[key], index])
    return {key: torch.unique(index) for key, index in merged.items()}


def plan_from_removals(model: nn.Module, removals: dict[tuple[str, str, int], torch.Tensor]) -> Plan:
    """Turn 'indices to delete' into 'indices to keep', checking every index against the tensor's size."""
    plan: Plan = {}
    for (module_name, param_name, dim), removed in removals.items():
        tensor = _tensor(model, module_name, param_name)
        size = tensor.shape[dim]
        removed = torch.unique(removed.long())
        if len(removed) and (int(removed.min()) < 0 or int(removed.max()) >= size):
            raise ModelError(f"{module_name}.{param_name}: index out of range for dimension {dim} of size {size}")
        keep = torch.ones(size, dtype=torch.bool)
        keep[removed] = False
        if not keep.any():
            raise ModelError(f"{module_name}.{param_name}: removal would leave dimension {dim} empty")
        plan[(module_name, param_name, dim)] = torch.nonzero(keep).flatten()
    return plan


def _tensor(model: nn.Module, module_name: str, param_name: str) -> torch.Tensor:
    module = model.get_submodule(module_name) if module_name else model
    tensor = getattr(module, param_name, None)
    if not isinstance(tensor, torch.Tensor):
        raise ModelError(f"{module_name or type(model).__name__} has no tensor {param_name!r}")
    return tensor


@torch.no_grad()
def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Slice every tensor named in `plan` in place, then refresh module attributes. Returns `model`."""
    for (module_name, param_name, dim), keep in sorted(plan.items(), key=lambda item: item[0]):
        module = model.get_submodule(module_name) if module_name else model
        tensor = _tensor(model, module_name, param_name)
        if int(keep.max()) >= tensor.shape[dim]:
            raise FormatError(
                f"plan for {module_name}.{param_name} keeps index {int(keep.max())} but dimension {dim} "
                f"has size {tensor.shape[dim]}: the plan belongs to a different model"
            )
        sliced = tensor.index_select(dim, keep.to(tensor.device)).clone()
        if isinstance(tensor, nn.Parameter):
            setattr(module, param_name, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
        elif param_name in module._buffers:
            module._buffers[param_name] = sliced
        else:
            setattr(module, param_name, sliced)
    refresh_attributes(model)
    return model


def refresh_attributes(model: nn.Module) -> None:
    """Make every module's size attributes agree with its tensors (in_features, num_features, groups, ...)."""
    if any(type(m).__module__.startswith("transformers.") for m in model.modules()):
        import prunekit.graph.transformers  # noqa: F401  (registers the transformers refreshers)
    for name, module in model.named_modules():
        for refresher in _REFRESHERS:
            if refresher(name, module, model):
                break


# --- the torch.nn modules --------------------------------------------------------------------------------------


def _refresh_torch(name: str, module: nn.Module, root: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
        return True
    if isinstance(module, nn.modules.conv._ConvNd):
        weight = module.weight
        if module.transposed:  # weight [in, out / groups, ...]
            raise ModelError(f"{name}: transposed convolutions are not supported by physical removal yet")
        out_channels, in_per_group = weight.shape[:2]
        if module.groups > 1 and module.in_channels == module.groups:  # depthwise: one input per group
            module.groups = out_channels // max(1, module.out_channels // module.groups)
        module.out_channels = out_channels
        module.in_channels = in_per_group * module.groups
        return True
    if isinstance(module, nn.modules.batchnorm._NormBase):
        if module.weight is not None:
            module.num_features = module.weight.shape[0]
        elif module.running_mean is not None:
            module.num_features = module.running_mean.shape[0]
        return True
    if isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            module.normalized_shape = tuple(module.weight.shape)
        return True
    if isinstance(module, nn.GroupNorm):
        if module.weight is not None:
            per_group = module.num_channels // module.num_groups  # the tracer removes whole groups only
            module.num_channels = module.weight.shape[0]
            module.num_groups = module.num_channels // per_group
        return True
    if isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape
        return True
    if isinstance(module, nn.MultiheadAttention):
        embed_dim = module.in_proj_weight.shape[1] if module.in_proj_weight is not None else module.q_proj_weight.shape[1]
        internal = module.out_proj.weight.shape[1]
        if internal != embed_dim:
            raise ModelError(f"{name}: nn.MultiheadAttention needs its internal width ({internal}) equal to embed_dim ({embed_dim})")
        module.embed_dim = module.kdim = module.vdim = embed_dim
        module.num_heads = embed_dim // module.head_dim  # the tracer removes whole heads
        module.out_proj.in_features = module.out_proj.out_features = embed_dim
        return True
    return False


register_refresher(_refresh_torch)


# --- plans as data (JSON + safetensors, no pickling) ------------------------------------------------------------


def plan_to_json(plan: Plan) -> list[dict]:
    """A JSON-ready list of {module, param, dim, keep} entries."""
    return [
        {"module": m, "param": p, "dim": d, "keep": keep.tolist()}
        for (m, p, d), keep in sorted(plan.items(), key=lambda item: item[0])
    ]


def plan_from_json(entries: list[dict]) -> Plan:
    """Inverse of `plan_to_json`, validating every field."""
    plan: Plan = {}
    for position, entry in enumerate(entries):
        try:
            key = (str(entry["module"]), str(entry["param"]), int(entry["dim"]))
            keep = torch.tensor([int(i) for i in entry["keep"]], dtype=torch.long)
        except (KeyError, TypeError, ValueError) as error:
            raise FormatError(f"removal plan entry {position} is malformed: {error}") from None
        if len(keep) == 0 or bool((keep[1:] <= keep[:-1]).any()) or int(keep.min()) < 0:
            raise FormatError(f"removal plan entry {position} ({key[0]}.{key[1]}): 'keep' must be increasing non-negative indices")
        plan[key] = keep
    return plan
