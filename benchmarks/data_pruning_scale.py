#!/usr/bin/env python
"""SemDeDup and density-based pruning over 1,000,000 x 384 float32 embeddings on this machine: wall time, CPU time
and peak RSS (VmHWM), each method in its own process reading the same memory-mapped .npy file.

    .venv/bin/python benchmarks/data_pruning_scale.py [--rows 1000000] [--path FILE.npy] [--no-report]

The embeddings are synthetic, written once chunk by chunk (never all in memory) to --path (default
runs/data_pruning_scale/embeddings.npy): 1,000 cluster centres drawn as random unit directions, each row a centre plus
Gaussian noise whose scale differs per cluster (0.5 to 1.5 times 1/sqrt(384) per dimension, so clusters differ in
density), and 5% of the rows planted as near-duplicates: a copy of a random earlier row plus noise of 0.01/sqrt(384)
per dimension (cosine similarity to the original ~0.9999). Targets: <= 5 minutes wall and <= 4 GiB peak RSS per
method. A third child measures k-means alone with faiss and with scikit-learn on a 50,000-row slice (the backend
choice). Results: benchmarks/results/data_pruning_scale.jsonl and the `data-pruning-scale` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))
from prunekit.bench.machine import describe_all, machine_info  # noqa: E402

DEFAULT_PATH = REPO / "runs" / "data_pruning_scale" / "embeddings.npy"
RESULTS = REPO / "benchmarks" / "results" / "data_pruning_scale.jsonl"
DIM, CENTRES, DUPLICATE_SHARE, CHUNK = 384, 1000, 0.05, 50_000
CLUSTERS, MAX_POINTS_PER_CENTROID, KEEP, EPS = 1000, 64, 0.5, 0.001


def generate(path: Path, rows: int, seed: int = 0) -> dict[str, Any]:
    """Write the clustered embeddings with planted near-duplicates, chunk by chunk; returns what was planted."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.5, 1.5, CENTRES).astype(np.float32) / np.sqrt(DIM)
    duplicate = rng.random(rows) < DUPLICATE_SHARE
    duplicate[0] = False
    sources = np.full(rows, -1, dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    out = np.lib.format.open_memmap(temp, mode="w+", dtype=np.float32, shape=(rows, DIM))
    for start in tqdm(range(0, rows, CHUNK), desc="generating", unit="chunk", file=sys.stderr):
        stop = min(start + CHUNK, rows)
        chunk_rng = np.random.default_rng([seed, start])
        label = chunk_rng.integers(0, CENTRES, stop - start)
        chunk = centres[label] + spread[label, None] * chunk_rng.standard_normal((stop - start, DIM), dtype=np.float32)
        for i in np.flatnonzero(duplicate[start:stop]):  # a copy of a random earlier row, slightly perturbed
            source = int(chunk_rng.integers(0, start + i))
            sources[start + i] = source
            original = chunk[source - start] if source >= start else out[source]
            chunk[i] = original + (0.01 / np.sqrt(DIM)) * chunk_rng.standard_normal(DIM, dtype=np.float32)
        out[start:stop] = chunk
    out.flush()
    del out
    os.replace(temp, path)
    planted = path.with_suffix(".duplicates.npy")
    copies = np.flatnonzero(duplicate)
    np.save(planted, np.stack([copies, sources[copies]], axis=1))  # (copy, original) pairs
    return {"rows": rows, "planted_duplicates": int(duplicate.sum())}


def peak_rss_mib() -> float:
    """VmHWM of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(method: str, path: Path) -> dict[str, Any]:
    """Run one method on the memory-mapped file; wall, CPU and peak RSS of this process."""
    from prunekit import data as D

    started, cpu_started = time.perf_counter(), time.process_time()
    embeddings = D.prepare(path)  # memory-mapped, NaN check chunk by chunk
    phases = {"nan_check_s": time.perf_counter() - started}
    if method == "backends":
        sample = D.prepare(np.ascontiguousarray(np.asarray(embeddings.array[:50_000])))
        out: dict[str, Any] = {}
        for backend in ("faiss", "sklearn"):
            t = time.perf_counter()
            D.kmeans(sample, 100, backend=backend, progress=False)
            out[f"{backend}_kmeans_s"] = time.perf_counter() - t
        return {"method": method, **out, "sample_rows": 50_000, "clusters": 100}
    t = time.perf_counter()
    clustering = D.kmeans(embeddings, CLUSTERS, max_points_per_centroid=MAX_POINTS_PER_CENTROID, progress=False)
    phases["kmeans_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if method == "semdedup":
        result = D.semdedup(embeddings, eps=EPS, clustering=clustering, progress=False)
        pairs = np.load(path.with_suffix(".duplicates.npy"))
        kept = np.zeros(len(embeddings.array), dtype=bool)
        kept[result.keep] = True
        in_family = np.zeros(len(kept), dtype=bool)
        in_family[pairs.ravel()] = True
        extra = {"kept": int(kept.sum()), "removed": int((~kept).sum()), "planted": int(len(pairs)),
                 "pairs_both_kept": int((kept[pairs[:, 0]] & kept[pairs[:, 1]]).sum()),
                 "removed_outside_families": int((~kept & ~in_family).sum())}
    else:
        result = D.density_based_selection(embeddings, KEEP, clustering=clustering, progress=False)
        extra = {"kept": int(len(result.keep)), "target": result.info["target"],
                 "largest_quota_share": float((result.quotas / np.maximum(result.sizes, 1)).max()),
                 "smallest_quota_share": float((result.quotas / np.maximum(result.sizes, 1)).min())}
    phases[f"{method}_s"] = time.perf_counter() - t
    return {"method": method, "wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu_started,
            "peak_rss_mib": peak_rss_mib(), "backend": clustering.backend, **phases, **extra}


def run_child(method: str, path: Path) -> dict[str, Any]:
    """One method in a fresh process (its own peak RSS); its JSON result."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    completed = subprocess.run([sys.executable, __file__, "--child", method, "--path", str(path)], env=env,
                               capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"{method} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def render(records: dict[str, dict[str, Any]], generation: dict[str, Any], rows: int) -> str:
    """The BENCHMARKS.md section."""
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    lines = ["## Dataset pruning at scale (1,000,000 x 384 embeddings)", "",
             f"Machine: {describe_all(r.get('machine') for r in records.values())}. Date: {date}. Command: "
             "`nice -n 19 .venv/bin/python benchmarks/data_pruning_scale.py` (each method in its own process).", "",
             f"Data: {rows:,} x {DIM} float32 ({rows * DIM * 4 / 2**30:.2f} GiB) in a memory-mapped .npy, synthetic: "
             f"{CENTRES:,} random unit centres plus Gaussian noise of a per-cluster scale, and "
             f"{generation.get('planted_duplicates', 0):,} rows ({DUPLICATE_SHARE:.0%}) planted as near-duplicates of "
             f"earlier rows (cosine ~0.9999). k-means: {CLUSTERS:,} clusters, fitted on a seeded sample of "
             f"{MAX_POINTS_PER_CENTROID} rows per cluster, 20 iterations, then every row assigned in chunks. "
             f"SemDeDup eps {EPS}; DBP keep {KEEP:.0%}, tau 0.5, 20 neighbouring centroids. Targets: <= 5 min wall, "
             "<= 4 GiB peak RSS (VmHWM, which counts the memory-mapped file's resident pages).", "",
             "| method | wall | CPU (user+sys) | peak RSS | NaN check | k-means | method step | result |",
             "|---|---|---|---|---|---|---|---|"]
    for method in ("semdedup", "dbp"):
        r = records.get(method)
        if not r:
            continue
        if method == "semdedup":
            result = (f"removed {r['removed']:,} ({r['planted']:,} planted copies); planted pairs left with both "
                      f"kept: {r['pairs_both_kept']:,}; removed rows outside any planted pair: "
                      f"{r['removed_outside_families']:,}")
        else:
            result = (f"kept {r['kept']:,} (target {r['target']:,}); per-cluster kept share "
                      f"{r['smallest_quota_share']:.2f}..{r['largest_quota_share']:.2f}")
        lines.append(f"| `{method}` | {r['wall_s']:.0f} s | {r['cpu_s']:.0f} s | {r['peak_rss_mib'] / 1024:.2f} GiB | "
                     f"{r['nan_check_s']:.1f} s | {r['kmeans_s']:.0f} s | {r[method + '_s']:.0f} s | {result} |")
    backends = records.get("backends")
    if backends:
        lines += ["", f"k-means backends, same run, the first {backends.get('sample_rows', 50_000):,} x {DIM} rows "
                  f"of this file, "
                  f"{backends['clusters']} clusters, 20 iterations: faiss {backends['faiss_kmeans_s']:.1f} s, "
                  f"scikit-learn KMeans {backends['sklearn_kmeans_s']:.1f} s "
                  f"({backends['sklearn_kmeans_s'] / backends['faiss_kmeans_s']:.0f}x faiss)."]
    lines.append("")
    return "\n".join(lines)


def report_only(args: argparse.Namespace) -> int:
    """Render (and write) the section from the latest result of each method at --rows."""
    records: dict[str, dict[str, Any]] = {}
    for line in RESULTS.read_text().splitlines() if RESULTS.is_file() else []:
        record = json.loads(line)
        if record.get("dataset_rows", record.get("rows")) == args.rows:
            records[record["method"]] = record
    if not records:
        raise SystemExit(f"no results for {args.rows} rows in {RESULTS}")
    planted = args.path.with_suffix(".duplicates.npy")
    generation = {"planted_duplicates": int(len(np.load(planted))) if planted.is_file() else 0}
    section = render(records, generation, args.rows)
    print(section)
    if not args.no_report and args.rows == 1_000_000:
        from data_pruning import BENCHMARKS_MD, write_marked_section

        write_marked_section(BENCHMARKS_MD, "data-pruning-scale", section)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH, help="the embeddings file (made if missing)")
    parser.add_argument("--child", choices=("semdedup", "dbp", "backends"), help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", choices=("semdedup", "dbp", "backends"),
                        default=["semdedup", "dbp", "backends"])
    parser.add_argument("--no-report", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--report-only", action="store_true", help="write the section from the latest results")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.path)))
        return 0
    if args.report_only:
        return report_only(args)
    generation: dict[str, Any] = {}
    if not args.path.is_file() or len(np.load(args.path, mmap_mode="r")) != args.rows:
        started = time.perf_counter()
        generation = generate(args.path, args.rows)
        generation["seconds"] = time.perf_counter() - started
    else:
        generation = {"rows": args.rows,
                      "planted_duplicates": int(len(np.load(args.path.with_suffix(".duplicates.npy"))))}
    records: dict[str, dict[str, Any]] = {}
    machine = machine_info()
    for method in args.only:
        records[method] = {**run_child(method, args.path), "machine": machine}
        record = {**records[method], "dataset_rows": args.rows,
                  "date": _dt.datetime.now(_dt.timezone.utc).isoformat()}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        print(json.dumps(records[method]), file=sys.stderr)
    section = render(records, generation, args.rows)
    print(section)
    if not args.no_report and args.rows == 1_000_000:
        from data_pruning import BENCHMARKS_MD, write_marked_section

        write_marked_section(BENCHMARKS_MD, "data-pruning-scale", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
