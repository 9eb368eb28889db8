"""Parameter, MAC and latency measurement (closed forms for MACs; no timing assertions)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.errors import ArgumentError
from prunekit.measure import (CostReport, LatencyResult, batch_of, compare, cost_report, count_macs, count_params,
                              measure_latency)
from prunekit.nets import vit_tiny


# One intra-op thread for the module (conftest.one_intra_op_thread): the models here are tiny.
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def test_linear_macs_are_batch_times_in_times_out():
    layer = nn.Linear(24, 10)
    assert count_macs(layer, torch.randn(5, 24)) == 5 * 24 * 10


@pytest.mark.parametrize("in_ch, out_ch, k, stride, padding, groups", [
    (3, 8, 3, 1, 1, 1),
    (4, 6, 3, 2, 0, 2),
    (8, 8, 3, 1, 1, 8),  # depthwise
])
def test_conv_macs_closed_form(in_ch, out_ch, k, stride, padding, groups):
    conv = nn.Conv2d(in_ch, out_ch, k, stride, padding, groups=groups)
    h = w = 11
    out_h = (h + 2 * padding - k) // stride + 1
    out_w = (w + 2 * padding - k) // stride + 1
    assert count_macs(conv, torch.randn(1, in_ch, h, w)) == out_h * out_w * k * k * (in_ch // groups) * out_ch


def test_macs_accept_tuples_and_kwargs_and_restore_training_modes():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(6, 3)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    model = Pair().train()
    model.b.eval()  # a submodule's own mode must survive, not be overwritten by the parent's
    x, y = torch.randn(2, 4), torch.randn(2, 6)
    assert count_macs(model, (x, y)) == count_macs(model, {"x": x, "y": y}) == 2 * (4 * 3 + 6 * 3)
    assert model.training and model.a.training and not model.b.training


def test_attention_is_counted_the_same_for_both_attention_flavours():
    # nn.MultiheadAttention's fast path and CPU flash attention would otherwise be invisible to the counter.
    macs = {}
    for attention in ("mha", "fused"):
        torch.manual_seed(0)
        macs[attention] = count_macs(vit_tiny(attention=attention), torch.randn(1, 1, 28, 28))
    # by hand: patch conv 16 x 64 x 49; per block on 17 tokens (16 patches + cls) qkv, q k^T and a v, out, 2 MLP
    tokens, dim = 17, 64
    block = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * 4 * dim
    assert macs["mha"] == macs["fused"] == 16 * dim * 49 + 4 * block + dim * 10


def test_tied_weights_are_counted_once():
    embed, head = nn.Embedding(50, 8), nn.Linear(8, 50, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(embed, head)
    assert count_params(model) == 50 * 8
    head.weight = nn.Parameter(embed.weight.data)  # a second Parameter object on the same storage
    assert count_params(model) == 50 * 8
    assert count_params(nn.Linear(8, 50)) == 8 * 50 + 50


def test_latency_runs_warmup_plus_repeats_forward_passes():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).train()
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(module.training))
    result = measure_latency(model, torch.randn(1, 8), warmup=2, repeats=5)
    assert len(calls) == 7 and not any(calls)  # every pass in eval mode
    assert model.training
    assert isinstance(result, LatencyResult) and result.repeats == 5 and result.batch_size == 1
    assert 0 < result.min <= result.median <= result.p90


def test_batch_of_repeats_tensors_and_dicts():
    x = torch.randn(1, 3, 4)
    assert torch.equal(batch_of(x, 4), x.repeat(4, 1, 1))
    batch = batch_of({"input_ids": torch.tensor([[1, 2, 3]]), "use_cache": False}, 2)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 2, 3]] and batch["use_cache"] is False
    with pytest.raises(ArgumentError, match="batch-1"):
        batch_of(torch.randn(2, 3), 4)


def test_cost_report_and_compare():
    torch.manual_seed(0)
    big, small = nn.Linear(16, 16), nn.Linear(16, 8)
    example = torch.randn(1, 16)
    before = cost_report(big, example, latency_batches=(1, 4), warmup=0, repeats=2)
    after = cost_report(small, example, latency_batches=(1, 4), warmup=0, repeats=2)
    assert before.params == 16 * 16 + 16 and before.macs == 256 and set(before.latency) == {1, 4}
    assert before.latency[4].batch_size == 4 and before.latency_b1 is before.latency[1] and before.latency_b16 is None
    table = compare(before, after)
    assert "params" in table and "MACs" in table and "latency b1" in table and "latency b4" in table
    assert "0.500x" in table  # MACs halved
    untimed = cost_report(small, example, measure_time=False)
    assert untimed.latency == {} and untimed.latency_b1 is None
    assert "-" in compare(untimed, CostReport(untimed.params, untimed.macs, {1: after.latency[1]}))
    assert untimed.to_dict()["macs"] == 128


@pytest.mark.parametrize("kwargs, argument", [
    ({"warmup": -1}, "warmup"), ({"repeats": 0}, "repeats"), ({"repeats": 2.5}, "repeats"),
])
def test_latency_argument_errors(kwargs, argument):
    with pytest.raises(ArgumentError, match=argument):
        measure_latency(nn.Linear(2, 2), torch.randn(1, 2), **kwargs)


def test_other_argument_errors():
    with pytest.raises(ArgumentError, match="latency_batches"):
        cost_report(nn.Linear(2, 2), torch.randn(1, 2), latency_batches=(1, 0))
    with pytest.raises(ArgumentError, match="latency_batches"):
        cost_report(nn.Linear(2, 2), torch.randn(1, 2), latency_batches=16)
    with pytest.raises(ArgumentError, match="batch_size"):
        batch_of(torch.randn(1, 2), 0)
    with pytest.raises(ArgumentError, match="example_inputs"):
        count_macs(nn.Linear(2, 2), "not a tensor")
