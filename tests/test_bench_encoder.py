"""The benchmark harness on a real encoder (all-MiniLM-L6-v2, post-training pruning of its blocks' Linear layers,
scored by how close its sentence embeddings stay to the dense model's on held-out text)."""

from __future__ import annotations

import pytest
import torch

from prunekit import bench
from prunekit.bench.config import parse_config
from prunekit.errors import ArgumentError


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    config = parse_config({
        "name": "encoder-tiny", "dataset": "pydoc-topics",
        "dataset_options": {"n_samples": 8, "seq_len": 64, "eval_tokens": 256},
        "models": ["minilm"], "methods": ["wanda", "sparsegpt", "dense"], "sparsities": [0.5], "seeds": [0],
    })
    run_dir = tmp_path_factory.mktemp("encoder") / "run"
    summary = bench.run_bench(config, run_dir, progress=False)
    return config, run_dir, bench.read_results(run_dir), summary


def test_embedding_agreement_orders_dense_calibrated_random(encoder_run):
    config, run_dir, records, summary = encoder_run
    assert config.metric == "embedding_cosine" and summary.ran == 5  # + random and global-magnitude baselines
    cosine = {r["method"]: r["embedding_cosine"] for r in records.values()}
    assert all(r["perplexity"] is None and r["accuracy"] is None for r in records.values())
    assert cosine["dense"] == pytest.approx(1.0, abs=1e-6)  # the dense model agrees with itself
    # calibration-based pruning keeps the embeddings far closer than random pruning at the same sparsity
    assert min(cosine["wanda"], cosine["sparsegpt"]) > 0.8 > cosine["random"]
    text = (run_dir / "tables.md").read_text()
    assert "cosine similarity of sentence embeddings" in text and "dense reference: cosine" in text


def test_sparsity_counts_the_encoder_block_linears_only(encoder_run):
    _, _, records, _ = encoder_run
    record = records["minilm|wanda|0.5|seed=0"]
    names = [name for name, _ in record["layers"]]
    assert len(names) == 6 * 6 and all(".layer." in name for name in names)  # q, k, v, out, up, down x 6 blocks
    assert all(value == pytest.approx(0.5, abs=1e-3) for _, value in record["layers"])


def test_a_grid_mixing_causal_lms_and_encoders_is_refused():
    with pytest.raises(ArgumentError, match="models=.*not both"):
        parse_config({"dataset": "pydoc-topics", "models": ["minilm", "smollm2-135m"], "methods": ["wanda"],
                      "sparsities": [0.5]})


def test_wanda_prunes_a_real_encoder_through_the_front_door():
    """prunekit.prune runs the block engine on a transformers encoder too; a plain module is still refused."""
    import prunekit
    from prunekit.calibration import calibration_samples, load_text
    from prunekit.errors import ModelError
    from prunekit.zoo import load_minilm

    model, tokenizer = load_minilm()
    samples = calibration_samples(load_text(None), tokenizer, 4, 32, 0)
    report = prunekit.prune(model, "wanda", 0.5, data=samples, apply="bake", progress=False)
    assert report.sparsity == pytest.approx(0.5)
    weight = model.encoder.layer[0].intermediate.dense.weight
    assert float((weight == 0).float().mean()) == pytest.approx(0.5)
    with pytest.raises(ModelError, match="neither a transformers causal language model nor a transformers encoder"):
        prunekit.prune(torch.nn.Sequential(torch.nn.Linear(4, 4)), "wanda", 0.5, data=[torch.ones(1, 4).long()])
