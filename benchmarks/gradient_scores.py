"""One-shot gradient scores on a trained Fashion-MNIST CNN: Taylor (Molchanov et al. 2019) and SNIP (Lee et al.
2019) against random and magnitude pruning, under the same global budget, with no fine-tuning.

The dense CNN (prunekit.bench.tasks.ConvNet, width 16) is trained once on the 60,000 training images and cached as
safetensors; every row prunes a copy of it and measures test accuracy on the 10,000 test images. Data-driven rows
use calibration batches of 128 training images drawn with seeds 0, 1, 2 (mean +- std over them); random uses seeds
0, 1, 2. The row `|w mean_b g_b|` is the score prunekit shipped for both `taylor` and `snip` before this benchmark
(the batch-mean gradient, then the absolute value), kept here as the "before" figure.

    .venv/bin/python benchmarks/gradient_scores.py              # train (or load) the CNN, prune, write BENCHMARKS.md
    .venv/bin/python benchmarks/gradient_scores.py --no-write   # print the section only

Results: benchmarks/results/gradient_scores.json; BENCHMARKS.md section "gradient-scores".
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

import prunekit  # noqa: E402
from prunekit import masks  # noqa: E402
from markdown_sections import replace_marked_block  # noqa: E402
from prunekit.bench.machine import describe, machine_info, software  # noqa: E402
from prunekit.bench.tasks import ConvNet  # noqa: E402
from prunekit.datasets import load_fashion_mnist  # noqa: E402
from prunekit.scores import register_score  # noqa: E402
from prunekit.scores.context import ScoreContext  # noqa: E402
from prunekit.scores.gradient import accumulated_gradients, requiring_grad  # noqa: E402
from prunekit.zoo import cache_root  # noqa: E402

MARKER = "gradient-scores"
RESULTS = ROOT / "benchmarks" / "results" / "gradient_scores.json"
SPARSITIES = (0.5, 0.8, 0.9)
SEEDS = (0, 1, 2)
WIDTH, EPOCHS, BATCH, LR, TRAIN_SEED = 16, 4, 128, 2e-3, 0
CALIBRATION_BATCHES = 8
OLD_SCORE = "taylor-mean-abs-old"
TAYLOR = f"taylor, {CALIBRATION_BATCHES} batches (order 1)"
PER_EXAMPLE_ROW = f"diagnostic: order 2 with the per-example Fisher, {CALIBRATION_BATCHES} batches"


@register_score(OLD_SCORE, needs_data=True)
def mean_then_abs(ctx: ScoreContext) -> list[torch.Tensor]:
    """The score prunekit shipped for 'taylor' and 'snip' until this benchmark: |w * mean_b g_b|."""
    return [(w.detach().float() * g).abs() for w, g in zip(ctx.weights(), accumulated_gradients(ctx, "taylor"))]


PER_EXAMPLE = "taylor-order2-per-example-fisher"


@register_score(PER_EXAMPLE, needs_data=True)
def order2_per_example_fisher(ctx: ScoreContext) -> list[torch.Tensor]:
    """Diagnostic, not a prunekit score: order 2's mean_b (w g_b - F w^2 / 2)^2 with F = mean_n g_n^2 over the
    batches' single examples instead of over batch gradients."""
    weights = ctx.weights()
    first = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    second = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    fisher = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    batches = examples = 0
    with requiring_grad(weights):
        for xb, yb in ctx.batches():
            grads = torch.autograd.grad(F.cross_entropy(ctx.model(xb), yb), weights)
            for a, b, g in zip(first, second, grads):
                a += g.double()
                b += g.double() ** 2
            batches += 1
            for i in range(len(yb)):
                grads = torch.autograd.grad(F.cross_entropy(ctx.model(xb[i:i + 1]), yb[i:i + 1]), weights)
                for f, g in zip(fisher, grads):
                    f += g.double() ** 2
                examples += 1
    scores = []
    for w, a, b, f in zip(weights, first, second, fisher):
        w = w.detach().double()
        c = 0.5 * (f / examples) * w * w
        scores.append((w * w * b / batches - 2 * c * w * a / batches + c * c).clamp_min(0).float())
    return scores


# Rows: label -> (score, prune keywords besides data, how many calibration batches (0: data-free))
ROWS: dict[str, tuple[str, dict[str, Any], int]] = {
    "magnitude": ("magnitude", {}, 0),
    "random": ("random", {}, 0),
    TAYLOR: ("taylor", {}, CALIBRATION_BATCHES),
    f"taylor, {CALIBRATION_BATCHES} batches (order 2)": ("taylor", {"taylor_order": 2}, CALIBRATION_BATCHES),
    PER_EXAMPLE_ROW: (PER_EXAMPLE, {}, CALIBRATION_BATCHES),
    "taylor, 32 batches (order 1)": ("taylor", {}, 32),
    "snip, 1 batch": ("snip", {}, 1),
    f"before: \\|w mean_b g_b\\|, {CALIBRATION_BATCHES} batches (old taylor = old snip)": (OLD_SCORE, {},
                                                                                        CALIBRATION_BATCHES),
}


def fashion() -> tuple[torch.Tensor, ...]:
    """Train and test images and labels (all of them)."""
    x, y = load_fashion_mnist("train")
    tx, ty = load_fashion_mnist("test")
    return x, y, tx, ty


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy in eval mode, in chunks."""
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(y), 1000))
    return hits / len(y)


def dense_model(x: torch.Tensor, y: torch.Tensor, log: Callable[[str], None]) -> tuple[nn.Module, dict[str, Any]]:
    """The trained CNN: loaded from the cache when its weights are there, else trained and saved (atomically)."""
    path = cache_root() / "bench-gradient-scores" / f"convnet{WIDTH}-fmnist-e{EPOCHS}-s{TRAIN_SEED}.safetensors"
    torch.manual_seed(TRAIN_SEED)
    model = ConvNet(1, 10, WIDTH)
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model, {"cached": True, "path": str(path)}
    log(f"training ConvNet width {WIDTH} on {len(y)} Fashion-MNIST images, {EPOCHS} epochs")
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(TRAIN_SEED)
    started = time.perf_counter()
    for epoch in range(EPOCHS):
        model.train()
        for index in torch.randperm(len(y), generator=generator).split(BATCH):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
        log(f"  epoch {epoch + 1}/{EPOCHS} done ({time.perf_counter() - started:.0f} s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(temp))
    os.replace(temp, path)
    return model, {"cached": False, "path": str(path), "train_seconds": round(time.perf_counter() - started, 1)}


def calibration(x: torch.Tensor, y: torch.Tensor, seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n batches of BATCH training images from an order of their own."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 + seed))[: n * BATCH]
    return [(x[i], y[i]) for i in order.split(BATCH)]


def pruned(dense: nn.Module, score: str, sparsity: float, seed: int, data: Any, n_batches: int,
           options: dict[str, Any]) -> nn.Module:
    """A copy of the dense model pruned one-shot under the global budget."""
    model = copy.deepcopy(dense).eval()  # eval: BatchNorm keeps its trained statistics in the scoring passes
    extra = {"data": data, "n_batches": n_batches} if data is not None else {}
    if score == "random":
        extra["seed"] = seed  # only the random score reads it (data rows are seeded by their batches)
    prunekit.prune(model, "magnitude", sparsity, score=score, budget="global", **extra, **options)
    return model


def kept_masks(model: nn.Module) -> list[torch.Tensor]:
    """The masks prunekit attached, in module order."""
    return [mask.clone() for _, _, _, mask in masks.masked_modules(model)]


def classifier_rows_of(found: list[torch.Tensor]) -> list[int]:
    """Weights kept in each class's row of the classifier (the last mask)."""
    return [int(v) for v in found[-1].sum(dim=1)]


def classifier_rows(model: nn.Module) -> list[int]:
    return classifier_rows_of(kept_masks(model))


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Share of the weights kept by `a` that `b` keeps too."""
    both = sum(int((p & q).sum()) for p, q in zip(a, b))
    return both / sum(int(p.sum()) for p in a)


def fisher_ratio(dense: nn.Module, x: torch.Tensor, y: torch.Tensor, examples: int = 256) -> float:
    """Sum over the weights of the per-example empirical Fisher mean_n g_n^2 over that of the per-batch one
    mean_b g_b^2 (order 2's F): how much curvature the batch-level estimate leaves out."""
    model = copy.deepcopy(dense).eval()
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def squared_gradient(xb: torch.Tensor, yb: torch.Tensor) -> float:
        grads = torch.autograd.grad(F.cross_entropy(model(xb), yb), weights)
        return sum(float((g.double() ** 2).sum()) for g in grads)

    batches = calibration(x, y, 0, CALIBRATION_BATCHES)
    per_batch = statistics.mean(squared_gradient(xb, yb) for xb, yb in batches)
    images, labels = torch.cat([b[0] for b in batches])[:examples], torch.cat([b[1] for b in batches])[:examples]
    per_example = statistics.mean(squared_gradient(images[i:i + 1], labels[i:i + 1]) for i in range(examples))
    return per_example / per_batch


def run(log: Callable[[str], None]) -> dict[str, Any]:
    """Every row at every sparsity; accuracies in [0, 1]."""
    torch.set_num_threads(1)
    x, y, tx, ty = fashion()
    dense, dense_info = dense_model(x, y, log)
    dense_info["accuracy"] = accuracy(dense, tx, ty)
    log(f"dense test accuracy {100 * dense_info['accuracy']:.2f}%")
    rows: dict[str, dict[str, list[float]]] = {label: {} for label in ROWS}
    seconds: dict[str, float] = {}
    overlap: dict[str, dict[str, list[float]]] = {"snip": {}, "magnitude": {}}
    rows_kept: dict[str, list[list[int]]] = {}
    magnitude_masks = {s: kept_masks(pruned(dense, "magnitude", s, 0, None, 0, {})) for s in SPARSITIES}
    for label, (score, options, n_batches) in ROWS.items():
        started = time.perf_counter()
        seeds = (0,) if score == "magnitude" else SEEDS
        for sparsity in SPARSITIES:
            values = []
            for seed in seeds:
                data = calibration(x, y, seed, n_batches) if n_batches else None
                model = pruned(dense, score, sparsity, seed, data, n_batches, options)
                values.append(accuracy(model, tx, ty))
                if label == TAYLOR:
                    snip = pruned(dense, "snip", sparsity, seed, calibration(x, y, seed, 1), 1, {})
                    overlap["snip"].setdefault(str(sparsity), []).append(agreement(kept_masks(model),
                                                                                   kept_masks(snip)))
                    overlap["magnitude"].setdefault(str(sparsity), []).append(
                        agreement(kept_masks(model), magnitude_masks[sparsity]))
                    rows_kept.setdefault(str(sparsity), []).append(classifier_rows(model))
            rows[label][str(sparsity)] = values
            log(f"{label} at {100 * sparsity:g}%: " + ", ".join(f"{100 * v:.2f}" for v in values))
        seconds[label] = round(time.perf_counter() - started, 1)
    return {"dense": dense_info, "rows": rows, "seconds": seconds, "taylor_overlap": overlap, "taylor_classifier_rows": rows_kept,
            "magnitude_classifier_rows": {str(k): classifier_rows_of(v) for k, v in magnitude_masks.items()},
            "fisher_ratio": fisher_ratio(dense, x, y),
            "settings": {"model": f"ConvNet width {WIDTH}", "epochs": EPOCHS, "batch": BATCH, "lr": LR,
                         "train_seed": TRAIN_SEED, "calibration_batch": BATCH, "sparsities": list(SPARSITIES),
                         "seeds": list(SEEDS), "threads": 1},
            "machine": machine_info(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


def cell(values: list[float]) -> str:
    """Mean +- std (percent) over seeds; the single value where there is one."""
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def mean(result: dict[str, Any], label: str, sparsity: float) -> float:
    return statistics.mean(result["rows"][label][str(sparsity)])


def verdicts(result: dict[str, Any]) -> list[str]:
    """Taylor (order 1, the default) against random and magnitude at each sparsity."""
    lines = []
    for s in SPARSITIES:
        t, r, m = mean(result, TAYLOR, s), mean(result, "random", s), mean(result, "magnitude", s)
        lines.append(f"{100 * s:g}%: taylor {100 * t:.2f} vs random {100 * r:.2f} "
                     f"({'at least as good' if t >= r else 'WORSE'}, {100 * (t - r):+.2f} points) and magnitude "
                     f"{100 * m:.2f} ({100 * (t - m):+.2f} points)")
    return lines


def reading(result: dict[str, Any]) -> list[str]:
    """What the numbers say about the goal (Taylor >= random, near magnitude), each claim computed from them."""
    order2 = f"taylor, {CALIBRATION_BATCHES} batches (order 2)"
    behind = [s for s in SPARSITIES if mean(result, TAYLOR, s) < mean(result, "magnitude", s)]
    worse = [s for s in SPARSITIES if mean(result, TAYLOR, s) < mean(result, "random", s)]
    lines = [("taylor is at least as good as random at every sparsity" if not worse else
              "taylor is WORSE than random at " + ", ".join(f"{100 * s:g}%" for s in worse))
             + "; the old |w mean_b g_b| gave " + ", ".join(
                 f"{100 * mean(result, list(ROWS)[-1], s):.2f}" for s in SPARSITIES)
             + " at " + "/".join(f"{100 * s:g}" for s in SPARSITIES) + "%, the corrected score "
             + ", ".join(f"{100 * mean(result, TAYLOR, s):.2f}" for s in SPARSITIES) + "."]
    parts = []
    for s in SPARSITIES:
        rows, by_magnitude = result["taylor_classifier_rows"][str(s)], result["magnitude_classifier_rows"][str(s)]
        empty = [sum(1 for v in r if v == 0) for r in rows]
        parts.append(f"{100 * s:g}%: {min(min(r) for r in rows)} to {max(max(r) for r in rows)} (magnitude "
                     f"{min(by_magnitude)} to {max(by_magnitude)}; classes left with no weight, per seed: "
                     f"{', '.join(map(str, empty))})")
    lines.append(f"Weights of each class's row of the classifier ({2 * WIDTH * 16}) that taylor keeps: "
                 + "; ".join(parts) + ". A class the calibration batches already fit has g ≈ 0 on its logit's "
                 "weights, so its whole row scores near 0 and goes first: taylor starves the easy classes.")
    for s in behind:
        shared = statistics.mean(result["taylor_overlap"]["magnitude"][str(s)])
        gap = 100 * (mean(result, "magnitude", s) - mean(result, TAYLOR, s))
        lines.append(
            f"Why taylor stays {gap:.1f} points behind magnitude at {100 * s:g}%: it keeps only {100 * shared:.1f}% "
            "of the weights magnitude keeps. mean_b (w·g_b)² = w²·mean_b g_b² is the diagonal empirical-Fisher "
            "(OBD-like) saliency of removing one weight alone; its second-order correction is negligible: order 2 "
            f"gives {100 * mean(result, order2, s):.2f} (order 1 {100 * mean(result, TAYLOR, s):.2f}), and "
            f"{100 * mean(result, PER_EXAMPLE_ROW, s):.2f} even with the per-example Fisher (diagnostic row, "
            f"{result['fisher_ratio']:.0f}x larger than the batch-level one). More batches lower the noise of the "
            f"estimate (32 batches: {100 * mean(result, 'taylor, 32 batches (order 1)', s):.2f}) but not the gap: "
            "a per-weight estimate taken at the dense point misses how the removed weights interact when half of "
            "them go at once. Molchanov et al. prune a few units at a time with fine-tuning in between; one-shot "
            "removal of half the weights is outside the regime the estimate is made for.")
    return lines


def compare_runs(previous: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """How the accuracies of the cells two runs share differ (a check that the benchmark is deterministic)."""
    diffs = [abs(a - b) for label, cells in result["rows"].items() if label in previous.get("rows", {})
             for key, values in cells.items() if key in previous["rows"][label]
             for a, b in zip(values, previous["rows"][label][key])]
    return {"date": previous.get("machine", {}).get("date"), "cells": len(diffs),
            "max_points": 100 * max(diffs) if diffs else None}


def section(result: dict[str, Any]) -> str:
    """The BENCHMARKS.md section between the markers."""
    settings, dense = result["settings"], result["dense"]
    head = "| score (one-shot, global budget, no fine-tuning) | " + " | ".join(f"{100 * s:g}%" for s in SPARSITIES)
    lines = [f"<!-- {MARKER}: start (written by benchmarks/gradient_scores.py) -->",
             "## Gradient scores one-shot on a trained Fashion-MNIST CNN (`benchmarks/gradient_scores.py`)", "",
             f"Machine: {describe(result['machine'])}; {software(result['machine'])}; one intra-op thread, shared "
             f"with other jobs (accuracies do not depend on the load). Date: {result['date']}. Command: "
             "`.venv/bin/python benchmarks/gradient_scores.py` (the dense weights are cached as safetensors under "
             "the prunekit cache, bench-gradient-scores/).", "",
             f"{settings['model']} trained {settings['epochs']} epochs (Adam, lr {settings['lr']}, batch "
             f"{settings['batch']}, seed {settings['train_seed']}) on the 60,000 training images: dense test "
             f"accuracy {100 * dense['accuracy']:.2f}% on the 10,000 test images. Every row prunes a copy of it "
             "with `prunekit.prune(model, 'magnitude', s, score=..., budget='global')` (one threshold over the "
             "three Linear/Conv weights, no floor) and measures test accuracy right away. Data rows: calibration "
             f"batches of {settings['calibration_batch']} training images drawn with seeds 0, 1, 2; random: seeds "
             "0, 1, 2 (mean ± std). Taylor: mean_b (w·g_b)² (order 2: mean_b (w·g_b − F·w²/2)², F = mean_b g_b²); "
             "SNIP: |g·w| / Σ|g·w| on the first batch; the last row is the score prunekit used for both before "
             "(|w · mean_b g_b|).", "",
             head + " |", "|---|" + "---|" * len(SPARSITIES)]
    for label in ROWS:
        lines.append(f"| {label} | " + " | ".join(cell(result["rows"][label][str(s)]) for s in SPARSITIES) + " |")
    overlap = result["taylor_overlap"]
    lines += ["", *[f"- {line}" for line in verdicts(result)], *[f"- {line}" for line in reading(result)],
              *[f"- share of the weights taylor ({CALIBRATION_BATCHES} batches) keeps that {other} keeps too, mean "
                "over seeds: " + ", ".join(f"{100 * float(s):g}%: {100 * statistics.mean(v):.1f}%"
                                            for s, v in overlap[other].items()) for other in overlap],
              f"- the per-example empirical Fisher mean_n g_n² (256 training images) is {result['fisher_ratio']:.0f}x "
              f"the per-batch mean_b g_b² that order 2 uses (batches of {settings['calibration_batch']}: "
              f"mean_b g_b² ≈ ḡ² + σ²/{settings['calibration_batch']})",
              *([f"- a previous run ({result['previous_run']['date']}) of the {result['previous_run']['cells']} "
                 "seeded cells both runs have: " + ("the same accuracies" if result["previous_run"]["max_points"] == 0
                                                     else f"at most {result['previous_run']['max_points']:.2f} points "
                                                     "apart")] if result.get("previous_run") else []),
              f"- pruning and evaluating every row took {sum(result['seconds'].values()) / 60:.1f} min"
              + (f"; training the dense CNN {dense['train_seconds'] / 60:.1f} min" if dense.get("train_seconds")
                 else " (dense weights loaded from the cache)"),
              "", f"<!-- {MARKER}: end -->"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print the section; leave BENCHMARKS.md alone")
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the saved results")
    args = parser.parse_args()
    if args.report_only:
        result = json.loads(RESULTS.read_text(encoding="utf-8"))
    else:
        previous = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.is_file() else None
        result = run(lambda message: print(message, flush=True))
        if previous is not None:
            result["previous_run"] = compare_runs(previous, result)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        temp = RESULTS.with_name(f".{RESULTS.name}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(temp, RESULTS)
    text = section(result)
    print(text)
    if not args.no_write:
        replace_marked_block(ROOT / "BENCHMARKS.md", f"<!-- {MARKER}: start", f"<!-- {MARKER}: end -->", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
