"""Wanda, SparseGPT and OWL: the papers' invariants on pure functions, then the runner on tiny causal LMs."""

import copy

import pytest
import torch

import prunekit
from prunekit.llm import outlier_ratio, owl_sparsities, prune_causal_lm, row_keep_mask, wanda_scores
from prunekit.reconstruct.sparsegpt import sparsegpt_prune

transformers = pytest.importorskip("transformers")


def _activations(seed=0, n=3000, d=64):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * 0.3
    scale = torch.linspace(0.2, 3.0, d)  # uneven input scales: what separates Wanda/SparseGPT from magnitude
    return (torch.randn(n, d, generator=g) @ mix + torch.randn(n, d, generator=g)) * scale


def _hessian(x):
    return 2 * x.t() @ x / len(x)


def _output_error(x, w_ref, w):
    return float(((x @ w.t() - x @ w_ref.t()) ** 2).mean())


def test_sparsegpt_zero_sparsity_changes_nothing():
    x = _activations()
    w = torch.randn(16, 64)
    updated, keep = sparsegpt_prune(w, _hessian(x), 0.0, blocksize=16)
    assert keep.all()
    torch.testing.assert_close(updated, w)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_sparsegpt_exact_count_and_beats_the_same_mask_without_update(sparsity):
    x = _activations()
    w = torch.randn(24, 64)
    updated, keep = sparsegpt_prune(w, _hessian(x), sparsity, blocksize=16)
    assert int((~keep).sum()) == round(sparsity * w.numel())
    assert (updated[~keep] == 0).all()
    assert _output_error(x, w, updated) < _output_error(x, w, w * keep)
    # and beats row-wise magnitude at the same sparsity
    assert _output_error(x, w, updated) < _output_error(x, w, w * row_keep_mask(w.abs(), sparsity))


def test_sparsegpt_equals_least_squares_when_pruned_columns_come_first():
    # Processing columns left to right, SparseGPT's updates for pruning the first k columns are exactly the
    # least-squares re-fit of the remaining columns (OBS with the exact inverse Hessian).
    x = _activations(n=4000, d=32)
    w = torch.randn(8, 32)
    w[:, :8] *= 1e-4  # the 8 first columns are by far the least salient
    updated, keep = sparsegpt_prune(w, _hessian(x), 0.25, blocksize=32, dampening=1e-9)
    assert not keep[:, :8].any() and keep[:, 8:].all()
    solution = torch.linalg.lstsq(x[:, 8:].double(), (x @ w.t()).double()).solution.t().float()
    torch.testing.assert_close(updated[:, 8:], solution, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_sparsegpt_n_m_valid(n, m):
    x = _activations()
    w = torch.randn(16, 64)
    updated, keep = sparsegpt_prune(w, _hessian(x), 1 - n / m, n=n, m=m, blocksize=32)
    assert (keep.reshape(16, -1, m).sum(-1) == n).all()
    assert (updated[~keep] == 0).all()


def test_wanda_score_definition_and_row_groups():
    w = torch.randn(5, 8)
    norm_sq = torch.rand(8) * 4
    s = wanda_scores(w, norm_sq)
    torch.testing.assert_close(s, w.abs() * norm_sq.sqrt())
    keep = row_keep_mask(s, 0.5)
    assert (keep.sum(1) == 4).all()  # every output row loses exactly half
    # with equal input norms, Wanda is row-wise magnitude
    torch.testing.assert_close(wanda_scores(w, torch.ones(8)), w.abs())


def test_outlier_ratio_definition():
    scores = torch.ones(100)
    scores[:3] = 100.0  # mean = 3.97: 3 scores above 5 x mean
    assert outlier_ratio(scores, 5) == pytest.approx(0.03)


def test_owl_sparsities_average_to_target_and_follow_outliers():
    ratios = [0.01, 0.05, 0.02, 0.08]
    result = owl_sparsities(ratios, 0.7, lam=0.08)
    assert sum(result) / 4 == pytest.approx(0.7)
    assert max(result) - min(result) == pytest.approx(0.16)  # r spans [0, 2 lambda]
    assert result.index(min(result)) == 3 and result.index(max(result)) == 0  # more outliers -> less pruning
    assert owl_sparsities([0.02, 0.02], 0.5) == [0.5, 0.5]


def _tiny(arch="llama", layers=3):
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_layer=layers, n_embd=64, n_head=4, vocab_size=128, n_positions=64)
    else:
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                          max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _samples(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (1, 16 + 3 * i), generator=g) for i in range(n)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("solver", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_runner_exact_sparsity_on_tiny_models(arch, solver, pattern):
    model = _tiny(arch)
    report = prune_causal_lm(model, _samples(), 0.5 if pattern == "unstructured" else None, solver=solver,
                             pattern=pattern, blocksize=32, progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=1e-12)
    assert all(row.sparsity == pytest.approx(0.5) for row in report.layers)
    names = {row.name for row in report.layers}
    assert not any("wte" in n or "embed" in n or "lm_head" in n for n in names)
    with torch.no_grad():
        assert torch.isfinite(model(_samples(1)[0]).logits).all()


def test_runner_per_block_sparsity_list_and_owl():
    model = _tiny()
    report = prune_causal_lm(model, _samples(), [0.2, 0.5, 0.8], progress=False)
    per_block = {}
    for row in report.layers:
        per_block.setdefault(row.name.split(".")[2], []).append(row.sparsity)
    assert [round(sum(v) / len(v), 2) for v in per_block.values()] == [0.2, 0.5, 0.8]
    model = _tiny()
    report = prunekit.prune(model, "owl", 0.6, data=_samples(), progress=False)
    assert sum(report.extra["block_sparsities"]) / 3 == pytest.approx(0.6)
    assert len(set(report.extra["block_sparsities"])) == 3
    assert prunekit.masks.has_masks(model)


def test_wanda_prune_preserves_outputs_better_than_magnitude_on_uneven_inputs():
    # A block whose inputs have very uneven scales: Wanda (and SparseGPT) should hurt the block output less.
    model = _tiny(layers=1)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.copy_(torch.linspace(0.05, 4.0, 64))
        model.model.layers[0].post_attention_layernorm.weight.copy_(torch.linspace(4.0, 0.05, 64))
    samples = _samples(8)
    probe = _samples(4, seed=9)

    def error(pruned):
        with torch.no_grad():
            return sum(float(((pruned(s).logits - model(s).logits) ** 2).mean()) for s in probe)

    errors = {}
    # each method gets only what it reads (magnitude no calibration, wanda no SparseGPT block size): others are refused
    options = {"magnitude": {}, "wanda": {"data": samples, "progress": False},
               "sparsegpt": {"data": samples, "blocksize": 32, "progress": False}}
    for method in ("magnitude", "wanda", "sparsegpt"):
        copy_ = copy.deepcopy(model)
        prunekit.prune(copy_, method, 0.5, **options[method])
        errors[method] = error(copy_)
    assert errors["wanda"] < errors["magnitude"] and errors["sparsegpt"] < errors["magnitude"]


# --- bad input ------------------------------------------------------------------------------------------------


def test_bad_llm_inputs():
    model = _tiny()
    with pytest.raises(prunekit.ArgumentError, match=r"one sparsity per decoder block \(3\)"):
        prune_causal_lm(model, _samples(), [0.5, 0.5], progress=False)
    with pytest.raises(prunekit.ArgumentError, match="allocation"):
        prune_causal_lm(model, _samples(), None, pattern="2:4", allocation="owl", progress=False)
    with pytest.raises(prunekit.ArgumentError, match="pattern='4x1'"):
        prune_causal_lm(model, _samples(), 0.5, pattern="4x1", progress=False)
    with pytest.raises(prunekit.ArgumentError, match="solver='wandaa'.*Did you mean 'wanda'"):
        prune_causal_lm(model, _samples(), 0.5, solver="wandaa", progress=False)
    with pytest.raises(prunekit.ArgumentError, match="data=None"):
        prunekit.prune(model, "wanda", 0.5)
    with pytest.raises(prunekit.ArgumentError, match=r"sparsity\[1\]=1.2"):
        prune_causal_lm(model, _samples(), [0.5, 1.2, 0.1], progress=False)
    with pytest.raises(prunekit.ModelError):
        prune_causal_lm(torch.nn.Sequential(torch.nn.Linear(4, 4)), _samples(), 0.5, progress=False)
    assert not prunekit.masks.has_masks(model)
    assert all(float((p == 0).float().mean()) < 0.01 for p in model.parameters() if p.dim() == 2)


def test_job_predicted_not_to_fit_is_refused_before_work(monkeypatch):
    import prunekit.llm as llm

    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(llm, "_available_memory", lambda: 1024)  # 1 KiB free
    with pytest.raises(prunekit.PruneError, match="GiB is available"):
        prune_causal_lm(model, _samples(), 0.5, solver="sparsegpt", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- SparseGPT on layers sharing an input, one-pass calibration ------------------------------------------------


def test_sparsegpt_group_sweep_equals_each_layer_alone():
    # Rows are independent given H^-1 (the paper's row-parallel OBS update), so sweeping q/k/v-like layers stacked
    # must give each layer its own solve: same masks, same weights up to float32 rounding, exact count per layer.
    from prunekit.reconstruct.sparsegpt import inverse_hessian_factor, sparsegpt_prune_group

    x = _activations()
    factor = inverse_hessian_factor(_hessian(x), 0.01)
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(rows, 64, generator=g) * (1 + k) for k, rows in enumerate((16, 8, 8))]
    for kwargs in ({"sparsity": 0.5}, {"sparsity": 0.5, "n": 2, "m": 4}):
        together = sparsegpt_prune_group(weights, factor, blocksize=16, **kwargs)
        for w, (updated, keep) in zip(weights, together):
            alone, keep_alone = sparsegpt_prune(w, None, blocksize=16, factor=factor, **kwargs)
            assert torch.equal(keep, keep_alone)
            assert int((~keep).sum()) == round(0.5 * w.numel())
            torch.testing.assert_close(updated, alone, rtol=1e-5, atol=1e-5)


def _dense_inputs_sq(model, samples):
    """||X_j||^2 of every Linear's input in the blocks, from the unpruned model (hooks, whole forward per sample)."""
    sums, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            def hook(_m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for s in samples:
            model(s)
    for h in handles:
        h.remove()
    return sums


def test_one_pass_calibration_uses_the_dense_models_activations():
    # One-pass: every layer's statistics come from the dense model. Wanda has no weight update, so each mask must be
    # the row-wise Wanda mask of the dense activations; sequential differs after block 0 (its later blocks see the
    # pruned outputs) and agrees on block 0 (same inputs either way).
    dense, samples = _tiny(), _samples()
    norms = _dense_inputs_sq(dense, samples)
    one_pass, sequential = copy.deepcopy(dense), copy.deepcopy(dense)
    report = prune_causal_lm(one_pass, samples, 0.5, calibration="one-pass", progress=False)
    prune_causal_lm(sequential, samples, 0.5, progress=False)
    assert report.extra["calibration"] == "one-pass" and report.arguments["calibration"] == "one-pass"
    weights = dict(dense.named_parameters())
    pruned_one, pruned_seq = dict(one_pass.named_parameters()), dict(sequential.named_parameters())
    later_differ = False
    for name, sq in norms.items():
        w = weights[name + ".weight"]
        expected = row_keep_mask(wanda_scores(w, sq.float()), 0.5)
        assert torch.equal(pruned_one[name + ".weight"] != 0, expected), name
        same = torch.equal(pruned_seq[name + ".weight"] != 0, expected)
        if ".layers.0." in name:
            assert same, name
        later_differ |= not same
    assert later_differ


def test_one_pass_sparsegpt_and_owl_run_and_refuse_checkpoints(tmp_path):
    model = _tiny()
    report = prunekit.prune(model, "owl-sparsegpt", 0.5, data=_samples(), calibration="one-pass", blocksize=32,
                            progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=1e-3) and len(report.extra["owl_outlier_ratios"]) == 3
    # OWL's ratios are the dense model's in both modes (sequential measures them in a dense pass of its own)
    sequential = prunekit.prune(_tiny(), "owl-sparsegpt", 0.5, data=_samples(), blocksize=32, progress=False)
    assert report.extra["owl_outlier_ratios"] == pytest.approx(sequential.extra["owl_outlier_ratios"], abs=1e-6)
    with torch.no_grad():
        assert torch.isfinite(model(_samples(1)[0]).logits).all()
    with pytest.raises(prunekit.ArgumentError, match="checkpoint_dir=.*calibration='one-pass'"):
        prune_causal_lm(_tiny(), _samples(), 0.5, calibration="one-pass", checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(prunekit.ArgumentError, match="calibration='onepass'.*one-pass"):
        prune_causal_lm(_tiny(), _samples(), 0.5, calibration="onepass", progress=False)


@pytest.mark.parametrize("features", [7, 300, 577])
def test_input_stats_hessian_is_the_full_symmetric_gram_from_upper_tiles(features):
    # only the upper triangle is accumulated: readers must still see H = 2 X X^T / n, symmetric, in every tile layout
    from prunekit.activations import InputStats

    torch.manual_seed(0)
    batches = [torch.randn(1, 40, features), torch.randn(2, 9, features)]
    stats = InputStats(features, hessian=True)
    for batch in batches:
        stats.update(batch)
    x = torch.cat([b.reshape(-1, features) for b in batches]).double()
    expected = 2 * x.t() @ x / x.shape[0]
    hessian = stats.hessian
    assert torch.equal(hessian, hessian.t())
    torch.testing.assert_close(hessian, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(stats.hessian, hessian)  # reading does not consume or change the running total
