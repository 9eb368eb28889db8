"""The LLM job end to end: load -> calibration samples -> perplexity before -> prune -> perplexity after -> save.

Every argument is checked before the model is loaded, and the output folder is written atomically at the very end.
"""

from __future__ import annotations

import gc
import os
import resource
import time
from pathlib import Path
from typing import Any

from .errors import ArgumentError, check_sparsity
from .methods import get_method

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
    from .calibration import calibration_samples, load_text
    from .evaluate import perplexity
    from .export import check_destination, save_pretrained
    from .hf import check_sequence_length
    from .distributed import init_from_environment, is_writer, resolve_device
    from .zoo import load_causal_lm

    recipe = get_method(method)
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
        if checkpoint_dir is not None:
            raise ArgumentError("checkpoint_dir", os.fspath(checkpoint_dir), "None with out_of_core (an out-of-core "
                                "run resumes from its own staging folder beside `out`: rerun the same command)")
    init_from_environment()  # under torchrun: join the group; the samples are then shared across the ranks
    calib_text = load_text(calib)
    eval_text = load_text(ppl) if ppl is not None else None
    if eval_text is None or (ppl == calib):
        calib_text, eval_text = split_held_out(calib_text)

    log = log or (lambda message: None)
    device = resolve_device(device)
    if out_of_core:
        return _prune_out_of_core(model, recipe.name, sparsity, pattern, calib_text, eval_text, n_samples, seq_len,
                                  seed, out, overwrite, eval_tokens, window, evaluate, progress, log,
                                  dict(options, device=device))
    log(f"loading {os.fspath(model)}")
    started = time.perf_counter()
    lm, tokenizer = load_causal_lm(model)
    lm.to(device)
    load_seconds = time.perf_counter() - started
    check_sequence_length(lm, seq_len)
    samples = calibration_samples(calib_text, tokenizer, n_samples, seq_len, seed)
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
    data = samples if recipe.runner is not None else None
    report = prune(lm, recipe.name, sparsity, pattern=pattern, data=data, apply="bake", seed=seed,
                   **({"checkpoint_dir": checkpoint_dir, "progress": progress} if recipe.runner is not None else {}),
                   **options)
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


def _prune_out_of_core(model, method, sparsity, pattern, calib_text, eval_text, n_samples, seq_len, seed, out,
                       overwrite, eval_tokens, window, evaluate, progress, log, options) -> dict[str, Any]:
    """The same job as prune_language_model, block by block from the memory-mapped checkpoint (prunekit.streaming)."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoTokenizer

    from .calibration import calibration_samples
    from .evaluate import encode, tokenizer_adds_bos
    from .hf import check_sequence_length
    from .streaming import prune_out_of_core, release_free_memory, resolve_folder

    folder = resolve_folder(model)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    check_sequence_length(SimpleNamespace(config=config), seq_len)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    samples = calibration_samples(calib_text, tokenizer, n_samples, seq_len, seed)
    eval_ids, bos = None, None
    if evaluate:
        eval_ids = encode(tokenizer, eval_text)[:eval_tokens]
        bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    del tokenizer  # the pruned folder gets the tokenizer's files copied as they are; its memory is not needed
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
