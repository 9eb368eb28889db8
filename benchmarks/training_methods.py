"""Pruning during and before training on real digits: every prunekit.training method at one sparsity, same data,
same model (DigitsCNN), same optimizer and epochs, several seeds; writes its section of BENCHMARKS.md.

    nice -n 19 .venv/bin/python benchmarks/training_methods.py            # 3 seeds, 90% sparsity, ~2 min on 2 cores
    nice -n 19 .venv/bin/python benchmarks/training_methods.py --quick    # 1 seed, 3 epochs; no BENCHMARKS.md

Each finished run is appended to benchmarks/results/training_methods.jsonl; a rerun with the same settings reuses
those lines and trains only what is missing (--fresh starts over).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from prunekit.bench.machine import describe_all, machine_info
from prunekit.examples import DigitsCNN, accuracy, load_digits_data
from prunekit.training import (PDP, SAP, GradualPruning, IterativeSoftShrinkage, MaskSparsity, PruneAtInit, fit,
                               precrop)
from markdown_sections import replace_marked_block  # noqa: E402  (benchmarks/ is on sys.path)

MARKER = "training-methods"
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "training_methods.jsonl"


def load_done(path: Path, settings: dict[str, Any]) -> dict[tuple[str, int], dict[str, float]]:
    """Results already measured with these settings, by (method, seed); unreadable lines are skipped."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run
            if entry.get("settings") == settings:
                done[(entry["method"], entry["seed"])] = entry["result"]
    return done


def append_result(path: Path, settings: dict[str, Any], method: str, seed: int, result: dict[str, float]) -> None:
    """Append one run's result as a JSON line (flushed, so an interrupted run keeps what it finished)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps({"settings": settings, "method": method, "seed": seed, "result": result}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def weight_sparsity(model: nn.Module, dense_weights: int) -> float:
    """Zeros in the Linear/Conv weights plus weights removed by narrowing, over the dense model's weight count."""
    present = zeros = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            present += module.weight.numel()
            zeros += int((module.weight == 0).sum())
    return (dense_weights - present + zeros) / dense_weights


def methods(sparsity: float, steps: int, data: Any) -> dict[str, Callable[[nn.Module], list]]:
    """Callbacks per method; pruning during training ends at 60% of the steps, leaving the rest to fine-tune."""
    end = int(0.6 * steps)
    calibration = data.batches(batch_size=64, seed=99)[:1]
    return {
        "dense": lambda m: [],
        "gradual magnitude (Zhu & Gupta)": lambda m: [GradualPruning(m, "magnitude", final_sparsity=sparsity,
                                                                     end_step=end, frequency=4)],
        "ISS-P (shrink 0.5)": lambda m: [IterativeSoftShrinkage(m, sparsity, end, shrink=0.5, frequency=4)],
        "MaskSparsity (L1 0.02)": lambda m: [MaskSparsity(m, sparsity, end, strength=0.02)],
        "PDP (tau 1e-3)": lambda m: [PDP(m, sparsity, end, tau=1e-3)],
        "SNIP at init": lambda m: [PruneAtInit(m, "snip", sparsity, data=calibration)],
        "SAP (prune every 2 epochs)": lambda m: [SAP(m, prune_every=2, scope="layer")],
        "PreCropping (ERK widths)": "precrop",
    }


def run(name: str, make: Any, seed: int, epochs: int, sparsity: float, data: Any) -> dict[str, float]:
    """Train one seeded DigitsCNN with the method; returns test accuracy, weight sparsity and seconds."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    dense_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    started = time.perf_counter()
    callbacks = []
    if make == "precrop":
        precrop(model, sparsity, data.x_train[:4], "erk")
    else:
        callbacks = make(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    fit(model, lambda epoch: data.batches(seed=seed * 1000 + epoch), epochs, optimizer, callbacks=callbacks,
        progress=False)
    seconds = time.perf_counter() - started
    return {"accuracy": accuracy(model, data.x_test, data.y_test), "sparsity": weight_sparsity(model, dense_weights),
            "seconds": seconds}


def section(rows: dict[str, list[dict[str, float]]], settings: dict[str, Any]) -> str:
    """The BENCHMARKS.md section: machine, command, date, one row per method."""
    lines = ["## Pruning during and before training on digits (`benchmarks/training_methods.py`)", "",
             f"Machine: {settings['machine']}. Date: {settings['date']}. Command: "
             "`nice -n 19 .venv/bin/python benchmarks/training_methods.py`.", "",
             f"DigitsCNN on scikit-learn digits ({settings['n_train']} train / {settings['n_test']} test images), Adam "
             f"3e-3, {settings['epochs']} epochs of {settings['steps_per_epoch']} steps, target sparsity "
             f"{settings['sparsity']:.0%} of the Linear/Conv weights; methods that prune while training finish at "
             f"60% of the steps and fine-tune after. Seeds {settings['seeds']}; mean ± standard deviation. SAP picks its own "
             "sparsity; PreCropping removes channels (its sparsity counts the weights no longer there). Run times are "
             "left out: the machine was shared with other jobs, so they measure the neighbours (each run's seconds are "
             "in benchmarks/results/training_methods.jsonl).", "",
             "| method | test accuracy | vs dense | weight sparsity |", "|---|---|---|---|"]
    dense = statistics.mean(r["accuracy"] for r in rows["dense"])
    for name, results in rows.items():
        acc = [r["accuracy"] for r in results]
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        sparsity = statistics.mean(r["sparsity"] for r in results)
        lines.append(f"| {name} | {100 * statistics.mean(acc):.1f}% ± {100 * spread:.1f} | "
                     f"{100 * (statistics.mean(acc) - dense):+.1f} points | {100 * sparsity:.1f}% |")
    return "\n".join(lines) + "\n"


def write_marked_section(path: Path, text: str) -> None:
    """Replace the text between the section's markers (append them if absent), atomically."""
    start, end = f"<!-- {MARKER}: start -->", f"<!-- {MARKER}: end -->"
    replace_marked_block(path, start, end, f"{start}\n{text.rstrip()}\n{end}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs; prints, writes no BENCHMARKS.md")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fresh", action="store_true", help="ignore results saved by earlier runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs, seeds = (3, 1) if args.quick else (args.epochs, args.seeds)
    data = load_digits_data()
    steps = epochs * len(data.batches())
    table = methods(args.sparsity, steps, data)
    key = {"epochs": epochs, "sparsity": args.sparsity, "threads": 1}
    done = {} if args.fresh or args.quick else load_done(RESULTS, key)
    todo = [(name, seed) for name in table for seed in range(seeds) if (name, seed) not in done]
    if todo:
        run("warm-up", table["dense"], 999, 1, args.sparsity, data)  # first calls pay one-off costs: not timed
    machine = machine_info()  # stored with each run: results of earlier runs may come from another machine
    for name, seed in tqdm(todo, desc="training runs", unit="run", disable=None, file=sys.stderr):
        done[(name, seed)] = {**run(name, table[name], seed, epochs, args.sparsity, data), "machine": machine}
        if not args.quick:
            append_result(RESULTS, key, name, seed, done[(name, seed)])
    rows = {name: [done[(name, seed)] for seed in range(seeds)] for name in table}
    machines = describe_all(r.get("machine") for results in rows.values() for r in results)
    settings = {"machine": f"{machines}; one thread",
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "epochs": epochs,
                "steps_per_epoch": len(data.batches()), "sparsity": args.sparsity, "seeds": list(range(seeds)),
                "n_train": len(data.y_train), "n_test": len(data.y_test)}
    text = section(rows, settings)
    print(text)
    if not args.quick:
        write_marked_section(ROOT / "BENCHMARKS.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
