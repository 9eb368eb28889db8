"""Block-by-block calibration: exactness on 8 architectures, pruned propagation, resume, fingerprints, text helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

pytest.importorskip("transformers")

from test_evaluate import KJV, CharTokenizer  # noqa: E402
from test_hf_blocks import ARCHS, MAX_POSITIONS, VOCAB, tiny_causal_lm  # noqa: E402

from prunekit.calibration import (  # noqa: E402
    PROGRESS_FILE,
    calibration_samples,
    capture_block_inputs,
    load_text,
    protocol_calibration_samples,
    protocol_calibration_texts,
    run_blocks,
)
from prunekit.errors import ArgumentError, ModelError, PruneError  # noqa: E402
from prunekit.hf import find_decoder_blocks, linear_layers_of  # noqa: E402


def token_samples(lengths=(16, 11), seed: int = 0) -> list[torch.Tensor]:
    """Random token id samples of different lengths (longer than the tiny sliding windows)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (1, n), generator=generator) for n in lengths]


def full_forward_block_io(model, samples):
    """Per sample, the hidden states entering each block and leaving the last, from an ordinary forward pass."""
    _, blocks = find_decoder_blocks(model)
    inputs, outputs, current = {}, {}, [0]

    def before(index):
        def hook(module, args, kwargs):
            inputs[current[0], index] = (args[0] if args else kwargs["hidden_states"]).clone()
        return hook

    def after(module, args, output):
        outputs[current[0]] = (output[0] if isinstance(output, tuple) else output).clone()

    handles = [block.register_forward_pre_hook(before(i), with_kwargs=True) for i, block in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(after))
    try:
        with torch.no_grad():
            for current[0], ids in enumerate(samples):
                model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


def zero_half(block) -> None:
    """Deterministic 50% magnitude pruning of every linear layer of a block (per layer)."""
    for layer in linear_layers_of(block).values():
        weight = layer.weight.data
        threshold = weight.abs().flatten().kthvalue(weight.numel() // 2).values
        weight[weight.abs() <= threshold] = 0


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_callback_reproduces_the_full_forward(arch):
    model = tiny_causal_lm(arch)
    samples = token_samples()
    reference_in, reference_out = full_forward_block_io(model, samples)
    seen = []

    def identity(index, name, block, feed):
        seen.append((index, name))
        for sample in range(len(feed)):
            torch.testing.assert_close(feed.inputs[sample], reference_in[sample, index], rtol=1e-5, atol=1e-6)

    outputs = run_blocks(model, samples, identity, progress=False)
    prefix, blocks = find_decoder_blocks(model)
    assert seen == [(i, f"{prefix}.{i}") for i in range(len(blocks))]
    for sample, output in enumerate(outputs):
        torch.testing.assert_close(output, reference_out[sample], rtol=1e-5, atol=1e-6)


def test_final_norm_and_head_on_the_outputs_give_the_logits():
    model = tiny_causal_lm("llama")
    samples = token_samples()
    outputs = run_blocks(model, samples, lambda *args: None, progress=False)
    with torch.no_grad():
        for ids, hidden in zip(samples, outputs):
            logits = model.lm_head(model.model.norm(hidden))
            torch.testing.assert_close(logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_capture_uses_no_cache_and_skips_the_head():
    model = tiny_causal_lm("llama")
    head_calls = []
    handle = model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    try:
        captured = capture_block_inputs(model, token_samples())
    finally:
        handle.remove()
    assert head_calls == []  # the forward stops after the last block's arguments are known
    for calls in captured.calls:
        assert len(calls) == 3
        for call in calls:
            assert call.kwargs.get("cache") is None and call.kwargs.get("past_key_values") is None
            assert "position_embeddings" in call.kwargs  # rotary tables travel with the call
    # the real forward is back in place
    assert "forward" not in vars(find_decoder_blocks(model)[1][0])


def test_blocks_see_the_pruned_outputs_of_the_previous_block():
    model = tiny_causal_lm("gemma3")
    samples = token_samples()
    dense_in, _ = full_forward_block_io(model, samples)
    expected = {}

    def prune(index, name, block, feed):
        if index > 0:
            for sample in range(len(feed)):
                assert torch.equal(feed.inputs[sample], expected[index][sample])
                assert not torch.allclose(feed.inputs[sample], dense_in[sample, index], atol=1e-4)
        zero_half(block)
        expected[index + 1] = feed.run(keep_outputs=True)

    outputs = run_blocks(model, samples, prune, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected[3]))
    for block in find_decoder_blocks(model)[1]:
        for layer in linear_layers_of(block).values():
            assert (layer.weight == 0).float().mean() >= 0.5


def test_hooks_on_linear_layers_see_every_sample():
    model = tiny_causal_lm("gpt2")
    samples = token_samples((16, 11, 7))
    tokens = {}

    def collect(index, name, block, feed):
        handles = []
        for layer_name, layer in linear_layers_of(block).items():
            def hook(module, args, key=(index, layer_name)):
                tokens[key] = tokens.get(key, 0) + args[0].shape[-2]
            handles.append(layer.register_forward_pre_hook(hook))
        feed.run()
        for handle in handles:
            handle.remove()

    run_blocks(model, samples, collect, progress=False)
    assert len(tokens) == 3 * 4 and set(tokens.values()) == {16 + 11 + 7}


def test_non_finite_activations_name_the_block():
    model = tiny_causal_lm("llama")

    def poison(index, name, block, feed):
        if index == 1:
            block.mlp.down_proj.weight.data.fill_(float("nan"))

    with pytest.raises(PruneError, match=r"block 1 \(model\.layers\.1\).*non-finite"):
        run_blocks(model, token_samples(), poison, progress=False)


class Interrupt(Exception):
    pass


def pruning_run(arch, checkpoint_dir, stop_at=None, settings=None, calls=None):
    """Fresh model, 50% pruning per block, optionally interrupted when block `stop_at` starts."""
    model = tiny_causal_lm(arch, layers=4)

    def prune(index, name, block, feed):
        if calls is not None:
            calls.append(index)
        if index == stop_at:
            raise Interrupt
        feed.run()
        zero_half(block)

    outputs = run_blocks(model, token_samples(), prune, checkpoint_dir=checkpoint_dir,
                         settings=settings or {"sparsity": 0.5}, progress=False)
    return model, outputs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_resume_after_interruption_equals_an_uninterrupted_run(arch, tmp_path):
    reference, reference_out = pruning_run(arch, None)
    with pytest.raises(Interrupt):
        pruning_run(arch, tmp_path, stop_at=2)
    progress = json.loads((tmp_path / PROGRESS_FILE).read_text())
    assert progress["blocks_done"] == 2 and progress["num_blocks"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "block_0000.safetensors", "block_0001.safetensors", "inputs_0002.safetensors", PROGRESS_FILE,
    ]
    calls = []
    resumed, resumed_out = pruning_run(arch, tmp_path, calls=calls)
    assert calls == [2, 3]  # finished blocks are restored, not redone
    reference_state, resumed_state = reference.state_dict(), resumed.state_dict()
    assert reference_state.keys() == resumed_state.keys()
    assert all(torch.equal(reference_state[key], resumed_state[key]) for key in reference_state)
    assert all(torch.equal(a, b) for a, b in zip(reference_out, resumed_out))
    # a finished checkpoint restores everything and runs no callback
    calls.clear()
    again, _ = pruning_run(arch, tmp_path, calls=calls)
    assert calls == [] and all(torch.equal(reference_state[k], v) for k, v in again.state_dict().items())


def test_checkpoint_made_with_other_settings_is_refused(tmp_path):
    with pytest.raises(Interrupt):
        pruning_run("llama", tmp_path, stop_at=1)
    with pytest.raises(PruneError, match="different settings"):
        pruning_run("llama", tmp_path, settings={"sparsity": 0.6})
    model = tiny_causal_lm("llama", layers=4)
    with pytest.raises(PruneError, match="different samples"):
        run_blocks(model, token_samples(seed=1), lambda *a: None, checkpoint_dir=tmp_path, settings={"sparsity": 0.5}, progress=False)
    other = tiny_causal_lm("llama", layers=4, seed=1)
    with pytest.raises(PruneError, match="different weights"):
        run_blocks(other, token_samples(), lambda *a: None, checkpoint_dir=tmp_path, settings={"sparsity": 0.5}, progress=False)


def test_sample_validation():
    model = tiny_causal_lm("llama")
    noop = lambda *args: None  # noqa: E731
    with pytest.raises(ArgumentError, match=rf"samples\[0\] length={MAX_POSITIONS + 1}.*{MAX_POSITIONS}"):
        run_blocks(model, [torch.randint(3, VOCAB, (1, MAX_POSITIONS + 1))], noop, progress=False)
    with pytest.raises(ArgumentError, match="samples"):
        run_blocks(model, [], noop, progress=False)
    with pytest.raises(ArgumentError, match=r"samples\[1\]"):
        run_blocks(model, [torch.arange(4), torch.rand(4)], noop, progress=False)
    with pytest.raises(ArgumentError, match=r"token ids in \[0, 128\)"):
        run_blocks(model, [torch.tensor([5, 128])], noop, progress=False)
    with pytest.raises(ArgumentError, match="process_block"):
        run_blocks(model, token_samples(), "wanda", progress=False)
    with pytest.raises(ModelError):
        run_blocks(torch.nn.Linear(2, 2), token_samples(), noop, progress=False)


# ---- calibration text ---------------------------------------------------------------------------------------------


def test_load_text(tmp_path):
    default = load_text(None)
    assert isinstance(default, str) and len(default) > 100_000 and default == load_text()
    path = tmp_path / "t.txt"
    path.write_text("héllo\n", encoding="utf-8")
    assert load_text(path) == "héllo\n"
    with pytest.raises(ArgumentError, match="path"):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(ArgumentError, match="path"):
        load_text(tmp_path)


def test_calibration_samples_are_seeded_windows():
    text = load_text(None)[:20_000]
    tokenizer = CharTokenizer()
    first = calibration_samples(text, tokenizer, n_samples=4, seq_len=64, seed=0)
    assert [tuple(s.shape) for s in first] == [(1, 64)] * 4
    assert all(torch.equal(a, b) for a, b in zip(first, calibration_samples(text, tokenizer, 4, 64, 0)))
    assert not all(torch.equal(a, b) for a, b in zip(first, calibration_samples(text, tokenizer, 4, 64, 1)))
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    window = first[0][0]
    assert any(torch.equal(ids[i : i + 64], window) for i in range(ids.numel() - 63))  # a real window of the text
    with_bos = calibration_samples(text, CharTokenizer(adds_bos=True), 3, 64, 0)
    assert all(s.shape == (1, 64) and s[0, 0] == 1 for s in with_bos)


def test_too_short_text_is_an_error():
    with pytest.raises(ArgumentError, match=r"text=.*at least 64 tokens.*seq_len=64"):
        calibration_samples("far too short", CharTokenizer(), n_samples=2, seq_len=64, seed=0)
    with pytest.raises(ArgumentError, match="seq_len"):
        calibration_samples("x" * 100, CharTokenizer(), n_samples=2, seq_len=0, seed=0)
    with pytest.raises(ArgumentError, match="n_samples"):
        calibration_samples("x" * 100, CharTokenizer(), n_samples=0, seq_len=8, seed=0)
    with pytest.raises(ArgumentError, match="text"):
        protocol_calibration_texts("a short line\n" * 100)


def test_protocol_texts_are_deterministic_runs_of_long_lines():
    lines = [f"line {i:05d} " + "x" * (30 + i % 20) for i in range(3000)]
    texts = protocol_calibration_texts("\n\n".join(lines), n_samples=10)
    assert len(texts) == 10 and texts == protocol_calibration_texts("\n\n".join(lines), n_samples=10)
    qualifying = [line for line in lines if len(line) > 40]
    for text in texts:
        chunk = text.split("\n")
        assert len(chunk) == 8 and all(len(line) > 40 for line in chunk)
        start = qualifying.index(chunk[0])
        assert chunk == qualifying[start : start + 8] and start % 8 == 0
    # spread over the whole text: the first run and one near the end
    assert texts[0].startswith(qualifying[0]) and qualifying.index(texts[-1].split("\n")[0]) > 0.85 * len(qualifying)


@pytest.mark.slow
@pytest.mark.skipif(not KJV.is_file(), reason="needs ../shared/data/kjv.txt")
def test_protocol_samples_on_kjv_with_smollm2():
    from transformers import AutoTokenizer

    from prunekit.zoo import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    samples = protocol_calibration_samples(KJV.read_text(encoding="utf-8"), tokenizer)
    lengths = [s.shape[1] for s in samples]
    assert len(samples) == 128 and max(lengths) <= 256 and 120 <= sum(lengths) / len(lengths) <= 180


@pytest.mark.slow
def test_smollm2_blocks_match_the_full_forward():
    from prunekit.zoo import load_causal_lm

    model, _ = load_causal_lm("smollm2-135m")
    samples = [torch.randint(3, 40_000, (1, 24), generator=torch.Generator().manual_seed(0))]
    _, reference_out = full_forward_block_io(model, samples)
    outputs = run_blocks(model, samples, lambda *args: None, progress=False)
    torch.testing.assert_close(outputs[0], reference_out[0], rtol=1e-4, atol=1e-4)
