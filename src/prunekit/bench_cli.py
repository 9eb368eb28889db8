"""`prunekit bench CONFIG.yaml`: run a benchmark grid into a run folder (resumable) and write its report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_ROOT = Path("runs") / "bench"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `bench` subcommand."""
    parser = subparsers.add_parser(
        "bench", help="run a grid of models x methods x sparsities x seeds; tables, plots and an HTML report")
    parser.add_argument("config", metavar="CONFIG.yaml", help="the benchmark configuration (see benchmarks/configs/)")
    parser.add_argument("--out", metavar="RUN_DIR", help="run folder (default: runs/bench/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a run folder of the same configuration; finished cells are skipped")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads while training (default 1: the models are small)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Validate the configuration (before any work), run the unfinished cells, print where the outputs are."""
    from .bench import load_config, run_bench
    from .errors import ArgumentError

    if args.threads < 1:
        raise ArgumentError("--threads", args.threads, "an integer >= 1")
    config = load_config(args.config)
    run_dir = Path(args.out) if args.out else DEFAULT_ROOT / config.name
    log = (lambda message: None) if args.quiet else (
        lambda message: print(f"prunekit: {message}", file=sys.stderr, flush=True))
    summary = run_bench(config, run_dir, resume=args.resume, threads=args.threads, progress=not args.quiet, log=log)
    print(f"{config.name}: {summary.ran} cells run, {summary.skipped} already finished, "
          f"{summary.cells} in the grid ({summary.seconds:.1f} s)")
    for name, path in summary.outputs.items():
        print(f"  {name}: {path}")
    return 0
