"""No silently ignored arguments, and CLI errors that name the flag before any model loads.

Every argument a chosen path would not use is refused by name (the Python keyword in the API, the flag in the CLI)
with its value; a substitute (rate-distortion's data-free proxy, bn-scale/FPGM's group-norm fallback, skipping
untraceable blocks) runs only when asked for, and is then reported. The CLI tests run `cli.main` in process with
the model loaders replaced by functions that fail the test if called: the errors must come before any weights load.
"""

from __future__ import annotations

import contextlib
import io as text_io
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from prunekit import cli
from prunekit.errors import ArgumentError, PruneError
from helpers import cnn_batch, small_cnn, small_mlp, state_copy, same_state


def run_cli(*argv: str) -> tuple[int, str, str]:
    """cli.main in process: (exit code, stdout, stderr)."""
    out, err = text_io.StringIO(), text_io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse usage errors
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


# --- the API: LLM methods refuse what they would drop ----------------------------------------------------------------


@pytest.mark.parametrize("keyword, value", [
    ("budget", "uniform"), ("score", "magnitude"), ("min_keep", 10), ("seed", 3), ("types", ["conv"]),
    ("n_batches", 2), ("rounds", 3), ("keep_original", True),
])
def test_llm_method_refuses_a_keyword_it_would_drop(keyword, value):
    model = small_mlp()
    saved = state_copy(model)
    with pytest.raises(ArgumentError) as caught:
        prunekit.prune(model, "owl", 0.5, data=[torch.zeros(1, 4, dtype=torch.long)], **{keyword: value})
    assert caught.value.argument == keyword and f"{keyword}={value!r}" in str(caught.value)
    assert same_state(model, saved)


def test_llm_method_refuses_a_loss_fn_and_example_inputs_by_name():
    for keyword, value in (("loss_fn", nn.functional.cross_entropy), ("example_inputs", torch.ones(1, 4))):
        with pytest.raises(ArgumentError, match=f"^{keyword}=") as caught:
            prunekit.prune(small_mlp(), "wanda", 0.5, **{keyword: value})
        assert caught.value.argument == keyword


def test_llm_method_names_the_method_that_does_the_other_allocation():
    with pytest.raises(ArgumentError, match="Method 'owl' does that") as caught:
        prunekit.prune(small_mlp(), "wanda", 0.5, budget="owl")
    assert caught.value.argument == "budget"


def test_llm_method_accepts_its_own_score_and_budget_named_explicitly():
    # Accepted: the run gets as far as the runner, which then asks for the calibration data it lacks.
    with pytest.raises(ArgumentError) as caught:
        prunekit.prune(small_mlp(), "owl", 0.5, score="wanda", budget="owl")
    assert caught.value.argument == "data"


@pytest.mark.parametrize("method, keyword, value", [
    ("wanda", "blocksize", 64), ("owl", "dampening", 0.02), ("wanda", "owl_m", 7.0), ("sparsegpt", "owl_lambda", 0.1),
    ("wanda", "taylor_order", 2),
])
def test_llm_solver_options_are_refused_for_the_other_solver(method, keyword, value):
    with pytest.raises(ArgumentError) as caught:  # an ArgumentError, not a TypeError from deep inside
        prunekit.prune(small_mlp(), method, 0.5, data=[torch.zeros(1, 4, dtype=torch.long)], **{keyword: value})
    assert caught.value.argument == keyword and str(caught.value).startswith(f"{keyword}={value!r}")


def test_a_score_option_the_chosen_score_does_not_read_is_refused():
    with pytest.raises(ArgumentError, match=r"^taylor_order=2 .*'magnitude'"):
        prunekit.prune(small_mlp(), "magnitude", 0.5, taylor_order=2)


# --- rate-distortion: measured on data, or the proxy only when asked -------------------------------------------------


def test_rate_distortion_without_data_is_refused_naming_data():
    model = small_cnn()
    with pytest.raises(ArgumentError, match="^data=None .*distortion_proxy=True") as caught:
        prunekit.prune(model, "rate-distortion", 0.5)
    assert caught.value.argument == "data"
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())


def test_rate_distortion_proxy_runs_only_when_asked_and_is_reported():
    from prunekit import budget as budgets

    model = small_cnn()
    report = prunekit.prune(model, "rate-distortion", 0.5, distortion_proxy=True)
    assert any("proxy" in note and "distortion_proxy=True" in note for note in report.notes)
    # Oracle: the proxy distortion of layer l losing k weights is the sum of the k smallest squared |w|, so the DP
    # allocation must equal budget.rate_distortion fed exactly that.
    weights = [m.weight.detach() for m in small_cnn().modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    energy = [torch.cumsum(torch.sort(w.abs().flatten().double() ** 2).values, 0) for w in weights]
    counts = budgets.rate_distortion([w.numel() for w in weights], 0.5,
                                     lambda layer, k: float(energy[layer][k - 1]) if k else 0.0)
    assert [layer.zeros for layer in report.layers] == counts
    # With data the output distortion is measured, so asking for the proxy as well is a contradiction.
    with pytest.raises(ArgumentError, match="^distortion_proxy=True"):
        prunekit.prune(small_cnn(), "rate-distortion", 0.5, data=cnn_batch(), distortion_proxy=True)
    with pytest.raises(ArgumentError, match="^distortion_proxy=True .*rate-distortion"):
        prunekit.prune(small_cnn(), "magnitude", 0.5, distortion_proxy=True)


# --- structured: bn-scale / FPGM substitute only when asked; untraceable blocks named -------------------------------


def test_bn_scale_on_a_group_without_batchnorm_is_refused_naming_the_group():
    from prunekit.graph.prune import prune_structured

    model = small_mlp()
    saved = state_copy(model)
    with pytest.raises(ArgumentError, match="^score='bn-scale' .*group .*no BatchNorm.*fallback='l2'"):
        prune_structured(model, torch.randn(2, 16), 0.5, score="bn-scale")
    assert same_state(model, saved)


def test_bn_scale_fallback_scores_by_the_asked_norm_and_lists_the_groups():
    from prunekit.graph.prune import prune_structured

    x = torch.randn(2, 16)
    fallback, reference = small_mlp(), small_mlp()
    result = prune_structured(fallback, x, 0.5, score="bn-scale", fallback="l2")
    prune_structured(reference, x, 0.5, score="l2")
    # Same weights kept as scoring by L2 directly, and every substituted group named in the notes.
    assert all(torch.equal(a, b) for a, b in zip(fallback.state_dict().values(), reference.state_dict().values()))
    assert len(result.notes) == len(result.decisions) and all("fallback='l2'" in n for n in result.notes)
    assert result.settings["fallback"] == "l2"


def test_fallback_for_a_score_that_needs_none_is_refused():
    from prunekit.graph.prune import prune_structured

    with pytest.raises(ArgumentError, match="^fallback='l2'"):
        prune_structured(small_mlp(), torch.randn(2, 16), 0.5, score="l2", fallback="l2")


def test_fpgm_without_a_producing_layer_is_refused_or_falls_back_when_asked():
    from prunekit.graph.groups import Group, Member
    from prunekit.graph.importance import get_score, norm_score

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    # a group seen only from its consumer (role "in"): FPGM has no filters to compare
    group = Group(name="g", kind="channel", size=4,
                  members=[Member("1", "weight", 1, torch.arange(4), torch.arange(4), role="in")])
    with pytest.raises(ArgumentError, match="^score='fpgm' .*group 'g'"):
        get_score("fpgm")(model, group, {})
    scores = get_score("fpgm")(model, group, {"fallback": "l1"})
    assert torch.equal(scores, norm_score(model, group, {}, p=1)) and "fallback='l1'" in group.notes[0]


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Linear(width, width)

    def forward(self, x):
        return x + self.body(x)


class _Untraceable(nn.Module):
    """Shape-preserving, with control flow on the data: torch.fx cannot say whether it is residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Linear(width, width)

    def forward(self, x):
        if x.sum() > -1e9:
            return x + self.body(x)
        return x


def _depth_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(_Residual(8), _Untraceable(8), _Residual(8), nn.Linear(8, 2))


def test_an_untraceable_candidate_block_is_an_error_naming_it():
    from prunekit.graph.depth import drop_residual_blocks
    from prunekit.graph.trace import TraceError

    model = _depth_model()
    saved = state_copy(model)
    with pytest.raises(TraceError, match="module '1' \\(_Untraceable\\).*skip_untraceable=True"):
        drop_residual_blocks(model, torch.randn(4, 8), 1)
    assert same_state(model, saved) and isinstance(model[1], _Untraceable)


def test_skip_untraceable_lists_what_it_skipped():
    from prunekit.graph.depth import drop_residual_blocks

    model = _depth_model()
    removed, influence, skipped = drop_residual_blocks(model, torch.randn(4, 8), 1, skip_untraceable=True)
    assert skipped == ["1"] and set(influence) == {"0", "2"} and len(removed) == 1 and removed[0] in ("0", "2")


# --- the CLI: flag names, before any model loads --------------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Every way the CLI loads weights fails the test if called (tokenizers and configs may load)."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("prunekit.zoo.load_causal_lm", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setitem(cli.MODELS, "digits-cnn", refuse)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("texts")
    paths = {"empty": folder / "empty.txt", "short": folder / "short.txt", "enough": folder / "enough.txt"}
    paths["empty"].write_text("")
    paths["short"].write_text("A few words of calibration text. " * 10)
    paths["enough"].write_text("The quick brown fox jumps over the lazy dog.\n" * 400)
    return paths


LM = ("prune", "smollm2-135m", "--no-eval", "-q")


def _cases(texts: dict[str, Path], tmp: Path) -> list[tuple[list[str], str, str]]:
    """(extra argv, the flag the error must name, a piece of the message)."""
    return [
        (["--method", "wanda", "--sparsity", "0.5", "--calib", tmp / "missing.txt"], "--calib",
         f"--calib='{tmp / 'missing.txt'}' is not valid: an existing UTF-8 text file"),
        (["--method", "wanda", "--sparsity", "0.5", "--calib", texts["empty"]], "--calib", "the file is empty"),
        (["--method", "wanda", "--sparsity", "0.5", "--calib", texts["short"], "--n-samples", "16", "--seq-len", "64"],
         "--calib", "at least 1024 tokens for 16 samples of 64 text tokens (seq_len=64)"),
        (["--method", "wanda", "--sparsity", "1.5"], "--sparsity", "--sparsity=1.5 is not valid: a number in [0, 1)"),
        (["--method", "wandaa", "--sparsity", "0.5"], "--method", "Did you mean 'wanda'?"),
        (["--method", "taylor", "--sparsity", "0.5"], "--method", "runs on a causal language model: magnitude"),
        (["--method", "wanda", "--sparsity", "0.5", "--pattern", "unstructred"], "--pattern",
         "Did you mean 'unstructured'?"),
        (["--method", "owl", "--sparsity", "0.5", "--budget", "uniform"], "--budget", "Method 'wanda' does that"),
        (["--method", "wanda", "--sparsity", "0.5", "--score", "magnitude"], "--score", "--score='magnitude'"),
        (["--method", "wanda", "--sparsity", "0.5", "--min-keep", "5"], "--min-keep", "--min-keep=5"),
        (["--method", "sparsegpt", "--sparsity", "0.5", "--apply", "mask"], "--apply", "'bake'"),
        (["--method", "wanda", "--sparsity", "0.5", "--blocksize", "64"], "--blocksize", "sparsegpt"),
        (["--method", "owl", "--sparsity", "0.5", "--dampening", "0.1"], "--dampening", "sparsegpt"),
        (["--method", "magnitude", "--sparsity", "0.5", "--owl-m", "3"], "--owl-m", "--owl-m=3.0"),
        (["--method", "magnitude", "--sparsity", "0.5", "--budget", "rate-distortion"], "--budget",
         "--budget='rate-distortion'"),
        (["--method", "magnitude", "--sparsity", "0.5", "--checkpoint-dir", tmp / "ck"], "--checkpoint-dir",
         "--checkpoint-dir="),
        (["--method", "wanda", "--sparsity", "0.5", "--seq-len", "100000"], "--seq-len", "--seq-len=100000"),
        (["--method", "wanda", "--sparsity", "0.5", "--calib-split", "test"], "--calib-split", "--calib-dataset"),
    ]


def test_language_model_errors_name_the_flag_and_come_before_the_model_loads(no_model_load, texts, tmp_path):
    out = tmp_path / "never"
    for extra, flag, message in _cases(texts, tmp_path):
        argv = [*LM, *extra, "--out", out]
        if "--n-samples" not in extra:
            argv += ["--n-samples", "2", *([] if "--seq-len" in extra else ["--seq-len", "16"])]
        code, stdout, err = run_cli(*argv)
        assert code == 2 and stdout == "", (extra, err)
        assert err.startswith(f"prunekit: error: {flag}="), (extra, err)
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not out.exists() and not (tmp_path / "ck").exists()


def test_enough_calibration_text_passes_the_checks_and_reaches_the_model_load(no_model_load, texts, tmp_path):
    # The same text is long enough for 2 x 16 tokens: every check passes and the (refused) model load is reached.
    # (The CLI reports the refusal as an unexpected error, exit 1; a model load in the tests above would do the same.)
    code, _, err = run_cli(*LM, "--method", "wanda", "--sparsity", "0.5", "--calib", texts["enough"], "--n-samples",
                           "2", "--seq-len", "16", "--out", tmp_path / "o")
    assert code == 1 and "a model was loaded before the arguments were checked" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model", ["smollm2-135m", "digits-cnn"])
def test_an_existing_out_without_overwrite_is_refused_and_never_touched(no_model_load, tmp_path, model):
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "prunekit.json").write_text("{}")  # an earlier prunekit save is protected too
    (out / "notes.txt").write_text("keep me")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    folder_mtime = out.stat().st_mtime_ns
    code, _, err = run_cli("prune", model, "--method", "magnitude", "--sparsity", "0.5", "--out", out, "-q")
    assert code == 2 and err.startswith(f"prunekit: error: --out='{out}'") and "--overwrite" in err
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    assert out.stat().st_mtime_ns == folder_mtime


@pytest.mark.parametrize("flag, value", [
    ("--n-samples", "3"), ("--seq-len", "8"), ("--calib", "x.txt"), ("--blocksize", "64"), ("--device", "cpu"),
    ("--eval-tokens", "10"), ("--out-of-core", None),
])
def test_language_model_flags_for_another_model_are_refused(no_model_load, tmp_path, flag, value):
    code, _, err = run_cli("prune", "digits-cnn", "--method", "magnitude", "--sparsity", "0.5", flag,
                           *([value] if value else []), "--out", tmp_path / "o")
    assert code == 2 and err.startswith(f"prunekit: error: {flag}=") and "language models" in err, err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_an_unexpected_failure_is_one_line_and_a_nonzero_exit(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.delenv("PRUNEKIT_TRACEBACK", raising=False)
    monkeypatch.setitem(cli.MODELS, "digits-cnn", broken)
    code, _, err = run_cli("prune", "digits-cnn", "--method", "magnitude", "--sparsity", "0.5", "--out", tmp_path / "o")
    assert code == 1 and err.strip() == ("prunekit: error: RuntimeError: disk on fire (set PRUNEKIT_TRACEBACK=1 to see "
                                         "the traceback)")


def test_shrink_flags_are_refused_by_name(tmp_path):
    code, _, err = run_cli("shrink", "resnet-small", "--method", "l2", "--fallback", "l2", "--no-latency", "-q")
    assert code == 2 and err.startswith("prunekit: error: --fallback='l2'"), err
    code, _, err = run_cli("shrink", "resnet-small", "--calib", tmp_path / "missing.txt", "--no-latency", "-q")
    assert code == 2 and err.startswith("prunekit: error: --calib=") and "no such file" in err, err
    text = tmp_path / "t.txt"
    text.write_text("some text")
    code, _, err = run_cli("shrink", "resnet-small", "--calib", text, "--no-latency", "-q")
    assert code == 2 and err.startswith("prunekit: error: --calib=") and "causal language models" in err, err
    code, _, err = run_cli("shrink", "resnet-small", "--skip-untraceable", "--no-latency", "-q")
    assert code == 2 and err.startswith("prunekit: error: --skip-untraceable=True"), err


# --- data keywords only where the score or budget reads them ---------------------------------------------------------


def _no_masks(model: nn.Module) -> bool:
    return not any(name.endswith("_mask") for name, _ in model.named_buffers())


@pytest.mark.parametrize("method, keyword, value, extra", [
    ("magnitude", "data", cnn_batch(), {}),
    ("global-magnitude", "loss_fn", nn.functional.cross_entropy, {}),
    ("random", "n_batches", 2, {}),
    ("lamp", "example_inputs", cnn_batch()[0][:1], {}),
    ("snip", "example_inputs", cnn_batch()[0][:1], {"data": cnn_batch()}),  # a gradient score reads no example
    ("synflow", "data", cnn_batch(), {"example_inputs": cnn_batch()[0][:1]}),  # SynFlow reads the shape only
    # rate-distortion with a data-free score measures on example_inputs when given: data would go unread
    ("rate-distortion", "data", cnn_batch(), {"example_inputs": cnn_batch()[0][:1]}),
])
def test_a_data_keyword_the_method_does_not_read_is_refused(method, keyword, value, extra):
    model = small_cnn()
    saved = state_copy(model)
    with pytest.raises(ArgumentError) as caught:
        prunekit.prune(model, method, 0.5, **{keyword: value}, **extra)
    shown = value if keyword == "n_batches" else type(value).__name__
    assert caught.value.argument == keyword and str(caught.value).startswith(f"{keyword}={shown!r} is not valid")
    assert "do not read it" in str(caught.value)
    assert same_state(model, saved) and _no_masks(model)


def test_the_data_keywords_a_method_reads_are_accepted():
    x, y = cnn_batch()
    assert prunekit.prune(small_cnn(), "synflow", 0.5, example_inputs=x[:1]).sparsity == pytest.approx(0.5, abs=1e-3)
    assert prunekit.prune(small_cnn(), "taylor", 0.5, data=[(x, y), (x, y)], n_batches=2,
                          loss_fn=nn.functional.cross_entropy).sparsity == pytest.approx(0.5, abs=1e-3)
    assert prunekit.prune(small_cnn(), "magnitude", 0.5, budget="rate-distortion", data=(x, y)).sparsity == \
        pytest.approx(0.5, abs=1e-3)


def test_callers_pass_each_method_only_the_data_it_reads():
    from prunekit.api import inputs_for

    preset = {"data": ["b1", "b2", "b3"], "n_batches": 3, "example_inputs": "x", "types": ["conv"]}
    assert inputs_for(preset, "magnitude") == {"types": ["conv"]}
    assert inputs_for(preset, "taylor") == {"data": ["b1", "b2", "b3"], "n_batches": 3, "types": ["conv"]}
    assert inputs_for(preset, "snip")["n_batches"] == 1  # SNIP is defined on one minibatch
    assert inputs_for(preset, "synflow") == {"example_inputs": "x", "types": ["conv"]}
    assert inputs_for(preset, "magnitude", budget="rate-distortion") == {"example_inputs": "x", "types": ["conv"]}
    assert inputs_for(preset, "magnitude", score="grasp")["data"] == ["b1", "b2", "b3"]
    assert inputs_for(preset, "wanda") == {"data": ["b1", "b2", "b3"], "types": ["conv"]}


def test_prune_at_init_refuses_data_its_method_does_not_read_when_built():
    from prunekit.training import PruneAtInit

    x, y = cnn_batch()
    with pytest.raises(ArgumentError, match="^data='tuple' .*'magnitude'"):
        PruneAtInit(small_cnn(), "magnitude", 0.5, data=(x, y))
    # SynFlow takes its input shape from data when no example is given: that data is read, so it is accepted
    callback = PruneAtInit(small_cnn(), "synflow", 0.5, data=(x, y))
    assert callback.apply().sparsity == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("densities, keyword", [("erk", "data"), ("synflow", "data"), ("erk", "example_inputs"),
                                                ("snip", "example_inputs")])
def test_layer_densities_refuse_inputs_their_source_does_not_read(densities, keyword):
    from prunekit.training import layer_densities

    value = cnn_batch() if keyword == "data" else cnn_batch()[0][:1]
    given = {"example_inputs": cnn_batch()[0][:1]} if densities == "synflow" else {}
    if densities == "snip":
        given = {"data": cnn_batch()}
    with pytest.raises(ArgumentError, match=f"^{keyword}=.*densities '{densities}', which does not read it"):
        layer_densities(small_cnn(), 0.5, densities, **{**given, keyword: value})


@pytest.mark.parametrize("keyword, value", [("data", cnn_batch()), ("loss_fn", nn.functional.cross_entropy),
                                            ("n_batches", 2)])
def test_structured_scores_without_gradients_refuse_data_keywords(keyword, value):
    from prunekit.graph.prune import prune_structured

    model = small_cnn()
    saved = state_copy(model)
    with pytest.raises(ArgumentError, match=f"^{keyword}=.*score 'l2', which reads no gradients") as caught:
        prune_structured(model, cnn_batch()[0][:1], 0.5, score="l2", **{keyword: value})
    assert caught.value.argument == keyword
    assert same_state(model, saved) and model[0].out_channels == 16


# --- the Python API never touches an existing folder without overwrite=True -----------------------------------------


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}


def test_save_refuses_an_earlier_save_unless_overwrite(tmp_path):
    from prunekit import io

    model = small_cnn()
    out = io.save(model, tmp_path / "earlier", prunekit.prune(model, "magnitude", 0.5))
    before = _snapshot(out)
    other = small_cnn(seed=1)
    with pytest.raises(ArgumentError, match="overwrite=True") as caught:
        io.save(other, out)
    assert caught.value.argument == "path" and caught.value.value == str(out)
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["earlier"]
    io.save(other, out, overwrite=True)
    assert _snapshot(out) != before
    with pytest.raises(ArgumentError, match="^overwrite='yes'"):
        io.save(other, out, overwrite="yes")


@pytest.mark.parametrize("content", ["prunekit.json", "notes.txt"])
def test_export_destination_check_refuses_any_non_empty_folder(tmp_path, content):
    from prunekit.export import check_destination

    out = tmp_path / "o"
    out.mkdir()
    check_destination(out, False)  # empty: fine
    (out / content).write_text("{}")
    with pytest.raises(ArgumentError, match="overwrite=True") as caught:
        check_destination(out, False)
    assert caught.value.argument == "out"
    check_destination(out, True)
    assert (out / content).read_text() == "{}"  # checking never touches it


# --- shrink and per-block sparsities: checked before the weights load -----------------------------------------------


def test_shrink_checks_the_calibration_token_count_before_the_model_loads(no_model_load, texts):
    code, stdout, err = run_cli("shrink", "smollm2-135m", "--method", "flap", "--calib", texts["short"],
                                "--n-samples", "16", "--seq-len", "64", "--no-latency", "-q")
    assert code == 2 and stdout == "" and err.startswith(f"prunekit: error: --calib='{texts['short']}'"), err
    assert "at least 1024 tokens for 16 samples of 64 text tokens" in err and "Traceback" not in err


def test_a_per_block_sparsity_list_of_the_wrong_length_fails_before_the_model_loads(no_model_load, tmp_path):
    code, _, err = run_cli(*LM, "--method", "wanda", "--sparsity", "0.5,0.4", "--n-samples", "2", "--seq-len", "16",
                           "--out", tmp_path / "o")
    assert code == 2 and err.startswith("prunekit: error: --sparsity='0.5,0.4' is not valid"), err
    assert "one sparsity per decoder block (30" in err and "2 entries" in err  # SmolLM2-135M has 30 blocks
    assert not (tmp_path / "o").exists()


def test_a_per_block_sparsity_list_of_the_right_length_reaches_the_model_load(no_model_load, tmp_path):
    code, _, err = run_cli(*LM, "--method", "wanda", "--sparsity", ",".join(["0.5"] * 30), "--n-samples", "2",
                           "--seq-len", "16", "--out", tmp_path / "o")
    assert code == 1 and "a model was loaded before the arguments were checked" in err, err


# --- LayerDropAtInit: untraceable candidates skipped only when asked, and listed --------------------------------------


def test_layer_drop_refuses_an_untraceable_candidate_or_skips_and_lists_it_when_asked():
    from prunekit.graph.trace import TraceError
    from prunekit.training import LayerDropAtInit

    x = torch.randn(4, 8)
    with pytest.raises(TraceError, match="module '1' \\(_Untraceable\\).*skip_untraceable=True"):
        LayerDropAtInit(_depth_model(), 1, "synflow", example_inputs=x)
    model = _depth_model()
    drop = LayerDropAtInit(model, 1, "synflow", example_inputs=x, skip_untraceable=True)
    assert drop.skipped == ["1"] and drop.candidates == ["0", "2"]
    removed = drop.apply()
    assert len(removed) == 1 and removed[0] in ("0", "2") and isinstance(model.get_submodule(removed[0]), nn.Identity)
    assert isinstance(model[1], _Untraceable) and model(x).shape == (4, 2)
    with pytest.raises(ArgumentError, match="^skip_untraceable=True .*blocks given"):
        LayerDropAtInit(_depth_model(), 1, "synflow", example_inputs=x, blocks=["0", "2"], skip_untraceable=True)
    with pytest.raises(ArgumentError, match="^skip_untraceable='yes'"):
        LayerDropAtInit(_depth_model(), 1, "synflow", example_inputs=x, skip_untraceable="yes")
