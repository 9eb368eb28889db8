"""Calibration-based structured pruning of causal LMs (FLAP, CFSP-style) and the `prunekit shrink` command."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import prunekit
from prunekit import nets
from prunekit.cli import main
from prunekit.errors import ArgumentError
from prunekit.graph.llm_structured import (
    ChannelStats, angular_sparsities, cfsp, collect_input_stats, compensate_bias, consumer_member, flap,
    flap_channel_metric, flap_scores, standardise, unit_costs,
)
from prunekit.graph.surgery import apply_plan, plan_from_removals
from prunekit.graph.transformers import save_pruned_pretrained, transformers_graph

transformers = pytest.importorskip("transformers")


def _llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return transformers.LlamaForCausalLM(config).eval()


def _samples(count: int = 4, length: int = 24) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (length,), generator=generator) for _ in range(count)]


def test_flap_score_is_input_variance_times_column_energy():
    model, samples = _llama(), _samples()
    graph = transformers_graph(model)
    group = next(g for g in graph.groups if g.kind == "neuron")
    down = consumer_member(group).module
    captured = []
    handle = model.get_submodule(down).register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for sample in samples:
            model(sample[None])
    handle.remove()
    x = torch.cat(captured).double()
    variance = x.var(dim=0, unbiased=False)
    energy = model.get_submodule(down).weight.double().pow(2).sum(dim=0)
    stats = collect_input_stats(model, samples, {down}, progress=False)[down]
    assert torch.allclose(flap_channel_metric(model, group, stats), variance * energy, rtol=1e-4)
    # a neuron is one down_proj column: its score is its metric standardised over the layer's neurons
    expected = (variance * energy - (variance * energy).mean()) / (variance * energy).std()
    assert torch.allclose(flap_scores(model, group, stats), expected, rtol=1e-4, atol=1e-6)


def test_flap_head_score_squares_then_standardises_channels_then_averages_per_head():
    """The reference's order (lib/prune.py:336, 368-373): metric ** 2 per o_proj column, standardised over the
    layer's columns, mean per head; not per-head sums standardised over the few heads."""
    model = _llama()
    config = model.config
    group = next(g for g in transformers_graph(model, heads="kv-group").groups if g.kind == "kv-group")
    o_proj = model.get_submodule(consumer_member(group).module)
    generator = torch.Generator().manual_seed(1)
    variance = torch.rand(o_proj.in_features, generator=generator, dtype=torch.float64) + 0.1
    stats = ChannelStats(torch.zeros_like(variance), variance, torch.ones_like(variance))
    metric = (variance * o_proj.weight.double().pow(2).sum(dim=0)) ** 2
    channels = (metric - metric.mean()) / metric.std()
    per_group = config.num_attention_heads // config.num_key_value_heads * config.head_dim
    expected = channels.reshape(config.num_key_value_heads, per_group).mean(dim=1)
    scores = flap_scores(model, group, stats)
    assert torch.allclose(scores, expected, rtol=1e-9, atol=1e-12)
    assert abs(float(scores.mean())) < 1e-9 and float(scores.std()) < 0.9  # a mean of standardised channels
    assert torch.allclose(standardise(flap_channel_metric(model, group, stats)), channels, rtol=1e-9, atol=1e-12)


def test_bias_compensation_is_exact_when_removed_inputs_sit_at_their_mean():
    model = _llama()
    group = next(g for g in transformers_graph(model).groups if g.kind == "neuron")
    down = model.get_submodule(consumer_member(group).module)
    mean = torch.randn(down.in_features)
    stats = ChannelStats(mean, torch.ones_like(mean), torch.ones_like(mean))
    removed = torch.tensor([1, 5, 7, 40])
    x = torch.randn(3, down.in_features)
    x[:, removed] = mean[removed]
    expected = down(x)
    compensate_bias(model, group, removed, stats)
    apply_plan(model, plan_from_removals(model, group.removed_indices(removed)))
    keep = torch.tensor([i for i in range(len(mean)) if i not in removed.tolist()])
    assert torch.allclose(model.get_submodule(consumer_member(group).module)(x[:, keep]), expected, atol=1e-5)


def test_flap_ratio_zero_changes_nothing():
    model, samples = _llama(), _samples()
    ids = torch.tensor([[3, 9, 27, 81]])
    reference = model(ids).logits
    result = flap(model, samples, 0.0, progress=False)
    assert result.plan == {} and torch.equal(model(ids).logits, reference)


def test_flap_global_threshold_removes_the_asked_share_of_parameters():
    model, samples = _llama(), _samples()
    groups = transformers_graph(model).groups
    total = sum(float(unit_costs(model, g).sum()) for g in groups)
    largest_unit = max(float(unit_costs(model, g).max()) for g in groups)
    before = sum(p.numel() for p in model.parameters())
    flap(model, samples, 0.3, bias_compensation=False, progress=False)
    removed = before - sum(p.numel() for p in model.parameters())
    assert 0.3 * total <= removed <= 0.3 * total + largest_unit


def test_flap_uniform_structure_saves_a_folder_plain_transformers_loads(tmp_path):
    model, samples = _llama(), _samples()
    flap(model, samples, 0.25, structure="UL-UM", progress=False)
    widths = {model.model.layers[i].mlp.down_proj.in_features for i in range(3)}
    assert len(widths) == 1 and model.model.layers[0].mlp.down_proj.bias is not None
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    expected = model(ids).logits
    save_pruned_pretrained(model, None, tmp_path / "flap")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "flap").eval()
    heads_removed = model.model.layers[0].self_attn.o_proj.in_features < 64
    assert loaded.config.mlp_bias and loaded.config.attention_bias == heads_removed
    assert torch.allclose(loaded(ids).logits, expected, atol=1e-5)


def test_flap_refuses_bad_arguments_before_work():
    model, samples = _llama(), _samples()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, argument in ((dict(ratio=1.2), "ratio"), (dict(ratio=0.3, structure="XX"), "structure"),
                             (dict(ratio=0.3, round_to=0), "round_to")):
        with pytest.raises(ArgumentError, match=argument):
            flap(model, samples, progress=False, **kwargs)
    with pytest.raises(ArgumentError, match="samples"):
        flap(model, [], 0.3, progress=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_angular_sparsities_average_the_ratio_inverse_to_importance_and_capped():
    values = angular_sparsities([0.1, 0.2, 0.4, 0.8], 0.4)
    assert abs(sum(values) / 4 - 0.4) < 1e-9
    assert values == sorted(values, reverse=True)
    extreme = angular_sparsities([1e-6, 0.5, 0.5, 0.5], 0.5, cap=0.9)
    assert max(extreme) <= 0.9 + 1e-12 and abs(sum(extreme) / 4 - 0.5) < 1e-9


def test_cfsp_gives_less_important_blocks_narrower_mlps():
    model, samples = _llama(), _samples()
    result = cfsp(model, samples, 0.4, progress=False)
    importance = result.settings["block_importance"]
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    order = sorted(range(3), key=lambda i: importance[i])
    assert [widths[i] for i in order] == sorted(widths)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 128)


def test_flap_beats_random_structured_pruning_on_the_real_model():
    """On SmolLM2-135M, FLAP's fluctuation keeps far more of the model than random heads and neurons."""
    from prunekit.calibration import calibration_samples, load_text
    from prunekit.evaluate import perplexity
    from prunekit.graph.prune import prune_structured
    from prunekit.pipeline import split_held_out
    from prunekit.zoo import load_causal_lm

    text, held_out = split_held_out(load_text(None))
    results = {}
    for method in ("flap", "random"):
        model, tokenizer = load_causal_lm("smollm2-135m")
        samples = calibration_samples(text, tokenizer, 4, 64, seed=0)
        if method == "flap":
            flap(model, samples, 0.2, structure="UL-UM", progress=False)
        else:
            prune_structured(model, None, 0.2, score="random", graph=transformers_graph(model))
        results[method] = perplexity(model, tokenizer, held_out, max_tokens=512, progress=False)
    assert results["flap"] < 0.5 * results["random"], results


def _smollm2_flap_statistics(model: nn.Module, samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer FLAP channel metrics recomputed from scratch: hooks on the dense model's o_proj / down_proj inputs."""
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            key = f"{i}.{name}"
            captured[key] = []
            hooks.append(layer.get_submodule(name).register_forward_pre_hook(
                lambda m, a, key=key: captured[key].append(a[0].reshape(-1, a[0].shape[-1]).double())))
    with torch.no_grad():
        for sample in samples:
            model(sample)
    for hook in hooks:
        hook.remove()

    def metric(i: int, name: str) -> torch.Tensor:
        x = torch.cat(captured[f"{i}.{name}"])
        weight = model.model.layers[i].get_submodule(name).weight.detach().double()
        return x.var(dim=0, unbiased=False) * weight.pow(2).sum(dim=0)

    layers = range(len(model.model.layers))
    attention = torch.stack([metric(i, "self_attn.o_proj") ** 2 for i in layers])  # lib/prune.py:336
    mlp = torch.stack([metric(i, "mlp.down_proj") for i in layers])
    return attention, mlp


def test_flap_adaptive_allocation_is_one_global_parameter_threshold_on_smollm2(one_thread):
    """AL-AM on SmolLM2-135M against an independent recomputation of the reference's procedure: per-layer channel
    standardisation, per-head means, one threshold across all layers and both structure types, sized in parameters."""
    from prunekit.calibration import calibration_samples, load_text
    from prunekit.pipeline import split_held_out
    from prunekit.zoo import load_causal_lm

    ratio = 0.2
    model, tokenizer = load_causal_lm("smollm2-135m")
    text, _ = split_held_out(load_text(None))
    samples = calibration_samples(text, tokenizer, 4, 64, seed=0)
    config = model.config
    n_layers, hidden = config.num_hidden_layers, config.hidden_size
    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    d, n_rep = config.head_dim, n_q // n_kv
    assert not config.attention_bias and not config.mlp_bias  # the costs below count weights only

    attention, mlp = _smollm2_flap_statistics(model, samples)
    standard = lambda x: (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True)  # lib/prune.py:368
    attention, mlp = standard(attention), standard(mlp)
    # (a) standardised per layer, over all of the layer's channels, before any threshold
    for values in (attention, mlp):
        assert torch.allclose(values.mean(dim=1), torch.zeros(n_layers, dtype=torch.float64), atol=1e-9)
        assert torch.allclose(values.std(dim=1), torch.ones(n_layers, dtype=torch.float64), atol=1e-9)
    # unit j of a layer's head group is query-head slot j of every KV group (query head g * n_rep + j)
    heads = attention.reshape(n_layers, n_kv, n_rep, d).mean(dim=(1, 3))
    neurons = mlp
    groups = transformers_graph(model).groups
    stats = collect_input_stats(model, samples, {consumer_member(g).module for g in groups}, progress=False)
    for g in groups:
        layer = int(g.name.split(".")[2])
        member = consumer_member(g)
        channels = standardise(flap_channel_metric(model, g, stats[member.module]))
        expected = (attention if g.kind == "head" else mlp)[layer]
        assert torch.allclose(channels, expected, rtol=1e-4, atol=1e-6), g.name
        assert torch.allclose(flap_scores(model, g, stats[member.module]),
                              (heads if g.kind == "head" else neurons)[layer], rtol=1e-4, atol=1e-6), g.name

    # the reference's AL-AM selection with each unit weighed by the parameters it removes
    head_cost, neuron_cost = 2 * n_kv * d * hidden, 3 * hidden  # q rows + o columns; gate/up rows + down column
    units = [(score, head_cost, "head", i) for i, row in enumerate(heads.tolist()) for score in row]
    units += [(score, neuron_cost, "neuron", i) for i, row in enumerate(neurons.tolist()) for score in row]
    units.sort()
    total = n_layers * (n_rep * head_cost + neurons.shape[1] * neuron_cost)
    budget, spent, cut = ratio * total, 0, 0
    while spent < budget:
        spent += units[cut][1]
        cut += 1
    removed_heads, removed_neurons = [0] * n_layers, [0] * n_layers
    for _, _, kind, layer in units[:cut]:
        (removed_heads if kind == "head" else removed_neurons)[layer] += 1
    assert all(r < n_rep for r in removed_heads)  # the keep-one-unit guard is not in play here

    before = sum(p.numel() for p in model.parameters())
    result = flap(model, samples, ratio, bias_compensation=False, progress=False)
    removed = before - sum(p.numel() for p in model.parameters())
    kept_heads = [layer.self_attn.o_proj.in_features // (n_kv * d) for layer in model.model.layers]
    kept_neurons = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    # (c) the removed share is the ratio, overshooting by less than one unit's parameters
    assert budget <= removed < budget + head_cost
    # (d) adaptive: widths differ between layers, and each layer's widths are the recomputation's
    assert len(set(kept_neurons)) > 1
    assert kept_heads == [n_rep - r for r in removed_heads]
    assert kept_neurons == [neurons.shape[1] - r for r in removed_neurons]
    # (b) one threshold: every kept unit, head or neuron, in any layer, scores at least every removed one
    kept_scores, removed_scores = [], []
    for i in range(n_layers):
        o_columns = result.plan.get((f"model.layers.{i}.self_attn.o_proj", "weight", 1), torch.arange(n_q * d))
        down_columns = result.plan.get((f"model.layers.{i}.mlp.down_proj", "weight", 1),
                                       torch.arange(neurons.shape[1]))
        for row, kept in ((heads[i], torch.unique(o_columns // d % n_rep)), (neurons[i], down_columns)):
            mask = torch.zeros(len(row), dtype=torch.bool)
            mask[kept] = True
            kept_scores += row[mask].tolist()
            removed_scores += row[~mask].tolist()
    assert len(removed_scores) == cut and min(kept_scores) >= max(removed_scores)


# --- the command line ------------------------------------------------------------------------------------------------


def test_shrink_command_prunes_saves_and_the_save_replays(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["shrink", "resnet-small", "--ratio", "0.5", "--round-to", "4", "--no-latency", "--json", "-q",
                 "--out", str(out)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["after"]["macs"] < 0.5 * summary["before"]["macs"]
    assert all(after % 4 == 0 for _, after in summary["widths"].values())
    torch.manual_seed(0)
    fresh = nets.build_net("resnet-small").eval()
    prunekit.load(fresh, out)
    assert sum(p.numel() for p in fresh.parameters()) == summary["after"]["params"]


def test_shrink_refuses_an_llm_method_on_a_cnn(capsys):
    assert main(["shrink", "resnet-small", "--method", "flap", "--no-latency", "-q"]) == 2
    assert "flap needs a transformers causal language model" in capsys.readouterr().err
    assert main(["shrink", "resnet-small", "--method", "nope", "-q"]) == 2
    assert "method='nope'" in capsys.readouterr().err
