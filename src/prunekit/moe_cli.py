"""`prunekit moe MODEL --experts N --out DIR`: STUN expert pruning of a transformers MoE language model folder."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .errors import ArgumentError, ModelError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `moe` subcommand."""
    parser = subparsers.add_parser(
        "moe", help="prune MoE experts (STUN: router-weight clusters), then weights inside the kept experts",
        description="Keep --experts experts per MoE layer (one per cluster of router rows), optionally prune "
                    "--sparsity inside them, and write a folder that plain from_pretrained loads.")
    parser.add_argument("model", help="a transformers MoE causal LM folder (Mixtral, Qwen2-MoE, Qwen3-MoE)")
    parser.add_argument("--experts", type=int, required=True, help="experts kept in every MoE layer")
    parser.add_argument("--sparsity", type=float, default=0.0, help="share of each kept expert's weights to zero")
    parser.add_argument("--method", default="magnitude", help="inside the experts: magnitude or wanda")
    parser.add_argument("--calib", help="calibration text for wanda (default: the embedded English text)")
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Check the cheap arguments, load, prune, save."""
    import torch
    import transformers

    from .errors import check_sparsity, unknown_choice
    from .export import check_destination, save_pretrained
    from .moe import METHODS, stun

    check_sparsity(args.sparsity)
    if args.method not in METHODS:
        raise unknown_choice("method", args.method, METHODS)
    if args.experts < 1:
        raise ArgumentError("experts", args.experts, "an integer >= 1")
    check_destination(Path(args.out), args.overwrite)
    if not Path(args.model).is_dir():
        raise ArgumentError("model", args.model, "a local transformers folder")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load a causal LM from {args.model!r}: {error}") from error
    tokenizer, data = None, None
    if any(Path(args.model).glob("tokenizer*")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    if args.method == "wanda" and args.sparsity > 0:
        if tokenizer is None:
            raise ArgumentError("model", args.model, "a folder with a tokenizer: wanda needs calibration text")
        from .calibration import calibration_samples, load_text

        data = calibration_samples(load_text(args.calib), tokenizer, args.n_samples, args.seq_len, seed=0)
    start = time.perf_counter()
    result = stun(model, args.experts, args.sparsity, method=args.method, data=data)
    seconds = time.perf_counter() - start
    save_pretrained(model, args.out, tokenizer=tokenizer, extra={"moe": result.to_json(), "method": "stun"},
                    overwrite=args.overwrite)
    summary = {**result.to_json(), "seconds": round(seconds, 3), "out": args.out}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"stun: {result.experts_before} -> {result.experts_after} experts per MoE layer, "
              f"{result.expert_sparsity:.1%} zeros inside the kept experts, written to {args.out} ({seconds:.1f} s)")
    return 0
