"""transformers glue: decoder blocks, their linear layers, causal-LM checks and length limits on 8 architectures."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ["HF_HUB_OFFLINE"] = "1"

transformers = pytest.importorskip("transformers")

from prunekit.errors import ArgumentError, ModelError, PruneError  # noqa: E402
from prunekit.hf import (  # noqa: E402
    check_causal_lm,
    check_sequence_length,
    find_decoder_blocks,
    is_causal_lm,
    linear_layers_of,
    max_sequence_length,
)

VOCAB = 128
MAX_POSITIONS = 256
ARCHS = ("llama", "qwen2", "mistral", "gemma3", "phi3", "gpt2", "opt", "gpt_neox")
BLOCK_PATHS = {
    "llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers", "gemma3": "model.layers",
    "phi3": "model.layers", "gpt2": "transformer.h", "opt": "model.decoder.layers", "gpt_neox": "gpt_neox.layers",
}


def tiny_config(arch: str, layers: int = 3):
    """A tiny config of `arch` (hidden 64, vocab 128); sliding windows short enough to matter on 16 tokens."""
    T = transformers
    ids = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, **ids)
    if arch == "llama":
        return T.LlamaConfig(**llama_like)
    if arch == "qwen2":
        return T.Qwen2Config(**llama_like)
    if arch == "mistral":
        return T.MistralConfig(sliding_window=4, **llama_like)
    if arch == "gemma3":
        # Mixed sliding/global layers: each block gets its own mask and rotary tables.
        types = [("sliding_attention", "full_attention")[i % 2] for i in range(layers)]
        return T.Gemma3TextConfig(head_dim=16, sliding_window=4, layer_types=types, **llama_like)
    if arch == "phi3":
        return T.Phi3Config(**llama_like)
    if arch == "gpt2":
        return T.GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=MAX_POSITIONS, **ids)
    if arch == "opt":
        return T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                           max_position_embeddings=MAX_POSITIONS, word_embed_proj_dim=64, **ids)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                               max_position_embeddings=MAX_POSITIONS, **ids)
    raise ValueError(arch)


def tiny_causal_lm(arch: str, layers: int = 3, seed: int = 0) -> nn.Module:
    """A seeded random tiny causal LM of `arch` in eval mode."""
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(arch, layers)).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_find_decoder_blocks_on_every_architecture(arch):
    model = tiny_causal_lm(arch)
    name, blocks = find_decoder_blocks(model)
    assert name == BLOCK_PATHS[arch]
    assert blocks is model.get_submodule(name)
    assert len(blocks) == 3 and len({type(block) for block in blocks}) == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_linear_layers_of_a_block(arch):
    _, blocks = find_decoder_blocks(tiny_causal_lm(arch))
    layers = linear_layers_of(blocks[0])
    assert len(layers) >= 4
    assert all(dict(blocks[0].named_modules())[name] is layer for name, layer in layers.items())
    # definition order: attention before MLP
    names = list(layers)
    assert any(part in names[0] for part in ("attn", "attention"))
    assert any(part in names[-1] for part in ("mlp", "fc2"))


def test_gpt2_conv1d_counts_as_linear():
    from transformers.pytorch_utils import Conv1D

    layers = linear_layers_of(find_decoder_blocks(tiny_causal_lm("gpt2"))[1][0])
    assert list(layers) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert all(isinstance(layer, Conv1D) for layer in layers.values())


def test_llama_linear_layers_in_definition_order():
    layers = linear_layers_of(find_decoder_blocks(tiny_causal_lm("llama"))[1][0])
    assert list(layers) == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ]


class _Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)


class _MoEBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(_Expert() for _ in range(6))  # more children than blocks, fewer weights
        self.out = nn.Linear(16, 8)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stack = nn.ModuleList(_MoEBlock() for _ in range(2))
        self.heads = nn.ModuleList([nn.Linear(8, 2), nn.Linear(8, 3)])


def test_blocks_are_the_heaviest_list_not_the_longest():
    name, blocks = find_decoder_blocks(_Toy())
    assert name == "stack" and len(blocks) == 2


def test_no_module_list_is_a_model_error():
    with pytest.raises(ModelError, match="Sequential"):
        find_decoder_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_mixed_block_classes_are_a_model_error():
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Linear(64, 64), nn.Conv1d(64, 64, 3)])
    with pytest.raises(ModelError, match="mixes block classes"):
        find_decoder_blocks(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_causal_lm_and_length_limit(arch):
    model = tiny_causal_lm(arch)
    assert is_causal_lm(model)
    check_causal_lm(model)
    assert max_sequence_length(model) == MAX_POSITIONS


def test_not_a_causal_lm_names_the_class():
    base = transformers.LlamaModel(tiny_config("llama"))
    assert not is_causal_lm(base) and not is_causal_lm(nn.Linear(2, 2))
    with pytest.raises(ModelError, match="LlamaModel"):
        check_causal_lm(base)
    with pytest.raises(PruneError, match="Linear"):
        check_causal_lm(nn.Linear(2, 2))


def test_max_sequence_length_unknown_is_none():
    assert max_sequence_length(nn.Linear(2, 2)) is None


def test_sequence_length_is_validated_never_chosen():
    model = tiny_causal_lm("llama")
    assert check_sequence_length(model, MAX_POSITIONS) == MAX_POSITIONS
    with pytest.raises(ArgumentError, match=r"seq_len=257 .*256"):
        check_sequence_length(model, MAX_POSITIONS + 1)
    for bad in (0, -3, 2.5, True, "128", None):
        with pytest.raises(ArgumentError, match="seq_len"):
            check_sequence_length(model, bad)
