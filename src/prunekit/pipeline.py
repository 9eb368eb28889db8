"""The LLM job end to end: load -> calibration samples -> perplexity before -> prune -> perplexity after -> save.

Every argument is checked before the model is loaded, and the output folder is written atomically at the very end.
"""

from __future__ import annotations

import gc
import os
import resource
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .errors import ArgumentError, check_sparsity
from .methods import get_method
from .patterns import NM, Unstructured, parse_pattern

# When calibration and evaluation come from the same text, the last tenth is held out for evaluation.
HELD_OUT_SHARE = 0.1


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    /proc/self/status VmHWM is this process's own high-water mark; ru_maxrss is not (on Linux it carries over
    fork+exec, so a child starts at its parent's size).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def language_methods() -> list[str]:
    """Methods that run on a causal LM here: the calibration methods, and the data-free ones (no gradients,
    example inputs or output measurements, which this job does not supply)."""
    from .methods import METHODS
    from .scores import DATA_FREE

    return [m.name for m in METHODS.values() if m.runner is not None
            or (m.score in DATA_FREE and m.score != "synflow" and m.budget != "rate-distortion")]


def check_language_method(recipe: Any, options: dict[str, Any], checkpoint_dir: Any) -> None:
    """Refuse, before anything loads, a method or keyword this job would not use as asked."""
    from .api import RUNNER_UNUSED, SCORE_OPTIONS, refuse_unused_by_runner
    from .budget import BUDGETS
    from .errors import unknown_choice
    from .scores import DATA_FREE, SCORES

    usable = language_methods()
    if recipe.name not in usable:
        raise ArgumentError("method", recipe.name, "a method that runs on a causal language model: "
                            + ", ".join(usable), "The others need gradients, example inputs or output "
                            "measurements on data this job does not take")
    if recipe.runner is not None:
        given = {name: options.get(name, default) for name, default in RUNNER_UNUSED.items()}
        refuse_unused_by_runner(recipe, **given)
        from .methods.wanda import check_runner_options

        rest = {k: v for k, v in options.items() if k not in RUNNER_UNUSED and k not in ("include", "ignore")}
        solver, allocation = recipe.score, recipe.budget
        check_runner_options(recipe.name, solver, "owl" if allocation == "owl" else "uniform", rest)
        return
    if checkpoint_dir is not None:
        raise ArgumentError("checkpoint_dir", os.fspath(checkpoint_dir), f"None for method {recipe.name!r} "
                            "(only the calibration methods run block by block and resume)")
    score = options.get("score") or recipe.score
    if score not in SCORES:
        raise unknown_choice("score", score, SCORES)
    if score not in DATA_FREE or score == "synflow":
        raise ArgumentError("score", score, "a data-free score for a causal LM: " + ", ".join(
            sorted(s for s in DATA_FREE if s != "synflow")))
    budget = options.get("budget") or recipe.budget
    if budget not in BUDGETS:
        raise unknown_choice("budget", budget, BUDGETS)
    if budget == "rate-distortion":
        raise ArgumentError("budget", budget, "one of " + ", ".join(b for b in BUDGETS if b != "rate-distortion")
                            + " for a causal LM (rate-distortion measures outputs on data this job does not take)")
    keywords = ("score", "budget", "min_keep", "types", "include", "ignore", *SCORE_OPTIONS.get(score, ()))
    for name, value in options.items():
        if name not in keywords:
            raise ArgumentError(name, value, f"not given: method {recipe.name!r} does not use it")


def split_held_out(text: str, share: float = HELD_OUT_SHARE) -> tuple[str, str]:
    """(calibration part, evaluation part) of one text, cut at a line break near the split point."""
    cut = int(len(text) * (1 - share))
    newline = text.rfind("\n", 0, cut)
    cut = newline if newline > 0 else cut
    return text[:cut], text[cut:]


def prune_language_model(
    model: str | os.PathLike = "smollm2-135m",
    method: str = "wanda",
    sparsity: float | list[float] | None = 0.5,
    *,
    pattern: str = "unstructured",
    calib: str | os.PathLike | None = None,
    ppl: str | os.PathLike | None = None,
    n_samples: int = 128,
    seq_len: int = 256,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    eval_tokens: int = 8192,
    window: int = 512,
    checkpoint_dir: str | os.PathLike | None = None,
    evaluate: bool = True,
    out_of_core: bool = False,
    device: str = "auto",
    progress: bool = True,
    log: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """Prune a causal LM with calibration text and measure perplexity before and after; optionally save it.

    With `out_of_core=True` the model is never loaded whole: blocks are read from its memory-mapped safetensors,
    pruned and written to `out` one at a time (see prunekit.streaming); the result is the same.
    `device`: "auto" runs on this rank's GPU (cuda:LOCAL_RANK) when CUDA is available, else on the CPU.
    """
    from . import prune
    from .calibration import calibration_samples, check_calibration_tokens, load_text
    from .evaluate import perplexity
    from .export import check_destination, save_pretrained
    from .hf import check_sequence_length
    from .distributed import init_from_environment, is_writer, resolve_device
    from .zoo import load_causal_lm

    recipe = get_method(method)
    check_language_method(recipe, options, checkpoint_dir)
    if recipe.runner is not None and not isinstance(parse_pattern(pattern), (Unstructured, NM)):
        raise ArgumentError("pattern", pattern, f"'unstructured' or N:M (such as '2:4') for method {recipe.name!r}")
    if not isinstance(sparsity, (list, tuple)) and sparsity is not None:
        check_sparsity(sparsity)
    for name, value in (("n_samples", n_samples), ("seq_len", seq_len), ("eval_tokens", eval_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArgumentError(name, value, "a positive integer")
    if out is not None:
        check_destination(Path(out), overwrite)
    if out_of_core:
        if out is None:
            raise ArgumentError("out", None, "a folder: an out-of-core run writes the pruned model block by block")
        from .streaming import check_streamed_method

        check_streamed_method(recipe.name)
        if options.get("calibration", "sequential") != "sequential":
            raise ArgumentError("calibration", options["calibration"], "'sequential' with out_of_core (one-pass "
                                "calibration holds every block's statistics at once; run it in memory)")
        if checkpoint_dir is not None:
            raise ArgumentError("checkpoint_dir", os.fspath(checkpoint_dir), "None with out_of_core (an out-of-core "
                                "run resumes from its own staging folder beside `out`: rerun the same command)")
    init_from_environment()  # under torchrun: join the group; the samples are then shared across the ranks
    calib_text = load_text(calib, argument="calib")
    eval_text = load_text(ppl, argument="ppl") if ppl is not None else None
    if eval_text is None or (ppl == calib):
        calib_text, eval_text = split_held_out(calib_text)

    log = log or (lambda message: None)
    # The tokenizer and config only (seconds): the text and lengths are checked before the weights load.
    config, tokenizer = load_tokenizer(model)
    check_sequence_length(SimpleNamespace(config=config), seq_len)
    if recipe.runner is not None:  # the calibration methods take one sparsity per block
        check_block_count(sparsity, config)
    check_calibration_tokens(calib_text, tokenizer, n_samples, seq_len, source=calib)
    samples = calibration_samples(calib_text, tokenizer, n_samples, seq_len, seed)
    device = resolve_device(device)
    if out_of_core:
        from .evaluate import encode, tokenizer_adds_bos

        eval_ids = encode(tokenizer, eval_text)[:eval_tokens] if evaluate else None
        bos = tokenizer.bos_token_id if evaluate and tokenizer_adds_bos(tokenizer) else None
        del tokenizer  # the pruned folder gets the tokenizer's files copied as they are; its memory is not needed
        return _prune_out_of_core(model, recipe.name, sparsity, pattern, samples, eval_ids, bos, seq_len, seed, out,
                                  overwrite, eval_tokens, window, progress, log, dict(options, device=device))
    log(f"loading {os.fspath(model)}")
    started = time.perf_counter()
    lm, tokenizer = load_causal_lm(model)
    lm.to(device)
    load_seconds = time.perf_counter() - started
    log(f"loaded in {load_seconds:.1f} s; {len(samples)} calibration samples of {seq_len} tokens")

    writer = is_writer()  # under torchrun only rank 0 evaluates and writes; every rank calibrates and prunes

    def measure() -> float | None:
        if not evaluate or not writer:
            return None
        return perplexity(lm, tokenizer, eval_text, window=min(window, seq_len * 4, eval_tokens), max_tokens=eval_tokens,
                          progress=progress)

    dense_ppl = measure()
    if dense_ppl is not None:
        log(f"dense perplexity {dense_ppl:.3f}")
    log(f"pruning with {recipe.name}")
    started = time.perf_counter()
    if recipe.runner is not None:  # calibration methods; seed only picked the samples
        report = prune(lm, recipe.name, sparsity, pattern=pattern, data=samples, apply="bake",
                       checkpoint_dir=checkpoint_dir, progress=progress, **options)
    else:
        report = prune(lm, recipe.name, sparsity, pattern=pattern, apply="bake", seed=seed, **options)
    prune_seconds = time.perf_counter() - started
    pruned_ppl = measure()
    if pruned_ppl is not None:
        log(f"pruned perplexity {pruned_ppl:.3f}")
    summary = {
        "model": os.fspath(model), "method": recipe.name, "pattern": pattern, "sparsity": report.sparsity,
        "dense_perplexity": dense_ppl, "pruned_perplexity": pruned_ppl, "load_seconds": load_seconds,
        "prune_seconds": prune_seconds, "peak_rss_mib": peak_rss_mib(), "calibration_samples": len(samples),
        "seq_len": seq_len, "seed": seed,
    }
    report.extra.update({k: v for k, v in summary.items() if k not in ("model", "method", "pattern", "sparsity")})
    if out is not None and writer:
        save_pretrained(lm, out, tokenizer=tokenizer, report=report, extra={"job": summary}, overwrite=overwrite)
        summary["out"] = os.fspath(out)
    summary["report"] = report
    return summary


def check_block_count(sparsity: Any, config: Any) -> None:
    """A per-block sparsity list has one entry per decoder block: checked on config.json's num_hidden_layers,
    before the weights load (where the config does not say, the job checks it on the loaded blocks)."""
    n_blocks = getattr(config, "num_hidden_layers", None)
    if isinstance(sparsity, (list, tuple)) and isinstance(n_blocks, int) and len(sparsity) != n_blocks:
        raise ArgumentError("sparsity", ",".join(map(str, sparsity)), f"one number, or a list with one sparsity "
                            f"per decoder block ({n_blocks}: num_hidden_layers in the model's config.json)",
                            f"The list has {len(sparsity)} entries.")


def load_tokenizer(model: str | os.PathLike) -> tuple[Any, Any]:
    """(config, tokenizer) of a causal LM without its weights, for the checks that come before loading it."""
    from transformers import AutoConfig, AutoTokenizer

    from .errors import ModelError
    from .zoo import resolve_model

    source = resolve_model(model)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read the config and tokenizer of {os.fspath(model)!r} (resolved to {source!r}): "
                         f"{error}") from error
    return config, tokenizer


def _prune_out_of_core(model, method, sparsity, pattern, samples, eval_ids, bos, seq_len, seed, out, overwrite,
                       eval_tokens, window, progress, log, options) -> dict[str, Any]:
    """The same job as prune_language_model, block by block from the memory-mapped checkpoint (prunekit.streaming)."""
    from .streaming import prune_out_of_core, release_free_memory, resolve_folder

    folder = resolve_folder(model)
    gc.collect()
    release_free_memory()
    log(f"pruning {folder} out of core with {method}; {len(samples)} calibration samples of {seq_len} tokens")
    started = time.perf_counter()
    summary: dict[str, Any] = {"model": os.fspath(model), "method": method, "pattern": pattern,
                               "calibration_samples": len(samples), "seq_len": seq_len, "seed": seed,
                               "out_of_core": True}
    report = prune_out_of_core(folder, samples, sparsity, out, method=method, pattern=pattern, eval_ids=eval_ids,
                               eval_window=min(window, seq_len * 4, eval_tokens), bos_token_id=bos,
                               overwrite=overwrite, progress=progress,
                               extra={"seq_len": seq_len, "seed": seed}, **options)
    summary.update(sparsity=report.sparsity, dense_perplexity=report.extra.get("dense_perplexity"),
                   pruned_perplexity=report.extra.get("pruned_perplexity"), load_seconds=0.0,
                   prune_seconds=time.perf_counter() - started, peak_rss_mib=peak_rss_mib(), out=os.fspath(out),
                   report=report)
    for label in ("dense", "pruned"):
        if summary[f"{label}_perplexity"] is not None:
            log(f"{label} perplexity {summary[f'{label}_perplexity']:.3f}")
    return summary
