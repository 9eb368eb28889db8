#!/usr/bin/env python
"""FLAP on SmolLM2-135M: the reference's order of operations against prunekit's earlier formula, per
../shared/BENCH-PROTOCOLS.md (LLM section: kjv.txt calibration samples and held-out perplexity).

    .venv/bin/python benchmarks/flap.py [--ratios 0.2 0.3] [--threads 1] [--no-report]

Runs: dense; AL-AM (one global threshold sized in parameters) with the current scores and with the earlier ones;
UL-UM (every layer loses the same share) likewise. "Earlier" is a copy of the score function prunekit had before
it followed the reference (CASIA-IVA-Lab/FLAP, lib/prune.py): per-unit sums of Var(X_j) * ||W[:, j]||^2, not squared
for attention, standardised over each group's few units. It lives only here, so the old numbers stay reproducible.

The calibration statistics of the dense model are collected once and handed to every run (they depend on the
dense model and the samples only); each run then loads a fresh model, prunes it with `flap()` and measures the
protocol perplexity on the pruned model in memory (AL-AM's per-layer widths cannot be saved as a plain transformers
Llama folder). Results go to benchmarks/results/flap.json and the "FLAP" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
if str(SRC) not in sys.path:  # run from a checkout: prunekit need not be installed in the venv
    sys.path.insert(0, str(SRC))

from markdown_sections import replace_marked_block  # noqa: E402  (benchmarks/ is on sys.path)

BENCHMARKS_MD = REPO / "BENCHMARKS.md"
RESULTS = REPO / "benchmarks" / "results" / "flap.json"
DEFAULT_TEXT = Path(os.environ.get("PRUNEKIT_KJV", "/work/shared/data/kjv.txt"))
MARK_START = "<!-- flap: start (written by benchmarks/flap.py) -->"
MARK_END = "<!-- flap: end -->"
EXPECTED_DENSE_PPL = 24.72


def earlier_flap_scores(model: Any, group: Any, stats: Any) -> Any:
    """prunekit's FLAP unit score before it followed the reference: sum of Var(X_j)*||W[:, j]||^2 per unit
    (attention not squared), standardised over the group's units (3 query-head slots per SmolLM2 layer)."""
    from prunekit.graph.importance import per_unit, slices
    from prunekit.graph.llm_structured import consumer_member, standardise

    member = consumer_member(group)
    weight = getattr(model.get_submodule(member.module), member.param)
    column_energy = slices(weight, member).pow(2).sum(dim=1)
    return standardise(per_unit(group, member, stats.variance[member.index].double() * column_energy))


@contextlib.contextmanager
def scores(formula: str) -> Iterator[None]:
    """Make `flap()` use the current or the earlier unit score for the duration."""
    import prunekit.graph.llm_structured as module

    current = module.flap_scores
    if formula == "earlier":
        module.flap_scores = earlier_flap_scores
    try:
        yield
    finally:
        module.flap_scores = current


@contextlib.contextmanager
def reused_statistics(cache: dict[str, Any]) -> Iterator[None]:
    """Collect the dense model's statistics on the first call and hand the same ones to every later run."""
    import prunekit.graph.llm_structured as module

    collect = module.collect_input_stats

    def cached(model: Any, samples: Any, layer_names: set[str], progress: bool = True) -> Any:
        key = json.dumps(sorted(layer_names))
        if key not in cache:
            started = time.perf_counter()
            cache[key] = collect(model, samples, layer_names, progress=progress)
            cache["seconds"] = time.perf_counter() - started
        return cache[key]

    module.collect_input_stats = cached
    try:
        yield
    finally:
        module.collect_input_stats = collect


def widths(model: Any) -> dict[str, list[int]]:
    """Kept query heads and MLP neurons per decoder layer."""
    layers = model.model.layers
    return {"heads": [layer.self_attn.o_proj.in_features // layer.self_attn.head_dim for layer in layers],
            "neurons": [layer.mlp.down_proj.in_features for layer in layers]}


def one_run(name: str, structure: str | None, formula: str | None, ratio: float | None, samples: list, text: str,
            cache: dict[str, Any]) -> dict[str, Any]:
    """Load a fresh model, prune it as asked (dense: not at all) and measure the protocol perplexity."""
    from prunekit.evaluate import protocol_perplexity
    from prunekit.graph.llm_structured import flap
    from prunekit.zoo import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2-135m")
    params = sum(p.numel() for layer in model.model.layers for p in layer.parameters() if p.dim() == 2)
    record: dict[str, Any] = {"name": name, "structure": structure, "formula": formula, "ratio": ratio}
    if structure is not None:
        started = time.perf_counter()
        with scores(formula), reused_statistics(cache):
            flap(model, samples, ratio, structure=structure, progress=False)
        record["prune_seconds"] = time.perf_counter() - started
    after = sum(p.numel() for layer in model.model.layers for p in layer.parameters() if p.dim() == 2)
    record["removed_share"] = 1 - after / params  # of the decoder blocks' weight matrices (norms excluded)
    record.update(widths(model), heads_total=model.config.num_attention_heads,
                  neurons_total=model.config.intermediate_size)
    started = time.perf_counter()
    record["perplexity"] = protocol_perplexity(model, tokenizer, text, progress=False)
    record["eval_seconds"] = time.perf_counter() - started
    print(json.dumps({k: v for k, v in record.items() if k not in ("heads", "neurons")}), flush=True)
    return record


def runs(ratios: list[float]) -> list[tuple[str, str | None, str | None, float | None]]:
    """(name, structure, formula, ratio) of every run, dense first."""
    out: list[tuple[str, str | None, str | None, float | None]] = [("dense", None, None, None)]
    for ratio in ratios:
        for structure in ("AL-AM", "UL-UM"):
            for formula in ("earlier", "reference"):
                out.append((f"{structure} {ratio:.0%} {formula}", structure, formula, ratio))
    return out


def spread(values: list[int]) -> str:
    return f"{min(values)}-{max(values)}" if min(values) != max(values) else str(values[0])


def comparisons(records: list[dict[str, Any]]) -> list[str]:
    """One line per (structure, ratio): the reference formula's perplexity against the earlier one's."""
    by_key = {(r["structure"], r["ratio"], r["formula"]): r for r in records if r["structure"] is not None}
    lines = []
    for (structure, ratio, formula), earlier in by_key.items():
        reference = by_key.get((structure, ratio, "reference"))
        if formula != "earlier" or reference is None:
            continue
        # Both formulas standardise a layer's neuron metrics, an affine map that keeps their order: with equal
        # widths everywhere (UL-UM) they keep the same neurons, and only the dropped query-head slots can differ.
        why = (" Both keep the same MLP neurons (standardising a layer's neuron metrics keeps their order); the "
               "difference is which query-head slot each layer drops: the one with the smallest sum of squared "
               "channel metrics (reference, lib/prune.py:336-338) or of unsquared ones (earlier)."
               if structure == "UL-UM" else "")
        lines.append(f"- {structure} {ratio:.0%}: reference {reference['perplexity']:.2f} vs earlier "
                     f"{earlier['perplexity']:.2f} (earlier / reference = "
                     f"{earlier['perplexity'] / reference['perplexity']:.2f}).{why}")
    return lines


def render(records: list[dict[str, Any]], machine: dict[str, Any], settings: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section."""
    from prunekit.bench.machine import describe, software

    dense = next(r for r in records if r["structure"] is None)
    lines = [
        "## FLAP structured pruning (SmolLM2-135M)", "",
        f"- Command: `{command}`. Date: {machine.get('date')}.",
        f"- Machine: {describe(machine)}; shared with other jobs (perplexity does not depend on the load). "
        f"{software(machine)}; {settings['threads']} intra-op thread(s), fp32.",
        f"- Calibration: the protocol's {settings['samples']} kjv.txt samples ({settings['tokens']} tokens); the dense "
        f"model's statistics are collected once ({settings['stats_seconds']:.0f} s) and reused by every run. "
        "Evaluation: the protocol's held-out perplexity (last 200,000 characters, first 8192 tokens, windows of 512), "
        "measured on the pruned model in memory.",
        "- Formula `reference`: the order of operations of the authors' code (CASIA-IVA-Lab/FLAP, lib/prune.py): "
        "WIFV metric Var(X_j) * ||W[:, j]||^2 per o_proj / down_proj input channel, squared for o_proj; "
        "standardised over all channels of its layer; a unit scores the mean of its channels. Formula `earlier`: "
        "prunekit before, per-unit sums (attention not squared) standardised over the group's units (with "
        "grouped-query attention a unit is one query-head slot of every KV group, so a layer has as few as 3). "
        "AL-AM: one threshold across all layers and both kinds, each unit weighed by the parameters it removes (the "
        "reference hard-codes 512/3, LLaMA-7B's head/neuron cost); UL-UM: the same share in every layer.",
        "",
        "| run | removed (block weights) | perplexity | x dense | query heads kept per layer | MLP neurons kept per layer |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in records:
        lines.append(f"| {r['name']} | {r['removed_share']:.1%} | {r['perplexity']:.2f} | "
                     f"{r['perplexity'] / dense['perplexity']:.2f} | {spread(r['heads'])} (of {r['heads_total']}) | "
                     f"{spread(r['neurons'])} (of {r['neurons_total']}) |")
    lines += [""] + comparisons(records)
    lines += ["", f"Dense perplexity {dense['perplexity']:.2f} (the protocol's check value is {EXPECTED_DENSE_PPL}). "
              "Removed share: of the decoder blocks' weight matrices, embeddings and norms excluded; the ratio is "
              "of the attention and MLP parameters FLAP can remove (key/value rows stay with query-head pruning)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1: on a loaded machine with few cores, 2 threads ran several times slower)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--no-report", action="store_true", help="do not write BENCHMARKS.md or the results file")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the BENCHMARKS.md section from benchmarks/results/flap.json, running nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        if args.no_report:
            parser.error("--report-only writes the report; it cannot be combined with --no-report")
        saved = json.loads(RESULTS.read_text())
        section = render(saved["records"], saved["machine"], saved["settings"], saved["command"])
        print(section)
        replace_marked_block(BENCHMARKS_MD, MARK_START, MARK_END, f"{MARK_START}\n{section}\n{MARK_END}")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from prunekit.bench.machine import machine_info
    from prunekit.calibration import load_text, protocol_calibration_samples
    from prunekit.zoo import load_causal_lm

    machine = machine_info()  # before the runs: its load average is the one they start under
    text = load_text(str(args.text))
    _, tokenizer = load_causal_lm("smollm2-135m")
    samples = protocol_calibration_samples(text, tokenizer)
    cache: dict[str, Any] = {}
    records = [one_run(name, structure, formula, ratio, samples, text, cache)
               for name, structure, formula, ratio in runs(args.ratios)]
    settings = {"samples": len(samples), "tokens": sum(int(s.numel()) for s in samples), "threads": args.threads,
                "stats_seconds": cache.get("seconds", float("nan"))}
    ratios = " ".join(f"{r:g}" for r in args.ratios)
    command = f".venv/bin/python benchmarks/flap.py --ratios {ratios} --threads {args.threads}"
    section = render(records, machine, settings, command)
    print(section)
    if not args.no_report:
        payload = {"machine": machine, "settings": settings, "command": command, "records": records,
                   "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        temp = RESULTS.with_name(f".{RESULTS.name}.{os.getpid()}.tmp")
        temp.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(json.dumps(payload, indent=1) + "\n")
        os.replace(temp, RESULTS)
        replace_marked_block(BENCHMARKS_MD, MARK_START, MARK_END, f"{MARK_START}\n{section}\n{MARK_END}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
