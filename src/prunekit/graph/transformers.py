"""transformers adapter for structured pruning: read the structure of a transformers model, without tracing.

Decoder LLMs of the Llama family (Llama, Qwen2/3, Mistral, ...: attention with q_proj/k_proj/v_proj/o_proj, MLP with
gate_proj/up_proj/down_proj) and BERT-style encoders (attention.self.query/key/value + attention.output.dense,
intermediate.dense + output.dense) are recognised from their module structure, block by block, so control flow in
their forward passes (caches, masks, rotary embeddings) never gets in the way.

    graph = transformers_graph(model, heads="query", neurons=True)
    removals = merge_removals(group.removed_indices(units) for group, units in chosen)
    apply_plan(model, plan_from_removals(model, removals))   # slices, then the refreshers below fix attributes
    save_pruned_pretrained(model, tokenizer, "out/")          # config rewritten, loads with plain from_pretrained

Depth pruning (ShortGPT): `block_influence` scores every decoder block, `remove_blocks` deletes some.

transformers is imported inside functions, so importing this module works without it.
"""

from __future__ import annotations

import copy
import difflib
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from prunekit.errors import ArgumentError, ModelError
from prunekit.graph.groups import Barrier, DependencyGraph, Group, Member
from prunekit.graph.surgery import (
    Plan,
    apply_plan,
    checked_edit,
    merge_removals,
    plan_from_removals,
    register_refresher,
    run_located,
)

HEAD_MODES = ("query", "kv-group")

# Attributes that hold a block's position in the stack (the KV cache is indexed by them).
_LAYER_INDEX_ATTRIBUTES = ("layer_idx", "layer_index", "layer_id")
# Config fields holding one entry per decoder layer, and fields holding a list of layer indices.
_PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")
_LAYER_INDEX_FIELDS = ("mlp_only_layers",)


# --------------------------------------------------------------------------------------------------------------------
# Reading the structure
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Attention:
    """One attention module: where its projections are and how its heads are laid out."""

    name: str  # the module whose attributes describe the heads (LlamaAttention, BertSelfAttention)
    style: str  # "llama" (q_proj/k_proj/v_proj/o_proj) or "bert" (query/key/value + output.dense)
    q: str
    k: str
    v: str
    o: str
    head_dim: int
    n_q: int
    n_kv: int
    cross: bool = False  # BERT cross-attention: key/value read the encoder's states, not this model's hidden size

    @property
    def n_rep(self) -> int:
        return self.n_q // self.n_kv


@dataclass
class _Mlp:
    """One MLP: the layers producing its neurons (gate, up) and the one consuming them (down)."""

    name: str
    producers: list[str]
    down: str
    width: int


@dataclass
class _Block:
    index: int
    name: str
    attentions: list[_Attention] = field(default_factory=list)
    mlps: list[_Mlp] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)  # modules with per-hidden-channel weight (and bias)
    barriers: list[Barrier] = field(default_factory=list)


@dataclass
class _Layout:
    blocks_name: str
    blocks: list[_Block]
    hidden: int


def _child_linear(module: nn.Module, attribute: str) -> nn.Linear | None:
    child = module._modules.get(attribute)
    return child if isinstance(child, nn.Linear) else None


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _config_head_dim(config: Any, n_q: int, hidden: int) -> int | None:
    value = getattr(config, "head_dim", None) if config is not None else None
    if isinstance(value, int) and value > 0:
        return value
    return hidden // n_q if n_q else None


def _llama_attention(name: str, module: nn.Module, config: Any) -> _Attention | None:
    """q_proj/k_proj/v_proj/o_proj with whole heads, or None."""
    q, k, v, o = (_child_linear(module, f"{p}_proj") for p in "qkvo")
    if q is None or k is None or v is None or o is None:
        return None
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0:
        head_dim = _config_head_dim(config, getattr(config, "num_attention_heads", 0) or 0, q.in_features)
    if not head_dim or q.out_features % head_dim or k.out_features % head_dim or k.out_features != v.out_features:
        return None
    n_q, n_kv = q.out_features // head_dim, k.out_features // head_dim
    if n_kv == 0 or n_q % n_kv or o.in_features != q.out_features:
        return None
    if _cross_head_tensors(module, head_dim):
        return None
    return _Attention(name, "llama", _join(name, "q_proj"), _join(name, "k_proj"), _join(name, "v_proj"),
                      _join(name, "o_proj"), head_dim, n_q, n_kv)


def _cross_head_tensors(module: nn.Module, head_dim: int) -> list[str]:
    """Tensors of an attention module, besides its projections, that are not shared by every head: OLMo-2's q_norm
    over all heads, per-head attention sinks. Head removal would have to change them, so such an attention is left
    alone. Per-head-dim norms (Qwen3's q_norm/k_norm, shape (head_dim,)) are shared by every head and fine."""
    found = []
    for child_name, child in module.named_modules():
        if child_name.split(".")[0] in ("q_proj", "k_proj", "v_proj", "o_proj"):
            continue
        for param_name, tensor in child.named_parameters(recurse=False):
            if tuple(tensor.shape) != (head_dim,):
                found.append(_join(child_name, param_name))
    return found


def _bert_attention(name: str, module: nn.Module) -> _Attention | None:
    """A BertAttention-like module: `self` with query/key/value, `output` with dense; or None."""
    inner, output = module._modules.get("self"), module._modules.get("output")
    if inner is None or output is None:
        return None
    q, k, v = (_child_linear(inner, p) for p in ("query", "key", "value"))
    dense = _child_linear(output, "dense")
    head_dim = getattr(inner, "attention_head_size", None)
    if q is None or k is None or v is None or dense is None or not isinstance(head_dim, int) or head_dim <= 0:
        return None
    if q.out_features % head_dim or k.out_features != q.out_features or v.out_features != q.out_features:
        return None
    if dense.in_features != q.out_features:
        return None
    n = q.out_features // head_dim
    cross = bool(getattr(module, "is_cross_attention", False))
    return _Attention(_join(name, "self"), "bert", _join(name, "self.query"), _join(name, "self.key"),
                      _join(name, "self.value"), _join(name, "output.dense"), head_dim, n, n, cross)


def _mlp(name: str, module: nn.Module) -> _Mlp | None:
    """gate_proj/up_proj/down_proj (gate optional), or BERT's intermediate.dense + output.dense; or None."""
    up, down = _child_linear(module, "up_proj"), _child_linear(module, "down_proj")
    if up is not None and down is not None:
        gate = _child_linear(module, "gate_proj")
        producers = [_join(name, "up_proj")]
        if gate is not None:
            if gate.out_features != up.out_features:
                return None
            producers.insert(0, _join(name, "gate_proj"))
        return _Mlp(name, producers, _join(name, "down_proj"), up.out_features) if down.in_features == up.out_features else None
    intermediate, output = module._modules.get("intermediate"), module._modules.get("output")
    if intermediate is None or output is None:
        return None
    up, down = _child_linear(intermediate, "dense"), _child_linear(output, "dense")
    if up is None or down is None or down.in_features != up.out_features:
        return None
    return _Mlp(_join(name, "intermediate"), [_join(name, "intermediate.dense")], _join(name, "output.dense"), up.out_features)


def _is_norm(module: nn.Module, hidden: int) -> bool:
    """A leaf holding one weight of the hidden size (RMSNorm, LayerNorm), not a Linear or an Embedding."""
    if module._modules or isinstance(module, (nn.Linear, nn.Embedding)):
        return False
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() == 1 and weight.shape[0] == hidden


def _hidden_size(model: nn.Module) -> int:
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embedding, nn.Embedding):
        raise ModelError(f"{type(model).__name__}: no nn.Embedding input embedding (get_input_embeddings()); "
                         "the transformers adapter reads the hidden size from it")
    return embedding.embedding_dim


def _layout(model: nn.Module) -> _Layout:
    """Find the blocks, and in each its attention modules, MLPs, norms, and whatever it does not understand."""
    from prunekit.hf import find_decoder_blocks

    if not isinstance(model, nn.Module):
        raise ArgumentError("model", type(model).__name__, "a transformers model (torch.nn.Module)")
    config = _text_config(model)
    hidden = _hidden_size(model)
    blocks_name, block_list = find_decoder_blocks(model)
    blocks = []
    for index, block_module in enumerate(block_list):
        block = _Block(index, _join(blocks_name, str(index)))
        covered: set[str] = set()
        head_norm_scope: list[str] = []
        for relative, module in block_module.named_modules():
            name = _join(block.name, relative)
            if any(name == c or name.startswith(c + ".") for c in covered):
                continue
            attention = _llama_attention(name, module, config) or _bert_attention(name, module)
            if attention is not None:
                block.attentions.append(attention)
                covered.update({attention.q, attention.k, attention.v, attention.o})
                if attention.style == "llama":
                    head_norm_scope.append(name)  # q_norm/k_norm (Qwen3) act on head_dim, never on the hidden size
                continue
            if all(_child_linear(module, f"{p}_proj") is not None for p in "qkvo"):
                spanning = _cross_head_tensors(module, getattr(module, "head_dim", 0) or 0)
                detail = f" ({', '.join(spanning)}: not shared by all heads)" if spanning else ""
                block.barriers.append(Barrier(name, "attention whose heads cannot be removed one by one" + detail))
                covered.add(name)
                continue
            mlp = _mlp(name, module)
            if mlp is not None:
                block.mlps.append(mlp)
                covered.update(mlp.producers + [mlp.down])
        for relative, module in block_module.named_modules():
            name = _join(block.name, relative)
            if not any(p is not None for p in module._parameters.values()):
                continue
            if any(name == c or name.startswith(c + ".") for c in covered):
                continue
            inside_attention = any(name.startswith(scope + ".") for scope in head_norm_scope)
            if _is_norm(module, hidden) and not inside_attention:
                block.norms.append(name)
            elif not inside_attention or isinstance(module, nn.Linear):
                block.barriers.append(Barrier(name, f"{type(module).__name__} is not a recognised attention "
                                                    "projection, MLP projection or norm; left as it is"))
        blocks.append(block)
    return _Layout(blocks_name, blocks, hidden)


def _rows(start: int, stop: int) -> torch.Tensor:
    return torch.arange(start, stop, dtype=torch.long)


def _member(model: nn.Module, module: str, param: str, dim: int, unit: torch.Tensor, role: str) -> Member | None:
    """A member slicing `module.param` along `dim`, every index belonging to `unit[index]`; None without the tensor."""
    tensor = getattr(model.get_submodule(module), param, None)
    if not isinstance(tensor, torch.Tensor):
        return None
    if tensor.shape[dim] != len(unit):
        raise ModelError(f"{module}.{param}: dimension {dim} has size {tensor.shape[dim]}, expected {len(unit)}")
    return Member(module, param, dim, _rows(0, len(unit)), unit.long(), role)


def _members(model: nn.Module, specs: Iterable[tuple[str, str, int, torch.Tensor, str]]) -> list[Member]:
    return [m for m in (_member(model, *spec) for spec in specs) if m is not None]


def _head_group(model: nn.Module, attention: _Attention, mode: str) -> Group:
    """The heads of one attention module as a group, per `mode` (see transformers_graph)."""
    d, n_q, n_kv, n_rep = attention.head_dim, attention.n_q, attention.n_kv, attention.n_rep
    query_head = _rows(0, n_q * d) // d  # the query head of every q row / o column
    kv_head = _rows(0, n_kv * d) // d
    if n_rep == 1:  # one key/value head per query head: a unit is one head
        q_unit, kv_unit, size, kind = query_head, kv_head, n_q, "head"
        name = f"{attention.name}: {n_q} heads"
    elif mode == "query":
        # Unit j is query-head slot j of every KV group, so every group keeps the same number of query heads.
        q_unit, kv_unit, size, kind = query_head % n_rep, None, n_rep, "head"
        name = f"{attention.name}: {n_q} query heads ({n_rep} per KV group)"
    else:
        q_unit, kv_unit, size, kind = query_head // n_rep, kv_head, n_kv, "kv-group"
        name = f"{attention.name}: {n_kv} KV groups ({n_rep} query heads each)"
    specs = [(attention.q, "weight", 0, q_unit, "out"), (attention.q, "bias", 0, q_unit, "out"),
             (attention.o, "weight", 1, q_unit, "in")]
    if kv_unit is not None:
        for projection in (attention.k, attention.v):
            specs += [(projection, "weight", 0, kv_unit, "out"), (projection, "bias", 0, kv_unit, "out")]
    return Group(name=name, kind=kind, size=size, members=_members(model, specs), min_keep=1)


def _neuron_group(model: nn.Module, mlp: _Mlp) -> Group:
    unit = _rows(0, mlp.width)
    specs = [(producer, param, 0, unit, "out") for producer in mlp.producers for param in ("weight", "bias")]
    specs.append((mlp.down, "weight", 1, unit, "in"))
    return Group(name=f"{mlp.name}: {mlp.width} neurons", kind="neuron", size=mlp.width,
                 members=_members(model, specs), min_keep=1)


def _outside_blocks(model: nn.Module, layout: _Layout) -> Iterable[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if name == layout.blocks_name or name.startswith(layout.blocks_name + "."):
            continue
        yield name, module


def _hidden_group(model: nn.Module, layout: _Layout) -> Group:
    """Every tensor slice that belongs to one channel of the residual stream, across the whole model."""
    hidden = layout.hidden
    unit = _rows(0, hidden)
    specs: list[tuple[str, str, int, torch.Tensor, str]] = []
    problems: list[str] = []
    for block in layout.blocks:
        problems += [f"{b.where} ({b.reason})" for b in block.barriers]
        for attention in block.attentions:
            if attention.cross:
                problems.append(f"{attention.name} (cross-attention: its key/value read another model's hidden size)")
                continue
            specs += [(p, "weight", 1, unit, "in") for p in (attention.q, attention.k, attention.v)]
            specs += [(attention.o, "weight", 0, unit, "out"), (attention.o, "bias", 0, unit, "out")]
        for mlp in block.mlps:
            specs += [(p, "weight", 1, unit, "in") for p in mlp.producers]
            specs += [(mlp.down, "weight", 0, unit, "out"), (mlp.down, "bias", 0, unit, "out")]
        for norm in block.norms:
            specs += [(norm, "weight", 0, unit, "norm"), (norm, "bias", 0, unit, "norm")]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding_weights = {id(m.weight) for _, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for name, module in _outside_blocks(model, layout):
        if not any(p is not None for p in module._parameters.values()):
            continue
        if isinstance(module, nn.Embedding) and module.embedding_dim == hidden:
            if hasattr(module, "embed_scale"):  # Gemma: sqrt(hidden_size), fixed when the model is built
                problems.append(f"{name} (scales embeddings by a constant computed from hidden_size at construction)")
            specs.append((name, "weight", 1, unit, "norm"))
        elif _is_norm(module, hidden):
            specs += [(name, "weight", 0, unit, "norm"), (name, "bias", 0, unit, "norm")]
        elif module is output and isinstance(module, nn.Linear) and module.in_features == hidden:
            if id(module.weight) not in embedding_weights:  # tied: the embedding's member already slices it
                specs.append((name, "weight", 1, unit, "in"))
        elif (isinstance(module, nn.Linear) and name.split(".")[-2:] == ["pooler", "dense"]
              and tuple(module.weight.shape) == (hidden, hidden)):
            specs += [(name, "weight", 1, unit, "in"), (name, "weight", 0, unit, "out"), (name, "bias", 0, unit, "out")]
        elif any(dim == hidden for p in module._parameters.values() if p is not None for dim in p.shape):
            shapes = [tuple(p.shape) for p in module._parameters.values() if p is not None]
            problems.append(f"{name} ({type(module).__name__} {shapes})")
    if problems:
        raise ModelError(
            f"hidden=True: {type(model).__name__} has modules that use the hidden size ({hidden}) in ways the "
            f"transformers adapter does not know: {'; '.join(problems[:8])}{' ...' if len(problems) > 8 else ''}. "
            "Prune heads and neurons only (hidden=False), or use the torch.fx tracer for this model"
        )
    blocks = len(layout.blocks)
    return Group(name=f"hidden size ({hidden} channels, shared by the embeddings and all {blocks} blocks)", kind="hidden",
                 size=hidden, members=_members(model, specs), min_keep=1,
                 notes=["norm statistics are taken over the kept channels, so even zero channels change outputs slightly"])


def transformers_graph(
    model: nn.Module, *, heads: str | None = "query", neurons: bool = True, hidden: bool = False
) -> DependencyGraph:
    """The prunable groups of a transformers Llama-family decoder or BERT-style encoder, read from its modules.

    heads: "query" prunes query heads; with grouped-query attention a unit is one query-head slot of every KV group,
        so all groups keep the same number of query heads. "kv-group" removes whole KV groups (the key/value head
        with its query heads). Without GQA both give one unit per head. None: no head groups.
    neurons: one group per MLP (gate/up rows, down columns).
    hidden: one group for the residual stream's width (embeddings, every norm, every projection reading or writing it).
    head_dim is always kept.
    """
    if heads is not None and heads not in HEAD_MODES:
        close = difflib.get_close_matches(str(heads), HEAD_MODES, n=1)
        raise ArgumentError("heads", heads, "'query', 'kv-group', or None for no head groups",
                            f"Did you mean {close[0]!r}?" if close else "")
    for argument, value in (("neurons", neurons), ("hidden", hidden)):
        if not isinstance(value, bool):
            raise ArgumentError(argument, value, "True or False")
    layout = _layout(model)
    if not any(block.attentions or block.mlps for block in layout.blocks):
        left = [f"{b.where}: {b.reason}" for block in layout.blocks for b in block.barriers]
        raise ModelError(
            f"{type(model).__name__}: no prunable attention module (q_proj/k_proj/v_proj/o_proj, or BERT's "
            "query/key/value + output.dense) and no MLP (gate_proj/up_proj/down_proj, or intermediate.dense + "
            f"output.dense) in its blocks {layout.blocks_name!r}"
            + (f" (not understood: {'; '.join(left[:3])}{' ...' if len(left) > 3 else ''})" if left else "")
            + "; the transformers adapter covers Llama-family decoders and BERT-style encoders, use the torch.fx "
            "tracer for other models"
        )
    groups: list[Group] = []
    barriers: list[Barrier] = []
    for block in layout.blocks:
        barriers += block.barriers
        if heads is not None:
            groups += [_head_group(model, attention, heads) for attention in block.attentions]
        if neurons:
            groups += [_neuron_group(model, mlp) for mlp in block.mlps]
    if hidden:
        groups.append(_hidden_group(model, layout))
    return DependencyGraph(groups=groups, barriers=barriers)


CHECK_HINT = "the model's forward reads a size, index or module that the removal changed"


def check_ids(model: nn.Module) -> torch.Tensor:
    """The inputs a transformers model is checked on after surgery: a few token ids (as prune_structured's default),
    on the model's device."""
    from prunekit.graph.prune import _check_inputs

    parameter = next(model.parameters(), None)
    ids = _check_inputs(model, None)
    return ids.to(parameter.device) if parameter is not None else ids


def checked(model: nn.Module, edit: Callable[[], Any], same_shapes: bool = True) -> Any:
    """surgery.checked_edit on a few token ids: the edit's result, or the model restored exactly and a ModelError
    naming the module that failed. With `same_shapes`, the outputs must keep the shapes they had before the edit
    (when the model ran before it: a config fixed by the edit itself, such as a removed block's layer type, is fine)."""
    ids = check_ids(model)
    expected, _, error = run_located(model, ids) if same_shapes else (None, None, None)
    return checked_edit(model, edit, ids, expected if error is None else None, CHECK_HINT)


def _slices_hidden(model: nn.Module, plan: Plan) -> bool:
    """Whether the plan narrows the input embeddings (the hidden size), which changes an encoder's output shape."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    names = [name for name, module in model.named_modules() if module is embedding]
    return any(module in names and param == "weight" and dim == 1 for module, param, dim in plan)


def apply_plan_checked(model: nn.Module, plan: Plan) -> nn.Module:
    """apply_plan (a plan replay) on a transformers model, then a forward on a few token ids; on failure the model is
    restored exactly and a ModelError names the module that failed."""
    return checked(model, lambda: apply_plan(model, plan), same_shapes=not _slices_hidden(model, plan))


def remove_units(model: nn.Module, selections: Iterable[tuple[Group, Any]]) -> Plan:
    """Physically remove, for every (group, units) pair, those units; returns the plan applied (see surgery).

    The pruned model runs on a few token ids before this returns; on failure (or a changed output shape) it is
    restored exactly and a ModelError names the module that failed."""
    parts = []
    for group, units in selections:
        units = torch.as_tensor(units, dtype=torch.long).reshape(-1)
        if len(units) and (int(units.min()) < 0 or int(units.max()) >= group.size):
            raise ArgumentError("units", units.tolist(), f"unit numbers from 0 to {group.size - 1} for group {group.name!r}")
        if group.size - len(torch.unique(units)) < group.min_keep:
            raise ArgumentError("units", units.tolist(),
                                f"at most {group.size - group.min_keep} of the {group.size} units of {group.name!r}")
        parts.append(group.removed_indices(units))
    plan = plan_from_removals(model, merge_removals(parts))
    apply_plan_checked(model, plan)
    return plan


# --------------------------------------------------------------------------------------------------------------------
# Refreshers: module attributes from the sliced tensors
# --------------------------------------------------------------------------------------------------------------------


def _set_if_present(module: nn.Module, values: Mapping[str, int]) -> None:
    for attribute, value in values.items():
        if isinstance(getattr(module, attribute, None), int) and not isinstance(getattr(module, attribute), bool):
            setattr(module, attribute, value)


def _is_transformers(module: nn.Module) -> bool:
    """Classes of transformers (and of its trust_remote_code modules); other models are the tracer's to refresh."""
    return type(module).__module__.startswith("transformers")


def _refresh_attention(name: str, module: nn.Module, root: nn.Module) -> bool:
    if not _is_transformers(module):
        return False
    q, k, o = (_child_linear(module, f"{p}_proj") for p in "qko")
    if q is not None and k is not None and o is not None and _child_linear(module, "v_proj") is not None:
        head_dim = getattr(module, "head_dim", None)
        if not isinstance(head_dim, int) or head_dim <= 0:
            return False
        n_q, n_kv = q.weight.shape[0] // head_dim, k.weight.shape[0] // head_dim
        if q.weight.shape[0] % head_dim or k.weight.shape[0] % head_dim or n_kv == 0 or n_q % n_kv:
            raise ModelError(f"{name}: after removal q_proj has {q.weight.shape[0]} rows and k_proj {k.weight.shape[0]} "
                             f"for head_dim {head_dim}; every KV group needs the same whole number of query heads")
        # forward() reads num_key_value_groups (repeat_kv, sdpa's GQA path); the others exist in some families.
        _set_if_present(module, {"num_key_value_groups": n_q // n_kv, "num_heads": n_q, "num_attention_heads": n_q,
                                 "num_key_value_heads": n_kv, "hidden_size": q.weight.shape[1]})
        return True
    query = _child_linear(module, "query")
    if query is not None and _child_linear(module, "key") is not None and _child_linear(module, "value") is not None:
        head_size = getattr(module, "attention_head_size", None)
        if not isinstance(head_size, int) or head_size <= 0:
            return False
        rows = query.weight.shape[0]
        if rows % head_size:
            raise ModelError(f"{name}: query has {rows} rows, not a multiple of the head size {head_size}")
        module.num_attention_heads = rows // head_size
        module.all_head_size = rows
        return True
    return False


def _refresh_mlp(name: str, module: nn.Module, root: nn.Module) -> bool:
    if not _is_transformers(module):
        return False
    up, down = _child_linear(module, "up_proj"), _child_linear(module, "down_proj")
    if up is None or down is None:
        return False
    _set_if_present(module, {"intermediate_size": up.weight.shape[0], "hidden_size": up.weight.shape[1]})
    return True


def _refresh_block(name: str, module: nn.Module, root: nn.Module) -> bool:
    """Decoder layers keep `hidden_size` (unused by forward in Llama/Qwen2, kept true for readers)."""
    attention = module._modules.get("self_attn")
    if not _is_transformers(module) or not isinstance(getattr(module, "hidden_size", None), int) or attention is None:
        return False
    o = _child_linear(attention, "o_proj")
    if o is None:
        return False
    module.hidden_size = o.weight.shape[0]
    return True


def _retie(name: str, module: nn.Module, root: nn.Module) -> bool:
    """Slicing replaces a tied embedding's Parameter; tie the output head to the new one again."""
    if name or module is not root or not _is_transformers(module):
        return False
    inputs = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    outputs = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    config = _text_config(module)
    # Only a head left with the embedding's old width is stale; one sliced along with it was untied on purpose.
    if (isinstance(inputs, nn.Embedding) and isinstance(outputs, nn.Linear) and getattr(config, "tie_word_embeddings", False)
            and outputs.weight is not inputs.weight and outputs.weight.shape[0] == inputs.weight.shape[0]
            and outputs.weight.shape[1] != inputs.weight.shape[1]):
        outputs.weight = inputs.weight
        outputs.out_features, outputs.in_features = outputs.weight.shape
    return False  # the root itself may still be someone else's to refresh


register_refresher(_retie)
register_refresher(_refresh_attention)
register_refresher(_refresh_mlp)
register_refresher(_refresh_block)


# --------------------------------------------------------------------------------------------------------------------
# Config and saving
# --------------------------------------------------------------------------------------------------------------------


def _uniform(per_layer: list[int], field_name: str, what: str, problems: list[str]) -> int | None:
    """The one value of a per-layer list, or None (a problem is recorded when the layers disagree)."""
    values = sorted(set(per_layer))
    if len(values) > 1:
        problems.append(f"{what} differ between layers ({field_name} per layer: {per_layer})")
    return values[0] if values else None


def _wanted_config(model: nn.Module, layout: _Layout, config: Any) -> dict[str, int]:
    """The config values the current module shapes call for."""
    attentions = [a for block in layout.blocks for a in block.attentions if not a.cross]
    mlps = [m for block in layout.blocks for m in block.mlps]
    hidden = layout.hidden
    wanted: dict[str, int] = {"hidden_size": hidden, "num_hidden_layers": len(layout.blocks)}
    problems: list[str] = []
    n_q = _uniform([a.n_q for a in attentions], "num_attention_heads", "attention head counts", problems)
    has_kv_field = hasattr(config, "num_key_value_heads")
    n_kv = (_uniform([a.n_kv for a in attentions], "num_key_value_heads", "key/value head counts", problems)
            if has_kv_field else None)
    head_dim = _uniform([a.head_dim for a in attentions], "head_dim", "head sizes", problems)
    intermediate = _uniform([m.width for m in mlps], "intermediate_size", "MLP widths", problems)
    if problems:
        raise ModelError(
            f"{type(model).__name__}: {'; '.join(problems)}. {type(config).__name__} holds one value of each for "
            "every layer, so a transformers folder needs uniform widths. Prune with a uniform budget (the same number "
            "of units removed in every layer), or save with prunekit's plan-based save, which records per-layer widths"
        )
    if n_q is not None:
        wanted["num_attention_heads"] = n_q
        if has_kv_field:
            wanted["num_key_value_heads"] = n_kv
        if any(a.style == "bert" for a in attentions):
            if n_q * head_dim != hidden:
                raise ModelError(
                    f"{type(model).__name__}: {n_q} heads of size {head_dim} make {n_q * head_dim} attention channels but "
                    f"the hidden size is {hidden}; {type(config).__name__} derives the head size as hidden_size / "
                    "num_attention_heads and builds attention.output.dense as hidden_size x hidden_size, so a "
                    "transformers folder needs num_attention_heads * head size == hidden_size. Prune heads and the "
                    "hidden size together so that they match, prune MLP neurons only, or save with prunekit's plan-based save"
                )
        elif getattr(config, "head_dim", None) is not None or hidden % n_q or hidden // n_q != head_dim:
            wanted["head_dim"] = head_dim
    if intermediate is not None:
        wanted["intermediate_size"] = intermediate
    return wanted


def _check_rebuild(model: nn.Module, candidate: Any) -> None:
    """Build the model class from `candidate` on the meta device and compare every tensor's shape with `model`'s."""
    validate = getattr(candidate, "validate", None)
    if callable(validate):
        try:
            validate()
        except Exception as error:  # the config class's own rules (e.g. hidden_size % num_attention_heads)
            raise ModelError(
                f"the pruned widths break a rule of {type(candidate).__name__}, so from_pretrained would refuse the "
                f"folder: {str(error).strip()}. Choose widths that satisfy it (a uniform budget that keeps a divisor of "
                "the hidden size as the head count), or save with prunekit's plan-based save"
            ) from None
    try:
        with torch.device("meta"):
            fresh = type(model)(candidate)
    except Exception as error:
        raise ModelError(f"{type(model).__name__} cannot be built from the updated config ({type(error).__name__}: {error}); "
                         "save with prunekit's plan-based save instead") from None
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    theirs = {key: tuple(value.shape) for key, value in fresh.state_dict().items()}
    wrong = [f"{key}: pruned {ours[key]}, config builds {theirs[key]}"
             for key in ours if key in theirs and ours[key] != theirs[key]]
    if wrong:
        raise ModelError(f"{type(model).__name__}: the updated config does not describe the pruned tensors "
                         f"({'; '.join(wrong[:5])}); save with prunekit's plan-based save instead")


def update_config(model: nn.Module) -> list[str]:
    """Rewrite the model's config from its module shapes; returns one note per changed field.

    Raises ModelError, leaving the config as it was, when the shapes cannot be written as one config: layers of
    different widths, or widths the config class refuses or would build differently.
    """
    config = _text_config(model)
    if config is None:
        raise ArgumentError("model", type(model).__name__, "a transformers model with a config")
    layout = _layout(model)
    wanted = _wanted_config(model, layout, config)
    changed = {key: value for key, value in wanted.items() if getattr(config, key, None) != value}
    if not changed:
        return []
    root_config = model.config
    candidate_root = copy.deepcopy(root_config)
    candidate = candidate_root.get_text_config() if hasattr(candidate_root, "get_text_config") else candidate_root
    for key, value in changed.items():
        setattr(candidate, key, value)
    _check_rebuild(model, candidate_root)
    notes = []
    for key, value in changed.items():
        before = getattr(config, key, None)
        setattr(config, key, value)
        notes.append(f"{key}: {before} -> {value}" if before is not None else f"{key}: set to {value} (explicit now)")
    return notes


def save_pruned_pretrained(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    report: Any = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """update_config, then prunekit.export.save_pretrained: a folder plain `from_pretrained` loads, with prunekit.json."""
    from prunekit.export import save_pretrained

    notes = update_config(model)
    extra = {**dict(extra or {}), "structured": {"config_changes": notes}}
    return save_pretrained(model, out_dir, tokenizer=tokenizer, report=report, extra=extra, overwrite=overwrite)


# --------------------------------------------------------------------------------------------------------------------
# Depth: block influence (ShortGPT) and block removal
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def block_influence(model: nn.Module, samples: Sequence[torch.Tensor]) -> list[float]:
    """ShortGPT's Block Influence per decoder block: 1 - mean over tokens of cos(block input, block output).

    `samples` are calibration token id tensors, (n,) or (1, n). Low values mark blocks that change little.
    """
    from prunekit.calibration import call_block, capture_block_inputs, check_samples
    from prunekit.hf import find_decoder_blocks

    samples = check_samples(model, samples)
    _, blocks = find_decoder_blocks(model)
    was_training = model.training
    model.eval()
    try:
        captured = capture_block_inputs(model, samples, blocks)
        hidden = captured.hidden
        totals = [0.0] * len(blocks)
        tokens = 0
        for sample in range(len(hidden)):
            tokens += hidden[sample].shape[:-1].numel()
        for index, block in enumerate(blocks):
            for sample in range(len(hidden)):
                output = call_block(block, hidden[sample], captured.calls[sample][index])
                cosine = torch.nn.functional.cosine_similarity(hidden[sample].float(), output.float(), dim=-1)
                totals[index] += float(cosine.sum())
                hidden[sample] = output
    finally:
        model.train(was_training)
    return [1.0 - total / tokens for total in totals]


def _check_indices(indices: Any, count: int) -> list[int]:
    allowed = f"distinct block numbers from 0 to {count - 1}, fewer than all {count} blocks"
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        raise ArgumentError("indices", indices, allowed)
    indices = list(indices)
    for value in indices:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) < count:
            raise ArgumentError("indices", indices, allowed)
    chosen = sorted({int(v) for v in indices})
    if len(chosen) != len(indices) or len(chosen) >= count:
        raise ArgumentError("indices", indices, allowed)
    return chosen


def remove_blocks(model: nn.Module, indices: Iterable[int]) -> list[str]:
    """Delete decoder blocks `indices`: renumber the layer indices the KV cache uses, update num_hidden_layers and
    the per-layer config lists (layer_types, ...). Returns notes of what changed.

    The model runs on a few token ids before this returns; on failure (or a changed output shape) the blocks, their
    indices and the config are restored exactly and a ModelError names the module that failed."""
    from prunekit.hf import find_decoder_blocks

    _, blocks = find_decoder_blocks(model)
    removed = _check_indices(indices, len(blocks))
    return checked(model, lambda: _remove_blocks(model, removed))


def _remove_blocks(model: nn.Module, removed: list[int]) -> list[str]:
    from prunekit.hf import find_decoder_blocks

    blocks_name, blocks = find_decoder_blocks(model)
    count = len(blocks)
    kept = [i for i in range(count) if i not in removed]
    config = _text_config(model)
    if config is not None and getattr(config, "is_heterogeneous", False):
        raise ModelError(f"{type(model).__name__}: its config has per-layer overrides (per_layer_config); removing "
                         "blocks from such a config is not supported")
    # Check the config first, so that nothing changes when it cannot be followed.
    per_layer: dict[str, list] = {}
    if config is not None:
        for key in _PER_LAYER_FIELDS:
            value = getattr(config, key, None)
            if value is None:
                continue
            if not isinstance(value, (list, tuple)) or len(value) != count:
                raise ModelError(f"config.{key} has {len(value) if isinstance(value, (list, tuple)) else value!r} entries "
                                 f"for {count} blocks; cannot tell which entries belong to the removed blocks")
            per_layer[key] = [value[i] for i in kept]
    new_index = {old: new for new, old in enumerate(kept)}
    notes = [f"removed blocks {removed} of {blocks_name} ({count} -> {len(kept)})"]
    for old in reversed(removed):
        del blocks[old]
    for new, block in enumerate(blocks):
        old = kept[new]
        for module in block.modules():
            for attribute in _LAYER_INDEX_ATTRIBUTES:
                value = getattr(module, attribute, None)
                if isinstance(value, int) and not isinstance(value, bool) and value == old:
                    setattr(module, attribute, new)
    if config is not None:
        if hasattr(config, "num_hidden_layers"):
            config.num_hidden_layers = len(kept)
            notes.append(f"num_hidden_layers: {count} -> {len(kept)}")
        for key, value in per_layer.items():
            setattr(config, key, value)
            notes.append(f"{key}: kept the entries of blocks {kept}")
        for key in _LAYER_INDEX_FIELDS:
            value = getattr(config, key, None)
            if isinstance(value, (list, tuple)) and value:
                setattr(config, key, [new_index[i] for i in value if i in new_index])
                notes.append(f"{key}: renumbered")
    return notes
