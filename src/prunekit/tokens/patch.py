"""Patch a ViT-style or BERT-style encoder so that its layers merge (ToMe) or prune (Zero-TPrune) tokens.

Each transformer layer's forward is replaced by one that runs the same weights: attention (with the token sizes
as a log(size) bias for ToMe's proportional attention, and padding as size 0), then the token reduction, then the
MLP. The layers share a small state for one forward pass (token sizes, where each input token went). `unpatch`
puts the original forward methods back; nothing else about the model changes. The patched layers are meant for
inference: attention dropout is not applied.

Supported: prunekit.nets.ViT, transformers BertModel and ViTModel, and models built on them (a `bert` / `vit`
base model). BERT outputs keep their length by default: every input position reads the merged token it went into,
so mean pooling with the attention mask equals the size-weighted mean that ToMe pools with. A pruned position
reads zeros, and `TokenPatch.kept` marks the positions whose token survived the last forward (pool with
attention_mask * kept to average over the survivors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ArgumentError, ModelError, unknown_choice
from .merge import apply_reduction, compose_source
from .tome import bipartite_soft_matching, check_merges, max_merges
from .zero_tprune import check_prunes, check_share, layer_iterations, max_prunes, zero_tprune_select

METHODS = ("tome", "zero-tprune")
PATCH_ATTRIBUTE = "_prunekit_token_patch"


# ------------------------------------------------------------------------------------------------ layer adapters


@dataclass
class Attended:
    """What a layer's attention half hands to the token reducer."""

    x: torch.Tensor  # the residual stream after attention (batch, tokens, dim)
    keys: torch.Tensor  # attention keys averaged over heads (batch, tokens, head_dim)
    probs: torch.Tensor | None  # attention probabilities (batch, heads, tokens, tokens) when asked for


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float, bias: torch.Tensor | None,
            need_probs: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Multi-head attention of (batch, tokens, heads*dim) q, k, v with an additive (batch, 1, 1, tokens) bias."""
    batch, tokens, width = q.shape
    shape = (batch, tokens, heads, width // heads)
    q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
    probs = None
    if need_probs:
        logits = (q @ k.transpose(-2, -1)) * scale
        if bias is not None:
            logits = logits + bias
        probs = logits.softmax(dim=-1)
        out = probs @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return out.transpose(1, 2).reshape(batch, tokens, width), k.mean(dim=1), probs


class NetsBlockAdapter:
    """prunekit.nets.EncoderBlock (pre-norm; nn.MultiheadAttention or the fused-qkv SelfAttention)."""

    def attention(self, block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, need_probs: bool) -> Attended:
        """x + attn(norm1(x)), with keys and optional probabilities."""
        from ..nets import MultiheadSelfAttention

        h = block.norm1(x)
        if isinstance(block.attn, MultiheadSelfAttention):
            mha = block.attn.attn
            q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
            heads, project = mha.num_heads, mha.out_proj
        else:
            q, k, v = block.attn.qkv(h).chunk(3, dim=-1)
            heads, project = block.attn.heads, block.attn.proj
        out, keys, probs = _attend(q, k, v, heads, (q.shape[-1] // heads) ** -0.5, bias, need_probs)
        return Attended(x + project(out), keys, probs)

    def feedforward(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x + mlp(norm2(x))."""
        return x + block.mlp(block.norm2(x))


class BertLayerAdapter:
    """transformers BertLayer (post-norm self-attention encoder layer)."""

    def attention(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, need_probs: bool) -> Attended:
        """LayerNorm(x + dense(attention(x))), with keys and optional probabilities."""
        sa = layer.attention.self
        out, keys, probs = _attend(sa.query(x), sa.key(x), sa.value(x), sa.num_attention_heads, sa.scaling, bias,
                                   need_probs)
        return Attended(layer.attention.output(out, x), keys, probs)

    def feedforward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The intermediate + output sub-layers (with their residual and LayerNorm)."""
        return layer.output(layer.intermediate(x), x)


class HFViTLayerAdapter:
    """transformers ViTLayer (pre-norm)."""

    def attention(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, need_probs: bool) -> Attended:
        """x + o_proj(attention(layernorm_before(x)))."""
        at = layer.attention
        h = layer.layernorm_before(x)
        out, keys, probs = _attend(at.q_proj(h), at.k_proj(h), at.v_proj(h), at.num_attention_heads, at.scaling,
                                   bias, need_probs)
        return Attended(x + layer.dropout(at.o_proj(out)), keys, probs)

    def feedforward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x + mlp(layernorm_after(x))."""
        return x + layer.dropout(layer.mlp(layer.layernorm_after(x)))


@dataclass
class Target:
    """The layers to patch in a supported model, how to run them, and facts about its inputs."""

    kind: str
    layers: list[nn.Module]
    adapter: Any
    tokens: int | None  # fixed token count (images), None for text
    reads_mask: bool  # layers receive a 4-D attention mask whose padding becomes size 0
    restore_length: bool  # default for restoring the output length


def _find_target(model: nn.Module) -> Target:
    """The patchable layers of `model`, or a ModelError naming its class."""
    from ..nets import ViT

    if isinstance(model, ViT):
        return Target("prunekit ViT", list(model.blocks), NetsBlockAdapter(), model.pos_embed.shape[1], False, False)
    try:
        from transformers.models.bert.modeling_bert import BertModel
        from transformers.models.vit.modeling_vit import ViTModel
    except ImportError:  # transformers is optional for prunekit's own ViT
        BertModel = ViTModel = ()  # type: ignore[assignment,misc]
    base = getattr(model, "base_model", model)
    if BertModel and isinstance(base, BertModel):
        if base.config.is_decoder:
            raise ModelError(f"{type(model).__name__} is a BERT decoder; token reduction needs an encoder "
                             f"(is_decoder=False)")
        return Target("BERT", list(base.encoder.layer), BertLayerAdapter(), None, True, True)
    if ViTModel and isinstance(base, ViTModel):
        image = base.config.image_size
        patch = base.config.patch_size
        return Target("transformers ViT", list(base.layers), HFViTLayerAdapter(), (image // patch) ** 2 + 1,
                      False, False)
    raise ModelError(
        f"token merging/pruning does not support {type(model).__name__}: supported are prunekit.nets.ViT and "
        f"transformers BertModel and ViTModel (or models whose base_model is one of them)")


# -------------------------------------------------------------------------------------------------------- plan


def _layer_values(value: Any, depth: int, argument: str, check: Callable[[Any], Any]) -> list[Any]:
    """One value per layer from a single value or a sequence of `depth` values."""
    if isinstance(value, (list, tuple)):
        if len(value) != depth:
            raise ArgumentError(argument, value, f"one value or {depth} values (one per layer)")
        return [check(item) for item in value]
    return [check(value)] * depth


def _check_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ArgumentError("r", value, "a whole number >= 0 of tokens per layer, or one per layer")
    return value


def _check_keep(value: Any) -> float:
    try:
        keep = float(value)
    except (TypeError, ValueError):
        raise ArgumentError("keep", value, "a share of tokens kept per layer in (0, 1]") from None
    if not 0.0 < keep <= 1.0:
        raise ArgumentError("keep", value, "a share of tokens kept per layer in (0, 1]")
    return keep


@dataclass
class TokenPatch:
    """A patched model's settings and what its last forward pass did."""

    method: str
    r: list[int] | None
    keep: list[float] | None
    kind: str
    prop_attn: bool
    protect_first: bool
    restore_length: bool
    importance_share: float
    iterations: list[int]
    head_filter: tuple[float, float] | None
    layers: list[nn.Module] = field(repr=False, default_factory=list)
    saved: list[tuple[nn.Module, bool, Any]] = field(repr=False, default_factory=list)
    tokens_per_layer: list[int] = field(default_factory=list)  # tokens entering each layer, last forward
    kept: torch.Tensor | None = None  # (batch, input tokens) bool, last forward with restore_length: token survived

    def removals(self, layer: int, tokens: int) -> int:
        """How many tokens `layer` removes from `tokens`, validated against the method's maximum."""
        place = f"at layer {layer} ({tokens} tokens enter it)"
        if self.r is None:
            # A keep share is a target: on very short inputs a layer removes at most what its method allows.
            r = tokens - int(math.floor(tokens * self.keep[layer] + 0.5))
            limit = (max_merges(tokens, self.protect_first) if self.method == "tome"
                     else max_prunes(tokens, self.importance_share, self.protect_first))
            return min(r, limit)
        r = self.r[layer]
        if self.method == "tome":
            return check_merges(r, tokens, self.protect_first, place)
        return check_prunes(r, tokens, self.importance_share, self.protect_first, place)

    def schedule(self, tokens: int) -> list[int]:
        """Tokens entering each layer for an input of `tokens` tokens, and after the last (raises if r is too big)."""
        counts = [tokens]
        for layer in range(len(self.layers)):
            counts.append(counts[-1] - self.removals(layer, counts[-1]))
        return counts


# ----------------------------------------------------------------------------------------------- forward pass


@dataclass
class _PassState:
    """Token bookkeeping shared by the layers during one forward pass."""

    size: torch.Tensor  # (batch, tokens, 1); 0 marks padding
    padded: bool
    merged: bool = False
    source: torch.Tensor | None = None  # (batch, original tokens): current index of each input token, -1 if pruned


def _validity_from_mask(mask: Any, batch: int, tokens: int, device: torch.device) -> torch.Tensor:
    """(batch, tokens) bool of real tokens from a transformers 4-D encoder mask (bool or additive) or None."""
    if not isinstance(mask, torch.Tensor):
        return torch.ones(batch, tokens, dtype=torch.bool, device=device)
    row = mask[:, 0, 0, :] if mask.dim() == 4 else mask
    if row.dtype == torch.bool:
        return row.expand(batch, tokens).clone()
    if row.dtype.is_floating_point:
        return (row > torch.finfo(row.dtype).min / 2).expand(batch, tokens).clone()
    return (row != 0).expand(batch, tokens).clone()


def _bias(state: _PassState, prop_attn: bool) -> torch.Tensor | None:
    """The additive attention bias over keys: log(size) (or 0 / -inf for padding), None when it would be all 0."""
    if not state.padded and not (state.merged and prop_attn):
        return None
    size = state.size[..., 0]
    bias = size.log() if prop_attn else torch.where(size > 0, 0.0, -float("inf")).to(size.dtype)
    return bias[:, None, None, :]


def _layer_forward(patch: TokenPatch, target: Target, index: int, layer: nn.Module, hidden_states: torch.Tensor,
                   attention_mask: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The patched forward of layer `index`: attention, token reduction, MLP."""
    x = hidden_states
    if index == 0 or getattr(patch, "_state", None) is None:
        batch, tokens, _ = x.shape
        valid = (_validity_from_mask(attention_mask, batch, tokens, x.device) if target.reads_mask
                 else torch.ones(batch, tokens, dtype=torch.bool, device=x.device))
        state = _PassState(valid[..., None].to(x.dtype), padded=not bool(valid.all()))
        if patch.restore_length:
            state.source = torch.arange(tokens, device=x.device).expand(batch, tokens).clone()
        patch._state = state  # type: ignore[attr-defined]
        patch.tokens_per_layer = []
    state = patch._state  # type: ignore[attr-defined]
    tokens = x.shape[1]
    patch.tokens_per_layer.append(tokens)
    r = patch.removals(index, tokens)
    need_probs = patch.method == "zero-tprune" and r > 0
    attended = target.adapter.attention(layer, x, _bias(state, patch.prop_attn), need_probs)
    x = attended.x
    if r > 0:
        if patch.method == "tome":
            reduction = bipartite_soft_matching(attended.keys, r, patch.protect_first, state.size)
            state.merged = True
        else:
            reduction = zero_tprune_select(attended.probs, attended.keys, r, patch.importance_share,
                                           patch.iterations[index], patch.protect_first, state.size,
                                           patch.head_filter)
        if state.source is not None:
            state.source = compose_source(state.source, reduction)
        x, state.size = apply_reduction(x, state.size, reduction)
    x = target.adapter.feedforward(layer, x)
    if index == len(patch.layers) - 1:
        patch._state = None  # type: ignore[attr-defined]
        if state.source is not None:
            patch.kept = state.source >= 0
            x = _restore(x, state.source)
    return x


def _restore(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Output of the input's length: each position reads the token it went into, zeros if it was pruned."""
    channels = x.shape[-1]
    gathered = x.gather(1, source.clamp_min(0)[..., None].expand(-1, -1, channels))
    return torch.where((source >= 0)[..., None], gathered, torch.zeros((), dtype=x.dtype, device=x.device))


# -------------------------------------------------------------------------------------------------- public API


def patch(model: nn.Module, method: str = "tome", r: int | Sequence[int] | None = None,
          keep: float | Sequence[float] | None = None, *, prop_attn: bool | None = None, protect_first: bool = True,
          restore_length: bool | None = None, importance_share: float = 0.5,
          iterations: int | Sequence[int] | None = None,
          head_filter: tuple[float, float] | None = None) -> TokenPatch:
    """Make `model` merge (method="tome") or prune (method="zero-tprune") tokens in every layer, in place.

    Give exactly one of `r` (tokens removed per layer: one number or one per layer; more than a layer can remove is
    an error naming the maximum) or `keep` (share of the tokens entering a layer that it keeps, capped at what the
    method can remove). `prop_attn` (default: on for ToMe, off for Zero-TPrune) adds log(size) to the
    attention logits. `protect_first` never removes the first (class) token. `restore_length` (default: on for BERT)
    gives outputs of the input's length. Zero-TPrune options: `importance_share` of r pruned by importance (the rest
    by similarity), WPR `iterations` (default: the paper's 30 / 5 / 1 by depth), `head_filter` variance range.
    Returns the patch record; `unpatch(model)` restores the original forward methods.
    """
    if method not in METHODS:
        raise unknown_choice("method", method, METHODS)
    if getattr(model, PATCH_ATTRIBUTE, None) is not None:
        raise ModelError(f"{type(model).__name__} is already token-patched; call prunekit.tokens.unpatch(model) "
                         f"first")
    target = _find_target(model)
    depth = len(target.layers)
    if (r is None) == (keep is None):
        raise ArgumentError("r", r, "give exactly one of r (tokens removed per layer) or keep (share kept per "
                                    "layer)", hint=f"keep={keep!r}")
    r_values = _layer_values(r, depth, "r", _check_count) if r is not None else None
    keep_values = _layer_values(keep, depth, "keep", _check_keep) if keep is not None else None
    if head_filter is not None:
        if not (isinstance(head_filter, (tuple, list)) and len(head_filter) == 2
                and 0 <= float(head_filter[0]) <= float(head_filter[1])):
            raise ArgumentError("head_filter", head_filter, "a (low, high) variance range with 0 <= low <= high")
        head_filter = (float(head_filter[0]), float(head_filter[1]))
    record = TokenPatch(
        method=method, r=r_values, keep=keep_values, kind=target.kind,
        prop_attn=(method == "tome") if prop_attn is None else bool(prop_attn), protect_first=bool(protect_first),
        restore_length=target.restore_length if restore_length is None else bool(restore_length),
        importance_share=check_share(importance_share), iterations=layer_iterations(iterations, depth),
        head_filter=head_filter, layers=target.layers,
    )
    if target.tokens is not None:
        record.schedule(target.tokens)  # images have a fixed token count: a too large r fails here, not mid-run
    for index, layer in enumerate(target.layers):
        had_own = "forward" in layer.__dict__
        record.saved.append((layer, had_own, layer.__dict__.get("forward")))
        layer.forward = _bind(record, target, index, layer)
    setattr(model, PATCH_ATTRIBUTE, record)
    return record


def _bind(record: TokenPatch, target: Target, index: int, layer: nn.Module) -> Callable[..., torch.Tensor]:
    """The closure installed as layer.forward."""
    def forward(hidden_states: torch.Tensor, attention_mask: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _layer_forward(record, target, index, layer, hidden_states, attention_mask, *args, **kwargs)
    forward.__doc__ = f"{record.method} token reduction around {type(layer).__name__}.forward"
    return forward


def unpatch(model: nn.Module) -> None:
    """Restore the forward methods `patch` replaced (a model that is not patched is an error)."""
    record = getattr(model, PATCH_ATTRIBUTE, None)
    if record is None:
        raise ModelError(f"{type(model).__name__} is not token-patched; nothing to undo")
    for layer, had_own, previous in record.saved:
        if had_own:
            layer.forward = previous
        else:
            del layer.forward
    delattr(model, PATCH_ATTRIBUTE)


def patched(model: nn.Module) -> TokenPatch | None:
    """The patch record of a token-patched model, else None."""
    return getattr(model, PATCH_ATTRIBUTE, None)
