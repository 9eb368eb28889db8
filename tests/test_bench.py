"""The benchmark harness on real digits (1 epoch per phase): the grid runs and writes JSONL, tables, PNGs and a
self-contained HTML report; every method of a seed starts from the same data and dense model; an interrupted run
resumes without repeating finished cells; a run folder refuses another configuration; bad configurations name the
key and the valid values."""

from __future__ import annotations

import base64
import json
import re
import statistics
from pathlib import Path

import pytest
import torch

from prunekit import bench
from prunekit.bench import methods as bench_methods
from prunekit.bench import runner as bench_runner
from prunekit.bench.config import ConfigError, load_config, parse_config
from prunekit.errors import ArgumentError, FormatError, PruneError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY = """\
name: tiny
dataset: digits
dataset_options: {{train_size: 640, test_size: 300}}
models:
  - {{name: convnet, width: 8}}
methods: {methods}
sparsities: {sparsities}
seeds: [0, 1]
training: {{epochs: 1, finetune_epochs: 1, batch_size: 32, lottery_rounds: 2}}
"""


# One intra-op thread for the module (conftest.one_intra_op_thread): the models here are tiny.
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def write_config(folder: Path, methods: str = "[lamp, snip-init, gradual-magnitude, lottery, structured-l2, dense]",
                 sparsities: str = "[0.5, 0.9]", name: str = "tiny.yaml", **replace: str) -> Path:
    text = TINY.format(methods=methods, sparsities=sparsities)
    for old, new in replace.items():
        text = text.replace(old, new)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny grid, run once: (config, run folder, records by key)."""
    folder = tmp_path_factory.mktemp("bench")
    config = load_config(write_config(folder))
    summary = bench.run_bench(config, folder / "run", progress=False)
    return config, folder / "run", bench.read_results(folder / "run"), summary


# --- the grid and its outputs -------------------------------------------------------------------------------------


def test_baselines_are_added_and_said(finished):
    config = finished[0]
    assert config.methods == ["lamp", "snip-init", "gradual-magnitude", "lottery", "structured-l2", "dense", "random",
                              "global-magnitude", "structured-l2-scratch"]
    assert any("random, global-magnitude added automatically" in note for note in config.notes)
    assert any("structured-l2-scratch" in note and "scratch" in note for note in config.notes)


def test_every_cell_is_one_jsonl_line(finished):
    config, run_dir, records, summary = finished
    cells = bench.grid_cells(config)
    # 8 methods x 2 sparsities x 2 seeds, plus the dense reference once per seed
    assert len(cells) == 8 * 2 * 2 + 2 == summary.cells == summary.ran
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(cells)
    assert sorted(json.loads(line)["key"] for line in lines) == sorted(c.key for c in cells)


def test_unstructured_cells_reach_their_sparsity_and_budget_is_shared(finished):
    config, _, records, _ = finished
    steps_per_epoch = 640 // 32
    for record in records.values():
        if record["kind"] in ("one-shot", "callback", "lottery"):
            assert record["measured_sparsity"] == pytest.approx(record["sparsity"], abs=2e-3), record["key"]
        if record["kind"] == "lottery":  # two search rounds of one epoch, then the same two epochs as the others
            assert record["steps"] == (2 + 2) * steps_per_epoch
        else:
            assert record["steps"] == 2 * steps_per_epoch, record["key"]
        if record["kind"] == "dense":
            assert record["measured_sparsity"] == 0.0
    # the scratch twin has exactly the architecture the structured method left
    for seed in config.seeds:
        for s in config.sparsities:
            pruned = records[f"convnet-width8|structured-l2|{s:g}|seed={seed}"]
            scratch = records[f"convnet-width8|structured-l2-scratch|{s:g}|seed={seed}"]
            assert pruned["kept_weights"] == scratch["kept_weights"] < pruned["dense_weights"]
            assert pruned["layers"] == scratch["layers"]


def test_one_shot_starts_from_the_shared_dense_model(finished):
    """Fairness: a one-shot cell prunes the cached dense model of its seed (trained on the common data order)."""
    import prunekit
    from prunekit.bench.tasks import build_model, load_task
    from prunekit.examples import accuracy

    config, run_dir, records, _ = finished
    task = load_task("digits", config.dataset_options)
    spec = config.models[0]
    ctx = bench_methods.CellContext(task, spec.name, dict(spec.options), 1, config.training, dense_trained=None)
    # retrain the dense model from scratch: identical to the cached one (same seed, same batches)
    retrained = bench_methods.train_dense(ctx)
    cached = bench_runner.DenseCache(run_dir).get(ctx, spec.label)
    for key, value in cached.state_dict().items():
        assert torch.equal(value, retrained.state_dict()[key]), key
    prunekit.prune(cached, "lamp", 0.9, seed=1)  # data-free: the cell passes it no data either
    assert records["convnet-width8|lamp|0.9|seed=1"]["pruned_accuracy"] == accuracy(cached, task.x_test, task.y_test)
    assert build_model(spec.name, spec.options, task, 1).state_dict().keys() == cached.state_dict().keys()


def test_trained_models_learn_and_baselines_order(finished):
    config, _, records, _ = finished

    def mean(method, sparsity):
        return statistics.fmean(r["accuracy"] for r in records.values()
                                if r["method"] == method and r["sparsity"] == sparsity)

    assert mean("dense", 0.0) > 0.6  # ten classes: chance is 0.1
    assert mean("global-magnitude", 0.5) > mean("random", 0.9)


def test_tables_hold_mean_and_std_over_seeds(finished):
    config, run_dir, records, _ = finished
    text = (run_dir / "tables.md").read_text()
    values = [r["accuracy"] for r in records.values() if r["method"] == "lamp" and r["sparsity"] == 0.9]
    expected = f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values):.2f}"
    row = next(line for line in text.splitlines() if line.startswith("| `lamp`"))
    cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
    assert cells[2] == expected  # columns: method, 50%, 90%, steps
    assert "| method | 50% | 90% | steps |" in text
    assert "added automatically" in text and "dense reference:" in text
    for method in config.methods:
        if method != "dense":
            assert f"| `{method}` |" in text
    # the best mean of each column is bold (ties: each of them), and no other
    table = text.split("### convnet-width8")[1].split("Right after")[0]
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| `")]
    for column in (1, 2):
        means = [float(row[column].strip(" *").split(" ± ")[0]) for row in rows]
        assert [("**" in row[column]) for row in rows] == [m == max(means) for m in means]


def test_plots_are_png_and_the_html_embeds_them(finished):
    from matplotlib.image import imread

    _, run_dir, _, summary = finished
    pngs = [run_dir / "accuracy_vs_sparsity.png", run_dir / "layer_sparsity.png"]
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC)
        height, width = imread(str(png)).shape[:2]
        assert height > 200 and width > 300
    page = (run_dir / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(e) for e in embedded] == [p.read_bytes() for p in pngs]
    assert not re.search(r'(src|href)="(?!data:)', page)  # no external assets
    assert "<table>" in page and "±" in page and "structured-l2-scratch" in page
    assert set(summary.outputs) == {"tables", "accuracy_plot", "layer_plot", "report"}


# --- resuming and run folders -----------------------------------------------------------------------------------


def test_interrupted_run_resumes_without_repeating_cells(tmp_path, monkeypatch):
    config = load_config(write_config(tmp_path, methods="[global-magnitude]", sparsities="[0.5, 0.8]"))
    cells = bench.grid_cells(config)
    assert len(cells) == 8  # global-magnitude and random (added) x 2 sparsities x 2 seeds
    calls = []
    real = bench_runner.run_method

    def interrupted(method, sparsity, ctx):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append((method, sparsity, ctx.seed))
        return real(method, sparsity, ctx)

    monkeypatch.setattr(bench_runner, "run_method", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(config, tmp_path / "run", progress=False)
    assert len(bench.read_results(tmp_path / "run")) == 3
    # an append cut short by the interruption: ignored, and the next line still starts on its own line
    with open(tmp_path / "run" / "results.jsonl", "a") as handle:
        handle.write('{"key": "convnet-width8|random|0.5|se')
    with pytest.raises(ConfigError, match="--resume"):
        bench.run_bench(config, tmp_path / "run", progress=False)

    calls.clear()
    monkeypatch.setattr(bench_runner, "run_method", lambda m, s, c: calls.append((m, s, c.seed)) or real(m, s, c))
    summary = bench.run_bench(config, tmp_path / "run", resume=True, progress=False)
    assert (summary.ran, summary.skipped) == (5, 3)
    assert len(calls) == 5
    records = bench.read_results(tmp_path / "run")
    assert sorted(records) == sorted(c.key for c in cells)
    # a finished grid resumed again runs nothing and rewrites the report
    calls.clear()
    assert bench.run_bench(config, tmp_path / "run", resume=True, progress=False).ran == 0 and not calls


def test_a_different_config_is_refused(tmp_path):
    config = load_config(write_config(tmp_path, methods="[global-magnitude]", sparsities="[0.5]"))
    bench.run_bench(config, tmp_path / "run", progress=False)
    other = load_config(write_config(tmp_path, methods="[global-magnitude]", sparsities="[0.5]", name="other.yaml",
                                     **{"epochs: 1": "epochs: 2"}))
    with pytest.raises(ConfigError) as error:
        bench.run_bench(other, tmp_path / "run", resume=True, progress=False)
    message = str(error.value)
    assert str(tmp_path / "run") in message and "training.epochs: 1 -> 2" in message
    assert len(bench.read_results(tmp_path / "run")) == 4  # nothing was added: 2 methods x 2 seeds
    # a folder that is not a run folder is refused too
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a benchmark run folder"):
        bench.run_bench(config, tmp_path / "busy", progress=False)


def test_config_digest_ignores_formatting(tmp_path):
    a = load_config(write_config(tmp_path, name="a.yaml"))
    b = parse_config({"training": {"batch_size": 32, "epochs": 1, "finetune_epochs": 1, "lottery_rounds": 2},
                      "seeds": [0, 1], "sparsities": [0.9, 0.5], "dataset": "digits", "name": "tiny",
                      "dataset_options": {"test_size": 300, "train_size": 640},
                      "models": [{"name": "convnet", "width": 8}],
                      "methods": ["lamp", "snip-init", "gradual-magnitude", "lottery", "structured-l2", "dense"]})
    assert a.digest == b.digest
    assert a.digest != parse_config({**yaml_of(a), "seeds": [0]}).digest


def yaml_of(config):
    import yaml

    return yaml.safe_load(config.source)


# --- bad input ----------------------------------------------------------------------------------------------------

BAD = [
    ({"models": ["resnet-smal"]}, ArgumentError, ["models[0].name='resnet-smal'", "convnet, mlp, resnet-small, vit-tiny",
                                                  "Did you mean 'resnet-small'"]),
    ({"methods": ["lamp", "snipp"]}, ArgumentError, ["methods[1]='snipp'", "global-magnitude", "snip-init",
                                                     "structured-l2-scratch"]),
    ({"dataset": "mnist"}, ArgumentError, ["dataset='mnist'", "digits, fashion-mnist"]),
    ({"sparsities": [0.5, "high"]}, ArgumentError, ["sparsities[1]='high'", "a number in (0, 1)"]),
    ({"sparsities": [1.0]}, ArgumentError, ["sparsities[0]=1.0", "(0, 1)"]),
    ({"sparsities": 0.5}, ArgumentError, ["sparsities=0.5", "a non-empty list"]),
    ({"seeds": [0, -1]}, ArgumentError, ["seeds[1]=-1", "an integer >= 0"]),
    ({"training": {"epochs": "two"}}, ArgumentError, ["training.epochs='two'", "an integer >= 1"]),
    ({"training": {"epoch": 2}}, ArgumentError, ["training key='epoch'", "Did you mean 'epochs'"]),
    ({"training": {"optimizer": "rmsprop"}}, ArgumentError, ["training.optimizer='rmsprop'", "adam, sgd"]),
    ({"models": [{"name": "convnet", "widht": 8}]}, ArgumentError, ["models[0] option='widht'", "width"]),
    ({"models": [{"name": "mlp", "width": 0}]}, ArgumentError, ["models[0].width=0", "an integer >= 1"]),
    ({"models": [{"width": 8}]}, ConfigError, ["models[0] misses the required key 'name'", "convnet"]),
    ({"sparsity": [0.5]}, ArgumentError, ["config key='sparsity'", "Did you mean 'sparsities'"]),
    ({"methods": ["lamp", "snip-init"], "method_options": {"snip-init": {"min_keep": 2}}}, ArgumentError, ["method_options.snip-init",
                                                                        "one-shot methods"]),
    ({"method_options": {"lmap": {}}}, ArgumentError, ["method_options key='lmap'", "global-magnitude, lamp, random"]),
    ({"method_options": {"lamp": {"min_kep": 2}}}, ArgumentError, ["method_options.lamp key='min_kep'", "min_keep"]),
]


@pytest.mark.parametrize("change, error, words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_config_names_the_key_and_valid_values(change, error, words):
    raw = {"dataset": "digits", "models": ["convnet"], "methods": ["lamp"], "sparsities": [0.5]}
    raw.update(change)
    with pytest.raises(error) as caught:
        parse_config(raw)
    for word in words:
        assert word in str(caught.value)


def test_missing_keys_and_non_mappings():
    with pytest.raises(ConfigError, match=r"misses the required key\(s\) methods, sparsities"):
        parse_config({"dataset": "digits", "models": ["convnet"]})
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config(["dataset", "digits"])


def test_yaml_that_does_not_parse(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("dataset: digits\nmodels: [convnet\nmethods: [lamp]\n")
    with pytest.raises(FormatError, match=r"broken.yaml is not valid YAML at line \d+, column \d+"):
        load_config(path)
    python = tmp_path / "object.yaml"  # safe_load only: no Python objects from a configuration
    python.write_text("dataset: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(FormatError, match="not valid YAML"):
        load_config(python)


def test_cli_runs_and_bad_input_is_one_line(tmp_path, capsys):
    from prunekit import bench_cli

    import argparse

    parser = argparse.ArgumentParser(prog="prunekit")
    bench_cli.register(parser.add_subparsers())
    path = write_config(tmp_path, methods="[global-magnitude]", sparsities="[0.5]", **{"seeds: [0, 1]": "seeds: [0]"})
    args = parser.parse_args(["bench", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "2 cells run, 0 already finished" in out and "report.html" in out

    from prunekit.cli import main

    bad = write_config(tmp_path, name="bad.yaml", **{"convnet": "convnett"})
    assert main(["bench", str(bad), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunekit: error: models[0].name='convnett'")
    assert not (tmp_path / "never").exists()  # nothing written for a bad configuration
    assert issubclass(ConfigError, PruneError)


def test_a_failing_cell_is_named_and_finished_cells_stay(tmp_path, monkeypatch):
    config = load_config(write_config(tmp_path, methods="[global-magnitude]", sparsities="[0.5]"))
    real = bench_runner.run_method

    def failing(method, sparsity, ctx):
        if method == "random":
            raise ArgumentError("sparsity", sparsity, "something this method cannot do")
        return real(method, sparsity, ctx)

    monkeypatch.setattr(bench_runner, "run_method", failing)
    with pytest.raises(PruneError, match=r"cell convnet-width8\|random\|0.5\|seed=0 failed: sparsity=0.5"):
        bench.run_bench(config, tmp_path / "run", progress=False)
    assert list(bench.read_results(tmp_path / "run")) == ["convnet-width8|global-magnitude|0.5|seed=0"]


def test_every_cell_records_the_machine_and_the_reports_say_it(finished):
    from prunekit.bench.machine import cpu_model, describe_all

    _, run_dir, records, _ = finished
    machines = [r["machine"] for r in records.values()]
    assert all(m["cpu"] == cpu_model() and m["versions"]["torch"] == torch.__version__ for m in machines)
    line = f"Machine: {describe_all(machines)}."
    assert cpu_model() in line and "not recorded" not in line
    assert line in (run_dir / "tables.md").read_text()
    assert line in (run_dir / "report.html").read_text()
