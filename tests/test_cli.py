"""The `prunekit` command line: listing methods, pruning to a folder, reading it back, the demo, and bad input."""

from __future__ import annotations

import contextlib
import io as text_io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from prunekit import METHODS, cli
from prunekit import io as pk_io
from prunekit.examples import DigitsCNN, accuracy, load_digits_data

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*argv: str) -> tuple[int, str, str]:
    """cli.main in process: (exit code, stdout, stderr)."""
    out, err = text_io.StringIO(), text_io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exit_:  # argparse usage errors
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """digits-cnn pruned at 50% magnitude and saved once for the tests that read it: (folder, --json stdout)."""
    folder = tmp_path_factory.mktemp("cli") / "pruned"
    code, out, err = run_cli("prune", "digits-cnn", "--method", "magnitude", "--sparsity", "0.5",
                             "--out", str(folder), "--json", "--quiet")
    assert code == 0, err
    return folder, out


# --- methods ------------------------------------------------------------------------------------------------------


def test_methods_lists_every_registered_method():
    code, out, err = run_cli("methods")
    assert code == 0 and err == ""
    listed = {line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")}
    assert listed == set(METHODS)
    for method in METHODS.values():
        assert method.paper in out


def test_methods_json_has_name_summary_and_paper():
    code, out, _ = run_cli("methods", "--json")
    rows = json.loads(out)
    assert code == 0
    assert [r["name"] for r in rows] == list(METHODS)
    assert all(r["summary"] == METHODS[r["name"]].summary and r["paper"] == METHODS[r["name"]].paper for r in rows)


def test_methods_markdown_is_one_row_per_method_with_pipes_escaped():
    code, out, _ = run_cli("methods", "--markdown")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == len(METHODS) + 2
    for line in lines:
        assert len(re.findall(r"(?<!\\)\|", line)) == 5  # summaries such as "smallest |w|" must not add columns


def test_readme_methods_table_matches_the_registry():
    """Every method row in README.md is exactly what `prunekit methods --markdown` prints now."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Methods\n", 1)[-1].split("\n## ", 1)[0]
    current = {line.split("|")[1].strip(): line for line in cli.methods_markdown(cli.method_rows()).splitlines()[2:]}
    documented = [line for line in section.splitlines() if re.match(r"\| `[a-z0-9-]+` \|", line)]
    assert documented, "README.md has no methods table"
    for line in documented:
        name = line.split("|")[1].strip()
        assert current.get(name) == line, f"README row for {name} is stale: paste `prunekit methods --markdown`"


# --- prune and report ---------------------------------------------------------------------------------------------


def test_prune_writes_a_folder_whose_manifest_says_the_sparsity(pruned_folder):
    folder, out = pruned_folder
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "masks.safetensors", "prunekit.json"}
    manifest = pk_io.read_manifest(folder)
    assert manifest["method"] == "magnitude"
    assert manifest["arguments"]["sparsity"] == 0.5
    assert manifest["sparsity"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert json.loads(out)["total"]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_report_json_round_trips_what_prune_printed(pruned_folder):
    folder, printed = pruned_folder
    code, out, err = run_cli("report", str(folder), "--json")
    assert code == 0, err
    assert json.loads(out) == json.loads(printed)


def test_report_text_shows_the_table_and_the_accuracy(pruned_folder):
    folder, _ = pruned_folder
    code, out, _ = run_cli("report", str(folder))
    assert code == 0
    assert "TOTAL" in out and "50.00%" in out and "classifier" in out
    assert re.search(r"accuracy: dense \d+\.\d+% -> pruned \d+\.\d+%", out)


def test_saved_folder_reloads_into_a_fresh_digits_cnn(pruned_folder):
    folder, printed = pruned_folder
    model = DigitsCNN()
    report = pk_io.load(model, folder)
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    data = load_digits_data()
    stored = json.loads(printed)["extra"]["metrics"]["pruned"]["accuracy"]
    assert accuracy(model, data.x_test, data.y_test) == pytest.approx(stored)


def test_prune_into_an_existing_folder_needs_overwrite_and_leaves_it_untouched(pruned_folder, tmp_path):
    folder, _ = pruned_folder
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    code, _, err = run_cli("prune", "digits-cnn", "--method", "random", "--sparsity", "0.3", "--out", str(folder))
    assert code == 2 and f"--out='{folder}'" in err and "--overwrite" in err
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()} == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, err = run_cli("prune", "digits-cnn", "--method", "magnitude", "--sparsity", "0.5", "--out", str(foreign))
    assert code == 2 and "--out" in err and "--overwrite" in err
    assert (foreign / "notes.txt").read_text() == "keep me"


# --- bad input ----------------------------------------------------------------------------------------------------


def test_unknown_method_exits_2_with_a_suggestion_and_writes_nothing(tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run_cli("prune", "digits-cnn", "--method", "magnitud", "--sparsity", "0.5", "--out", str(out_dir))
    assert code == 2 and out == ""
    assert err.startswith("prunekit: error: --method='magnitud'")
    assert "Did you mean 'magnitude'?" in err
    assert "Traceback" not in err
    assert not out_dir.exists()


def test_bad_sparsity_exits_2_naming_sparsity_and_writes_nothing(tmp_path):
    out_dir = tmp_path / "out"
    code, _, err = run_cli("prune", "digits-cnn", "--method", "magnitude", "--sparsity", "1.5", "--out", str(out_dir))
    assert code == 2
    assert err.startswith("prunekit: error: --sparsity=1.5") and "[0, 1)" in err
    assert not out_dir.exists()


@pytest.mark.parametrize("argv, named", [
    (["prune", "digits-cn", "--method", "magnitude", "--sparsity", "0.5"], "MODEL='digits-cn'"),
    (["prune", "digits-cnn", "--method", "magnitude", "--sparsity", "0.5", "--pattern", "3:2"], "--pattern='3:2'"),
    (["demo", "--method", "wanda-x"], "--method='wanda-x'"),
    (["demo", "--pattern", "diagonal"], "--pattern='diagonal'"),
])
def test_bad_arguments_fail_fast_with_exit_2(tmp_path, argv, named):
    if argv[0] == "prune":
        argv = [*argv, "--out", str(tmp_path / "out")]
    code, _, err = run_cli(*argv)
    assert code == 2 and named in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_report_of_a_missing_or_foreign_folder_exits_2(tmp_path):
    code, _, err = run_cli("report", str(tmp_path / "nowhere"))
    assert code == 2 and "DIR=" in err
    code, _, err = run_cli("report", str(tmp_path))
    assert code == 2 and "prunekit.json is missing" in err


def test_console_script_prints_one_error_line_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "prunekit.cli", "prune", "digits-cnn", "--method", "snipp", "--sparsity", "0.5",
         "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "prunekit: error: --method='snipp' is not valid: choose one of " + ", ".join(sorted(METHODS))
        + ". Did you mean 'snip'?"
    )


# --- the demo -----------------------------------------------------------------------------------------------------


def test_demo_keeps_accuracy_within_a_few_points_at_80_percent_global_magnitude():
    """Fixed seeds: 80% global magnitude, then 3 epochs of fine-tuning with masks enforced, stays near dense."""
    code, out, err = run_cli("demo", "--method", "global-magnitude", "--sparsity", "0.8", "--json", "--quiet")
    assert code == 0, err
    result = json.loads(out)
    assert result["report"]["total"]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert result["dense_accuracy"] > 0.95
    assert result["finetuned_accuracy"] >= result["dense_accuracy"] - 0.03
    assert result["final_sparsity"] == pytest.approx(0.8, abs=1e-3)  # the masks held through fine-tuning
