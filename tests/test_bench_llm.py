"""The benchmark harness on a real causal LM (SmolLM2-135M, post-training pruning, perplexity on held-out text):
the ordering the papers report (dense < Wanda < random) shows, and sparsity is counted over the decoder's Linears."""

from __future__ import annotations

import pytest

from prunekit import bench
from prunekit.bench.config import parse_config

pytestmark = pytest.mark.slow

# Held-out perplexities of this run (4 x 64 calibration tokens, 256 evaluation tokens of pydoc-topics), measured with
# the config below on torch 2.13 CPU; 1 and 2 threads give the same values to 1e-12. 2% is far above rounding and far
# below the gaps between methods. Random pruning is not stored: at ~1e8 its value is chaotic, only its size matters.
PERPLEXITY = {"dense": 10.397, "wanda": 24.245, "global-magnitude": 642.6}
PERPLEXITY_REL = 0.02


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory):
    config = parse_config({
        "name": "llm-tiny", "dataset": "pydoc-topics",
        "dataset_options": {"n_samples": 4, "seq_len": 64, "eval_tokens": 256},
        "models": ["smollm2-135m"], "methods": ["wanda", "dense"], "sparsities": [0.5], "seeds": [0],
    })
    run_dir = tmp_path_factory.mktemp("llm") / "run"
    summary = bench.run_bench(config, run_dir, progress=False)
    return config, run_dir, bench.read_results(run_dir), summary


def test_perplexity_orders_dense_wanda_random(llm_run):
    config, run_dir, records, summary = llm_run
    assert config.metric == "perplexity" and config.methods == ["wanda", "dense", "random", "global-magnitude"]
    assert summary.ran == 4
    ppl = {r["method"]: r["perplexity"] for r in records.values()}
    assert all(r["accuracy"] is None and r["steps"] == 0 for r in records.values())
    assert ppl["dense"] < ppl["wanda"] < ppl["random"]
    assert {m: ppl[m] for m in PERPLEXITY} == pytest.approx(PERPLEXITY, rel=PERPLEXITY_REL)
    assert ppl["random"] > 100 * ppl["dense"]  # random pruning destroys the model


def test_sparsity_counts_the_decoder_linears_only(llm_run):
    _, _, records, _ = llm_run
    for method in ("wanda", "random", "global-magnitude"):
        record = records[f"smollm2-135m|{method}|0.5|seed=0"]
        names = [name for name, _ in record["layers"]]
        assert names and all(".layers." in name for name in names)  # no embedding, no output head
        assert len(names) == 7 * 30  # q, k, v, o, gate, up, down in each of the 30 blocks
        assert record["measured_sparsity"] == pytest.approx(0.5, abs=1e-3)
        if method != "global-magnitude":  # per-layer methods: every layer at 50%
            assert all(value == pytest.approx(0.5, abs=1e-3) for _, value in record["layers"])


def test_tables_rank_by_lowest_perplexity(llm_run):
    _, run_dir, _, _ = llm_run
    text = (run_dir / "tables.md").read_text()
    assert "held-out perplexity (lower is better)" in text and "dense reference: perplexity" in text
    wanda_row = next(line for line in text.splitlines() if line.startswith("| `wanda`"))
    assert "**" in wanda_row  # the lowest perplexity of the column is the bold one
    assert (run_dir / "accuracy_vs_sparsity.png").read_bytes().startswith(b"\x89PNG")
