"""`prunekit shrink`: structured pruning with physical removal, as one job with costs measured before and after.

MODEL is one of the architectures in prunekit.nets (random weights, for trying the engine), an embedded model
(smollm2-135m, minilm), or a transformers folder. Plain torch models are traced with torch.fx; transformers
models are read through the adapter (heads and MLP neurons), and calibration-based methods (flap, cfsp) and
block removal (--drop-blocks, ShortGPT block influence) run on calibration text.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from prunekit.errors import ArgumentError, unknown_choice

GRAPH_SCORES = ("l1", "l2", "bn-scale", "random", "fpgm")
LLM_METHODS = ("flap", "cfsp")
METHODS = GRAPH_SCORES + LLM_METHODS
DEFAULT_IMAGE = {"resnet50-style": (1, 3, 224, 224), "vit-b-style": (1, 3, 224, 224)}
EMBEDDED_ENCODERS = ("minilm",)


# What `prunekit shrink --method` offers: (name, what it removes and how, paper)
STRUCTURED_METHODS = (
    ("l1", "channels/heads/neurons with the smallest group L1 norm (every coupled slice summed)",
     "Li et al. 2017, Pruning Filters for Efficient ConvNets"),
    ("l2", "the same with the group L2 norm (default)", "Fang et al. 2023, DepGraph: Towards Any Structural Pruning"),
    ("bn-scale", "channels with the smallest BatchNorm |gamma| (network slimming)",
     "Liu et al. 2017, Learning Efficient Convolutional Networks through Network Slimming"),
    ("fpgm", "filters nearest the geometric median of their layer (the most replaceable)",
     "He et al. 2019, Filter Pruning via Geometric Median for Deep Convolutional Neural Networks Acceleration"),
    ("random", "uniformly random units (the baseline)", "Li et al. 2022, Revisiting Random Channel Pruning"),
    ("taylor", "first-order Taylor (sum w dL/dw)^2 per unit and batch, averaged over batches (Python API, needs data)",
     "Molchanov et al. 2019, Importance Estimation for Neural Network Pruning"),
    ("flap", "LLM heads and MLP neurons by fluctuation Var(X_j)||W_:,j||^2, global threshold, bias compensation",
     "An et al. 2024, Fluctuation-based Adaptive Structured Pruning for Large Language Models"),
    ("cfsp", "LLM MLP widths per block from angular importance, neurons by |W| x ||X||",
     "Wang et al. 2024, CFSP: An Efficient Structured Pruning Framework for LLMs with Coarse-to-Fine Activation Information"),
    ("--drop-blocks", "whole decoder blocks with the lowest block influence 1 - cos(x_in, x_out)",
     "Men et al. 2024, ShortGPT: Layers in Large Language Models are More Redundant Than You Expect"),
)


def structured_markdown() -> str:
    """The README table of structured methods."""
    out = ["| method | what it removes | paper |", "|---|---|---|"]
    for name, what, paper in STRUCTURED_METHODS:
        cells = [f"`{name}`", what, paper]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' -> (1, 3, 224, 224)."""
    try:
        shape = tuple(int(part) for part in str(text).replace("x", ",").split(","))
    except ValueError:
        raise ArgumentError("input_shape", text, "comma-separated positive integers such as 1,3,224,224") from None
    if not shape or any(d < 1 for d in shape):
        raise ArgumentError("input_shape", text, "comma-separated positive integers such as 1,3,224,224")
    return shape


def load_model(name: str, input_shape: str | None, seed: int, seq_len: int) -> tuple[nn.Module, Any, Any, str]:
    """(model, example inputs, tokenizer or None, kind) where kind is "net", "causal-lm" or "encoder"."""
    from prunekit import nets

    if name in nets.NETS:
        torch.manual_seed(seed)
        model = nets.build_net(name).eval()
        shape = parse_shape(input_shape) if input_shape else DEFAULT_IMAGE.get(name, (1, 1, 28, 28))
        return model, torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), None, "net"
    from prunekit.hf import is_causal_lm
    from prunekit.zoo import resolve_model

    if name.lower() in EMBEDDED_ENCODERS:
        from prunekit.zoo import minilm_path

        source = minilm_path()
    else:
        source = resolve_model(name)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
    loader = AutoModelForCausalLM if causal else AutoModel
    model = loader.from_pretrained(source, trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    ids = torch.randint(0, int(config.vocab_size), (1, seq_len), generator=torch.Generator().manual_seed(seed))
    kind = "causal-lm" if is_causal_lm(model) else "encoder"
    return model, ({"input_ids": ids} if kind == "encoder" else ids), tokenizer, kind


def check_job(method: str, kind: str, budget: str, drop_blocks: int) -> None:
    """Refuse combinations that cannot run, before anything is loaded or computed."""
    if method not in METHODS:
        raise unknown_choice("method", method, METHODS)
    if method in LLM_METHODS and kind != "causal-lm":
        raise ArgumentError("method", method, f"{', '.join(GRAPH_SCORES)} for this model ({kind}); "
                            f"{method} needs a transformers causal language model and calibration text")
    if method in LLM_METHODS and budget != "uniform":
        raise ArgumentError("budget", budget, f"'uniform' with --method {method} (it allocates widths itself)")
    if drop_blocks and kind == "encoder":
        raise ArgumentError("drop_blocks", drop_blocks, "0 for this model: block removal covers causal LMs and "
                            "residual CNN blocks")


def shrink(
    model_name: str,
    method: str = "l2",
    ratio: float | None = 0.5,
    *,
    budget: str = "uniform",
    target: float | None = None,
    round_to: int = 1,
    heads: str | None = "query",
    drop_blocks: int = 0,
    input_shape: str | None = None,
    calib: str | None = None,
    n_samples: int = 32,
    seq_len: int = 128,
    eval_tokens: int = 4096,
    measure_latency: bool = True,
    out: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
    fallback: str | None = None,
    skip_untraceable: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Load, prune structurally, measure before/after, save. Returns a JSON-ready summary.

    fallback: with method bn-scale or fpgm, score the groups they cannot by this group norm ("l1"/"l2") instead of
    refusing them. skip_untraceable: with drop_blocks on a plain torch model, leave shape-preserving modules torch.fx
    cannot trace out of the candidates instead of refusing them. Either substitute is listed in the notes.
    """
    from prunekit.calibration import load_text
    from prunekit.measure import cost_report

    if method not in METHODS:
        raise unknown_choice("method", method, METHODS)
    if fallback is not None and method not in ("bn-scale", "fpgm"):
        raise ArgumentError("fallback", fallback, f"left out for method {method!r} (only bn-scale and fpgm may "
                            "need a substitute score)")
    if out is not None:
        from prunekit.export import check_destination

        check_destination(Path(out), overwrite)
    # The file is read before the model loads, so a missing or empty one fails at once.
    text = load_text(calib, argument="calib") if calib is not None else None
    _check_tokens_before_loading(model_name, text, calib, n_samples, seq_len, method, drop_blocks)
    log(f"loading {model_name}")
    model, example, tokenizer, kind = load_model(model_name, input_shape, seed, seq_len)
    check_job(method, kind, budget, drop_blocks)
    if calib is not None and kind != "causal-lm":
        raise ArgumentError("calib", calib if isinstance(calib, str) else repr(calib), f"left out for this model "
                            f"({kind}): calibration text is read only for causal language models")
    if skip_untraceable and not (drop_blocks and kind == "net"):
        raise ArgumentError("skip_untraceable", skip_untraceable, "False unless drop_blocks removes residual blocks "
                            "of a plain torch model (the only step that traces candidate blocks one by one)")
    batches = (1, 16) if measure_latency else ()
    log("measuring the dense model")
    before = cost_report(model, example, latency_batches=batches, measure_time=measure_latency)
    samples, held_out = _text_for(kind, tokenizer, text, n_samples, seq_len, seed, method, drop_blocks)
    dense_ppl = _perplexity(model, tokenizer, held_out, eval_tokens, progress) if held_out is not None else None
    started = time.perf_counter()
    notes: list[str] = []
    dropped: list[str] = []
    if drop_blocks and kind == "net":
        from prunekit.graph.depth import drop_residual_blocks

        dropped, influence, untraceable = drop_residual_blocks(model, example, drop_blocks, skip_untraceable)
        notes.append(f"removed residual blocks {dropped} (lowest block influence of {len(influence)})")
        if untraceable:
            notes.append(f"not candidates (cannot be traced, skipped as asked): {untraceable}")
    elif drop_blocks:
        from prunekit.graph.transformers import block_influence, remove_blocks

        influence = block_influence(model, samples)
        chosen = sorted(range(len(influence)), key=lambda i: influence[i])[:drop_blocks]
        notes += [f"removed blocks {sorted(chosen)} (lowest block influence)"] + remove_blocks(model, chosen)
    result = _prune(model, example, method, ratio, budget, target, round_to, heads, samples, seed, progress, fallback)
    result.removed_modules = dropped
    prune_seconds = time.perf_counter() - started
    log("measuring the pruned model")
    after = cost_report(model, example, latency_batches=batches, measure_time=measure_latency)
    pruned_ppl = _perplexity(model, tokenizer, held_out, eval_tokens, progress) if held_out is not None else None
    saved = _save(model, tokenizer, kind, result, out, overwrite, notes) if out is not None else None
    return {"model": model_name, "kind": kind, "method": method, "ratio": ratio, "budget": budget, "target": target,
            "result": result, "before": before, "after": after, "prune_seconds": prune_seconds,
            "dense_perplexity": dense_ppl, "pruned_perplexity": pruned_ppl, "notes": notes, "out": saved}


def _check_tokens_before_loading(model_name: str, text: str | None, calib: Any, n_samples: int, seq_len: int,
                                 method: str, drop_blocks: int) -> None:
    """For a causal LM that will calibrate: enough tokens for n_samples x seq_len, from its tokenizer alone
    (seconds, as `prunekit prune` does), so a short text fails before the weights load."""
    from prunekit import nets

    if model_name in nets.NETS or model_name.lower() in EMBEDDED_ENCODERS or not (method in LLM_METHODS or drop_blocks):
        return
    from prunekit.calibration import check_calibration_tokens, load_text
    from prunekit.pipeline import load_tokenizer, split_held_out

    config, tokenizer = load_tokenizer(model_name)
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or [])):
        return  # not a causal LM: check_job refuses the method after the load, by name
    calibration_text = split_held_out(load_text(None) if text is None else text)[0]
    check_calibration_tokens(calibration_text, tokenizer, n_samples, seq_len, source=calib)


def _text_for(kind: str, tokenizer: Any, text: str | None, n_samples: int, seq_len: int, seed: int, method: str,
              drop_blocks: int) -> tuple[Any, str | None]:
    if kind != "causal-lm":
        return None, None
    from prunekit.calibration import calibration_samples, check_calibration_tokens, load_text
    from prunekit.pipeline import split_held_out

    calibration_text, held_out = split_held_out(load_text(None) if text is None else text)
    needs_samples = method in LLM_METHODS or drop_blocks
    if needs_samples:
        check_calibration_tokens(calibration_text, tokenizer, n_samples, seq_len)
    samples = calibration_samples(calibration_text, tokenizer, n_samples, seq_len, seed) if needs_samples else None
    return samples, held_out


def _perplexity(model: nn.Module, tokenizer: Any, text: str, eval_tokens: int, progress: bool) -> float:
    from prunekit.evaluate import perplexity

    return perplexity(model, tokenizer, text, max_tokens=eval_tokens, progress=progress)


def _prune(model, example, method, ratio, budget, target, round_to, heads, samples, seed, progress, fallback):
    if method == "flap":
        from prunekit.graph.llm_structured import flap

        return flap(model, samples, ratio, heads=heads or "query", round_to=round_to, progress=progress)
    if method == "cfsp":
        from prunekit.graph.llm_structured import cfsp

        return cfsp(model, samples, ratio, round_to=round_to, progress=progress)
    from prunekit.graph.prune import default_graph, is_transformers_model, prune_structured

    if is_transformers_model(model):
        from prunekit.graph.transformers import transformers_graph

        graph = transformers_graph(model, heads=heads)
    else:
        graph = default_graph(model, example)
    try:
        return prune_structured(model, example, ratio, score=method, budget=budget, target=target,
                                round_to=round_to, seed=seed, fallback=fallback, graph=graph)
    except ArgumentError as error:
        if error.argument != "score":
            raise
        raise ArgumentError("method", error.value, error.allowed, error.hint) from None


def _save(model, tokenizer, kind, result, out, overwrite, notes) -> dict[str, Any]:
    import prunekit

    extra = {"structured": result.settings, "widths": {d.name: [d.size, d.kept] for d in result.decisions}}
    if kind == "net":
        prunekit.save(model, out, extra=extra, overwrite=overwrite, structure=result)
        return {"path": out, "format": "prunekit (weights + removal plan; prunekit.load replays it on the class)"}
    from prunekit.errors import ModelError
    from prunekit.graph.transformers import save_pruned_pretrained

    try:
        save_pruned_pretrained(model, tokenizer, out, extra=extra, overwrite=overwrite)
        return {"path": out, "format": "transformers (from_pretrained loads it without prunekit)"}
    except ModelError as error:
        # per-layer widths (FLAP's global threshold): transformers' config cannot express them for this family
        prunekit.save(model, out, extra=extra, overwrite=overwrite, structure=result)
        notes.append(f"saved as weights + removal plan, not a transformers folder: {error}")
        return {"path": out, "format": "prunekit (load the original with from_pretrained, then prunekit.load)"}


def summary_text(summary: dict[str, Any]) -> str:
    """The human-readable report printed by the CLI."""
    from prunekit.measure import compare

    result = summary["result"]
    lines = [result.table(), "", compare(summary["before"], summary["after"])]
    if summary["dense_perplexity"] is not None:
        lines.append(f"perplexity: dense {summary['dense_perplexity']:.3f} -> pruned {summary['pruned_perplexity']:.3f}")
    lines.append(f"pruning took {summary['prune_seconds']:.1f} s")
    lines += [f"note: {n}" for n in summary["notes"]]
    if summary["out"]:
        lines.append(f"saved to {summary['out']['path']} ({summary['out']['format']})")
    return "\n".join(lines)


def summary_json(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary with its objects turned into JSON-ready values."""
    result = summary["result"]
    return {**{k: v for k, v in summary.items() if k not in ("result", "before", "after")},
            "before": summary["before"].to_dict(), "after": summary["after"].to_dict(),
            "widths": {d.name: [d.size, d.kept] for d in result.decisions},
            "barriers": [[b.where, b.reason] for b in result.graph.barriers], "group_notes": result.notes}
