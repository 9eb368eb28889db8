#!/usr/bin/env python
"""Out-of-core pruning on SmolLM2-135M: peak memory of `prunekit prune` in memory vs `--out-of-core`, same result.

    .venv/bin/python benchmarks/out_of_core.py [--method wanda sparsegpt] [--samples 128] [--seq-len 256]

Per method, the same CLI job (embedded calibration text, 50%, perplexity before and after on 8192 held-out tokens,
the pruned model written to a folder) runs once in memory and once with --out-of-core, each in its own process whose
peak resident memory (VmHWM, read at exit) is recorded. The two folders are compared tensor by tensor (bitwise). A
third process measures the floor every run pays: importing torch and transformers' Llama code, building the empty
model and loading the tokenizer. Writes the "Out-of-core pruning" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from markdown_sections import replace_marked_block  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
MARK_START = "<!-- out-of-core: start (written by benchmarks/out_of_core.py) -->"
MARK_END = "<!-- out-of-core: end -->"

# Runs the CLI and prints this process's peak resident memory on stderr at exit.
PEAK_WRAPPER = """
import atexit, sys
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("PEAK_RSS_KIB", line.split()[1], file=sys.stderr)
atexit.register(_peak)
from prunekit.cli import main
sys.exit(main(sys.argv[1:]))
"""

FLOOR = """
import sys, torch
from transformers import AutoTokenizer
from prunekit.streaming import empty_causal_lm, resolve_folder
folder = resolve_folder("smollm2-135m")
model = empty_causal_lm(folder, torch.float32)
tokenizer = AutoTokenizer.from_pretrained(folder)
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print("PEAK_RSS_KIB", line.split()[1], file=sys.stderr)
"""


def run(code: str, args: list[str]) -> tuple[float, float, dict | None]:
    """(wall seconds, peak RSS MiB, the --json output or None)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"failed: {args}\n{result.stderr[-3000:]}")
    peak = [line for line in result.stderr.splitlines() if line.startswith("PEAK_RSS_KIB")]
    output = json.loads(result.stdout) if result.stdout.strip() else None
    return seconds, int(peak[-1].split()[1]) / 1024, output


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    merged = {}
    for path in sorted(folder.glob("*.safetensors")):
        merged.update(load_file(path))
    return merged


def compare(one: Path, two: Path) -> tuple[int, int]:
    """(tensors bitwise equal, tensors in the in-memory folder); names must match too."""
    import torch

    a, b = tensors(one), tensors(two)
    if set(a) != set(b):
        raise SystemExit(f"the folders hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    return sum(torch.equal(a[k], b[k]) for k in a), len(a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", nargs="+", default=["wanda", "sparsegpt"],
                        choices=("wanda", "sparsegpt", "owl", "owl-sparsegpt"))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--no-report", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()
    from prunekit.bench.machine import describe, machine_info, software

    machine = machine_info()  # before the runs: the load average it records is the one they start under

    _, floor_mib, _ = run(FLOOR, [])
    rows = []
    # The pruning job alone for every method, then the first method again with perplexity before and after.
    for method, evaluate in [(m, False) for m in args.method] + [(args.method[0], True)]:
        work = Path(tempfile.mkdtemp(prefix="prunekit-ooc-"))
        common = ["prune", "smollm2-135m", "--method", method, "--sparsity", "0.5", "--n-samples", str(args.samples),
                  "--seq-len", str(args.seq_len), "--json", "-q", *([] if evaluate else ["--no-eval"])]
        try:
            mem_s, mem_peak, mem = run(PEAK_WRAPPER, [*common, "--out", str(work / "memory")])
            ooc_s, ooc_peak, ooc = run(PEAK_WRAPPER, [*common, "--out", str(work / "ooc"), "--out-of-core"])
            same, total = compare(work / "memory", work / "ooc")
            shards = len(list((work / "ooc").glob("*.safetensors")))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows.append(dict(method=method, evaluate=evaluate, mem_s=mem_s, mem_peak=mem_peak, mem=mem, ooc_s=ooc_s, ooc_peak=ooc_peak,
                         ooc=ooc, same=same, total=total, shards=shards))

    methods = " ".join(args.method)
    lines = [
        "## Out-of-core pruning (blocks streamed from memory-mapped safetensors)", "",
        f"- Machine: {describe(machine)}; {software(machine)}. "
        f"Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"- Command: `.venv/bin/python benchmarks/out_of_core.py --method {methods} --samples {args.samples} "
        f"--seq-len {args.seq_len}`: per method `prunekit prune smollm2-135m --method M --sparsity 0.5 --n-samples "
        f"{args.samples} --seq-len {args.seq_len} --no-eval --out DIR` in memory, then the same with `--out-of-core`; "
        "then the first method again without --no-eval (perplexity before and after on 8192 held-out tokens). "
        "Each run is its own process; peak RSS = VmHWM at exit.",
        f"- Floor every run pays (import torch + transformers' Llama code, empty model, tokenizer): "
        f"**{floor_mib:.0f} MiB**. The model's float32 weights: 515 MiB.", "",
        "| method | run | peak RSS MiB | out-of-core / in-memory | above the floor, ratio | wall s | dense ppl | "
        "pruned ppl | tensors bitwise equal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    def ppl(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    for r in rows:
        ratio = r["ooc_peak"] / r["mem_peak"]
        above = (r["ooc_peak"] - floor_mib) / (r["mem_peak"] - floor_mib)
        job = f"{r['method']}{' + perplexity' if r['evaluate'] else ''}"
        lines += [
            f"| {job} | in memory | {r['mem_peak']:.0f} | - | - | {r['mem_s']:.1f} | "
            f"{ppl(r['mem']['dense_perplexity'])} | {ppl(r['mem']['pruned_perplexity'])} | - |",
            f"| {job} | out of core ({r['shards']} shards) | {r['ooc_peak']:.0f} | **{ratio:.2f}** | "
            f"{above:.2f} | {r['ooc_s']:.1f} | {ppl(r['ooc']['dense_perplexity'])} | "
            f"{ppl(r['ooc']['pruned_perplexity'])} | {r['same']} of {r['total']} |",
        ]
    lines += ["", "\"above the floor\" = (peak - floor) / (in-memory peak - floor): the memory the job itself adds. "
              "Identical result: every tensor of the two folders compared with torch.equal; the perplexities are "
              "computed by the same code path in memory and, out of core, from the hidden states streamed through "
              "each block."]
    text = "\n".join(lines)
    print(text)
    if not args.no_report:
        replace_marked_block(BENCHMARKS_MD, MARK_START, MARK_END, f"{MARK_START}\n{text.rstrip()}\n{MARK_END}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
