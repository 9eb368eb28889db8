"""Structured removals outside prune_structured never return a broken model (issue 14, point 8).

FLAP, CFSP, remove_units, plan replay, decoder block removal and residual block removal each run the pruned model
before returning. The oracle for a failure: a module whose forward depends on something the removal changes (a
stored width, a layer index, a child's attribute) makes the check fail, and then the model is bitwise what it was
(every tensor, every module attribute, every config field) and the ModelError names that module.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from prunekit.errors import ModelError  # noqa: E402
from prunekit.graph.depth import drop_residual_blocks  # noqa: E402
from prunekit.graph.llm_structured import cfsp, flap  # noqa: E402
from prunekit.graph.surgery import plan_from_removals  # noqa: E402
from prunekit.graph.transformers import apply_plan_checked, remove_blocks, remove_units, transformers_graph  # noqa: E402


def tiny_llama(layers: int = 3, seed: int = 0, biases: bool = False) -> nn.Module:
    """A tiny random GQA Llama (4 query heads, 2 KV heads of 16 channels, 128 MLP neurons), biases optional."""
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      intermediate_size=128, num_hidden_layers=layers, vocab_size=128,
                                      max_position_embeddings=64, initializer_range=0.1,
                                      layer_types=["full_attention"] * layers, attention_bias=biases,
                                      mlp_bias=biases)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def samples(count: int = 2, length: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, 128, (1, length), generator=generator) for _ in range(count)]


def _plain(value):
    """Attribute values that describe sizes and indices (tensors and modules are compared through state_dict)."""
    return isinstance(value, (int, float, str, bool, tuple, list, type(None))) and not isinstance(value, nn.Module)


def state(model: nn.Module) -> dict:
    """Everything a restore must bring back: tensors, module names and classes, plain attributes, config fields."""
    modules = {name: (type(m).__name__, {k: v for k, v in vars(m).items() if not k.startswith("_") and _plain(v)})
               for name, m in model.named_modules()}
    config = model.config.to_dict() if hasattr(model, "config") else None
    return {"tensors": {k: v.clone() for k, v in model.state_dict().items()}, "modules": modules, "config": config}


def assert_same(before: dict, after: dict) -> None:
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, tensor in before["tensors"].items():
        assert tensor.dtype == after["tensors"][key].dtype and torch.equal(tensor, after["tensors"][key]), key
    assert before["modules"] == after["modules"]
    assert before["config"] == after["config"]


def fail_when_width_changes(module: nn.Module, layer: str) -> None:
    """Give `module` a forward that reads a stored size of its child `layer`, as hand-written code does."""
    stored = getattr(module, layer).weight.shape[0]
    original = module.forward

    def forward(self, *args, **kwargs):
        if getattr(self, layer).weight.shape[0] != stored:
            raise RuntimeError(f"{layer} has {getattr(self, layer).weight.shape[0]} rows, the code expects {stored}")
        return original(*args, **kwargs)

    module.forward = types.MethodType(forward, module)


@pytest.mark.parametrize("biases", [False, True])
def test_flap_restores_weights_biases_and_config_when_the_check_fails(biases):
    model = tiny_llama(biases=biases)
    if biases:  # bias compensation then changes existing biases: those must come back bitwise
        for block in model.model.layers:
            nn.init.normal_(block.self_attn.o_proj.bias)
            nn.init.normal_(block.mlp.down_proj.bias)
    reference = copy.deepcopy(model)
    fail_when_width_changes(model.model.layers[1].mlp, "up_proj")
    before = state(model)
    assert model.config.attention_bias is biases and (model.model.layers[0].self_attn.o_proj.bias is None) != biases
    with pytest.raises(ModelError, match=r"'model\.layers\.1\.mlp' \(LlamaMLP\).*restored"):
        flap(model, samples(), 0.4, structure="UL-UM", progress=False)
    assert_same(before, state(model))  # compensated biases and attention_bias/mlp_bias are gone again
    # the normal path is unchanged by the check: the same widths and weights as before it existed
    result = flap(reference, samples(), 0.4, structure="UL-UM", progress=False)
    assert [d.kept for d in result.decisions] == [1, 77] * 3  # 2 query slots -> 1, 128 neurons -> 77
    assert reference.model.layers[1].mlp.up_proj.weight.shape[0] == 77
    assert reference.model.layers[0].self_attn.o_proj.bias is not None and reference.config.attention_bias is True
    assert reference.config.mlp_bias is True


def test_flap_with_a_failing_head_removal_names_the_attention():
    model = tiny_llama()
    fail_when_width_changes(model.model.layers[2].self_attn, "q_proj")
    before = state(model)
    with pytest.raises(ModelError, match=r"'model\.layers\.2\.self_attn' \(LlamaAttention\)"):
        flap(model, samples(), 0.5, structure="UL-UM", progress=False)
    assert_same(before, state(model))
    assert model.model.layers[2].self_attn.num_key_value_groups == 2


def test_cfsp_restores_the_model_when_the_check_fails():
    model = tiny_llama()
    fail_when_width_changes(model.model.layers[0].mlp, "gate_proj")
    before = state(model)
    with pytest.raises(ModelError, match=r"'model\.layers\.0\.mlp' \(LlamaMLP\)"):
        cfsp(model, samples(), 0.5, progress=False)
    assert_same(before, state(model))


def test_remove_units_and_plan_replay_restore_exactly_and_name_the_module():
    model = tiny_llama()
    graph = transformers_graph(model, heads="query")
    heads = [g for g in graph.groups if g.kind == "head"]
    neurons = [g for g in graph.groups if g.kind == "neuron"]
    fail_when_width_changes(model.model.layers[1].self_attn, "q_proj")
    before = state(model)
    with pytest.raises(ModelError, match=r"'model\.layers\.1\.self_attn' \(LlamaAttention\)"):
        remove_units(model, [(heads[1], [0]), (neurons[0], [3, 5])])
    assert_same(before, state(model))
    plan = plan_from_removals(model, heads[1].removed_indices(torch.tensor([1])))
    with pytest.raises(ModelError, match=r"'model\.layers\.1\.self_attn'"):
        apply_plan_checked(model, plan)
    assert_same(before, state(model))
    # without the failing forward the same removal goes through and changes the sizes it should
    healthy = tiny_llama()
    remove_units(healthy, [(transformers_graph(healthy).groups[2], [0])])
    assert healthy.model.layers[1].self_attn.q_proj.weight.shape[0] == 32


def test_remove_blocks_restores_blocks_indices_and_config():
    model = tiny_llama(layers=4)
    layer = model.model.layers[3].self_attn
    original = layer.forward

    def forward(self, *args, **kwargs):  # code that caches by a fixed layer number
        if self.layer_idx != 3:
            raise IndexError(f"layer_idx {self.layer_idx}: this module's cache slot is 3")
        return original(*args, **kwargs)

    layer.forward = types.MethodType(forward, layer)
    before = state(model)
    blocks = list(model.model.layers)
    with pytest.raises(ModelError, match=r"'model\.layers\.2\.self_attn' \(LlamaAttention\).*IndexError"):
        remove_blocks(model, [1])
    assert_same(before, state(model))
    assert list(model.model.layers) == blocks and model.config.num_hidden_layers == 4
    assert model.config.layer_types == ["full_attention"] * 4
    healthy = tiny_llama(layers=4)
    remove_blocks(healthy, [1])
    assert len(healthy.model.layers) == 3 and healthy.config.num_hidden_layers == 3
    assert [b.self_attn.layer_idx for b in healthy.model.layers] == [0, 1, 2]


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.scale = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x) * 1e-3


class ReadsChildAttribute(nn.Module):
    """A parent whose forward reads an attribute of one of its residual blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.blocks = nn.Sequential(Residual(8), Residual(8), Residual(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.head(h) * sum(block.scale for block in self.blocks)


def test_drop_residual_blocks_restores_the_blocks_when_the_model_stops_running():
    torch.manual_seed(0)
    model = ReadsChildAttribute().eval()
    x = torch.randn(2, 8)
    before = state(model)
    children = list(model.blocks)
    with pytest.raises(ModelError, match=r"ReadsChildAttribute.*AttributeError"):
        drop_residual_blocks(model, x, 1)
    assert_same(before, state(model))
    assert list(model.blocks) == children and all(isinstance(b, Residual) for b in model.blocks)
    expected = model(x)
    model.forward = types.MethodType(lambda self, x: self.head(self.blocks(self.stem(x))), model)  # reads no attribute
    removed, _, _ = drop_residual_blocks(model, x, 1)
    assert len(removed) == 1 and isinstance(model.get_submodule(removed[0]), nn.Identity)
    assert model(x).shape == expected.shape


def test_hidden_size_pruning_of_an_encoder_passes_the_check_with_its_narrower_output():
    # narrowing the residual stream narrows an encoder's output: the check must expect that, not refuse it
    import transformers

    from prunekit.graph.prune import prune_structured

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    prune_structured(model, None, 0.25, graph=transformers_graph(model, heads=None, neurons=False, hidden=True))
    assert model.embeddings.word_embeddings.weight.shape == (100, 24)
    out = model(input_ids=torch.arange(4).unsqueeze(0)).last_hidden_state
    assert out.shape == (1, 4, 24)
