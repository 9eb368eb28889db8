"""Structured pruning never returns a broken model: shape constants baked into reshapes follow the pruned sizes
(through the attribute they come from) or keep their dimension whole; window-attention heads are pruned with their
relative position bias columns; a prune whose result fails its forward restores the model and names the module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import structured_patterns as sp
from prunekit.errors import ModelError
from prunekit.graph import surgery
from prunekit.graph.groups import ATTRIBUTE
from prunekit.graph.prune import prune_structured
from prunekit.graph.trace import build_graph

IMAGE = (1, 3, 16, 16)


def _setup(make):
    torch.manual_seed(0)
    model = make().eval()
    return model, torch.randn(*IMAGE, generator=torch.Generator().manual_seed(1))


def _zero_heads(model: nn.Module, group, units: torch.Tensor) -> None:
    """Zero what a removed head contributes: its columns of the output projection (role "in" of the last Linear)."""
    with torch.no_grad():
        for member in group.members:
            module = model.get_submodule(member.module)
            if member.role == "in" and isinstance(module, nn.Linear):
                module.weight.index_fill_(member.dim, member.index[torch.isin(member.unit, units)], 0.0)


def test_torchvision_vit_with_stored_hidden_dim_prunes_and_runs():
    """The issue's crash (reshape(n, self.hidden_dim, h*w) after the hidden size shrank) is gone: the attribute
    is part of the hidden group and follows the pruned width."""
    model, x = _setup(sp.TorchvisionStyleViT)
    graph = build_graph(model, x)
    hidden = next(g for g in graph.groups if "conv_proj" in g.modules())
    assert [m.param for m in hidden.attributes] == [ATTRIBUTE + "hidden_dim"]
    result = prune_structured(model, x, 0.5, budget="uniform")
    assert model.hidden_dim == model.conv_proj.out_channels < 32
    assert model(x).shape == (1, 10)
    assert not [d for d in result.decisions if d.notes and "kept whole" in d.notes[0]]


def test_hidden_dim_patch_replays_from_the_plan():
    """The attribute is in the plan, so a fresh instance rebuilt from it runs and matches."""
    model, x = _setup(sp.TorchvisionStyleViT)
    result = prune_structured(model, x, 0.5)
    fresh, _ = _setup(sp.TorchvisionStyleViT)
    surgery.apply_plan(fresh, surgery.plan_from_json(surgery.plan_to_json(result.plan)))
    fresh.load_state_dict(model.state_dict())
    assert fresh.hidden_dim == model.hidden_dim
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("make,heads", [(sp.TinySwin, {"stage1.0.attn": 2, "stage1.1.attn": 2, "stage2.0.attn": 4,
                                                           "stage2.1.attn": 4}),
                                        (sp.TinyMaxViT, {"block.attn": 4, "grid.attn": 4})])
def test_window_attention_heads_are_groups_with_their_bias_columns(make, heads):
    model, x = _setup(make)
    graph = build_graph(model, x)
    assert not graph.barriers, graph.describe()
    found = {}
    for group in graph.groups:
        tables = [m for m in group.members if m.param == "relative_position_bias_table"]
        if tables:
            assert group.kind == "head" and tables[0].dim == 1
            assert sorted(tables[0].index.tolist()) == list(range(group.size))
            assert any(m.param.startswith(ATTRIBUTE) for m in group.attributes)
            found[tables[0].module] = group.size
    assert found == heads


@pytest.mark.parametrize("make", [sp.TinySwin, sp.TinyMaxViT])
def test_removing_zeroed_heads_leaves_the_output_unchanged(make):
    """Oracle: a head whose output-projection columns are zero contributes nothing, so removing it (its q/k/v rows,
    its bias column, the head-count attribute) changes no output beyond float error."""
    model, x = _setup(make)
    graph = build_graph(model, x)
    chosen = [(g, torch.tensor([0])) for g in graph.groups if g.kind == "head"]
    for group, units in chosen:
        _zero_heads(model, group, units)
    reference = model(x)
    plan = surgery.plan_from_removals(model, surgery.merge_removals(g.removed_indices(u) for g, u in chosen))
    surgery.apply_plan(model, plan)
    for group, _ in chosen:
        owner = next(m.module for m in group.members if m.param == "relative_position_bias_table")
        attention = model.get_submodule(owner)
        heads = getattr(attention, "num_heads", getattr(attention, "n_heads", None))
        assert heads == group.size - 1 == attention.relative_position_bias_table.shape[1]
    assert torch.allclose(model(x), reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [sp.TinySwin, sp.TinyMaxViT])
def test_half_pruned_window_attention_models_shrink_everywhere_and_run(make):
    """Before heads and the residual stream could be pruned, ratio 0.5 kept 0.79 (Swin) of the parameters; with
    every group halved, layers pruned on both sides keep a quarter, so the whole model keeps well under half."""
    model, x = _setup(make)
    before = sp.parameters(model)
    result = prune_structured(model, x, 0.5)
    share = sp.parameters(model) / before
    assert share < 0.4, share
    assert model(x).shape == (1, 10)
    assert all(d.kept <= (d.size + 1) // 2 for d in result.decisions), result.table()
    build_graph(model, x)  # the pruned model traces again


def test_untracked_literal_keeps_its_dimension_whole_and_says_why():
    model, x = _setup(sp.HardCodedView)
    x = x[..., :8, :8]
    result = prune_structured(model, x, 0.5)
    conv = next(d for d in result.decisions if d.name.startswith("conv"))
    assert conv.kept == conv.size == 32
    assert "kept whole" in conv.notes[0] and "32" in conv.notes[0], conv.notes
    mid = next(d for d in result.decisions if d.name.startswith("mid"))
    assert mid.kept == 8
    assert model(x).shape == (1, 10)
    with pytest.raises(ModelError, match="group 'conv.*constant 32"):
        prune_structured(sp.HardCodedView().eval(), x, 0.5, untracked_sizes="error")


def test_a_failing_pruned_forward_restores_the_model_bitwise_and_names_the_module(monkeypatch):
    """Force the tracer to miss the literal (no kept-whole mark): the forward check fails in 'fc', and the model is
    given back exactly as it was, tensors and attributes."""
    model, x = _setup(sp.HardCodedView)
    x = x[..., :8, :8]
    graph = build_graph(model, x)
    for group in graph.groups:
        group.kept_whole = ""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = model(x)
    with pytest.raises(ModelError, match=r"module 'fc' \(Linear\).*restored"):
        prune_structured(model, x, 0.5, graph=graph)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.conv.out_channels == 32 and model.fc.in_features == 32
    assert torch.equal(model(x), reference)


def test_sizes_computed_from_a_runtime_shape_keep_what_they_tie():
    """reshape(..., C // heads) with C read from x.shape ties the residual width to the heads: neither is cut
    apart from the other, and the pruned model runs (the barrier says why)."""
    torch.manual_seed(0)
    model = sp.RuntimeSizeAttention().eval()
    x = torch.randn(2, 5, 8)
    graph = build_graph(model, x)
    assert any("computed at run time" in b.reason for b in graph.barriers), graph.describe()
    prune_structured(model, x, 0.5, graph=graph)
    assert model(x).shape == (2, 3)
