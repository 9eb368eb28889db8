"""`prunekit merge CONFIG.yaml --out DIR`: merge fine-tuned checkpoints (DARE, TIES, task arithmetic, linear)."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `merge` subcommand."""
    parser = subparsers.add_parser(
        "merge", help="merge fine-tuned models into one (DARE, TIES, dare_ties, task arithmetic, linear)",
        description="Merge safetensors checkpoints tensor by tensor as a mergekit-style YAML config says; the "
                    "output folder loads with plain transformers from_pretrained.")
    parser.add_argument("config", help="YAML: merge_method, base_model, models [{model, parameters: {weight, "
                                       "density}}], parameters {lambda, normalize, rescale, seed}, dtype")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Validate the config (before any tensor is read), merge, print a summary."""
    from .config import load_config
    from .engine import merge

    config = load_config(args.config)
    start = time.perf_counter()
    result = merge(config, args.out, overwrite=args.overwrite, progress=not args.quiet)
    seconds = time.perf_counter() - start
    # ru_maxrss is in KiB on Linux.
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {**result.to_json(), "seconds": round(seconds, 3), "peak_rss_mib": round(peak_mib, 1)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{config.merge_method}: {len(config.models)} model(s) into {result.out} "
              f"({result.tensors} tensors, {result.parameters:,} values, {len(result.shards)} shard(s)) "
              f"in {seconds:.1f} s, peak RSS {peak_mib:.0f} MiB", file=sys.stdout)
    return 0
