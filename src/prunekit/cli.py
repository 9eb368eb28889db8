"""The `prunekit` command: list methods, run the demo, prune a model to a folder, and read a saved folder's report.

Every PruneError ends the command with `prunekit: error: <message>` on stderr and exit code 2 (argparse's own code
for bad usage), never a traceback. Progress goes to stderr, results to stdout, so `--json` output can be piped.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from .errors import ArgumentError, PruneError, check_sparsity, unknown_choice

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEMO_SPARSITY = 0.8


# ---------------------------------------------------------------------------------------------------------------
# Models the CLI can prune


@dataclass
class LoadedModel:
    """A model ready to prune, with what its methods may need and how to measure it."""

    name: str
    model: nn.Module
    prune_options: dict[str, Any] = field(default_factory=dict)  # data, n_batches, example_inputs, types, ...
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None  # metric name -> value
    extra: dict[str, Any] = field(default_factory=dict)  # stored in the saved report (how to rebuild the model)


def _load_digits_cnn(seed: int, log: Callable[[str], None], progress: bool) -> LoadedModel:
    """The embedded example: DigitsCNN trained on the spot on scikit-learn's digits (a few seconds)."""
    from . import examples

    data = examples.load_digits_data()
    log(f"training digits-cnn on {len(data.y_train)} digits ({examples.DENSE_EPOCHS} epochs, seed {seed})")
    model = examples.train_dense(data, seed=seed, progress=progress)
    return LoadedModel(
        name="digits-cnn", model=model, prune_options=examples.prune_options(data, seed),
        evaluate=lambda m: {"accuracy": examples.accuracy(m, data.x_test, data.y_test)},
        extra={"model": "digits-cnn", "model_class": "prunekit.examples.DigitsCNN"},
    )


# Name -> loader(seed, log, progress). Causal LMs (embedded names and model folders) are added in _load_model.
MODELS: dict[str, Callable[[int, Callable[[str], None], bool], LoadedModel]] = {"digits-cnn": _load_digits_cnn}


def is_language_model(name: str) -> bool:
    """Whether MODEL names a causal LM: an embedded LLM, a transformers folder, or a hub id (org/name)."""
    from .zoo import EMBEDDED_MODELS

    if name in MODELS:
        return False
    path = Path(os.path.expanduser(name))
    return name.lower() in EMBEDDED_MODELS or (path / "config.json").is_file() or (
        not path.exists() and name.count("/") == 1 and not name.startswith((".", "/", "~")))


def _load_model(name: str, seed: int = 0, log: Callable[[str], None] = print, progress: bool = False) -> LoadedModel:
    """The one place that turns a MODEL argument into a model: add new kinds of model (names, folders) here."""
    if name in MODELS:
        return MODELS[name](seed, log, progress)
    raise unknown_choice("MODEL", name, MODELS)


def _known_model(name: str) -> None:
    """Fail on a MODEL argument _load_model cannot handle, before any slow work."""
    from .zoo import EMBEDDED_MODELS

    if name not in MODELS and not is_language_model(name):
        raise unknown_choice("MODEL", name, [*MODELS, *EMBEDDED_MODELS])


# ---------------------------------------------------------------------------------------------------------------
# Commands


def cmd_methods(args: argparse.Namespace) -> int:
    """List the registered methods as text, JSON or a Markdown table."""
    if args.structured:
        from .shrink import STRUCTURED_METHODS, structured_markdown

        if args.json:
            print(json.dumps([{"name": n, "summary": w, "paper": p} for n, w, p in STRUCTURED_METHODS], indent=2))
        elif args.markdown:
            print(structured_markdown())
        else:
            width = max(len(n) for n, _, _ in STRUCTURED_METHODS) + 2
            print("\n".join(f"{n.ljust(width)}{w}\n{' ' * width}{p}" for n, w, p in STRUCTURED_METHODS))
        return EXIT_OK
    rows = method_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.markdown:
        print(methods_markdown(rows))
    else:
        print(methods_text(rows))
    return EXIT_OK


def method_rows() -> list[dict[str, Any]]:
    """One dictionary per registered method, in registration order."""
    from .methods import METHODS
    from .scores import DATA_FREE

    rows = []
    for method in METHODS.values():
        custom = method.runner is not None
        rows.append({
            "name": method.name, "summary": method.summary, "paper": method.paper,
            "score": method.score, "budget": method.budget, "rounds": method.rounds, "runner": custom,
            # A method with its own runner checks its own data needs (prunekit's score registry does not know them).
            # rate-distortion measures output distortion on data (its data-free proxy only when asked for)
            "needs_data": None if custom else (method.score not in DATA_FREE or method.budget == "rate-distortion"),
        })
    return rows


def methods_text(rows: list[dict[str, Any]]) -> str:
    """A terminal listing: name and summary, then the recipe and the paper indented below."""
    width = max(len(r["name"]) for r in rows) + 2
    out = []
    for r in rows:
        out.append(r["name"].ljust(width) + r["summary"])
        out.append(" " * width + _recipe(r))
        out.append(" " * width + r["paper"])
    return "\n".join(out)


def _recipe(row: dict[str, Any]) -> str:
    """'score=..., budget=..., data' in words."""
    if row["runner"]:
        return f"score={row['score']}, budget={row['budget']}, its own runner"
    rounds = f", {row['rounds']} rounds" if row["rounds"] > 1 else ""
    data = "needs data" if row["needs_data"] else "data-free"
    return f"score={row['score']}, budget={row['budget']}{rounds}, {data}"


def methods_markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the methods (pasted into README.md)."""
    out = ["| method | what it removes | score / budget | paper |", "|---|---|---|---|"]
    for r in rows:
        cells = [f"`{r['name']}`", r["summary"], _recipe(r), r["paper"]]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


def cmd_demo(args: argparse.Namespace) -> int:
    """Train, prune, fine-tune and measure the digits CNN."""
    from .examples import run_digits_demo
    from .methods import get_method
    from .patterns import NM, parse_pattern

    get_method(args.method)  # a typo fails before the model is trained
    pattern = parse_pattern(args.pattern)
    sparsity = args.sparsity
    if sparsity is None and not isinstance(pattern, NM):  # an N:M pattern fixes the sparsity itself
        sparsity = DEMO_SPARSITY
    log = _stderr_log(args.quiet)
    result = run_digits_demo(args.method, sparsity, args.finetune_epochs, seed=args.seed, pattern=pattern,
                             progress=not args.quiet, log=log)
    report = result["report"]
    if args.json:
        summary = {k: v for k, v in result.items() if k not in ("model", "report")}
        print(json.dumps({**summary, "report": report.to_dict()}, indent=2, default=str))
        return EXIT_OK
    print(report.table())
    print()
    print(f"digits-cnn, {report.method} at {100 * report.sparsity:.1f}% sparsity, "
          "accuracy on the held-out 25% of the digits:")
    print(f"  dense accuracy      {100 * result['dense_accuracy']:6.2f}%")
    print(f"  pruned accuracy     {100 * result['pruned_accuracy']:6.2f}%   (one shot, no retraining)")
    if result["finetuned_accuracy"] is not None:
        print(f"  fine-tuned accuracy {100 * result['finetuned_accuracy']:6.2f}%   "
              f"({result['finetune_epochs']} epochs with the masks enforced)")
    seconds = result["seconds"]
    print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune MODEL with a method and save it with its masks and report to --out."""
    from . import io
    from .api import prune

    _validate_prune_args(args)
    out = Path(args.out)
    _check_out(out, args.overwrite)
    if is_language_model(args.model):
        return _prune_language_model(args)
    _refuse_language_flags(args)
    if isinstance(args.sparsity, list):
        raise ArgumentError("--sparsity", ",".join(map(str, args.sparsity)), "one number for this model "
                            "(lists of per-block sparsities are for language models)")
    log = _stderr_log(args.quiet)
    loaded = _load_model(args.model, seed=args.seed, log=log, progress=not args.quiet)
    before = _evaluate(loaded, "dense", log) if not args.no_eval else None

    log(f"pruning {loaded.name} with {args.method}")
    options = {**_preset_for(loaded.prune_options, args), **_prune_kwargs(args)}
    report = prune(loaded.model, args.method, args.sparsity, **options)
    report.extra.update(loaded.extra)
    if before is not None:
        report.extra["metrics"] = {"dense": before, "pruned": _evaluate(loaded, "pruned", log)}

    folder = io.save(loaded.model, out, report, overwrite=args.overwrite)
    log(f"saved to {folder}")
    # Print what was saved (counts re-read from the folder), so `prunekit report DIR` shows exactly the same.
    _print_report(io.report_from_manifest(io.read_manifest(folder)), args.json, folder)
    return EXIT_OK


LLM_OPTIONS = ("blocksize", "dampening", "owl_m", "owl_lambda", "calibration")
# Flags only the language-model job reads (their defaults are None so that "given" can be told from "default"),
# and the value each means when left out.
LLM_FLAGS = {"calib": None, "calib_dataset": None, "calib_config": None, "calib_split": None, "calib_column": None,
             "ppl": None, "n_samples": 128, "seq_len": 256, "eval_tokens": 8192, "checkpoint_dir": None,
             "device": "auto", "out_of_core": None, **{name: None for name in LLM_OPTIONS}}


def _refuse_language_flags(args: argparse.Namespace) -> None:
    """Fail on a language-model flag given for a model that is not one (it would be ignored)."""
    for name in LLM_FLAGS:
        value = getattr(args, name)
        if value is not None and value is not False:
            raise ArgumentError(_flag(name), value, f"not given for MODEL {args.model!r}: it is for language models "
                                "(a transformers folder, a hub id or smollm2-135m)")


def _prune_language_model(args: argparse.Namespace) -> int:
    """Calibrate, prune, measure perplexity and save a transformers folder that loads without prunekit."""
    from .pipeline import prune_language_model

    log = _stderr_log(args.quiet)
    if args.apply == "mask":
        raise ArgumentError("--apply", args.apply, "'bake' (or left out) for a language model: the saved "
                            "transformers folder holds the zeros themselves, with no masks")
    options = {name: getattr(args, name) for name in LLM_OPTIONS if getattr(args, name) is not None}
    # score/budget/min_keep go to the job, which refuses them by flag for the methods that would not use them.
    for name in ("include", "ignore", "score", "budget", "min_keep"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    given = {name: default if getattr(args, name) is None else getattr(args, name)
             for name, default in LLM_FLAGS.items()}
    summary = prune_language_model(
        args.model, args.method, args.sparsity, pattern=args.pattern, calib=_calibration_source(args), ppl=args.ppl,
        n_samples=given["n_samples"], seq_len=given["seq_len"], seed=args.seed, out=args.out,
        overwrite=args.overwrite, eval_tokens=given["eval_tokens"], checkpoint_dir=args.checkpoint_dir,
        evaluate=not args.no_eval, out_of_core=bool(args.out_of_core), device=given["device"],
        progress=not args.quiet, log=log, **options,
    )
    report = summary.pop("report")
    from .distributed import is_writer

    if not is_writer():  # under torchrun, rank 0 reports and writes
        return EXIT_OK
    if args.json:
        print(json.dumps({**summary, "report": report.to_dict()}, indent=2, default=str))
        return EXIT_OK
    print(report.table())
    print()
    print(f"{summary['model']}, {summary['method']} ({summary['pattern']}) at {100 * report.sparsity:.2f}% of the "
          f"decoder's linear weights; saved to {summary['out']}")
    if summary["dense_perplexity"] is not None:
        print(f"  perplexity: dense {summary['dense_perplexity']:.3f} -> pruned {summary['pruned_perplexity']:.3f}")
    print(f"  seconds: load {summary['load_seconds']:.1f}, prune {summary['prune_seconds']:.1f}; "
          f"peak memory {summary['peak_rss_mib']:.0f} MiB")
    return EXIT_OK


def cmd_shrink(args: argparse.Namespace) -> int:
    """Structured pruning with physical removal; params, MACs, latency (and perplexity) before and after."""
    from .shrink import shrink, summary_json, summary_text

    summary = shrink(
        args.model, args.method, args.ratio, budget=args.budget, target=args.target, round_to=args.round_to,
        heads=None if args.heads == "none" else args.heads, drop_blocks=args.drop_blocks,
        input_shape=args.input_shape, calib=_calibration_source(args), n_samples=args.n_samples, seq_len=args.seq_len,
        eval_tokens=args.eval_tokens, measure_latency=not args.no_latency, out=args.out, overwrite=args.overwrite,
        seed=args.seed, fallback=args.fallback, skip_untraceable=args.skip_untraceable, progress=not args.quiet,
        log=_stderr_log(args.quiet),
    )
    if args.json:
        print(json.dumps(summary_json(summary), indent=2, default=str))
    else:
        print(summary_text(summary))
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity of a saved causal LM folder (loaded with plain transformers) on held-out text."""
    from .calibration import load_text
    from .evaluate import perplexity
    from .pipeline import split_held_out
    from .zoo import load_causal_lm

    text = load_text(args.ppl, argument="--ppl") if args.ppl is not None else split_held_out(load_text(None))[1]
    model, tokenizer = load_causal_lm(args.dir)
    value = perplexity(model, tokenizer, text, window=args.window, max_tokens=args.eval_tokens,
                       progress=not args.quiet)
    if args.json:
        print(json.dumps({"model": args.dir, "perplexity": value, "window": args.window,
                          "max_tokens": args.eval_tokens}))
    else:
        print(f"{args.dir}: perplexity {value:.4f} (windows of {args.window}, first {args.eval_tokens} tokens)")
    return EXIT_OK


def _validate_prune_args(args: argparse.Namespace) -> None:
    """Cheap checks first, so a typo fails at once rather than after loading or training a model."""
    from .methods import get_method
    from .patterns import parse_pattern

    _known_model(args.model)
    get_method(args.method)
    parse_pattern(args.pattern)
    if isinstance(args.sparsity, list):
        for i, value in enumerate(args.sparsity):
            check_sparsity(value, f"--sparsity[{i}]")
    elif args.sparsity is not None:
        check_sparsity(args.sparsity)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse, before any work is done, an --out that exists with files in it (an earlier save included) unless
    --overwrite is given: the rule every save applies (export.check_destination), named by the flag."""
    from .export import check_destination

    check_destination(out, overwrite, argument="--out")


def _preset_for(preset: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A model's preset prune options cut to the data the method, --score and --budget read (prune() refuses the
    rest), with n_batches 1 for a score defined on one minibatch (SNIP)."""
    from .api import inputs_for

    return inputs_for(preset, args.method, args.score, args.budget)


def _prune_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """prune() keyword arguments from the command line (only those given, so method defaults apply)."""
    kwargs: dict[str, Any] = {"pattern": args.pattern, "seed": args.seed, "apply": args.apply or "mask",
                              "min_keep": 0 if args.min_keep is None else args.min_keep}
    for name in ("score", "budget", "include", "ignore"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def _evaluate(loaded: LoadedModel, stage: str, log: Callable[[str], None]) -> dict[str, float] | None:
    """The model's metrics, logged; None when the model has no evaluation."""
    if loaded.evaluate is None:
        return None
    metrics = loaded.evaluate(loaded.model)
    log(f"{stage}: " + ", ".join(_metric(k, v) for k, v in metrics.items()))
    return metrics


def _metric(name: str, value: float) -> str:
    """'accuracy 99.33%' or 'perplexity 24.72'."""
    return f"{name} {_value(name, value)}"


def _value(name: str, value: float | None) -> str:
    """A metric value in its usual unit: accuracy in percent, anything else to four digits."""
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}%" if name == "accuracy" else f"{value:.4g}"


def cmd_report(args: argparse.Namespace) -> int:
    """Print the sparsity report stored in a saved folder."""
    from . import io

    folder = Path(args.dir)
    if not folder.exists():
        raise ArgumentError("DIR", str(folder), "a folder written by `prunekit prune` or prunekit.io.save",
                            "No such folder.")
    _print_report(io.report_from_manifest(io.read_manifest(folder)), args.json, folder)
    return EXIT_OK


def _print_report(report: Any, as_json: bool, folder: Path) -> None:
    """The report as JSON, or a heading, the table and the stored metrics."""
    if as_json:
        print(report.to_json())
        return
    model = report.extra.get("model", "model")
    print(f"{folder}: {model}, {report.method or 'no method'}, "
          f"{100 * report.sparsity:.2f}% of {report.total:,} weights pruned")
    arguments = {k: v for k, v in report.arguments.items() if v not in (None, [], 0) or k == "sparsity"}
    print("arguments: " + ", ".join(f"{k}={v}" for k, v in arguments.items()))
    print()
    print(report.table())
    metrics = report.extra.get("metrics") or {}
    if metrics.get("dense") and metrics.get("pruned"):
        print()
        for name, dense in metrics["dense"].items():
            print(f"{name}: dense {_value(name, dense)} -> pruned {_value(name, metrics['pruned'].get(name))}")


# ---------------------------------------------------------------------------------------------------------------
# Parsing


def _sparsity(text: str) -> float | list[float]:
    """argparse type for a sparsity, or a comma-separated list (one per decoder block); ranges are checked later."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be a number in [0, 1) or a comma-separated list of them, "
                                         f"got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _min_keep(text: str) -> float | int:
    """A weight count ('100') or a share of each layer ('0.05')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"min-keep must be a count or a share in [0, 1), got {text!r}") from None
    # prune() reads an int as a weight count and a float below 1 as a share of each layer.
    return int(value) if value >= 1 and math.isfinite(value) and value == int(value) else value


# Subcommands that live in modules of their own: each module has `register(subparsers)`, which adds its parser and
# sets `run=` to a function taking the parsed arguments. One line here per module keeps this file from growing.
COMMAND_MODULES: tuple[str, ...] = ("merge", "bench_cli", "data_cli", "moe_cli")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="prunekit", description="Prune neural networks the way the research literature does.",
        epilog="Errors in arguments exit with code 2 and a message naming the argument.",
    )
    parser.add_argument("--version", action="version", version=f"prunekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    methods = sub.add_parser("methods", help="list the registered pruning methods and their papers")
    style = methods.add_mutually_exclusive_group()
    style.add_argument("--json", action="store_true", help="print JSON")
    style.add_argument("--markdown", action="store_true", help="print a Markdown table")
    methods.add_argument("--structured", action="store_true", help="list the structured methods of `prunekit shrink`")
    methods.set_defaults(run=cmd_methods)

    demo = sub.add_parser("demo", help="train a small CNN on the bundled digits, prune it, fine-tune it, compare")
    demo.add_argument("--method", default="global-magnitude", help="a method from `prunekit methods`")
    demo.add_argument("--sparsity", type=_sparsity,
                      help=f"share of weights to remove (default {DEMO_SPARSITY}; an N:M pattern implies its own)")
    demo.add_argument("--pattern", default="unstructured", help="unstructured, N:M (e.g. 2:4) or RxC blocks (4x1)")
    demo.add_argument("--finetune-epochs", type=int, default=3, help="epochs of fine-tuning after pruning (0: none)")
    demo.add_argument("--seed", type=int, default=0)
    _output_flags(demo)
    demo.set_defaults(run=cmd_demo)

    prune = sub.add_parser("prune", help="prune a model and save it (safetensors + JSON manifest) to --out")
    prune.add_argument("model", metavar="MODEL", help="a model name (" + ", ".join(MODELS) +
                       ", smollm2-135m), a transformers causal-LM folder, or a hub id")
    prune.add_argument("--method", required=True, help="a method from `prunekit methods`")
    prune.add_argument("--sparsity", type=_sparsity, help="share of the selected weights to remove, in [0, 1)")
    prune.add_argument("--pattern", default="unstructured", help="unstructured, N:M (e.g. 2:4) or RxC blocks (4x1)")
    prune.add_argument("--score", help="override the method's score")
    prune.add_argument("--budget", help="override the method's budget: uniform, global, erk, lamp, rate-distortion")
    prune.add_argument("--min-keep", type=_min_keep,
                       help="per-layer floor for global budgets: a weight count, or a share of each layer if < 1")
    prune.add_argument("--include", nargs="+", action="extend", metavar="PATTERN",
                       help="only these layers (glob on module names, or 're:REGEX')")
    prune.add_argument("--ignore", nargs="+", action="extend", metavar="PATTERN", help="leave these layers dense")
    prune.add_argument("--apply", choices=("mask", "bake"),
                       help="save masks with the weights (default) or only the zeros")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--out", required=True, metavar="DIR", help="folder to write (atomically)")
    prune.add_argument("--overwrite", action="store_true", help="replace --out even if it holds other files")
    prune.add_argument("--no-eval", action="store_true", help="skip measuring the model before and after")
    llm = prune.add_argument_group("language models (wanda, sparsegpt, owl, owl-sparsegpt, magnitude)")
    llm.add_argument("--calib", metavar="FILE", help="calibration text (UTF-8); default: an embedded English text")
    _dataset_flags(llm)
    llm.add_argument("--ppl", metavar="FILE", help="held-out text for perplexity; default: the last tenth of --calib")
    llm.add_argument("--n-samples", type=int, help="calibration samples (default 128)")
    llm.add_argument("--seq-len", type=int, help="tokens per calibration sample (default 256)")
    llm.add_argument("--eval-tokens", type=int, help="tokens of held-out text to evaluate (8192)")
    llm.add_argument("--checkpoint-dir", metavar="DIR", help="save progress after each block; rerun to resume")
    llm.add_argument("--device", help="auto (this rank's GPU when CUDA is available, else the "
                     "CPU), cpu, cuda or cuda:N")
    llm.add_argument("--out-of-core", action="store_true", default=None, help="never hold the whole model: read, prune and write "
                     "one block at a time from its safetensors (same result; resumes when rerun)")
    llm.add_argument("--blocksize", type=int, help="SparseGPT column block size (default 128)")
    llm.add_argument("--dampening", type=float, help="SparseGPT dampening, share of the mean diagonal (0.01)")
    llm.add_argument("--owl-m", type=float, help="OWL outlier threshold M (default 5)")
    llm.add_argument("--owl-lambda", type=float, help="OWL spread lambda (default 0.08)")
    llm.add_argument("--calibration", help="sequential (default: each block calibrated on the pruned outputs of the "
                     "ones before) or one-pass (every layer's statistics from one dense forward pass: faster, less exact)")
    _output_flags(prune)
    prune.set_defaults(run=cmd_prune)

    evaluate = sub.add_parser("eval", help="perplexity of a saved causal-LM folder on held-out text")
    evaluate.add_argument("dir", metavar="DIR", help="a transformers folder (e.g. written by `prunekit prune`)")
    evaluate.add_argument("--ppl", metavar="FILE", help="held-out text; default: the embedded text's last tenth")
    evaluate.add_argument("--eval-tokens", type=int, default=8192, help="tokens to evaluate (default 8192)")
    evaluate.add_argument("--window", type=int, default=512, help="non-overlapping window length (default 512)")
    _output_flags(evaluate)
    evaluate.set_defaults(run=cmd_eval)

    shrink = sub.add_parser("shrink", help="structured pruning: remove channels, heads, neurons or blocks for real")
    shrink.add_argument("model", metavar="MODEL", help="a prunekit.nets architecture (resnet-small, resnet50-style, "
                        "densenet-small, mobilenet-v2-small, mobilenet-v3-small, vit-tiny, vit-b-style), smollm2-135m, "
                        "minilm, or a transformers folder")
    shrink.add_argument("--method", default="l2", help="group score l1, l2, bn-scale, random, fpgm; or flap, cfsp "
                        "(calibration-based, causal LMs)")
    shrink.add_argument("--fallback", choices=("l1", "l2"), help="with --method bn-scale or fpgm: score the groups "
                        "they cannot (no BatchNorm, no producing layer) by this group norm instead of refusing; "
                        "each is listed in the notes")
    shrink.add_argument("--ratio", type=_sparsity, default=0.5, help="share of units to remove (default 0.5)")
    shrink.add_argument("--budget", default="uniform", help="uniform, global, macs or latency (default uniform)")
    shrink.add_argument("--target", type=float, help="for --budget macs/latency: share of the dense cost to keep")
    shrink.add_argument("--round-to", type=int, default=1, help="keep widths a multiple of this (e.g. 8)")
    shrink.add_argument("--heads", default="query", help="transformers GQA heads: query (slots within KV groups), "
                        "kv-group (whole groups) or none")
    shrink.add_argument("--drop-blocks", type=int, default=0, help="causal LMs: also remove this many decoder blocks "
                        "with the lowest block influence (ShortGPT)")
    shrink.add_argument("--skip-untraceable", action="store_true", help="with --drop-blocks on a prunekit.nets "
                        "model: leave modules torch.fx cannot trace out of the candidates (listed in the notes) "
                        "instead of refusing")
    shrink.add_argument("--input-shape", help="example input for prunekit.nets models, e.g. 1,3,224,224")
    shrink.add_argument("--calib", metavar="FILE", help="calibration text (default: the embedded English text)")
    _dataset_flags(shrink)
    shrink.add_argument("--n-samples", type=int, default=32, help="calibration samples (default 32)")
    shrink.add_argument("--seq-len", type=int, default=128, help="tokens per sample / example length (default 128)")
    shrink.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for perplexity (4096)")
    shrink.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    shrink.add_argument("--seed", type=int, default=0)
    shrink.add_argument("--out", metavar="DIR", help="folder to write (atomically)")
    shrink.add_argument("--overwrite", action="store_true", help="replace --out even if it holds other files")
    _output_flags(shrink)
    shrink.set_defaults(run=cmd_shrink)

    report = sub.add_parser("report", help="print the sparsity report stored in a saved folder")
    report.add_argument("dir", metavar="DIR", help="a folder written by `prunekit prune`")
    report.add_argument("--json", action="store_true", help="print JSON")
    report.set_defaults(run=cmd_report)

    for module_name in COMMAND_MODULES:
        importlib.import_module(f"prunekit.{module_name}").register(sub)
    return parser


def _dataset_flags(parser: Any) -> None:
    parser.add_argument("--calib-dataset", metavar="NAME", help="calibration text from a `datasets` dataset instead "
                        "of --calib: a hub name or a folder written by save_to_disk (needs `pip install datasets`)")
    parser.add_argument("--calib-config", metavar="CONFIG", help="the dataset's configuration (e.g. wikitext-2-raw-v1)")
    parser.add_argument("--calib-split", metavar="SPLIT", help="the split to read (default train)")
    parser.add_argument("--calib-column", metavar="COLUMN", help="the text column (default text)")


def _calibration_source(args: argparse.Namespace) -> Any:
    """--calib FILE, or a DatasetText from --calib-dataset and its options (not both)."""
    from .calibration import DatasetText

    if args.calib_dataset is None:
        for name in ("calib_config", "calib_split", "calib_column"):
            if getattr(args, name) is not None:
                raise ArgumentError(_flag(name), getattr(args, name), "given only with --calib-dataset (it names "
                                    "the dataset's configuration, split or column)")
        return args.calib
    if args.calib is not None:
        raise ArgumentError("--calib-dataset", args.calib_dataset, "either --calib FILE or --calib-dataset, not both")
    return DatasetText(args.calib_dataset, args.calib_config, args.calib_split or "train", args.calib_column or "text")


def _flag(name: str) -> str:
    """The command-line flag of a Python keyword: n_samples -> --n-samples."""
    return "--" + name.replace("_", "-")


def _output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON on stdout")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def _stderr_log(quiet: bool) -> Callable[[str], None]:
    """A logger for progress lines on stderr (stdout stays clean for results)."""
    if quiet:
        return lambda message: None
    return lambda message: print(f"prunekit: {message}", file=sys.stderr, flush=True)


# Commands whose errors from the Python layer (keywords such as seq_len) are renamed to the flag the user typed.
FLAG_ERROR_COMMANDS = ("prune", "shrink", "demo", "eval")


def _as_flag_error(parser: argparse.ArgumentParser, command: str, error: PruneError) -> PruneError:
    """The error with a Python keyword that is one of the command's own options renamed to its flag (or MODEL)."""
    if command not in FLAG_ERROR_COMMANDS or not isinstance(error, ArgumentError):
        return error
    flags = _command_flags(parser, command)
    if error.argument not in flags:
        return error
    return ArgumentError(flags[error.argument], error.value, error.allowed, error.hint)


def _command_flags(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """{dest: what the user types} for one subcommand: its long flag, or the metavar of a positional."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            flags = {}
            for option in action.choices[command]._actions:
                long = [o for o in option.option_strings if o.startswith("--")]
                if long:
                    flags[option.dest] = long[0]
                elif not option.option_strings:
                    flags[option.dest] = option.metavar or option.dest.upper()
            return flags
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `prunekit` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except PruneError as error:
        print(f"prunekit: error: {_as_flag_error(parser, args.command, error)}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as error:  # an optional extra is missing: say which, without a traceback
        print(f"prunekit: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("prunekit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader left (`prunekit methods | head`): point stdout at /dev/null so the exit flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as error:  # anything else still ends in one line; PRUNEKIT_TRACEBACK=1 shows where it came from
        if os.environ.get("PRUNEKIT_TRACEBACK"):
            raise
        print(f"prunekit: error: {type(error).__name__}: {error} (set PRUNEKIT_TRACEBACK=1 to see the traceback)",
              file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
