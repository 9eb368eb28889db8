"""The LLM job end to end: CLI prune -> a folder plain transformers loads -> eval; and a real-model check."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prunekit.errors import ArgumentError  # noqa: E402
from prunekit.zoo import smollm2_135m  # noqa: E402


@pytest.fixture(scope="module")
def tiny_lm_folder(tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer, saved as an ordinary transformers folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    source = smollm2_135m()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                      max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# Perplexities of the tiny random model (seed 0) on the default texts, measured with `prunekit prune ... --json` and
# `prunekit eval ...` as below (torch 2.13 CPU; the same on 1 and 2 threads). Its logits are near zero, so it predicts
# almost uniformly: each value sits just under the 49,152-token vocabulary. 0.1% is far above float rounding (the
# values agree to 1e-9 across thread counts) and below any change of the evaluated text, model or calibration.
PERPLEXITY = {"dense": 49006.0, "pruned": 49043.1, "eval": 49109.7}
PERPLEXITY_REL = 1e-3


def _run(*argv):
    return subprocess.run([sys.executable, "-m", "prunekit", *map(str, argv)], capture_output=True, text=True,
                          timeout=600)


def test_cli_prune_writes_a_folder_plain_transformers_loads(tiny_lm_folder, tmp_path):
    out = tmp_path / "pruned"
    result = _run("prune", tiny_lm_folder, "--method", "sparsegpt", "--sparsity", "0.5", "--n-samples", "4",
                  "--seq-len", "32", "--eval-tokens", "256", "--out", out, "--json", "-q")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["report"]["total"]["sparsity"] == pytest.approx(0.5)
    assert summary["dense_perplexity"] == pytest.approx(PERPLEXITY["dense"], rel=PERPLEXITY_REL)
    assert summary["pruned_perplexity"] == pytest.approx(PERPLEXITY["pruned"], rel=PERPLEXITY_REL)
    # Loads with plain transformers, without importing prunekit, and the zeros are there.
    check = ("import sys, torch, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
             "w = m.model.layers[0].mlp.down_proj.weight; "
             "print('prunekit' in sys.modules, float((w == 0).float().mean()))")
    loaded = subprocess.run([sys.executable, "-c", check, str(out)], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    imported, share = loaded.stdout.split()
    assert imported == "False" and float(share) == pytest.approx(0.5)
    manifest = json.loads((out / "prunekit.json").read_text())
    assert manifest["method"] == "sparsegpt" and manifest["sparsity"]["sparsity"] == pytest.approx(0.5)
    assert "model.safetensors" in manifest["files"]
    # prunekit eval reads the folder back
    result = _run("eval", out, "--eval-tokens", "256", "--window", "64", "--json", "-q")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["perplexity"] == pytest.approx(PERPLEXITY["eval"], rel=PERPLEXITY_REL)


def test_cli_llm_bad_input_fails_before_work_and_writes_nothing(tiny_lm_folder, tmp_path):
    out = tmp_path / "never"
    cases = [
        (["--method", "wanda", "--sparsity", "1.5"], "--sparsity=1.5"),
        (["--method", "wanda", "--sparsity", "0.5", "--seq-len", "100000"], "--seq-len=100000"),
        (["--method", "wanda", "--sparsity", "0.5,0.5,0.5"], "one sparsity per decoder block (2"),
        (["--method", "wandaa", "--sparsity", "0.5"], "Did you mean 'wanda'"),
        (["--method", "wanda", "--sparsity", "0.5", "--calib", tmp_path / "missing.txt"],
         f"--calib='{tmp_path / 'missing.txt'}' is not valid: an existing UTF-8 text file. no such file"),
    ]
    for args, message in cases:
        proc = _run("prune", tiny_lm_folder, *args, *([] if "--seq-len" in args else ["--seq-len", "16"]),
                    "--n-samples", "2", "--no-eval", "--out", out, "-q")
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not out.exists()


def test_short_calibration_text_is_refused(tiny_lm_folder, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("Too short to fill one window.")
    proc = _run("prune", tiny_lm_folder, "--method", "wanda", "--sparsity", "0.5", "--calib", text, "--ppl", text,
                "--seq-len", "64", "--n-samples", "2", "--no-eval", "--out", tmp_path / "o", "-q")
    assert proc.returncode == 2 and f"--calib='{text}'" in proc.stderr, proc.stderr
    assert "at least 128 tokens for 2 samples of 64" in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_real_smollm2_wanda_beats_magnitude():
    """On the real SmolLM2-135M at 50%: magnitude is clearly worst (the literature's ordering).

    SparseGPT on the real model is measured in benchmarks/llm_posttraining.py (it takes minutes on 2 cores).
    """
    import prunekit
    from prunekit.calibration import calibration_samples, load_text
    from prunekit.evaluate import perplexity
    from prunekit.pipeline import split_held_out
    from prunekit.zoo import load_causal_lm

    calib, held_out = split_held_out(load_text(None))
    model, tokenizer = load_causal_lm("smollm2-135m")
    samples = calibration_samples(calib, tokenizer, 8, 128, seed=0)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for method in ("magnitude", "wanda"):
        model.load_state_dict(dense_state)
        calibrated = {"data": samples, "progress": False} if method == "wanda" else {}  # magnitude reads neither
        report = prunekit.prune(model, method, 0.5, apply="bake", **calibrated)
        assert report.sparsity == pytest.approx(0.5, abs=1e-6)
        results[method] = perplexity(model, tokenizer, held_out, window=256, max_tokens=1024, progress=False)
    model.load_state_dict(dense_state)
    dense = perplexity(model, tokenizer, held_out, window=256, max_tokens=1024, progress=False)
    assert dense < results["wanda"] < results["magnitude"]
    assert results["magnitude"] > 1.5 * results["wanda"]


def _kjv_like_dataset(tmp_path):
    """A real-text `datasets` dataset saved to disk (Python's pydoc topics, one row per topic, some empty rows)."""
    datasets = pytest.importorskip("datasets")
    from pydoc_data.topics import topics

    rows = [topics[key] for key in sorted(topics)] + ["", "   "]
    folder = tmp_path / "pydoc-dataset"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": rows, "n": list(range(len(rows)))})}) \
        .save_to_disk(folder)
    return folder, rows


def test_dataset_text_joins_the_non_empty_rows_of_the_column(tmp_path):
    from prunekit.calibration import DatasetText, load_text

    folder, rows = _kjv_like_dataset(tmp_path)
    text = load_text(DatasetText(str(folder)))
    assert text == "\n".join(r for r in rows if r.strip())
    with pytest.raises(ArgumentError, match="column='body'.*text, n"):
        load_text(DatasetText(str(folder), column="body"))
    with pytest.raises(ArgumentError, match="split='validation'.*train"):
        load_text(DatasetText(str(folder), split="validation"))
    with pytest.raises(ArgumentError, match="column='n'"):  # a column of numbers is not text
        load_text(DatasetText(str(folder), column="n"))


def test_cli_calibrates_from_a_dataset_folder_and_refuses_two_sources(tiny_lm_folder, tmp_path):
    folder, _ = _kjv_like_dataset(tmp_path)
    out = tmp_path / "pruned"
    result = _run("prune", tiny_lm_folder, "--method", "wanda", "--sparsity", "0.5", "--n-samples", "4",
                  "--seq-len", "32", "--no-eval", "--calib-dataset", folder, "--out", out, "--json", "-q")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["report"]["total"]["sparsity"] == pytest.approx(0.5)
    calib = tmp_path / "calib.txt"
    calib.write_text("words " * 5000)
    result = _run("prune", tiny_lm_folder, "--method", "wanda", "--sparsity", "0.5", "--calib", calib,
                  "--calib-dataset", folder, "--out", tmp_path / "two", "-q")
    assert result.returncode == 2 and "--calib-dataset" in result.stderr and "not both" in result.stderr
    assert not (tmp_path / "two").exists()


def test_cli_out_of_core_writes_the_in_memory_folder(tiny_lm_folder, tmp_path):
    """`--out-of-core`: the same tensors, sparsity and perplexities as the in-memory job, in a sharded folder."""
    from safetensors.torch import load_file

    common = ["prune", tiny_lm_folder, "--method", "sparsegpt", "--sparsity", "0.5", "--n-samples", "4",
              "--seq-len", "32", "--eval-tokens", "256", "--json", "-q"]
    summaries = {}
    for mode in ("memory", "ooc"):
        result = _run(*common, "--out", tmp_path / mode, *(["--out-of-core"] if mode == "ooc" else []))
        assert result.returncode == 0, result.stderr
        summaries[mode] = json.loads(result.stdout)
    for key in ("dense_perplexity", "pruned_perplexity"):
        assert summaries["ooc"][key] == summaries["memory"][key]
    tensors = {mode: {k: v for path in sorted((tmp_path / mode).glob("*.safetensors")) for k, v in load_file(path).items()}
               for mode in ("memory", "ooc")}
    assert set(tensors["ooc"]) == set(tensors["memory"])
    assert all(torch.equal(tensors["ooc"][k], tensors["memory"][k]) for k in tensors["memory"])
    assert (tmp_path / "ooc" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "ooc" / "tokenizer.json").is_file()
    # a non-calibration method is refused by name before anything is written
    result = _run("prune", tiny_lm_folder, "--method", "magnitude", "--sparsity", "0.5", "--out", tmp_path / "m",
                  "--out-of-core", "-q")
    assert result.returncode == 2 and "method" in result.stderr and not (tmp_path / "m").exists()


def test_cli_one_pass_calibration_runs_and_is_refused_out_of_core(tiny_lm_folder, tmp_path):
    common = ["prune", tiny_lm_folder, "--method", "wanda", "--sparsity", "0.5", "--n-samples", "4", "--seq-len", "32",
              "--eval-tokens", "256", "--calibration", "one-pass", "--json", "-q"]
    result = _run(*common, "--out", tmp_path / "one")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["report"]["arguments"]["calibration"] == "one-pass"
    result = _run(*common, "--out", tmp_path / "ooc", "--out-of-core")
    assert result.returncode == 2 and "--calibration='one-pass'" in result.stderr, result.stderr
    assert not (tmp_path / "ooc").exists()
    result = _run(*common[:-4], "--calibration", "onepass", "--out", tmp_path / "bad", "-q")
    assert result.returncode == 2 and "--calibration='onepass'" in result.stderr, result.stderr
