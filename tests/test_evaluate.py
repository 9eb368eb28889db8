"""Perplexity (windows, BOS, oracles, bad input), the protocol evaluation, and the embedded SmolLM2 model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

transformers = pytest.importorskip("transformers")

from test_hf_blocks import VOCAB, tiny_causal_lm, tiny_config  # noqa: E402

from prunekit.errors import ArgumentError, ModelError, PruneError  # noqa: E402
from prunekit.evaluate import perplexity, protocol_perplexity, tokenizer_adds_bos  # noqa: E402
from prunekit.zoo import EXPORT_MARKER, _materialise, cache_root, load_causal_lm, resolve_model  # noqa: E402

KJV = Path(__file__).resolve().parents[2] / "shared" / "data" / "kjv.txt"


class CharTokenizer:
    """A duck-typed tokenizer: one token per character (ids 3..VOCAB-1), optional BOS like Gemma's."""

    bos_token_id = 1

    def __init__(self, adds_bos: bool = False) -> None:
        self.adds_bos = adds_bos

    def __call__(self, text: str, add_special_tokens: bool = True, **_: object) -> dict:
        ids = [3 + ord(char) % (VOCAB - 3) for char in text]
        if add_special_tokens and self.adds_bos:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids}


def record_inputs(model):
    """Forward pre-hook on the embedding that records every input id tensor the model sees."""
    seen = []
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    return seen, handle


def test_perplexity_equals_mean_of_window_losses():
    model = tiny_causal_lm("llama")
    ids = torch.randint(3, VOCAB, (100,), generator=torch.Generator().manual_seed(0))
    got = perplexity(model, ids, window=32, max_tokens=None, progress=False)
    with torch.no_grad():  # 3 full windows of 32; the 4-token tail is dropped
        losses = [model(input_ids=ids[i * 32 : (i + 1) * 32][None], labels=ids[i * 32 : (i + 1) * 32][None]).loss for i in range(3)]
    assert got == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)


def test_uniform_model_has_perplexity_vocab_size():
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits 0: every token has probability 1/VOCAB
    assert perplexity(model, CharTokenizer(), "x" * 200, window=64, progress=False) == pytest.approx(VOCAB, rel=1e-5)


def test_max_tokens_and_windows():
    model = tiny_causal_lm("llama")
    seen, handle = record_inputs(model)
    try:
        perplexity(model, CharTokenizer(), "abcdefgh" * 40, window=50, max_tokens=210, progress=False)
    finally:
        handle.remove()
    assert [t.shape[1] for t in seen] == [50, 50, 50, 50]  # 210 tokens -> 4 windows, tail of 10 dropped
    assert torch.equal(seen[1][0], torch.tensor(CharTokenizer()("abcdefgh" * 40)["input_ids"][50:100]))


def test_each_window_gets_its_own_bos_when_the_tokenizer_adds_one():
    model = tiny_causal_lm("llama")
    tokenizer = CharTokenizer(adds_bos=True)
    assert tokenizer_adds_bos(tokenizer) and not tokenizer_adds_bos(CharTokenizer())
    seen, handle = record_inputs(model)
    try:
        perplexity(model, tokenizer, "q" * 100, window=20, progress=False)
    finally:
        handle.remove()
    assert len(seen) == 100 // 19
    assert all(t.shape[1] == 20 and t[0, 0] == 1 and (t[0, 1:] != 1).all() for t in seen)


def test_ids_with_explicit_bos():
    model = tiny_causal_lm("llama")
    seen, handle = record_inputs(model)
    try:
        perplexity(model, torch.full((40,), 7), window=10, bos_token_id=1, progress=False)
    finally:
        handle.remove()
    assert len(seen) == 4 and all(t[0, 0] == 1 for t in seen)


def test_perplexity_bad_input():
    model = tiny_causal_lm("llama")
    with pytest.raises(ArgumentError, match=r"text=.*at least 64 tokens"):
        perplexity(model, CharTokenizer(), "too short", window=64, progress=False)
    with pytest.raises(ArgumentError, match="window=257"):
        perplexity(model, CharTokenizer(), "x" * 1000, window=257, progress=False)
    with pytest.raises(ArgumentError, match="window"):
        perplexity(model, CharTokenizer(), "x" * 1000, window=1, progress=False)
    with pytest.raises(ArgumentError, match="max_tokens"):
        perplexity(model, CharTokenizer(), "x" * 1000, window=8, max_tokens=0, progress=False)
    with pytest.raises(ArgumentError, match="text"):
        perplexity(model, torch.arange(50), "also text", window=8, progress=False)
    with pytest.raises(ArgumentError, match="text"):
        perplexity(model, CharTokenizer(), None, window=8, progress=False)


def test_protocol_uses_the_tail_and_16_windows_of_512():
    torch.manual_seed(0)
    config = tiny_config("llama", layers=1)
    config.max_position_embeddings = 512
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    text = "A" * 50_000 + "".join(chr(97 + i % 26) for i in range(250_000))
    seen, handle = record_inputs(model)
    try:
        value = protocol_perplexity(model, CharTokenizer(), text, progress=False)
    finally:
        handle.remove()
    assert math.isfinite(value)
    assert [t.shape[1] for t in seen] == [512] * 16
    # held out = the last 200,000 characters: the leading run of "A" is never seen
    assert all((t != CharTokenizer()("A")["input_ids"][0]).all() for t in seen)


# ---- embedded models ------------------------------------------------------------------------------------------------


def test_cache_root_follows_argument_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("PRUNEKIT_CACHE")
    assert cache_root() == Path.home() / ".cache" / "prunekit"


def test_interrupted_export_leaves_no_folder(tmp_path):
    target = tmp_path / "models" / "m"

    def broken(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _materialise(target, broken)
    assert not target.exists() and list(target.parent.iterdir()) == []

    calls = []

    def export(folder: Path) -> None:
        calls.append(folder)
        (folder / EXPORT_MARKER).write_text("{}")

    assert _materialise(target, export) == target and (target / EXPORT_MARKER).is_file()
    assert _materialise(target, export) == target and len(calls) == 1  # exported once
    assert [p.name for p in target.parent.iterdir()] == ["m"]


def test_resolve_model_paths_and_names(tmp_path):
    assert resolve_model(tmp_path) == str(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # hub ids pass through
    with pytest.raises(ArgumentError, match="smollm2-135m"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ArgumentError, match="model"):
        resolve_model(42)
    with pytest.raises(ModelError, match="no-such-org/no-such-model"):
        load_causal_lm("no-such-org/no-such-model")
    with pytest.raises(ArgumentError, match="dtype"):
        load_causal_lm(tmp_path, dtype="float32")


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    return load_causal_lm("smollm2-135m")


@pytest.mark.slow
def test_smollm2_folder_is_plain_transformers(smollm2):
    folder = Path(resolve_model("smollm2-135m"))
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    # a real sub-word tokenizer (older transformers turned GGUF vocabularies into single characters)
    assert len(tokenizer("In the beginning God created the heaven")["input_ids"]) <= 8


@pytest.mark.slow
def test_smollm2_perplexity_on_short_text(smollm2):
    model, tokenizer = smollm2
    text = KJV.read_text(encoding="utf-8")[-6000:] if KJV.is_file() else (
        "The quick brown fox jumps over the lazy dog. " * 20 + "It was the best of times, it was the worst of times. " * 20
    )
    value = perplexity(model, tokenizer, text, window=128, max_tokens=256, progress=False)
    assert math.isfinite(value) and 1.0 < value < 100.0


def test_errors_are_prune_errors():
    assert issubclass(ArgumentError, PruneError) and issubclass(ModelError, PruneError)
