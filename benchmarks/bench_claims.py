"""Run the two shipped benchmark configurations with `prunekit bench` and record in BENCHMARKS.md whether each
paper's claim held, with the numbers (mean +- std over seeds).

- magnitude_vs_complex (Gupta et al. 2022, Is Complexity Required for Neural Network Pruning?): global magnitude
  is competitive with complex criteria: at every sparsity its mean accuracy is within 1 point of the best complex
  criterion's, or within that criterion's std over seeds.
- random_vs_width (Liu et al. 2022, The Unreasonable Effectiveness of Random Pruning): the accuracy gap between a
  dense network and its ERK-random sparse twin shrinks as the network widens: at every sparsity the gap of the
  widest model is smaller than the narrowest one's.

    .venv/bin/python benchmarks/bench_claims.py                 # both grids (resumes finished cells), ~10 minutes
    .venv/bin/python benchmarks/bench_claims.py --report-only   # rewrite the BENCHMARKS.md section from the results

Run folders: benchmarks/results/bench/<config name>/ (results.jsonl, tables.md, plots, report.html).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prunekit.bench import load_config, read_results, run_bench  # noqa: E402
from prunekit.bench.machine import describe_all  # noqa: E402
from prunekit.bench.runner import write_text_atomic  # noqa: E402
from prunekit.bench.tables import cell_stats, tables_markdown  # noqa: E402

CONFIGS = ROOT / "benchmarks" / "configs"
RESULTS = ROOT / "benchmarks" / "results" / "bench"
MARKER = "bench-claims"
COMPLEX = ("lamp", "taylor", "snip", "grasp", "synflow", "snip-init", "grasp-init", "synflow-init")
COMPETITIVE_POINTS = 0.01  # one accuracy point


def magnitude_verdict(config, records) -> tuple[list[bool], list[str]]:
    """Global magnitude within a point (or the best complex method's std) of the best complex method, everywhere."""
    model = config.models[0].label
    lines, held = [], []
    for sparsity in config.sparsities:
        gm = cell_stats(records, model, "global-magnitude", sparsity)
        complex_stats = {m: cell_stats(records, model, m, sparsity) for m in COMPLEX if m in config.methods}
        complex_stats = {m: s for m, s in complex_stats.items() if s is not None}
        if gm is None or not complex_stats:
            return [False], [f"{100 * sparsity:g}%: cells missing"]
        best = max(complex_stats, key=lambda m: complex_stats[m].mean)
        margin = gm.mean - complex_stats[best].mean
        ok = margin >= -max(COMPETITIVE_POINTS, complex_stats[best].std)
        held.append(ok)
        beaten = [m for m, v in complex_stats.items() if gm.mean > v.mean]
        lines.append(f"{100 * sparsity:g}%: global-magnitude {gm.text()} vs best complex `{best}` "
                     f"{complex_stats[best].text()} ({100 * margin:+.2f} points) -> "
                     f"{'competitive' if ok else 'not competitive'}; it beats {len(beaten)} of "
                     f"{len(complex_stats)} complex criteria ({', '.join(beaten) or 'none'})")
    return held, lines


def width_verdict(config, records) -> tuple[list[bool], list[str]]:
    """The dense - ERK-random gap of the widest model below the narrowest one's at every sparsity."""
    lines, held = [], []
    for sparsity in config.sparsities:
        gaps = []
        for spec in config.models:
            dense = cell_stats(records, spec.label, "dense", None)
            erk = cell_stats(records, spec.label, "erk-random-init", sparsity)
            if dense is None or erk is None:
                return [False], [f"{100 * sparsity:g}%: cells missing"]
            gaps.append((spec.label, dense.mean - erk.mean))
        ok = gaps[-1][1] < gaps[0][1]
        held.append(ok)
        listing = ", ".join(f"{label} {100 * gap:.2f}" for label, gap in gaps)
        lines.append(f"{100 * sparsity:g}%: dense - erk-random-init gap (points) {listing} -> "
                     f"{'shrinks' if ok else 'does not shrink'} from narrowest to widest")
    return held, lines


VERDICTS = {
    "magnitude_vs_complex": ("Global magnitude is competitive with complex criteria (Gupta et al. 2022)",
                             magnitude_verdict),
    "random_vs_width": ("Random ERK pruning approaches dense as width grows (Liu et al. 2022)", width_verdict),
}


def outcome(held: list[bool], sparsities: list[float]) -> str:
    """HELD, DID NOT HOLD, or where it held."""
    if all(held):
        return "HELD"
    if not any(held):
        return "DID NOT HOLD"
    where = ", ".join(f"{100 * s:g}%" for s, ok in zip(sparsities, held) if ok)
    return f"HELD IN PART (at {where} only)"


def identical_methods(config, records) -> list[str]:
    """Pairs of methods whose every cell gave the same accuracy (the same scores under two names)."""
    def results(method: str) -> list[float]:
        return sorted((r["key"].split("|", 2)[2], r["accuracy"]) for r in records if r["method"] == method)

    methods = [m for m in config.methods if m != "dense"]
    return [f"`{a}` and `{b}` gave identical results in every cell: with the same calibration batches they rank "
            "the weights identically" for i, a in enumerate(methods) for b in methods[i + 1:]
            if results(a) and results(a) == results(b)]


def finished_dates(records: list[dict]) -> str:
    """When the cells were run, with the methods of each date (a partial rerun shows as a second date)."""
    by_date: dict[str, set[str]] = {}
    for record in records:
        by_date.setdefault(str(record.get("finished", "unknown"))[:10], set()).add(record["method"])
    if len(by_date) == 1:
        return f"every cell ran on {next(iter(by_date))}"
    counts = {day: sum(str(r.get("finished", "unknown"))[:10] == day for r in records) for day in by_date}
    return "cells ran on " + "; ".join(f"{day} ({counts[day]} cells: {', '.join(sorted(by_date[day]))})"
                                       for day in sorted(by_date))


def section(results: dict[str, tuple], date: str) -> str:
    """The BENCHMARKS.md section between the markers."""
    machines = describe_all(r.get("machine") for _, records, _ in results.values() for r in records)
    out = [f"<!-- {MARKER}: start -->", "## Benchmark harness: two claims from the literature (`prunekit bench`)", "",
           f"Machine: {machines}; one intra-op thread. Date: {date}. Command: `.venv/bin/python benchmarks/bench_claims.py` (each grid is "
           "`prunekit bench benchmarks/configs/<name>.yaml`; results.jsonl, tables.md and the self-contained "
           "report.html of each run are in `benchmarks/results/bench/<name>/`). Accuracy: test accuracy (%), "
           "mean ± std over the seeds; every method gets the same epochs, data order and seeds.", ""]
    for name, (config, records, seconds) in results.items():
        title, verdict = VERDICTS[name]
        held, lines = verdict(config, records)
        out += [f"### {title}: {outcome(held, config.sparsities)}", ""]
        out += [f"- {line}" for line in lines]
        out += [f"- {line}" for line in identical_methods(config, records)]
        out.append(f"- {finished_dates(records)}")
        cell_minutes = sum(r.get("seconds", 0.0) for r in records) / 60
        out.append(f"- {len(records)} cells; their times sum to {cell_minutes:.1f} min"
                   + (f" (wall time of this run {seconds / 60:.1f} min)" if seconds is not None else "")
                   + "; the shared machine was heavily loaded, so times are not comparable between runs")
        out += ["", tables_markdown(config, records, heading_level=4).rstrip(), ""]
    out.append(f"<!-- {MARKER}: end -->")
    return "\n".join(out)


def update_benchmarks_md(text: str) -> None:
    """Replace the marked section of BENCHMARKS.md, or append it."""
    path = ROOT / "BENCHMARKS.md"
    current = path.read_text(encoding="utf-8")
    start, end = f"<!-- {MARKER}: start -->", f"<!-- {MARKER}: end -->"
    if start in current and end in current:
        head, rest = current.split(start, 1)
        new = head + text + rest.split(end, 1)[1]
    else:
        new = current.rstrip("\n") + "\n\n" + text + "\n"
    write_text_atomic(path, new)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(VERDICTS), nargs="+", help="run only these grids")
    parser.add_argument("--report-only", action="store_true", help="no training: rewrite the section from results")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of editing BENCHMARKS.md")
    args = parser.parse_args()
    results = {}
    for name in VERDICTS:
        config = load_config(CONFIGS / f"{name}.yaml")
        seconds = None
        if not args.report_only and (args.only is None or name in args.only):
            summary = run_bench(config, RESULTS / name, resume=True, threads=1, log=print)
            seconds = summary.seconds if summary.ran == summary.cells else None
        records = [r for r in read_results(RESULTS / name).values() if r.get("config_digest") == config.digest]
        results[name] = (config, records, seconds)
    text = section(results, datetime.now(timezone.utc).strftime("%Y-%m-%d"))
    if args.no_write:
        print(text)
    else:
        update_benchmarks_md(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
