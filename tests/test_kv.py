"""Mustafar KV-cache pruning: exact per-token counts, bitmap round trip, transformers generation, real SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch

from prunekit import kv
from prunekit.errors import ArgumentError, ModelError


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("dim", [64, 100, 128])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9])
def test_every_vector_keeps_exactly_its_top_entries(dim, sparsity):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, dim)
    x[0, 0, 0] = 1.0  # all magnitudes tied: the count must still be exact
    mask = kv.prune_mask(x, sparsity)
    keep = kv.kept_count(dim, sparsity)
    assert keep == dim - math.floor(sparsity * dim + 1e-9)
    assert (mask.sum(-1) == keep).all()
    magnitude = x.abs()
    smallest_kept = torch.where(mask, magnitude, torch.inf).amin(-1)
    largest_pruned = torch.where(mask, -torch.inf, magnitude).amax(-1)
    assert (smallest_kept >= largest_pruned).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 96, 130])
def test_decompress_of_compress_is_the_pruned_tensor_bitwise(dtype, dim):
    torch.manual_seed(1)
    x = torch.randn(2, 2, 7, dim).to(dtype)
    store = kv.compress(x, 0.7)
    assert store.bitmaps.dtype == torch.int64 and store.bitmaps.shape == (2, 2, 7, -(-dim // 64))
    assert store.values.shape == (2, 2, 7, kv.kept_count(dim, 0.7))
    restored = kv.decompress(store)
    expected = kv.prune_vectors(x, 0.7)
    assert restored.dtype == dtype and torch.equal(restored, expected)
    assert torch.equal(restored.ne(0).sum(-1), torch.full((2, 2, 7), kv.kept_count(dim, 0.7)))
    element = x.element_size()
    assert store.nbytes() == 2 * 2 * 7 * (-(-dim // 64) * 8 + kv.kept_count(dim, 0.7) * element)


def test_bitmap_layout_is_one_bit_per_position_in_64_element_tiles():
    x = torch.zeros(1, 70)
    x[0, 0], x[0, 63], x[0, 65] = 5.0, -4.0, 3.0
    store = kv.compress(x, 1 - 3 / 70)  # keep 3
    assert store.bitmaps.tolist() == [[1 | -(1 << 63), 1 << 1]]  # bit 63 is the sign bit of an int64
    assert store.values.tolist() == [[5.0, -4.0, 3.0]]


def test_bad_sparsity_window_and_model_are_refused():
    model = _tiny_llama()
    for bad in (1.0, -0.1, "half"):
        with pytest.raises(ArgumentError, match=r"\[0, 1\)"):
            kv.mustafar_cache(model, bad)
    with pytest.raises(ArgumentError, match="key_sparsity"):
        kv.mustafar_cache(model, 0.5, key_sparsity=1.2)
    with pytest.raises(ArgumentError, match="window"):
        kv.mustafar_cache(model, 0.5, window=-1)
    with pytest.raises(ModelError, match="Linear"):
        kv.mustafar_cache(torch.nn.Linear(2, 2), 0.5)
    from transformers import MistralConfig

    sliding = MistralConfig(num_hidden_layers=2, sliding_window=16, layer_types=["sliding_attention"] * 2)
    with pytest.raises(ModelError, match="sliding_attention"):
        kv.mustafar_cache(sliding, 0.5)


def test_sparsity_zero_generates_exactly_like_the_dense_cache():
    model = _tiny_llama()
    ids = torch.randint(0, 120, (2, 9))
    dense = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    cache = kv.mustafar_cache(model, 0.0)
    with pytest.warns(FutureWarning):  # transformers 5 renames past_key_values to cache; both reach the cache
        pruned = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, past_key_values=cache)
    assert torch.equal(dense, pruned)
    assert cache.get_seq_length() == 9 + 10 - 1
    nll, count = kv.teacher_forced_nll(model, ids[0], kv.mustafar_cache(model, 0.0))
    with torch.no_grad():
        logits = model(ids[:1]).logits[0, :-1]
    reference = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
    assert count == 8 and nll == pytest.approx(reference, rel=1e-5)


def test_prefill_stores_pruned_keys_and_values_and_keeps_the_window_dense():
    model = _tiny_llama()
    ids = torch.randint(0, 120, (1, 20))
    from transformers.cache_utils import DynamicCache

    dense = DynamicCache(config=model.config)
    cache = kv.mustafar_cache(model, 0.5, window=6)
    with torch.no_grad():
        reference = model(input_ids=ids, cache=dense, use_cache=True).logits
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits
    assert torch.equal(logits, reference)  # the prefill attends to its own states before they are pruned
    for layer, dense_layer in zip(cache.layers, dense.layers):
        stored = kv.decompress(layer.compressed_keys)
        assert stored.shape[-2] == 14 and torch.equal(stored, kv.prune_vectors(dense_layer.keys[..., :14, :], 0.5))
        assert torch.equal(kv.decompress(layer.compressed_values),
                           kv.prune_vectors(dense_layer.values[..., :14, :], 0.5))
        assert torch.equal(layer.keys, dense_layer.keys[..., 14:, :])
        assert (kv.unpack_mask(layer.compressed_keys.bitmaps, 16).sum(-1) == 8).all()  # head_dim 64 / 4 = 16
    sizes = kv.cache_nbytes(cache)
    assert sizes["dense"] == 2 * 2 * (1 * 2 * 20 * 16 * 4)  # layers x (K, V) x batch*heads*tokens*dim*4 bytes
    assert sizes["total"] == sizes["compressed"] + sizes["window"]


def test_pruned_cache_decodes_token_by_token_with_exact_counts():
    model = _tiny_llama()
    ids = torch.randint(0, 120, (1, 6))
    cache = kv.mustafar_cache(model, 0.75, window=2)
    out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, cache=cache)
    assert out.shape == (1, 18)
    for layer in cache.layers:
        assert layer.compressed_keys.tokens + layer.keys.shape[-2] == 17 and layer.keys.shape[-2] == 2
        assert (kv.decompress(layer.compressed_keys).ne(0).sum(-1) <= 4).all()
        assert (kv.unpack_mask(layer.compressed_values.bitmaps, 16).sum(-1) == 4).all()


# ------------------------------------------------------------------------------------------- real SmolLM2-135M


@pytest.fixture(scope="module")
def smollm2():
    from prunekit.zoo import load_causal_lm

    return load_causal_lm("smollm2-135m")


def test_real_smollm2_pruned_cache_perplexity_and_generation(smollm2, one_thread):
    model, tokenizer = smollm2
    from pydoc_data.topics import topics

    ids = tokenizer(topics["assignment"][:600], return_tensors="pt").input_ids[0][:48]
    dense_nll, count = kv.teacher_forced_nll(model, ids, prefix=8)
    half_nll, _ = kv.teacher_forced_nll(model, ids, kv.mustafar_cache(model, 0.5), prefix=8)
    windowed_nll, _ = kv.teacher_forced_nll(model, ids, kv.mustafar_cache(model, 0.5, window=16), prefix=8)
    dense_ppl, half_ppl, windowed_ppl = (math.exp(n / count) for n in (dense_nll, half_nll, windowed_nll))
    assert dense_ppl < 100
    assert dense_ppl < half_ppl < 1.5 * dense_ppl  # half of every K and V vector gone costs little
    assert windowed_ppl < half_ppl  # keeping the 16 most recent tokens dense wins some of it back
    cache = kv.mustafar_cache(model, 0.5)
    out = model.generate(ids[None, :16], max_new_tokens=6, min_new_tokens=6, do_sample=False, cache=cache)
    assert out.shape == (1, 22)
    sizes = kv.cache_nbytes(cache)
    assert sizes["total"] < 0.6 * sizes["dense"]  # fp32, head_dim 64: (8 + 32 * 4) / (64 * 4) = 0.53
