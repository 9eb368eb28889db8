"""KV-cache pruning with the Mustafar rule, stored compressed: a transformers Cache for `generate`.

Joo et al. 2025, Mustafar: Promoting Unstructured Sparsity for KV Cache Pruning in LLM Inference. Every cached key
and value vector (one token, one KV head) keeps only its largest-magnitude (1 - s) entries. The pruned vectors
are stored as the paper's format does: each 64-element tile is a 64-bit bitmap of the kept positions plus the kept
values packed in order. Because every vector keeps exactly the same count, the packed values of a layer form one
(batch, heads, tokens, kept) tensor and no per-tile offsets are needed. As in the paper's code, the `window` most
recent tokens stay dense (a token is pruned when it leaves the window) and each step attends to its own new keys
and values before they are pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from .errors import ArgumentError, ModelError, check_sparsity

TILE = 64
_BITS = torch.arange(TILE, dtype=torch.int64)


def kept_count(dim: int, sparsity: float) -> int:
    """Entries each vector of length `dim` keeps at `sparsity`: dim - floor(sparsity * dim), at least 1."""
    pruned = int(math.floor(sparsity * dim + 1e-9))
    return max(dim - pruned, 1)


def prune_mask(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask of the top (1 - sparsity) entries by magnitude of each last-axis vector of `x` (ties: lower index)."""
    sparsity = check_sparsity(sparsity)
    keep = kept_count(x.shape[-1], sparsity)
    # A stable descending sort breaks magnitude ties by position, so the count is exact even with repeated values.
    order = torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, order, True)


def prune_vectors(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """`x` with all but the top (1 - sparsity) entries of each vector (by magnitude) set to zero."""
    return torch.where(prune_mask(x, sparsity), x, torch.zeros((), dtype=x.dtype, device=x.device))


@dataclass
class Compressed:
    """Pruned vectors of length `dim`: per 64-element tile a 64-bit bitmap, plus the kept values packed in order."""

    bitmaps: torch.Tensor  # (..., tokens, tiles) int64; bit j of a tile set = element 64*t + j kept
    values: torch.Tensor  # (..., tokens, kept) the kept elements in position order
    dim: int

    def nbytes(self) -> int:
        """Bytes of the store: bitmaps plus packed values."""
        return self.bitmaps.numel() * self.bitmaps.element_size() + self.values.numel() * self.values.element_size()

    @property
    def tokens(self) -> int:
        """Number of vectors along the token axis."""
        return self.values.shape[-2]


def _pad_to_tiles(mask: torch.Tensor) -> torch.Tensor:
    """Pad the last dimension with False up to a multiple of 64 and split it into (tiles, 64)."""
    dim = mask.shape[-1]
    tiles = -(-dim // TILE)
    if tiles * TILE != dim:
        mask = torch.nn.functional.pad(mask, (0, tiles * TILE - dim), value=False)
    return mask.reshape(*mask.shape[:-1], tiles, TILE)


def compress(x: torch.Tensor, sparsity: float) -> Compressed:
    """Prune each vector of `x` (..., tokens, dim) to its top (1 - sparsity) and store it as bitmaps + packed values."""
    mask = prune_mask(x, sparsity)
    keep = kept_count(x.shape[-1], sparsity)
    bits = _pad_to_tiles(mask).to(torch.int64) << _BITS.to(x.device)
    bitmaps = bits.sum(dim=-1)  # distinct powers of two: the sum is the bitwise OR (bit 63 wraps to the sign bit)
    values = x[mask].reshape(*x.shape[:-1], keep)  # row-major: each vector's kept values in position order
    return Compressed(bitmaps, values, x.shape[-1])


def unpack_mask(bitmaps: torch.Tensor, dim: int) -> torch.Tensor:
    """The bool mask (..., dim) that 64-bit tile bitmaps (..., tiles) encode."""
    bits = (bitmaps[..., None] >> _BITS.to(bitmaps.device)) & 1
    return bits.reshape(*bitmaps.shape[:-1], -1)[..., :dim].bool()


def decompress(store: Compressed) -> torch.Tensor:
    """The dense pruned tensor (..., tokens, dim) a Compressed store holds (zeros where nothing was kept)."""
    mask = unpack_mask(store.bitmaps, store.dim)
    out = torch.zeros(mask.shape, dtype=store.values.dtype, device=store.values.device)
    return out.masked_scatter_(mask, store.values)


def _concat(stores: Iterable[Compressed | None]) -> Compressed | None:
    """One store from several along the token axis (None entries skipped)."""
    stores = [s for s in stores if s is not None]
    if not stores:
        return None
    if len(stores) == 1:
        return stores[0]
    return Compressed(torch.cat([s.bitmaps for s in stores], dim=-2), torch.cat([s.values for s in stores], dim=-2),
                      stores[0].dim)


# ------------------------------------------------------------------------------------------ transformers cache


def _layer_base() -> type:
    """transformers' DynamicLayer (imported late: transformers is only needed for the cache)."""
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


def _make_layer_class() -> type:
    """Build MustafarLayer on top of transformers' DynamicLayer."""
    base = _layer_base()

    class MustafarLayer(base):  # type: ignore[misc, valid-type]
        """One decoder layer's cache: Mustafar-pruned keys and values compressed, the recent `window` dense."""

        is_croppable = False

        def __init__(self, key_sparsity: float = 0.5, value_sparsity: float = 0.5, window: int = 0) -> None:
            super().__init__()
            self.key_sparsity, self.value_sparsity, self.window = key_sparsity, value_sparsity, window
            self.compressed_keys: Compressed | None = None
            self.compressed_values: Compressed | None = None
            self.cumulative_length = 0

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            """Append new states; return every cached key/value (old ones pruned, recent and new ones dense)."""
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.cumulative_length += key_states.shape[-2]
            dense_keys = torch.cat([self.keys, key_states], dim=-2)
            dense_values = torch.cat([self.values, value_states], dim=-2)
            keys, values = self.materialise(dense_keys, dense_values)
            overflow = dense_keys.shape[-2] - self.window
            if overflow > 0:  # the oldest dense tokens leave the window: prune and compress them
                self.compressed_keys = _concat([self.compressed_keys,
                                                compress(dense_keys[..., :overflow, :], self.key_sparsity)])
                self.compressed_values = _concat([self.compressed_values,
                                                  compress(dense_values[..., :overflow, :], self.value_sparsity)])
                dense_keys, dense_values = dense_keys[..., overflow:, :], dense_values[..., overflow:, :]
            self.keys, self.values = dense_keys, dense_values
            return keys, values

        def materialise(self, dense_keys: torch.Tensor, dense_values: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
            """Decompressed pruned states followed by `dense_*` along the token axis."""
            if self.compressed_keys is None:
                return dense_keys, dense_values
            return (torch.cat([decompress(self.compressed_keys), dense_keys], dim=-2),
                    torch.cat([decompress(self.compressed_values), dense_values], dim=-2))

        def get_seq_length(self) -> int:
            """Tokens cached so far (compressed and dense)."""
            return self.cumulative_length

        def reset(self) -> None:
            """Forget every cached token."""
            super().reset()
            self.compressed_keys = self.compressed_values = None
            self.cumulative_length = 0

        def _map(self, function: Any) -> None:
            """Apply `function` to every stored tensor along the batch axis (beam search, batch selection)."""
            if not self.is_initialized:
                return
            self.keys, self.values = function(self.keys), function(self.values)
            for name in ("compressed_keys", "compressed_values"):
                store = getattr(self, name)
                if store is not None:
                    setattr(self, name, Compressed(function(store.bitmaps), function(store.values), store.dim))

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            """Reorder the batch for beam search."""
            self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

        def batch_repeat_interleave(self, repeats: int) -> None:
            """Repeat each batch entry `repeats` times."""
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Keep only the batch entries `indices`."""
            self._map(lambda t: t[indices, ...])

        def crop(self, tokens_to_remove: int) -> None:
            """Not supported: pruned entries cannot be restored."""
            raise ModelError("a Mustafar KV cache cannot be cropped (pruned entries are gone)")

        def nbytes(self) -> dict[str, int]:
            """Bytes held: compressed store, dense window, and what a dense cache of the same tokens would take."""
            compressed = sum(s.nbytes() for s in (self.compressed_keys, self.compressed_values) if s is not None)
            window = 0 if not self.is_initialized else (self.keys.numel() * self.keys.element_size()
                                                        + self.values.numel() * self.values.element_size())
            dense = 0
            if self.is_initialized and self.keys.dim() == 4:  # shapes are known once the first update ran
                for recent in (self.keys, self.values):
                    batch, heads, _, dim = recent.shape
                    dense += batch * heads * dim * self.cumulative_length * recent.element_size()
            return {"compressed": compressed, "window": window, "total": compressed + window, "dense": dense}

    return MustafarLayer


_LAYER_CLASS: type | None = None


def mustafar_layer_class() -> type:
    """The MustafarLayer class (a transformers DynamicLayer subclass), built once."""
    global _LAYER_CLASS
    if _LAYER_CLASS is None:
        _LAYER_CLASS = _make_layer_class()
    return _LAYER_CLASS


def _check_window(window: Any) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ArgumentError("window", window, "a whole number >= 0 of recent tokens kept dense")
    return window


def _num_layers(model_or_config: Any) -> int:
    """Decoder layer count of a causal LM or its config; unsupported attention types raise ModelError naming them."""
    config = getattr(model_or_config, "config", model_or_config)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise ModelError(f"a Mustafar KV cache needs a transformers causal LM or its config; got "
                         f"{type(model_or_config).__name__}")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted(set(layer_types) - {"full_attention"})
    if other:
        raise ModelError(f"{type(model_or_config).__name__} has {', '.join(other)} layers; the Mustafar KV cache "
                         f"supports full-attention layers only")
    if isinstance(model_or_config, nn.Module) and not hasattr(model_or_config, "generate"):
        raise ModelError(f"{type(model_or_config).__name__} is not a generating causal LM (no generate method)")
    return int(config.num_hidden_layers)


def mustafar_cache(model_or_config: Any, sparsity: float = 0.5, *, key_sparsity: float | None = None,
                   value_sparsity: float | None = None, window: int = 0) -> Any:
    """A transformers Cache whose layers keep the top (1 - sparsity) of every key and value vector, compressed.

    Pass it as `model.generate(..., past_key_values=cache)` (transformers 5 also names it `cache=`). `key_sparsity` and
    `value_sparsity` override `sparsity` for keys or values; `window` recent tokens stay dense (the paper's code
    keeps 128). Each sparsity must lie in [0, 1).
    """
    from transformers.cache_utils import Cache

    k = check_sparsity(sparsity if key_sparsity is None else key_sparsity, "key_sparsity")
    v = check_sparsity(sparsity if value_sparsity is None else value_sparsity, "value_sparsity")
    check_sparsity(sparsity)
    window = _check_window(window)
    layer_class = mustafar_layer_class()
    cache = Cache(layers=[layer_class(k, v, window) for _ in range(_num_layers(model_or_config))])
    cache.key_sparsity, cache.value_sparsity, cache.window = k, v, window
    return cache


def cache_nbytes(cache: Any) -> dict[str, int]:
    """Bytes of a Mustafar cache summed over layers: compressed, window, total, and the dense equivalent."""
    totals = {"compressed": 0, "window": 0, "total": 0, "dense": 0}
    for layer in cache.layers:
        if not hasattr(layer, "nbytes"):
            raise ModelError(f"{type(layer).__name__} is not a Mustafar cache layer")
        for key, value in layer.nbytes().items():
            totals[key] += value
    return totals


@torch.no_grad()
def teacher_forced_nll(model: nn.Module, ids: torch.Tensor, cache: Any = None, prefix: int = 1,
                       progress: bool = False) -> tuple[float, int]:
    """Sum of next-token NLL over one sequence `ids` (1-D), fed one token at a time through `cache`.

    The first `prefix` tokens are fed at once (a prefill); every later token is a decoding step that reads the
    cache. Returns (sum of NLL, tokens scored). With cache=None a plain DynamicCache is used (the dense reference).
    """
    from tqdm.auto import tqdm
    from transformers.cache_utils import DynamicCache

    if ids.dim() != 1 or ids.numel() < 2:
        raise ArgumentError("ids", tuple(ids.shape), "a 1-D tensor of at least 2 token ids")
    if not 1 <= prefix < ids.numel():
        raise ArgumentError("prefix", prefix, f"a number in [1, {ids.numel() - 1}]")
    if cache is None:
        cache = DynamicCache(config=model.config)
    device = next(model.parameters()).device
    ids = ids.to(device)[None]
    logits = model(input_ids=ids[:, :prefix], cache=cache, use_cache=True).logits[:, -1]
    total, count = 0.0, 0
    for position in tqdm(range(prefix, ids.shape[1]), desc="decoding", unit="tok", disable=not progress, leave=False):
        total += float(torch.nn.functional.cross_entropy(logits.float(), ids[:, position]))
        count += 1
        if position + 1 < ids.shape[1]:
            logits = model(input_ids=ids[:, position:position + 1], cache=cache, use_cache=True).logits[:, -1]
    return total, count
