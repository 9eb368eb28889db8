"""Which weights to prune: selection by module type and name patterns, with transformers-aware defaults."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from .errors import ArgumentError, ModelError, SelectionError

# A weight's "kind" fixes how it is viewed as an (outputs x inputs) matrix; see layout.py.
LINEAR, CONV, HF_CONV1D, EMBEDDING = "linear", "conv", "hf_conv1d", "embedding"
TYPE_NAMES = ("linear", "conv", "embedding")
DEFAULT_TYPES = ("linear", "conv")


@dataclass
class Target:
    """One weight tensor to prune, with every name under which the model reaches it."""

    name: str  # qualified module name, e.g. "model.layers.0.mlp.up_proj"
    module: nn.Module
    kind: str
    aliases: list[str] = field(default_factory=list)  # other modules sharing this very Parameter
    param_name: str = "weight"

    @property
    def weight(self) -> torch.Tensor:
        """The parameter being pruned."""
        return getattr(self.module, self.param_name)

    @property
    def qualified_param(self) -> str:
        """The state-dict key of the weight."""
        return f"{self.name}.{self.param_name}" if self.name else self.param_name


@dataclass
class Selection:
    """The targets chosen, plus what was left alone and why (for the report)."""

    targets: list[Target]
    skipped: list[tuple[str, str]]  # (module name, reason)
    notes: list[str]


def module_kind(module: nn.Module) -> str | None:
    """The kind of a prunable module, or None if prunekit does not prune its weight."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CONV
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    # transformers' GPT-2 Conv1D is a Linear with a transposed (in, out) weight; matched by name to avoid importing it.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(getattr(module, "weight", None), torch.Tensor):
        return HF_CONV1D
    return None


def _type_of_kind(kind: str) -> str:
    return {LINEAR: "linear", HF_CONV1D: "linear", CONV: "conv", EMBEDDING: "embedding"}[kind]


def _compile(pattern: str, argument: str) -> re.Pattern:
    """Name patterns are shell globs ("*.mlp.*"), or regular expressions when prefixed with "re:"."""
    if not isinstance(pattern, str) or not pattern:
        raise ArgumentError(argument, pattern, "a non-empty glob such as '*.mlp.*' or a regex prefixed with 're:'")
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as exc:
            raise ArgumentError(argument, pattern, f"a valid regular expression ({exc})") from None
    return re.compile(fnmatch.translate(pattern))


def _as_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def transformers_default_ignores(model: nn.Module) -> dict[str, str]:
    """Modules of a transformers model left dense unless asked for: embeddings and the output head."""
    ignores: dict[str, str] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for getter, reason in (("get_input_embeddings", "input embedding"), ("get_output_embeddings", "output head")):
        fn = getattr(model, getter, None)
        if fn is None:
            continue
        try:
            module = fn()
        except (NotImplementedError, AttributeError):
            continue
        if module is not None and id(module) in names:
            ignores[names[id(module)]] = reason
    return ignores


def _is_transformers_model(model: nn.Module) -> bool:
    return any(cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__)


def _check_weight_dtype(name: str, module: nn.Module, weight: torch.Tensor) -> None:
    quantised_names = ("Linear8bitLt", "Linear4bit", "QuantLinear", "QLinear")
    if type(module).__name__ in quantised_names or "quantized" in type(module).__module__:
        raise ModelError(f"module {name!r} ({type(module).__name__}) is quantised; prune the float model, then quantise")
    if not torch.is_floating_point(weight) or weight.dtype in _FLOAT8:
        raise ModelError(
            f"module {name!r} has {weight.dtype} weights; prunekit prunes float16/bfloat16/float32/float64 weights only "
            "(prune before quantising)"
        )


_FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def select(
    model: nn.Module,
    types: Sequence[str] | str = DEFAULT_TYPES,
    include: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
) -> Selection:
    """Choose the weights to prune; every pattern must match something, every chosen weight must be float."""
    types = _as_list(types)
    for t in types:
        if t not in TYPE_NAMES:
            raise ArgumentError("types", t, "a list drawn from " + ", ".join(TYPE_NAMES))
    include_patterns = [(p, _compile(p, "include")) for p in _as_list(include)]
    ignore_patterns = [(p, _compile(p, "ignore")) for p in _as_list(ignore)]
    defaults = transformers_default_ignores(model) if _is_transformers_model(model) else {}

    matched_include: set[str] = set()
    matched_ignore: set[str] = set()
    by_param: dict[int, Target] = {}
    targets: list[Target] = []
    skipped: list[tuple[str, str]] = []
    notes: list[str] = []

    for name, module in model.named_modules():
        kind = module_kind(module)
        if kind is None:
            continue
        named_in = [p for p, rx in include_patterns if rx.fullmatch(name)]
        matched_include.update(named_in)
        if include_patterns and not named_in:
            continue
        ignored_by = [p for p, rx in ignore_patterns if rx.fullmatch(name)]
        matched_ignore.update(ignored_by)
        if ignored_by:
            skipped.append((name, f"ignored by pattern {ignored_by[0]!r}"))
            continue
        if _type_of_kind(kind) not in types:
            if not named_in:
                skipped.append((name, f"type {type(module).__name__} not in types={list(types)}"))
                continue
        if name in defaults and not named_in:
            skipped.append((name, f"{defaults[name]}: left dense by default (name it in include= to prune it)"))
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        _check_weight_dtype(name, module, weight)
        shared = by_param.get(id(weight))
        if shared is not None:
            shared.aliases.append(name)
            notes.append(f"{name}.weight is the same tensor as {shared.name}.weight (tied): pruned once")
            continue
        target = Target(name=name, module=module, kind=kind)
        by_param[id(weight)] = target
        targets.append(target)

    for pattern, _ in include_patterns:
        if pattern not in matched_include:
            raise SelectionError(f"include pattern {pattern!r} matches no prunable module ({_examples(model)})")
    for pattern, _ in ignore_patterns:
        if pattern not in matched_ignore:
            raise SelectionError(f"ignore pattern {pattern!r} matches no prunable module ({_examples(model)})")
    if not targets:
        raise SelectionError(
            f"the selection types={list(types)}, include={_as_list(include)}, ignore={_as_list(ignore)} matches no "
            f"prunable weight ({_examples(model)})"
        )
    _note_tied_outside_selection(model, targets, notes)
    if defaults:
        norms = sum(1 for m in model.modules() if "norm" in type(m).__name__.lower())
        if norms:
            notes.append(f"{norms} normalisation layers left dense: their weights are per-channel scales")
    return Selection(targets=targets, skipped=skipped, notes=notes)


def _note_tied_outside_selection(model: nn.Module, targets: list[Target], notes: list[str]) -> None:
    """A chosen weight shared with a module left out is pruned there too: say so rather than surprise."""
    chosen = {id(t.weight): t for t in targets}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        target = chosen.get(id(weight)) if isinstance(weight, torch.Tensor) else None
        if target is not None and name != target.name and name not in target.aliases:
            target.aliases.append(name)
            notes.append(f"{name}.weight is tied to {target.name}.weight: it is pruned with it")


def _examples(model: nn.Module, limit: int = 4) -> str:
    names = [n for n, m in model.named_modules() if module_kind(m) is not None]
    if not names:
        return "the model has no Linear, Conv or Embedding layers"
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"prunable modules include: {shown}"
