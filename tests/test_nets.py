"""The test architectures: shapes, layouts, determinism and torch.fx traceability."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.fx
from torch import nn

from prunekit.errors import ArgumentError
from prunekit.nets import (NETS, Bottleneck, DenseBlock, InvertedResidual, SelfAttention, SqueezeExcite, build_net,
                           densenet_small, mobilenet_v2_small, mobilenet_v3_small, resnet50_style, resnet_small,
                           vit_b_style, vit_tiny)

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

SMALL = {
    "resnet-small": resnet_small,
    "densenet-small": densenet_small,
    "mobilenet-v2-small": mobilenet_v2_small,
    "mobilenet-v3-small": mobilenet_v3_small,
    "vit-tiny": vit_tiny,
    "vit-tiny-fused": lambda: vit_tiny(attention="fused"),
}


# One intra-op thread for the module (conftest.one_intra_op_thread): the models here are tiny.
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _seeded(factory, seed=0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return factory(**kwargs).eval()


def _traced_matches(model: nn.Module, x: torch.Tensor) -> None:
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        expected, got = model(x), traced(x)
    assert torch.equal(expected, got)


@pytest.mark.parametrize("name", SMALL)
def test_small_nets_trace_with_fx_and_give_identical_outputs(name):
    model = _seeded(SMALL[name])
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    _traced_matches(model, x)


@pytest.mark.parametrize("name", SMALL)
def test_small_nets_are_deterministic_given_the_seed(name):
    a, b = _seeded(SMALL[name]), _seeded(SMALL[name])
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_cnns_take_any_channels_resolution_and_classes():
    x = torch.randn(2, 3, 20, 20)
    for factory in (resnet_small, densenet_small, mobilenet_v2_small, mobilenet_v3_small):
        with torch.no_grad():
            assert _seeded(factory, in_channels=3, num_classes=7)(x).shape == (2, 7)
    vit = _seeded(vit_tiny, image_size=32, patch=8, in_channels=3, num_classes=7)
    with torch.no_grad():
        assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_resnet50_layout_traces_and_has_resnet50_parameter_count():
    model = _seeded(resnet50_style)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision's resnet50
    assert [len(stage) for stage in model.layers] == [3, 4, 6, 3]
    assert all(isinstance(block, Bottleneck) for stage in model.layers for block in stage)
    assert model.fc.in_features == 2048
    _traced_matches(model, torch.randn(1, 3, 32, 32))  # small input: the layout, not the resolution, is under test


def test_vit_b_layout_traces_and_has_vit_b16_parameter_count():
    model = _seeded(vit_b_style)
    assert sum(p.numel() for p in model.parameters()) == 86_567_656  # torchvision's vit_b_16
    assert len(model.blocks) == 12 and model.blocks[0].mlp.fc1.out_features == 3072
    assert model.pos_embed.shape == (1, 197, 768)
    traced = torch.fx.symbolic_trace(model)
    assert any(node.target == "cls_token" for node in traced.graph.nodes)


def test_building_blocks_use_the_expected_operations():
    resnet = resnet_small()
    assert resnet.layers[1][0].downsample[0].kernel_size == (1, 1)  # projection shortcut
    dense = densenet_small()
    assert any(isinstance(m, DenseBlock) for m in dense.modules())
    mobile = mobilenet_v2_small()
    depthwise = [m for m in mobile.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert any(isinstance(m, InvertedResidual) and m.use_residual for m in mobile.modules())
    v3 = mobilenet_v3_small()
    assert any(isinstance(m, SqueezeExcite) for m in v3.modules())
    assert any(isinstance(m, nn.Hardswish) for m in v3.modules())
    fused = vit_tiny(attention="fused")
    attention = fused.blocks[0].attn
    assert isinstance(attention, SelfAttention) and attention.qkv.out_features == 3 * 64
    assert isinstance(vit_tiny().blocks[0].attn.attn, nn.MultiheadAttention)


def test_fused_and_mha_attention_agree_on_the_same_weights():
    torch.manual_seed(0)
    mha = vit_tiny(depth=1).eval()
    fused = vit_tiny(depth=1, attention="fused").eval()
    state = mha.state_dict()
    # nn.MultiheadAttention keeps q, k and v stacked in in_proj: the same layout as the fused qkv Linear.
    names = {"attn.attn.in_proj_weight": "attn.qkv.weight", "attn.attn.in_proj_bias": "attn.qkv.bias",
             "attn.attn.out_proj": "attn.proj"}
    renamed = {}
    for key, value in state.items():
        for old, new in names.items():
            key = key.replace(old, new)
        renamed[key] = value
    fused.load_state_dict(renamed)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(mha(x), fused(x), atol=1e-5)


def test_registry_and_errors():
    assert set(NETS) >= {"resnet-small", "resnet50-style", "densenet-small", "mobilenet-v2-small",
                         "mobilenet-v3-small", "vit-tiny", "vit-b-style"}
    assert isinstance(build_net("resnet-small", width=8), nn.Module)
    with pytest.raises(ArgumentError, match="vit-tiny"):
        build_net("vit-tiney")
    with pytest.raises(ArgumentError, match="attention"):
        vit_tiny(attention="flash")
    with pytest.raises(ArgumentError, match="patch"):
        vit_tiny(patch=5)
    with pytest.raises(ArgumentError, match="heads"):
        vit_tiny(heads=3)
    with pytest.raises(ArgumentError, match="width"):
        resnet_small(width=0)


def test_torchvision_is_not_imported():
    code = "import sys, prunekit.nets; assert 'torchvision' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": SRC})
