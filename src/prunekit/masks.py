"""The mask engine: attach masks to weights, keep masked weights at zero through training, bake or remove them.

A mask is stored as a non-persistent boolean buffer ``<param>_mask`` beside the weight, so the state dict keeps the
plain layout any loader expects. Masked entries are zeroed in place (forward needs no extra work), their gradients
are zeroed by a tensor hook, and a global optimizer post-step hook re-zeroes them after every step of every torch
optimizer, so momentum or weight decay state from before pruning cannot revive them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .errors import ArgumentError, ModelError

_MASK_SUFFIX = "_mask"


@dataclass
class _MaskState:
    mask: torch.Tensor  # bool, True = kept
    grad_hook: object
    load_hook: object
    module: weakref.ReferenceType
    param_name: str
    original: torch.Tensor | None  # values of the pruned entries, when kept for restore


class _ParamTable:
    """Parameter -> mask state, keyed by identity and held weakly (a deleted model frees its masks).

    weakref.WeakKeyDictionary cannot be used: on a hash collision it compares tensors with ==, which is elementwise.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ReferenceType, _MaskState]] = {}

    def get(self, param: object) -> _MaskState | None:
        entry = self._entries.get(id(param))
        return entry[1] if entry is not None and entry[0]() is param else None

    def __setitem__(self, param: torch.Tensor, state: _MaskState) -> None:
        key = id(param)
        self._entries[key] = (weakref.ref(param, lambda _, k=key: self._entries.pop(k, None)), state)

    def __getitem__(self, param: torch.Tensor) -> _MaskState:
        state = self.get(param)
        if state is None:
            raise KeyError("parameter has no mask")
        return state

    def pop(self, param: object, default: _MaskState | None = None) -> _MaskState | None:
        state = self.get(param)
        if state is None:
            return default
        del self._entries[id(param)]
        return state

    def __bool__(self) -> bool:
        return bool(self._entries)


_MASKED = _ParamTable()


@torch.no_grad()
def _rezero_after_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    if not _MASKED:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = _MASKED.get(param)
            if state is not None:
                param.masked_fill_(~state.mask, 0)


register_optimizer_step_post_hook(_rezero_after_step)


def attach(module: nn.Module, mask: torch.Tensor, param_name: str = "weight", keep_original: bool = False) -> None:
    """Mask one weight of `module` (True = kept); replaces any mask already there (the new one is final)."""
    param = getattr(module, param_name)
    if not isinstance(param, nn.Parameter):
        raise ModelError(f"{type(module).__name__}.{param_name} is not a Parameter; cannot attach a mask")
    if mask.shape != param.shape or mask.dtype != torch.bool:
        raise ArgumentError("mask", f"{tuple(mask.shape)} {mask.dtype}", f"a bool tensor of shape {tuple(param.shape)}")
    mask = mask.to(param.device)
    previous = _MASKED.get(param)
    original = None
    if keep_original:
        original = param.detach()[~mask].clone()
        if previous is not None and previous.original is not None:
            raise ArgumentError("keep_original", True, "False when a mask is already attached (the originals are gone)")
    if previous is not None:
        detach(module, param_name)
    with torch.no_grad():
        param.masked_fill_(~mask, 0)
    module.register_buffer(param_name + _MASK_SUFFIX, mask, persistent=False)
    grad_hook = param.register_hook(lambda grad, m=mask: grad.masked_fill(~m, 0))
    load_hook = module.register_load_state_dict_post_hook(_reapply_after_load)
    _MASKED[param] = _MaskState(mask, grad_hook, load_hook, weakref.ref(module), param_name, original)


def _reapply_after_load(module: nn.Module, incompatible_keys: object) -> None:
    for name, param in module.named_parameters(recurse=False):
        state = _MASKED.get(param)
        if state is not None:
            with torch.no_grad():
                param.masked_fill_(~state.mask, 0)


def detach(module: nn.Module, param_name: str = "weight", restore: bool = False) -> None:
    """Remove the mask from one weight; zeros stay unless `restore` puts the pruned values back."""
    param = getattr(module, param_name)
    state = _MASKED.pop(param, None)
    if state is None:
        return
    if restore:
        if state.original is None:
            _MASKED[param] = state
            raise ArgumentError("restore", True, "False unless the mask was attached with keep_original=True")
        with torch.no_grad():
            param[~state.mask] = state.original.to(param.dtype)
    state.grad_hook.remove()
    state.load_hook.remove()
    delattr(module, param_name + _MASK_SUFFIX)


def get_mask(module: nn.Module, param_name: str = "weight") -> torch.Tensor | None:
    """The mask attached to a weight (True = kept), or None."""
    state = _MASKED.get(getattr(module, param_name, None))
    return None if state is None else state.mask


def masked_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """(module name, module, parameter name, mask) for every masked weight in the model, each tensor once."""
    seen: set[int] = set()
    for name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            state = _MASKED.get(param)
            if state is not None and id(param) not in seen:
                seen.add(id(param))
                # A tied weight is reported on the module that holds its mask buffer.
                owner = state.module()
                if owner is not None and owner is not module:
                    name = next((n for n, m in model.named_modules() if m is owner), name)
                    module = owner
                yield name, module, param_name, state.mask


def has_masks(model: nn.Module) -> bool:
    """Whether any weight of the model carries a mask."""
    return next(masked_modules(model), None) is not None


@torch.no_grad()
def apply(model: nn.Module) -> None:
    """Re-zero every masked weight (after weights were changed by hand)."""
    for _, module, param_name, mask in masked_modules(model):
        getattr(module, param_name).masked_fill_(~mask, 0)


def bake(model: nn.Module) -> int:
    """Make masks permanent: weights keep their zeros, masks and hooks go. Returns how many were baked."""
    entries = list(masked_modules(model))
    apply(model)
    for _, module, param_name, _ in entries:
        detach(module, param_name)
    return len(entries)


def remove(model: nn.Module, restore: bool = False) -> int:
    """Remove every mask; with `restore`, put back the pruned values (needs keep_original=True at attach)."""
    entries = list(masked_modules(model))
    if restore:
        missing = [n for n, m, p, _ in entries if _MASKED[getattr(m, p)].original is None]
        if missing:
            raise ArgumentError("restore", True, f"False: {missing[0]!r} was masked without keep_original=True")
    for _, module, param_name, _ in entries:
        detach(module, param_name, restore=restore)
    return len(entries)
