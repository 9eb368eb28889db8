"""prune(): exact sparsity for every pattern x budget, N:M validity, selection, and bad input."""

import itertools

import pytest
import torch
from torch import nn

import prunekit
from helpers import cnn_batch, same_state, small_cnn, state_copy
from prunekit import masks
from prunekit.layout import from_matrix, to_matrix
from prunekit.patterns import parse_pattern

BUDGETS = ["uniform", "global", "erk", "lamp", "rate-distortion"]
PATTERNS = ["unstructured", "4x1", "1x4", "2x2"]


def _units(model, pattern):
    p = parse_pattern(pattern)
    return [(name, p.units(m.weight.shape, "conv" if isinstance(m, nn.Conv2d) else "linear"), p.unit_size)
            for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("pattern,budget", list(itertools.product(PATTERNS, BUDGETS)))
@pytest.mark.parametrize("sparsity", [0.3, 0.77])
def test_exact_sparsity_for_every_pattern_and_budget(pattern, budget, sparsity):
    model = small_cnn()
    data = cnn_batch() if budget == "rate-distortion" else None  # the only budget here that reads data
    report = prunekit.prune(model, "magnitude", sparsity, pattern=pattern, budget=budget, data=data)
    units = _units(model, pattern)
    if budget == "uniform":
        for (name, n, size), row in zip(units, report.layers):
            assert row.zeros == round(sparsity * n) * size, name
    else:
        total_units = sum(n for _, n, _ in units)
        assert report.zeros == round(sparsity * total_units) * units[0][2]
    # the zeros counted are exactly the masked entries
    for name, module, _, mask in masks.masked_modules(model):
        assert int((~mask).sum()) == report.layer(name).zeros


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (5, 8)])
def test_n_m_validity_every_group(n, m):
    model = small_cnn()
    report = prunekit.prune(model, "magnitude", pattern=f"{n}:{m}")
    assert report.sparsity == pytest.approx(1 - n / m)
    for name, module, _, mask in masks.masked_modules(model):
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        groups = to_matrix(mask, kind).reshape(mask.shape[0], -1, m)
        assert (groups.sum(-1) == n).all(), name
        # the kept ones are the largest |w| in each group
        weights = to_matrix(module.weight.detach().abs(), kind).reshape(mask.shape[0], -1, m)
        kept_min = weights.masked_fill(~groups, float("inf")).min(-1).values
        assert (kept_min >= 0).all()


def test_n_m_runs_along_the_input_dimension_of_gpt2_conv1d():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    report = prunekit.prune(model, "magnitude", pattern="2:4")
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D: weight is (in, out)
    mask = masks.get_mask(conv)
    assert (mask.reshape(-1, 4, mask.shape[1]).sum(1) == 2).all()  # groups of 4 consecutive inputs
    assert {"transformer.wte", "lm_head"} <= {name for name, _ in report.skipped}
    assert any("output head" in reason for _, reason in report.skipped)


def test_transformers_defaults_leave_embeddings_and_head_dense_unless_included():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    report = prunekit.prune(model, "magnitude", 0.5)
    names = {row.name for row in report.layers}
    assert "lm_head" not in names and "model.embed_tokens" not in names
    assert len(names) == 7  # q, k, v, o, gate, up, down
    assert any("3 normalisation layers left dense" in note for note in report.notes)
    report = prunekit.prune(model, "magnitude", 0.5, include=["lm_head"])
    assert [row.name for row in report.layers] == ["lm_head"]


def test_conv_layout_round_trip():
    w = torch.randn(6, 4, 3, 5)
    assert torch.equal(from_matrix(to_matrix(w, "conv"), "conv", w.shape), w)
    # consecutive columns are consecutive input channels at one kernel position
    assert torch.equal(to_matrix(w, "conv")[:, :4], w[:, :, 0, 0])


def test_blocks_are_kept_or_removed_whole():
    model = small_cnn()
    prunekit.prune(model, "magnitude", 0.5, pattern="4x1", budget="global")
    mask = masks.get_mask(model[7])  # Linear 12 x 32
    blocks = mask.reshape(3, 4, 32)
    assert ((blocks.sum(1) == 0) | (blocks.sum(1) == 4)).all()


def test_iterative_synflow_reaches_exact_sparsity():
    model = small_cnn()
    x, _ = cnn_batch()
    report = prunekit.prune(model, "synflow", 0.9, example_inputs=x, rounds=20)
    total = sum(n for _, n, _ in _units(model, "unstructured"))
    assert report.zeros == round(0.9 * total)


def test_gradient_methods_reach_exact_sparsity_and_keep_grads_clean():
    for method in ("snip", "grasp", "taylor"):
        model = small_cnn()
        report = prunekit.prune(model, method, 0.8, data=cnn_batch())
        total = sum(n for _, n, _ in _units(model, "unstructured"))
        assert report.zeros == round(0.8 * total), method
        assert all(p.grad is None for p in model.parameters())


def test_global_magnitude_floor_via_prune():
    model = small_cnn()
    report = prunekit.prune(model, "global-magnitude", 0.95, min_keep=100)
    assert min(row.kept for row in report.layers) >= 100


def test_report_table_and_json():
    model = small_cnn()
    report = prunekit.prune(model, "magnitude", 0.5)
    text = report.table()
    assert "TOTAL" in text and "50.00%" in text
    data = __import__("json").loads(report.to_json())
    assert data["total"]["zeros"] == report.zeros and len(data["layers"]) == 3
    assert data["arguments"]["sparsity"] == 0.5


# --- bad input: a clear PruneError, and the model untouched -------------------------------------------------


def _rejects(match, *args, model=None, **kwargs):
    model = model if model is not None else small_cnn()
    saved = state_copy(model)
    with pytest.raises(prunekit.PruneError, match=match):
        prunekit.prune(model, *args, **kwargs)
    assert same_state(model, saved) and not masks.has_masks(model)


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan"), "half", None])
def test_bad_sparsity(bad):
    _rejects(r"sparsity=.*\[0, 1\)", "magnitude", bad)


@pytest.mark.parametrize("bad,match", [("4:4", "0 < N < M"), ("5:4", "0 < N < M"), ("0:4", "0 < N < M"),
                                       ("diagonal", "unstructured"), ("0x2", "positive")])
def test_bad_pattern(bad, match):
    _rejects(match, "magnitude", 0.5, pattern=bad)


def test_m_not_dividing_a_layer_names_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6))
    _rejects(r"layer '0' has 12 inputs", "magnitude", pattern="1:8", model=model)


def test_nm_conflicting_sparsity_or_budget():
    _rejects("pattern 2:4 fixes", "magnitude", 0.7, pattern="2:4")
    _rejects("budget=", "magnitude", pattern="2:4", budget="global")


def test_unknown_method_lists_and_suggests():
    with pytest.raises(prunekit.PruneError) as info:
        prunekit.prune(small_cnn(), "magnitud", 0.5)
    assert "Did you mean 'magnitude'" in str(info.value) and "global-magnitude" in str(info.value)


def test_unknown_budget_and_score():
    _rejects("budget='glob'.*Did you mean 'global'", "magnitude", 0.5, budget="glob")
    _rejects("score='snipp'", "magnitude", 0.5, score="snipp")


def test_selection_matching_nothing():
    _rejects("matches no", "magnitude", 0.5, include=["*.attn.*"])
    _rejects("matches no prunable", "magnitude", 0.5, types=["embedding"])
    _rejects("ignore pattern 'nothing'", "magnitude", 0.5, ignore=["nothing"])
    _rejects("types=", "magnitude", 0.5, types=["dense"])


def test_data_driven_methods_need_data():
    _rejects("data=None", "snip", 0.5)
    _rejects("example_inputs=None", "synflow", 0.5)


def test_integer_weights_refused():
    model = nn.Sequential(nn.Linear(8, 8))
    model[0].weight = nn.Parameter(torch.ones(8, 8, dtype=torch.int32), requires_grad=False)
    with pytest.raises(prunekit.ModelError, match=r"'0' has torch.int32 weights"):
        prunekit.prune(model, "magnitude", 0.5)


def test_floor_only_with_global_budgets():
    _rejects("min_keep", "magnitude", 0.5, min_keep=10)


def test_block_not_tiling_a_layer_names_it():
    _rejects("layer '7' is 12 outputs x 32 inputs", "magnitude", 0.5, pattern="8x1")
