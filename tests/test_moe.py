"""MoE expert pruning (STUN-style) on tiny random Mixtral / Qwen2-MoE / Qwen3-MoE models of transformers 5."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from prunekit.errors import ArgumentError, ModelError
from prunekit.llm import row_keep_mask, wanda_scores
from prunekit.moe import (
    _expert_input_norms, cluster_experts, drop_experts, find_moe_layers, prune_experts, representatives, stun,
    stun_keep,
)

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, num_experts_per_tok=2)
# Where logits are compared, both sides name their kernels: transformers otherwise picks sdpa / grouped_mm (or falls
# back to eager) on its own, and two kernels sum in different orders.
KERNELS = dict(attn_implementation="eager", experts_implementation="eager")

# One thread in this process (conftest.one_intra_op_thread): the subprocess round trip pins the same count.
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _model(kind: str, experts: int = 16, seed: int = 0) -> nn.Module:
    if kind == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=48, num_local_experts=experts, **COMMON)
    elif kind == "qwen2_moe":  # norm_topk_prob: routing weights renormalised over the chosen experts
        config = transformers.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=experts,
                                             shared_expert_intermediate_size=40, norm_topk_prob=True, **COMMON)
    else:
        config = transformers.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=experts,
                                             norm_topk_prob=True, head_dim=8, **COMMON)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, **KERNELS).eval()
    with torch.no_grad():  # transformers leaves some routers at zero: give every layer distinct router rows
        for layer in find_moe_layers(model):
            layer.router.weight.normal_(0, 0.5)
    return model


def _count(model) -> int:
    config = model.config
    return config.num_local_experts if hasattr(config, "num_local_experts") else config.num_experts


def _routed(model, ids) -> dict[str, set[int]]:
    """Experts each MoE layer's router sends any token of `ids` to."""
    used: dict[str, set[int]] = {}
    hooks = [layer.router.register_forward_hook(
        lambda module, args, out, name=layer.name: used.setdefault(name, set()).update(out[2].flatten().tolist()))
        for layer in find_moe_layers(model)]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return used


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_dropping_never_routed_experts_keeps_the_logits_and_round_trips(kind, tmp_path):
    model = _model(kind)
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    used = _routed(model, ids)  # 5 tokens x top-2 reach at most 10 of the 16 experts
    keep = {}
    for layer in find_moe_layers(model):
        spare = [i for i in range(16) if i not in used[layer.name]]
        keep[layer.name] = sorted(used[layer.name] | set(spare[: 10 - len(used[layer.name])]))
    before = {layer.name: (layer.router.weight.detach().clone(), layer.experts.gate_up_proj.detach().clone(),
                           layer.experts.down_proj.detach().clone()) for layer in find_moe_layers(model)}
    drop_experts(model, keep)
    assert _count(model) == 10 and model.config.num_experts_per_tok == 2
    for layer in find_moe_layers(model):
        router, gate_up, down = before[layer.name]
        index = torch.tensor(keep[layer.name])
        assert torch.equal(layer.router.weight, router[index])
        assert torch.equal(layer.experts.gate_up_proj, gate_up[index])
        assert torch.equal(layer.experts.down_proj, down[index])
    with torch.no_grad():
        pruned = model(ids).logits
    # the softmax over fewer experts renormalises the same top-k: equal up to float rounding
    assert torch.allclose(pruned, reference, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", **KERNELS).eval()
    assert _count(loaded) == 10
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pruned)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_keeping_every_expert_is_exact(kind):
    model = _model(kind, experts=8)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(ids).logits
    result = stun(model, 8)
    assert result.experts_after == 8 and all(v == list(range(8)) for v in result.kept.values())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)


def test_router_clusters_find_near_duplicate_experts():
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(4, 32, generator=g) * 5
    # experts 0..7: pairs (i, i + 4) share a router row up to small noise
    weight = torch.cat([centres, centres + 0.01 * torch.randn(4, 32, generator=g)])
    clusters = cluster_experts(weight, 4)
    assert clusters == [[0, 4], [1, 5], [2, 6], [3, 7]]
    chosen = representatives(weight, clusters)
    assert len(chosen) == 4 and all(len(set(chosen) & set(c)) == 1 for c in clusters)
    # a triple: the representative is the member nearest the mean, i.e. the middle one
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.5, 0.0], [100.0, 0.0]])
    assert cluster_experts(line, 2) == [[0, 1, 2], [3]]
    assert representatives(line, [[0, 1, 2], [3]]) == [1, 3]


def test_stun_to_one_expert_clamps_experts_per_token(tmp_path):
    model = _model("mixtral", experts=4)
    result = stun(model, 1)
    assert model.config.num_local_experts == 1 and model.config.num_experts_per_tok == 1
    assert all(len(v) == 1 for v in result.kept.values())
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        out = model(ids).logits
    model.save_pretrained(tmp_path / "one")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "one", **KERNELS).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)


def test_magnitude_inside_experts_prunes_every_row_exactly():
    model = _model("qwen3_moe", experts=8)
    keep, _ = stun_keep(model, 4)
    drop_experts(model, keep)
    reached = prune_experts(model, 0.5, "magnitude")
    assert reached == pytest.approx(0.5)
    for layer in find_moe_layers(model):
        for param in (layer.experts.gate_up_proj, layer.experts.down_proj):
            zeros_per_row = (param == 0).sum(dim=-1)
            assert torch.all(zeros_per_row == param.shape[-1] // 2)


def test_wanda_inside_experts_uses_each_experts_routed_inputs():
    model = _model("mixtral", experts=8)
    data = [torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    layer = find_moe_layers(model)[1]
    # the inputs each expert sees, recorded independently of prunekit: MoE block input, router choice
    seen_in: list[torch.Tensor] = []
    seen_index: list[torch.Tensor] = []
    hooks = [layer.block.register_forward_pre_hook(lambda m, a: seen_in.append(a[0].reshape(-1, 32).clone())),
             layer.router.register_forward_hook(lambda m, a, out: seen_index.append(out[2].clone()))]
    norms = _expert_input_norms(model, [layer], data)[layer.name]
    for hook in hooks:
        hook.remove()
    x, index = torch.cat(seen_in), torch.cat(seen_index)
    for e in range(8):
        routed = x[(index == e).any(-1)]
        assert torch.allclose(norms[0][e].float(), routed.pow(2).sum(0), rtol=1e-4, atol=1e-6)
    gate_up = layer.experts.gate_up_proj.detach().clone()
    prune_experts(model, 0.5, "wanda", data)
    e = int(torch.argmax(norms[0].sum(-1)))
    expected = row_keep_mask(wanda_scores(gate_up[e], norms[0][e].float()), 0.5)
    assert torch.equal(layer.experts.gate_up_proj[e] != 0, expected & (gate_up[e] != 0))


# The round trip in a fresh process. What it claims: the reloaded tensors are the saved ones bit for bit; the logits
# agree up to float rounding and every token reaches the same experts. Both sides run one thread and the same named
# kernels, so today the logits come out equal, but the assertion is the tolerance: equality would pin a summation
# order, not the model. A routing near-tie would let one ulp pick another expert, so the inputs are checked to have
# none: the gap between each token's k-th and (k+1)-th router logit exceeds ROUTER_MARGIN, far above any rounding.
LOGIT_ATOL = 1e-5  # the logits are O(0.1-1) float32: a few hundred ulps
ROUTER_MARGIN = 1e-3
CHILD = f"""
import sys, torch, transformers
from safetensors.torch import load_file, save_file
torch.set_num_threads(1)
folder, inputs, out = sys.argv[1:4]
model = transformers.AutoModelForCausalLM.from_pretrained(folder, **{KERNELS!r}).eval()
routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
seen = {{}}
for i, router in enumerate(routers):
    router.register_forward_hook(lambda m, a, o, i=i: seen.update({{f"router_logits.{{i}}": o[0], f"index.{{i}}": o[2]}}))
with torch.no_grad():
    logits = model(load_file(inputs)["ids"]).logits
assert not any(name.startswith("prunekit") for name in sys.modules)
state = {{f"param.{{k}}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}}
save_file({{"logits": logits, **seen, **state}}, out)
print(model.config.num_experts, len(routers), torch.get_num_threads())
"""


def _routing(model, ids) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Logits, and each MoE layer's router logits and top-k expert indices, for `ids`."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [layer.router.register_forward_hook(lambda m, a, out: seen.append((out[0], out[2])))
             for layer in find_moe_layers(model)]
    with torch.no_grad():
        logits = model(ids).logits
    for hook in hooks:
        hook.remove()
    return logits, [s[0] for s in seen], [s[1] for s in seen]


def test_round_trip_loads_in_a_process_without_prunekit(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model("qwen2_moe", experts=8)
    stun(model, 3, 0.3, method="magnitude")
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(4))
    logits, router_logits, index = _routing(model, ids)
    k = model.config.num_experts_per_tok
    margin = min(float((top[:, k - 1] - top[:, k]).min()) for top in (r.topk(k + 1).values for r in router_logits))
    assert margin > ROUTER_MARGIN, f"inputs with a routing near-tie: top-k margin {margin:.2e}"
    model.save_pretrained(tmp_path / "out")
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "out"), str(tmp_path / "ids.safetensors"),
                           str(tmp_path / "child.safetensors")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["3", "2", "1"]  # 3 experts, 2 routers, one thread
    child = load_file(tmp_path / "child.safetensors")
    state = model.state_dict()
    assert {name[len("param."):] for name in child if name.startswith("param.")} == set(state)
    assert [name for name, value in state.items() if not torch.equal(child[f"param.{name}"], value)] == []
    assert all(torch.equal(child[f"index.{i}"], index[i]) for i in range(len(index)))  # the same experts
    assert float((child["logits"] - logits).abs().max()) <= LOGIT_ATOL


# ---------------------------------------------------------------------------------------------------------------
# Bad input


class _OldStyleMoeBlock(nn.Module):
    """A router that is a plain Linear over a ModuleList of experts (not the transformers 5 layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(8, 4, bias=False)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))


def test_unrecognised_router_and_dense_models_are_named():
    with pytest.raises(ModelError, match="router Linear and experts ModuleList"):
        find_moe_layers(nn.Sequential(_OldStyleMoeBlock()))
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ModelError, match="LlamaForCausalLM has no sparse MoE layer"):
        stun(dense, 2)


def test_bad_arguments_are_named():
    model = _model("mixtral", experts=4)
    with pytest.raises(ArgumentError, match=r"n_experts=5 .* \[1, 4\]"):
        stun(model, 5)
    with pytest.raises(ArgumentError, match="n_experts=0"):
        stun(model, 0)
    with pytest.raises(ArgumentError, match="sparsity=1.0"):
        stun(model, 2, 1.0)
    with pytest.raises(ArgumentError, match="Did you mean 'wanda'"):
        stun(model, 2, 0.5, method="wand")
    with pytest.raises(ArgumentError, match="data=None"):
        prune_experts(model, 0.5, "wanda")
    names = [layer.name for layer in find_moe_layers(model)]
    with pytest.raises(ArgumentError, match="distinct expert indices"):
        drop_experts(model, {names[0]: [0, 0], names[1]: [0, 1]})
    with pytest.raises(ArgumentError, match="the same number of experts"):
        drop_experts(model, {names[0]: [0], names[1]: [0, 1]})
    assert _count(model) == 4 and find_moe_layers(model)[0].num_experts == 4  # nothing changed


def test_cli_prunes_a_folder_and_names_bad_arguments(tmp_path, capsys):
    import json

    from prunekit.cli import main

    _model("mixtral", experts=4).save_pretrained(tmp_path / "moe")
    assert main(["moe", str(tmp_path / "moe"), "--experts", "2", "--sparsity", "0.5", "--out", str(tmp_path / "out"),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["experts_after"] == 2 and summary["expert_sparsity"] == pytest.approx(0.5)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.config.num_local_experts == 2
    capsys.readouterr()
    assert main(["moe", str(tmp_path / "moe"), "--experts", "5", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("prunekit: error: n_experts=5") and not (tmp_path / "bad").exists()
    assert main(["moe", str(tmp_path / "moe"), "--experts", "2", "--method", "wand", "--out",
                 str(tmp_path / "bad")]) == 2
    assert "method='wand'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
