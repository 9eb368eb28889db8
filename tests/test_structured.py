"""Structured pruning on traced graphs: the oracles of physical removal on CNN and ViT architectures."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit import nets
from prunekit.errors import ArgumentError, FormatError, PruneError
from prunekit.graph.groups import Group
from prunekit.graph.importance import get_score
from prunekit.graph.prune import prune_structured
from prunekit.graph.surgery import apply_plan, merge_removals, plan_from_removals
from prunekit.graph.trace import TraceError, build_graph, connected_components

IMAGE = (2, 1, 28, 28)
ARCHITECTURES = {
    "resnet": lambda: nets.resnet_small(),
    "densenet": lambda: nets.densenet_small(),
    "mobilenet_v2": lambda: nets.mobilenet_v2_small(),
    "mobilenet_v3": lambda: nets.mobilenet_v3_small(),
    "vit": lambda: nets.vit_tiny(),
    "vit_fused": lambda: nets.vit_tiny(attention="fused"),
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = ARCHITECTURES[name]().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so BN entries matter in the oracles
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def _input() -> torch.Tensor:
    return torch.randn(*IMAGE, generator=torch.Generator().manual_seed(1))


def _normalises_over_channels(model: nn.Module, group: Group) -> bool:
    """LayerNorm over the group's channels: removing a channel changes every other channel's statistics."""
    return any(isinstance(model.get_submodule(m.module), nn.LayerNorm) for m in group.members)


def _zero_units(model: nn.Module, group: Group, units: torch.Tensor) -> None:
    """Make the units' channels exactly zero everywhere: zero what produces them (rows, BN/affine entries)."""
    with torch.no_grad():
        for member in group.members:
            if member.role == "in":
                continue
            tensor = getattr(model.get_submodule(member.module), member.param)
            if member.param in ("running_mean", "running_var"):
                continue
            index = member.index[torch.isin(member.unit, units)]
            tensor.index_fill_(member.dim, index, 0.0)


def _remove_units(model: nn.Module, chosen: dict[int, torch.Tensor], groups: list[Group]) -> None:
    removals = merge_removals(groups[i].removed_indices(units) for i, units in chosen.items())
    apply_plan(model, plan_from_removals(model, removals))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_ratio_zero_is_the_exact_identity(name):
    model, x = _model(name), _input()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = model(x)
    result = prune_structured(model, x, 0.0)
    assert result.plan == {}
    assert torch.equal(model(x), reference)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_removing_zeroed_units_leaves_outputs_unchanged(name):
    """Physical removal of channels that are already all zero changes nothing (float tolerance)."""
    model, x = _model(name), _input()
    graph = build_graph(model, x)
    generator = torch.Generator().manual_seed(0)
    chosen = {}
    for index, group in enumerate(graph.groups):
        if group.size < 2 or _normalises_over_channels(model, group):
            continue
        count = max(1, group.size // 3)
        chosen[index] = torch.randperm(group.size, generator=generator)[:count]
    assert chosen, "every architecture has prunable groups"
    for index, units in chosen.items():
        _zero_units(model, graph.groups[index], units)
    zeroed = model(x)
    params_before = sum(p.numel() for p in model.parameters())
    _remove_units(model, chosen, graph.groups)
    assert sum(p.numel() for p in model.parameters()) < params_before
    assert torch.allclose(model(x), zeroed, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("budget", ["uniform", "global"])
def test_half_pruned_models_keep_output_shape_and_shrink(name, budget):
    model, x = _model(name), _input()
    shape = model(x).shape
    params = sum(p.numel() for p in model.parameters())
    result = prune_structured(model, x, 0.5, budget=budget)
    assert model(x).shape == shape
    assert sum(p.numel() for p in model.parameters()) < 0.85 * params
    assert all(d.kept >= 1 for d in result.decisions)
    # the pruned model is an ordinary module: it traces again, and trains
    build_graph(model, x)
    model.train()
    model(x).sum().backward()


def test_residual_adds_and_downsampling_shortcuts_share_one_group():
    model, x = _model("resnet"), _input()
    graph = build_graph(model, x)
    stem_group = next(g for g in graph.groups if any(m.module.startswith("stem") for m in g.members))
    modules = stem_group.modules()
    # the stem's channels run through every residual add of stage 1 and into stage 2's first conv and shortcut
    assert any(name.endswith("conv2") for name in modules if name.startswith("stages.0") or name.startswith("layer"))
    assert len(modules) >= 5


def test_depthwise_and_grouped_convolutions_keep_their_groups():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.expand = nn.Conv2d(3, 32, 1)
            self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
            self.grouped = nn.Conv2d(32, 64, 1, groups=4)
            self.norm = nn.BatchNorm2d(64)
            self.head = nn.Conv2d(64, 5, 1)

        def forward(self, x):
            return self.head(torch.relu(self.norm(self.grouped(torch.relu(self.depthwise(self.expand(x)))))))

    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    prune_structured(model, x, 0.5)
    assert model.depthwise.groups == model.depthwise.in_channels == model.depthwise.out_channels == 16
    assert model.grouped.groups == 4 and model.grouped.out_channels == 32 and model.grouped.in_channels == 16
    assert model(x).shape == (2, 5, 8, 8)


def test_flatten_into_linear_removes_every_spatial_column_of_a_channel():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 4 * 4, 3)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))

    model, x = Net().eval(), torch.randn(2, 1, 4, 4)
    graph = build_graph(model, x)
    (group,) = graph.groups
    fc = next(m for m in group.members if m.module == "fc")
    assert len(fc.index) == 8 * 16 and torch.equal(fc.index[fc.unit == 2], torch.arange(32, 48))
    prune_structured(model, x, 0.5)
    assert model.fc.in_features == 4 * 16 and model(x).shape == (2, 3)


def test_group_norm_units_are_whole_groups():
    model = nn.Sequential(nn.Conv2d(1, 12, 3), nn.GroupNorm(3, 12), nn.ReLU(), nn.Conv2d(12, 2, 1)).eval()
    x = torch.randn(1, 1, 6, 6)
    graph = build_graph(model, x)
    (group,) = graph.groups
    assert group.size == 3
    prune_structured(model, x, 0.4)
    assert model[1].num_groups == 2 and model[1].num_channels == 8


def test_multihead_attention_units_are_whole_heads():
    model, x = _model("vit"), _input()
    graph = build_graph(model, x)
    heads = [g for g in graph.groups if g.kind == "head"]
    assert len(heads) == 1 and heads[0].size == 4  # the residual stream: one unit per head slot of 16 channels
    prune_structured(model, x, 0.5)
    attention = next(m for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    assert attention.num_heads == 2 and attention.head_dim == 16 and attention.embed_dim == 32


def test_unknown_op_is_a_barrier_not_a_crash():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(8, 8)
            self.c = nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h = torch.fft.fft(self.b(h)).real  # no channel rule: b's outputs may not change
            return self.c(h)

    model, x = Net().eval(), torch.randn(3, 6)
    graph = build_graph(model, x)
    assert [g.modules() for g in graph.groups] == [["a", "b"]]
    assert graph.barriers and "fft" in graph.barriers[0].reason
    prune_structured(model, x, 0.5)
    assert model.b.out_features == 8 and model.a.out_features == 4 and model(x).shape == (3, 2)


def test_untraceable_module_is_named_and_can_be_marked_a_barrier():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.proj(x)
            return x

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Gate(), nn.Linear(8, 2)).eval()
    x = torch.randn(2, 4)
    with pytest.raises(TraceError, match=r"module '2' \(Gate\).*barriers=\['2'\]"):
        build_graph(model, x)
    graph = build_graph(model, x, barriers=["2"])
    assert any(b.where == "2" for b in graph.barriers)
    # '0' feeds only the barrier (its uses there are unknown), '3' is the output and '2.proj' is inside the barrier
    assert graph.groups == []
    with pytest.raises(ArgumentError, match="barriers"):
        build_graph(model, x, barriers=["nope"])


def test_wrong_example_input_shape_is_named():
    model = _model("resnet")
    with pytest.raises(ArgumentError, match=r"example_inputs=.*\(1, 3, 28, 28\).*stem"):
        prune_structured(model, torch.randn(1, 3, 28, 28), 0.5)


def test_ratio_that_would_empty_a_group_keeps_one_and_says_so():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    result = prune_structured(model, torch.randn(2, 4), 0.9)
    assert model[0].out_features == 1
    assert any("would remove every unit" in note for note in result.notes)


@pytest.mark.parametrize("bad", [dict(ratio=1.0), dict(ratio=-0.1), dict(ratio=0.5, budget="nope"),
                                 dict(ratio=0.5, score="nope"), dict(ratio=0.5, round_to=0),
                                 dict(budget="macs", target=1.5), dict(budget="macs")])
def test_bad_arguments_are_refused_before_any_change(bad):
    model, x = _model("resnet"), _input()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruneError):
        prune_structured(model, x, **bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_round_to_keeps_widths_multiples():
    model, x = _model("resnet"), _input()
    prune_structured(model, x, 0.3, round_to=8)
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.out_channels not in (10,):
            assert module.out_channels % 8 == 0


def test_macs_target_is_met():
    from prunekit.measure import count_macs

    model, x = _model("resnet"), _input()
    dense = count_macs(model, x)
    prune_structured(model, x, budget="macs", target=0.5)
    after = count_macs(model, x)
    # at most the target, and just under it: the search reaches 0.4994 of the dense MACs on this model
    assert 0.49 * dense <= after <= 0.5 * dense


def test_saved_structure_replays_on_a_fresh_instance(tmp_path):
    model, x = _model("mobilenet_v3"), _input()
    result = prune_structured(model, x, 0.5, score="l1")
    expected = model(x)
    prunekit.save(model, tmp_path / "run", structure=result)
    fresh = _model("mobilenet_v3")
    prunekit.load(fresh, tmp_path / "run")
    assert torch.allclose(fresh(x), expected, atol=1e-6)


def test_a_plan_for_another_model_is_refused_and_the_model_left_alone(tmp_path):
    model, x = _model("resnet"), _input()
    result = prune_structured(model, x, 0.5)
    prunekit.save(model, tmp_path / "run", structure=result)
    other = nets.resnet_small(width=8).eval()
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(FormatError):
        prunekit.load(other, tmp_path / "run")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


# --- scores ----------------------------------------------------------------------------------------------------------


def _conv_chain() -> tuple[nn.Module, Group]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 3, 1)).eval()
    graph = build_graph(model, torch.randn(1, 2, 5, 5))
    (group,) = graph.groups
    return model, group


def test_l1_score_is_the_sum_of_every_slice_the_unit_owns():
    model, group = _conv_chain()
    expected = (model[0].weight.abs().sum(dim=(1, 2, 3)) + model[0].bias.abs() + model[1].weight.abs()
                + model[1].bias.abs() + model[1].running_mean.abs() + model[1].running_var.abs()
                + model[3].weight.abs().sum(dim=(0, 2, 3)))
    assert torch.allclose(get_score("l1")(model, group, {}).float(), expected.detach(), rtol=1e-5)


def test_bn_scale_score_reads_gamma():
    model, group = _conv_chain()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -2.0, 0.1, 1.0, 3.0, -0.2]))
    assert torch.equal(torch.argsort(get_score("bn-scale")(model, group, {})), torch.tensor([2, 5, 0, 3, 1, 4]))


def test_fpgm_scores_the_filter_nearest_the_others_lowest():
    model, group = _conv_chain()
    with torch.no_grad():
        base = torch.randn(2, 3, 3)
        for i in range(6):
            model[0].weight[i] = base * (i + 1)  # filter 0.. on one line; the middle ones are nearest the rest
    scores = get_score("fpgm")(model, group, {})
    assert int(torch.argmin(scores)) in (2, 3)


def test_random_score_is_seeded():
    model, group = _conv_chain()
    assert torch.equal(get_score("random")(model, group, {"seed": 3}), get_score("random")(model, group, {"seed": 3}))


def test_taylor_score_uses_gradients_from_data():
    model, x = _model("resnet"), _input()
    labels = torch.tensor([1, 2])
    result = prune_structured(model, x, 0.25, score="taylor", data=(x, labels))
    assert result.plan and all(p.grad is None for p in model.parameters())
    with pytest.raises(ArgumentError, match="data"):
        prune_structured(_model("resnet"), x, 0.25, score="taylor")


def test_connected_components_matches_a_plain_union_find():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        count = 50
        a = torch.randint(0, count, (30,), generator=generator).numpy()
        b = torch.randint(0, count, (30,), generator=generator).numpy()
        parent = list(range(count))

        def find(i):
            while parent[i] != i:
                i = parent[i]
            return i

        for i, j in zip(a, b):
            parent[find(i)] = find(j)
        labels = connected_components(count, a, b)
        for i in range(count):
            for j in range(count):
                assert (labels[i] == labels[j]) == (find(i) == find(j))


# --- depth -----------------------------------------------------------------------------------------------------------


def test_residual_blocks_are_found_and_a_block_with_a_zeroed_branch_is_removed_exactly(tmp_path):
    from prunekit.graph.depth import drop_residual_blocks, residual_blocks

    model, x = _model("resnet"), _input().abs()
    blocks = residual_blocks(model, x)
    assert blocks and all("downsample" not in b for b in blocks)
    # a basic block computes relu(bn2(conv2(...)) + x) on a non-negative x: with bn2 zeroed it is the identity
    victim = blocks[-1]
    with torch.no_grad():
        model.get_submodule(victim).bn2.weight.zero_()
        model.get_submodule(victim).bn2.bias.zero_()
    expected = model(x)
    removed, influence, skipped = drop_residual_blocks(model, x, 1)
    assert skipped == []  # every candidate of this ResNet traces
    assert removed == [victim] and influence[victim] == pytest.approx(0.0, abs=1e-6)
    assert isinstance(model.get_submodule(victim), nn.Identity)
    assert torch.allclose(model(x), expected, atol=1e-5)
    # depth and width together survive a save and replay on a fresh instance
    result = prune_structured(model, x, 0.25)
    result.removed_modules = removed
    prunekit.save(model, tmp_path / "deep", structure=result)
    fresh = _model("resnet")
    prunekit.load(fresh, tmp_path / "deep")
    assert torch.allclose(fresh(x), model(x), atol=1e-6)


def test_drop_residual_blocks_refuses_a_count_beyond_the_blocks():
    from prunekit.graph.depth import drop_residual_blocks

    model, x = _model("resnet"), _input()
    with pytest.raises(ArgumentError, match="count"):
        drop_residual_blocks(model, x, 99)


def _group_signature(graph):
    return [(g.name, g.size, [(m.key, m.index.tolist(), m.unit.tolist()) for m in g.members]) for g in graph.groups]


@pytest.mark.parametrize("arch", ["mobilenet_v3", "resnet", "densenet", "vit"])
def test_meta_fake_and_real_shape_passes_give_the_same_groups(arch):
    model, x = _model(arch), _input()
    real = _group_signature(build_graph(model, x, shape_pass="real"))
    assert _group_signature(build_graph(model, x)) == real  # meta, the default
    assert _group_signature(build_graph(model, x, shape_pass="fake")) == real


class _SelectsChannelsByData(nn.Module):
    """Channels picked by the input's values (torch.nonzero on a traced tensor has no meta kernel): the shape-only
    pass must fall back to a real one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = self.conv(x)
        picked = torch.nonzero(y[0, :, 0, 0] > -1e9).squeeze(1)  # every channel, but only a real pass knows
        return self.head(y[:, picked].mean((2, 3)))


def test_an_op_without_a_meta_kernel_falls_back_to_a_real_pass():
    model, x = _SelectsChannelsByData(), torch.randn(1, 3, 8, 8)
    assert _group_signature(build_graph(model, x)) == _group_signature(build_graph(model, x, shape_pass="real"))


def test_unknown_shape_pass_is_named():
    with pytest.raises(ArgumentError, match="shape_pass"):
        build_graph(_model("resnet"), _input(), shape_pass="symbolic")


def test_latency_target_searches_the_ratio_with_measured_latency(monkeypatch):
    """The latency budget bisects on measured time; here 'time' is made proportional to MACs to check the search."""
    from prunekit import measure

    calls = []

    def fake_latency(model, inputs, warmup=3, repeats=20):
        calls.append(inputs.shape[0])
        return measure.LatencyResult(float(measure.count_macs(model, inputs)), 0.0, 0.0, repeats, warmup)

    monkeypatch.setattr(measure, "measure_latency", fake_latency)
    model, x = _model("resnet"), _input()[:1]
    dense = measure.count_macs(model, x)
    prune_structured(model, x, budget="latency", target=0.6, latency_batch=4)
    assert measure.count_macs(model, x) <= 0.6 * dense
    assert calls and set(calls) == {4}


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_macs_target_lands_just_under_the_target_even_with_coarse_head_groups(arch):
    """Whole-head groups of nn.MultiheadAttention move in large steps; the search must still land near the target."""
    from prunekit import measure

    model, x = _model(arch), _input()
    dense = measure.count_macs(model, x)
    prune_structured(model, x, budget="macs", target=0.5)
    kept = measure.count_macs(model, x) / dense
    assert 0.47 <= kept <= 0.5


@pytest.mark.parametrize("scale", [1, 2**40])  # the packed int64 path, and the rank path where packing overflows
def test_combined_key_sorts_like_lexsort_and_keeps_equal_rows_equal(scale):
    import numpy as np

    from prunekit.graph.trace import _combined_key

    rng = np.random.default_rng(0)
    columns = [rng.integers(0, 5, 200) * scale, rng.integers(0, 4, 200), rng.integers(0, 6, 200) * scale]
    key = _combined_key(*columns)
    rows = list(zip(*[c.tolist() for c in columns]))
    assert [rows[i] for i in np.argsort(key, kind="stable")] == sorted(rows)
    for i in range(0, 200, 7):
        for j in range(200):
            assert (key[i] == key[j]) == (rows[i] == rows[j])


def test_shapes_made_from_module_sizes_equal_the_real_shapes():
    """The meta pass skips running common modules; every node's recorded shape must still be the real one."""
    from prunekit.graph.trace import record_shapes, symbolic_trace

    pools = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, dilation=1), nn.MaxPool2d(3, 2, 1),
                          nn.AvgPool2d(2), nn.Conv2d(8, 4, (3, 1), stride=(1, 2), padding=(2, 0), dilation=(2, 1)),
                          nn.AdaptiveAvgPool2d((None, 2)))
    for model, x in [(_model(arch), _input()) for arch in ARCHITECTURES] + [(pools, torch.randn(2, 3, 33, 29))]:
        traced = symbolic_trace(model, set())
        meta, real = record_shapes(traced, (x,)), record_shapes(traced, (x,), shape_pass="real")
        assert meta == real
