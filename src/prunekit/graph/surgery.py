"""Physical removal: slice tensors, then bring every module's attributes in line with its new shapes.

The removal is recorded as a *plan* (which indices each tensor keeps), so a pruned model can be rebuilt from the
original class plus the plan, without pickling modules: `apply_plan(fresh_model, plan)` then `load_state_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

import torch
from torch import nn

from prunekit.errors import ArgumentError, FormatError, ModelError
from prunekit.graph.groups import ATTRIBUTE

# (module, param, dim) -> sorted LongTensor of the indices kept along dim
Plan = dict[tuple[str, str, int], torch.Tensor]
T = TypeVar("T")

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
        size = _attribute(model, module_name, param_name) if param_name.startswith(ATTRIBUTE) else \
            _tensor(model, module_name, param_name).shape[dim]
        removed = torch.unique(removed.long())
        if len(removed) and (int(removed.min()) < 0 or int(removed.max()) >= size):
            raise ModelError(f"{module_name}.{param_name}: index out of range for dimension {dim} of size {size}")
        keep = torch.ones(size, dtype=torch.bool)
        keep[removed] = False
        if not keep.any():
            raise ModelError(f"{module_name}.{param_name}: removal would leave dimension {dim} empty")
        plan[(module_name, param_name, dim)] = torch.nonzero(keep).flatten()
    return plan


def _attribute(model: nn.Module, module_name: str, param_name: str) -> int:
    """The value of a size attribute named by an ATTRIBUTE plan key."""
    module = model.get_submodule(module_name) if module_name else model
    value = getattr(module, param_name[len(ATTRIBUTE):], None)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ModelError(f"{module_name or type(model).__name__} has no int attribute {param_name[len(ATTRIBUTE):]!r}")
    return value


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
        if param_name.startswith(ATTRIBUTE):  # a size a reshape reads: it becomes the number of kept indices
            if int(keep.max()) >= _attribute(model, module_name, param_name):
                raise FormatError(f"plan for {module_name}.{param_name} keeps index {int(keep.max())} beyond the "
                                  "attribute's value: the plan belongs to a different model")
            setattr(module, param_name[len(ATTRIBUTE):], len(keep))
            continue
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


# --- never a broken model -----------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """What `restore` puts back: every module's attributes, parameters, buffers and children, and every config's fields."""

    modules: list[tuple[nn.Module, dict, dict, dict, dict]]
    configs: list[tuple[Any, dict]]


def _configs(model: nn.Module) -> list[Any]:
    """The config objects the modules hold (transformers: one shared config, its text config), each once."""
    found: dict[int, Any] = {}
    for module in model.modules():
        config = module.__dict__.get("config")
        if config is None or isinstance(config, nn.Module) or not hasattr(config, "__dict__"):
            continue
        found.setdefault(id(config), config)
        text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else None
        if text is not None and hasattr(text, "__dict__"):
            found.setdefault(id(text), text)
    return list(found.values())


def snapshot(model: nn.Module) -> Snapshot:
    """Every module's attributes, parameters, buffers and children by reference, and every config's fields (surgery
    replaces tensors, children and config values, never edits them in place)."""
    modules = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in model.modules()]
    return Snapshot(modules, [(config, dict(config.__dict__)) for config in _configs(model)])


def restore(saved: Snapshot) -> None:
    """Put back exactly what `snapshot` saw: the same tensor objects, children, attribute and config values."""
    for module, attributes, parameters, buffers, children in saved.modules:
        module.__dict__.clear()
        module.__dict__.update(attributes)
        # the containers themselves may have been replaced (ModuleList renumbering) or edited (del, setattr)
        for key, items in (("_parameters", parameters), ("_buffers", buffers), ("_modules", children)):
            container = module.__dict__[key]
            container.clear()
            container.update(items)
    for config, fields in saved.configs:
        config.__dict__.clear()
        config.__dict__.update(fields)


def _as_args(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return type(value)(_shapes(v) for v in value)
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in value.items()}
    return None


@torch.no_grad()
def run_located(model: nn.Module, example_inputs: Any) -> tuple[Any, str | None, BaseException | None]:
    """One eval-mode forward: (output shapes, None, None), or (None, innermost module that raised, the error)."""
    names = {module: name for name, module in model.named_modules()}
    stack: list[str] = []
    failed: list[str] = []

    def enter(module: nn.Module, args: Any) -> None:
        stack.append(names.get(module, "?"))

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if stack:
            stack.pop()

    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave) for m in model.modules()]
    was_training = model.training
    model.eval()  # no BatchNorm statistics updated by the check
    try:
        if isinstance(example_inputs, dict):
            return _shapes(model(**example_inputs)), None, None
        return _shapes(model(*_as_args(example_inputs))), None, None
    except Exception as error:  # any failure of the user's forward is reported, with where it happened
        failed.append(stack[-1] if stack else "")
        return None, failed[0], error
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


BARRIER_HINT = "mark that module as a barrier (barriers=[...], CLI --barrier) or ignore it"


def reference_shapes(model: nn.Module, example_inputs: Any) -> Any:
    """The output shapes of the model before surgery; an ArgumentError naming example_inputs when it cannot run them."""
    shapes, where, error = run_located(model, example_inputs)
    if error is not None:
        raise ArgumentError("example_inputs", type(example_inputs).__name__, f"inputs the model accepts; running it "
                            f"failed in module {where!r}: {type(error).__name__}: {_first_line(error)}")
    return shapes


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else ""


def checked_edit(model: nn.Module, edit: Callable[[], T], example_inputs: Any, expected: Any = None,
                 hint: str = BARRIER_HINT) -> T:
    """Run `edit()` (surgery on `model`), then a forward on `example_inputs`; on any failure of either (or an output
    of another shape than `expected`) the model and its config are restored exactly and a ModelError names the
    module where the forward failed. Returns what `edit` returned."""
    saved = snapshot(model)
    try:
        result = edit()
    except Exception:
        restore(saved)
        raise
    shapes, where, error = run_located(model, example_inputs)
    if error is None and (expected is None or shapes == expected):
        return result
    # named before restoring: a removal that renumbers blocks gives the same name to another module afterwards
    label = f"module {where!r} ({type(model.get_submodule(where)).__name__})" if where else \
        f"{type(model).__name__}.forward"
    restore(saved)
    if error is None:
        raise ModelError(f"the pruned model's output has shape {shapes}, not {expected}; the model was restored "
                         "to its state before pruning")
    raise ModelError(f"the pruned model fails on the example inputs in {label}: {type(error).__name__}: "
                     f"{_first_line(error)}. The model was restored to its state before pruning; {hint}") from None


def apply_checked(model: nn.Module, plan: Plan, example_inputs: Any, expected: Any = None) -> nn.Module:
    """apply_plan, then a forward on `example_inputs`; on any failure (or an output of another shape than `expected`)
    the model is restored exactly and a ModelError names the module where the forward failed."""
    return checked_edit(model, lambda: apply_plan(model, plan), example_inputs, expected)


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
