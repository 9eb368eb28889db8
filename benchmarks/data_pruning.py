#!/usr/bin/env python
"""Dataset pruning on Fashion-MNIST: test accuracy of a small CNN trained on the kept subset, per method and keep
fraction, with and without knowledge distillation from a teacher trained on the whole pool.

    .venv/bin/python benchmarks/data_pruning.py [--quick] [--only METHOD...] [--force] [--report-only]

1. Scoring run (once, cached under runs/data_pruning/): prunekit.data.train.SmallCNN trained on the pool (--pool
   training images, a seeded random subset of the 60,000, to keep the run affordable) for --teacher-steps steps
   (Adam, batch 128, seed 0). Forgetting events are counted at every presentation of this run; a snapshot after
   --snapshot-step steps (one epoch of the pool) gives EL2N (its softmax outputs) and GraNd (per-example gradient
   norms). The finished network is the distillation teacher, and its 128-d penultimate features are the embeddings
   for prototypes, SemDeDup and density-based pruning (k-means, --clusters clusters).
2. One cell per (method, keep fraction, distillation): a fresh SmallCNN (the same initialisation in every cell)
   trained for exactly --steps mini-batches of 128 drawn from the subset (the same budget for every method and
   fraction), then evaluated on the 10,000 test images. With distillation the loss is
   (1 - alpha) CE + alpha T^2 KL(teacher || student), alpha 0.9, T 4 (prunekit.distill.distillation_loss).

Every finished cell is appended to benchmarks/results/data_pruning.jsonl; a rerun skips cells already there with the
same settings (--force reruns). The full run rewrites the `data-pruning` section of BENCHMARKS.md (between marker
comments). --quick trains on 3,000 images with few steps, writes data_pruning.quick.jsonl and never BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from prunekit import data as D  # noqa: E402
from prunekit.bench.machine import describe_all, machine_info  # noqa: E402
from prunekit.data.train import SmallCNN, accuracy, penultimate, predict, train_steps  # noqa: E402
from prunekit.datasets import load_fashion_mnist  # noqa: E402
from markdown_sections import replace_marked_block  # noqa: E402  (benchmarks/ is on sys.path)

RESULTS = REPO / "benchmarks" / "results" / "data_pruning.jsonl"
QUICK_RESULTS = REPO / "benchmarks" / "results" / "data_pruning.quick.jsonl"
CACHE = REPO / "runs" / "data_pruning"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
SECTION = "data-pruning"
METHODS = ("random", "el2n", "grand", "forgetting", "prototypes", "prototypes-easy", "semdedup", "dbp")
FRACTIONS = (0.1, 0.3, 0.5, 0.7)
KD_ALPHA, KD_TEMPERATURE = 0.9, 4.0


def settings_of(args: argparse.Namespace, n_train: int) -> dict[str, Any]:
    """Everything that changes a cell's result; cells with other settings are not reused."""
    return {"steps": args.steps, "teacher_steps": args.teacher_steps, "snapshot_step": args.snapshot_step,
            "batch_size": 128, "lr": 2e-3, "seed": args.seed, "width": args.width, "clusters": args.clusters,
            "n_train": n_train,
            "kd_alpha": KD_ALPHA, "kd_temperature": KD_TEMPERATURE, "quick": args.quick}


def load_data(pool: int, quick: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded random pool of Fashion-MNIST training images and the test set (quick: 1,000 test images)."""
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    chosen = torch.as_tensor(np.sort(np.random.default_rng(0).permutation(len(y))[:pool]))
    x, y = x[chosen], y[chosen]
    return (x, y, xt[:1000], yt[:1000]) if quick else (x, y, xt, yt)


def scoring_run(x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """Teacher, scores and embeddings: computed once, then read back from `cache` (safetensors + npz)."""
    from safetensors.torch import load_file, save_file

    weights, arrays, meta = cache / "teacher.safetensors", cache / "scores.npz", cache / "scoring.json"
    key = {k: v for k, v in settings_of(args, len(x)).items() if k not in ("steps", "kd_alpha", "kd_temperature")}
    teacher = SmallCNN(width=args.width)
    if weights.is_file() and arrays.is_file() and meta.is_file() and json.loads(meta.read_text())["key"] == key:
        teacher.load_state_dict(load_file(weights))
        with np.load(arrays) as stored:
            return {"teacher": teacher.eval(), **{name: stored[name] for name in stored.files},
                    **json.loads(meta.read_text())["info"]}
    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    teacher = SmallCNN(width=args.width)
    started = time.perf_counter()
    run = train_steps(teacher, x, y, steps=args.teacher_steps, seed=args.seed, track_forgetting=True,
                      snapshot_step=args.snapshot_step)
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    el2n = D.el2n_scores(predict(run.snapshot, x), y)
    el2n_seconds = time.perf_counter() - started
    started = time.perf_counter()
    grand = D.grand_scores(run.snapshot, x, y)
    grand_seconds = time.perf_counter() - started
    out = {"el2n": el2n, "grand": grand, "forgetting": run.tracker.counts(), "embeddings": penultimate(teacher, x)}
    info = {"teacher_train_seconds": train_seconds, "el2n_seconds": el2n_seconds, "grand_seconds": grand_seconds}
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(weights))
    temp = cache / f".scores.{os.getpid()}.npz"
    np.savez(temp, **out)
    os.replace(temp, arrays)
    meta.write_text(json.dumps({"key": key, "info": info}, indent=1))
    return {"teacher": teacher.eval(), **out, **info}


def subset_for(method: str, keep: float, scored: dict[str, Any], clustering: D.Clustering, y: torch.Tensor,
               seed: int) -> np.ndarray:
    """Indices of the kept training examples for one method and keep fraction."""
    if method == "random":
        return D.select(D.random_scores(len(y), seed), keep)
    if method in ("el2n", "grand", "forgetting"):
        return D.select(scored[method], keep, hardness="hard")
    embeddings = scored["embeddings"]
    if method in ("prototypes", "prototypes-easy"):
        scores = D.prototype_scores(embeddings, clustering.n_clusters, clustering=clustering, progress=False)
        return D.select(scores, keep, hardness="easy" if method.endswith("easy") else "hard")
    if method == "semdedup":
        return D.semdedup(embeddings, keep=keep, clustering=clustering, progress=False).keep
    if method == "dbp":
        return D.density_based_selection(embeddings, keep, clustering=clustering, progress=False).keep
    raise ValueError(method)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every JSON line of a results file (none if it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk (an interrupted run keeps every finished cell)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def run_cell(method: str, keep: float, kd: bool, indices: np.ndarray, data: tuple, teacher: torch.nn.Module,
             args: argparse.Namespace) -> dict[str, Any]:
    """Train a fresh student on the subset for the fixed step budget; its test accuracy."""
    x, y, xt, yt = data
    torch.manual_seed(args.seed + 1)  # the same initialisation in every cell
    student = SmallCNN(width=args.width)
    index = torch.as_tensor(indices)
    started = time.perf_counter()
    run = train_steps(student, x[index], y[index], steps=args.steps, seed=args.seed + 1,
                      teacher=teacher if kd else None, alpha=KD_ALPHA, temperature=KD_TEMPERATURE, progress=False)
    seconds = time.perf_counter() - started
    counts = np.bincount(y[index].numpy(), minlength=10)
    return {"method": method, "keep": keep, "kd": kd, "kept": int(len(indices)),
            "test_accuracy": accuracy(student, xt, yt), "train_loss": run.final_loss, "train_seconds": seconds,
            "smallest_class_share": float(counts.min() / counts.sum())}


def _cell_text(cell: dict[str, Any] | None, base: dict[str, Any] | None) -> str:
    """Accuracy, and the difference to random in points when there is a random cell to compare with."""
    if cell is None:
        return "-"
    text = f"{cell['test_accuracy']:.2%}"
    if base is not None and cell is not base:
        text += f" ({100 * (cell['test_accuracy'] - base['test_accuracy']):+.1f})"
    return text


def render(records: list[dict[str, Any]], settings: dict[str, Any], scoring: dict[str, Any]) -> str:
    """The BENCHMARKS.md section: one table without and one with distillation, accuracy and difference to random."""
    cells = {(r["method"], r["keep"], r["kd"]): r for r in records}
    date = max(r["date"] for r in records)
    pool, steps = settings["n_train"], settings["steps"]
    passes = settings["teacher_steps"] * 128 / pool
    lines = [
        "## Dataset pruning (Fashion-MNIST)", "",
        f"Machine: {describe_all(r.get('machine') for r in records)}. Date: {date}. 1 thread.",
        "Command: `nice -n 19 .venv/bin/python benchmarks/data_pruning.py` (then `--report-only` to write this)", "",
        f"SmallCNN of width {settings['width']} (2 conv + 2 linear). Pool: {pool:,} Fashion-MNIST training images "
        f"(a seeded random subset of the 60,000, to fit the shared machine). Scoring run and teacher: the whole pool, "
        f"{settings['teacher_steps']} Adam steps of 128, seed {settings['seed']} (teacher test accuracy "
        f"{scoring['teacher_accuracy']:.2%}). EL2N and GraNd from the snapshot after {settings['snapshot_step']} "
        f"steps (one seed, not the paper's average over ten); forgetting events counted over the scoring run's "
        f"{passes:.1f} passes; prototypes, SemDeDup and DBP on the teacher's 128-d penultimate features (supervised "
        f"features: no self-supervised image model is available offline), k-means with {settings['clusters']} "
        f"clusters (faiss), DBP tau 0.5, 20 neighbouring centroids. Every cell: a fresh SmallCNN with the same "
        f"initialisation, exactly {steps} steps of 128 drawn from the subset, test accuracy on the 10,000 test images. "
        f"All methods keep the hardest examples except `prototypes-easy`. Distillation: (1 - alpha) CE + alpha T^2 KL, "
        f"alpha {KD_ALPHA}, T {KD_TEMPERATURE:g}, teacher above. In brackets: the difference to `random` in "
        f"percentage points (same run, same step budget). One seed per cell; seed-to-seed noise was not measured.", ""]
    methods, fractions = list(METHODS), sorted({*FRACTIONS, *(k[1] for k in cells if k[0] != "full")})
    missing = [(m, f, kd) for m in methods for f in fractions for kd in (False, True) if (m, f, kd) not in cells]
    if missing:
        lines += [f"{len(missing)} of {2 * len(methods) * len(fractions)} cells were not run (the run was stopped); "
                  "they show as -.", ""]
    for kd in (False, True):
        full = cells.get(("full", 1.0, kd))
        title = "with distillation from the teacher" if kd else "cross-entropy only"
        reference = f" (the whole pool, same steps: {full['test_accuracy']:.2%})" if full else ""
        lines += [f"Test accuracy, {title}{reference}:", "",
                  "| method | " + " | ".join(f"keep {f:.0%}" for f in fractions) + " |",
                  "|---|" + "---|" * len(fractions)]
        for method in methods:
            row = [_cell_text(cells.get((method, f, kd)), cells.get(("random", f, kd))) for f in fractions]
            lines.append(f"| `{method}` | " + " | ".join(row) + " |")
        lines.append("")
    full, smallest = cells.get(("full", 1.0, False)), cells.get(("random", fractions[0], False))
    if full and smallest:
        lines += [f"The step budget, not the data, limits these students: with {steps} steps a random "
                  f"{fractions[0]:.0%} subset reaches {smallest['test_accuracy']:.2%} against "
                  f"{full['test_accuracy']:.2%} for the whole pool, so a subset of the hardest examples only removes "
                  f"the easy, typical ones the budget would have learned first.", ""]
    seconds = [r["train_seconds"] for r in records]
    lines += [f"Wall times (contended machine): scoring run {scoring['teacher_train_seconds']:.0f} s, EL2N "
              f"{scoring['el2n_seconds']:.1f} s, GraNd {scoring['grand_seconds']:.0f} s ({pool:,} per-example "
              f"gradients); each cell trains in {np.median(seconds):.0f} s (median).", ""]
    return "\n".join(lines)


def write_marked_section(path: Path, name: str, section: str) -> None:
    """Replace the text between `<!-- name: start -->` and `<!-- name: end -->` (append both if absent), atomically."""
    start, end = f"<!-- {name}: start -->", f"<!-- {name}: end -->"
    replace_marked_block(path, start, end, f"{start}\n{section.rstrip()}\n{end}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3,000 images, few steps; no BENCHMARKS.md")
    parser.add_argument("--only", nargs="+", choices=METHODS, help="run only these methods")
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    parser.add_argument("--steps", type=int, help="optimisation steps per cell (default 120; quick 40)")
    parser.add_argument("--teacher-steps", type=int, help="steps of the scoring run (default 400; quick 120)")
    parser.add_argument("--snapshot-step", type=int, help="EL2N/GraNd snapshot (default 80; quick 24)")
    parser.add_argument("--clusters", type=int, default=100, help="k-means clusters (default 100)")
    parser.add_argument("--pool", type=int, help="training images to prune from, a seeded random subset of the "
                        "60,000 (default 10,000; quick 3,000)")
    parser.add_argument("--width", type=int, default=8, help="SmallCNN width: channels of the first conv (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rerun cells already in the results file")
    parser.add_argument("--report-only", action="store_true", help="rewrite the BENCHMARKS.md section from results")
    parser.add_argument("--no-report", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)
    args.steps = args.steps or (40 if args.quick else 120)
    args.teacher_steps = args.teacher_steps or (120 if args.quick else 400)
    args.snapshot_step = args.snapshot_step or (24 if args.quick else 80)
    args.pool = args.pool or (3000 if args.quick else 10000)
    torch.set_num_threads(1)  # a shared 2-core machine: one core for this job

    data = load_data(args.pool, args.quick)
    x, y, xt, yt = data
    settings = settings_of(args, len(x))
    results = QUICK_RESULTS if args.quick else RESULTS
    records = [r for r in read_records(results) if r.get("settings") == settings]
    cache = CACHE / ("quick" if args.quick else "full")
    scored = scoring_run(x, y, args, cache)
    teacher = scored["teacher"]
    scored["teacher_accuracy"] = accuracy(teacher, xt, yt)
    if not args.report_only:
        done = {(r["method"], r["keep"], r["kd"]) for r in records}
        clustering = D.kmeans(D.prepare(scored["embeddings"]), args.clusters, seed=args.seed, progress=False)
        # Cross-entropy cells first, then distillation: an interrupted run leaves whole tables.
        plan = [(m, f, kd) for kd in (False, True) for m, f in
                [("full", 1.0)] + [(m, f) for f in args.fractions for m in (args.only or METHODS)]]
        from tqdm import tqdm

        machine = machine_info()
        for method, keep, kd in tqdm(plan, desc="cells", unit="cell", file=sys.stderr):
            if (method, keep, kd) in done and not args.force:
                continue
            indices = np.arange(len(y)) if method == "full" else subset_for(method, keep, scored, clustering, y,
                                                                             args.seed)
            record = run_cell(method, keep, kd, indices, data, teacher, args)
            record.update(settings=settings, date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
                          machine=machine)
            append_record(results, record)
            records = [r for r in records if (r["method"], r["keep"], r["kd"]) != (method, keep, kd)] + [record]
            print(json.dumps({k: record[k] for k in ("method", "keep", "kd", "test_accuracy")}), file=sys.stderr)
    section = render(records, settings, scored)
    print(section)
    if not args.quick and not args.no_report:
        write_marked_section(BENCHMARKS_MD, SECTION, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
