#!/usr/bin/env python
"""LLM post-training pruning benchmark (SmolLM2-135M), per ../shared/BENCH-PROTOCOLS.md, with llmcompressor as peer.

    .venv/bin/python benchmarks/llm_posttraining.py [--quick] [--only NAME...] [--force] [--report PATH]

Every run happens in its own subprocesses: one loads the model, prunes it (timed alone) and saves the output folder;
a second one loads that folder with plain transformers (fp32) and measures the Linear sparsity of the decoder blocks
and the protocol perplexity. The floor (one no-grad forward pass of the calibration samples through the dense model)
is measured at the start of every invocation, in its own subprocess. The llmcompressor peer runs in its own
virtualenv (benchmarks/peers/llmcompressor_prune.py) on the same token ids and the same model folder; its output
is evaluated by the same code as prunekit's.

Results are appended as JSON lines to benchmarks/results/llm_posttraining.jsonl (keyed by run name and settings);
finished runs are skipped on a rerun unless --force. The full run rewrites the "LLM post-training pruning" section
of BENCHMARKS.md. --quick (8 samples, 2048 evaluation tokens, a subset of the runs) checks that everything works:
its results go to llm_posttraining.quick.jsonl and never into BENCHMARKS.md (pass --report PATH to see its report).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PEER_SCRIPT = REPO / "benchmarks" / "peers" / "llmcompressor_prune.py"
RESULTS_DIR = REPO / "benchmarks" / "results"
FULL_RESULTS = RESULTS_DIR / "llm_posttraining.jsonl"
QUICK_RESULTS = RESULTS_DIR / "llm_posttraining.quick.jsonl"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
TOP_HEADING = "# prunekit benchmarks"
SECTION_HEADING = "## LLM post-training pruning (SmolLM2-135M)"
DEFAULT_TEXT = Path(os.environ.get("PRUNEKIT_KJV", "/work/shared/data/kjv.txt"))
DEFAULT_LLMC_PYTHON = Path(os.environ.get("PRUNEKIT_LLMC_PYTHON", "/work/venv-llmc/bin/python"))
RESULT_MARK = "@@RESULT "
EXPECTED_DENSE_PPL = 24.72
THREADS = 2
QUICK_SAMPLES = 8
QUICK_EVAL_TOKENS = 2048
FULL_EVAL_TOKENS = 8192
# The targets, as criteria written into the report.
CLEARLY_WORST = 1.25  # magnitude's perplexity at least this times the worse of Wanda and SparseGPT
ABOUT_EQUAL = 0.20  # SparseGPT ~ Wanda: perplexities within 20% of each other
WANDA_FLOOR_TARGET = 1.5

if str(SRC) not in sys.path:  # run from a checkout: prunekit need not be installed in the venv
    sys.path.insert(0, str(SRC))

from prunekit.bench.machine import machine_info  # noqa: E402
from prunekit.io import sha256_file  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# The runs
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    name: str
    tool: str  # "dense", "prunekit" or "llmcompressor"
    method: str | None = None
    pattern: str = "unstructured"
    sparsity: float | None = None  # requested (None for N:M: the pattern fixes it)
    options: tuple = ()  # extra keyword arguments for prunekit.prune, as (name, value) pairs

    @property
    def label(self) -> str:
        return self.pattern if self.pattern != "unstructured" else f"unstructured {self.sparsity:.0%}"


def _runs() -> list[Run]:
    runs = [Run("dense", "dense")]
    # Each peer run sits right after the prunekit run it is compared with, so machine drift hits both alike.
    for pattern, sparsity, tag in (("unstructured", 0.5, "50"), ("2:4", None, "2:4"), ("4:8", None, "4:8")):
        runs.append(Run(f"magnitude-{tag}", "prunekit", "magnitude", pattern, sparsity))
        for method in ("sparsegpt", "wanda"):
            runs.append(Run(f"{method}-{tag}", "prunekit", method, pattern, sparsity))
            if tag in ("50", "2:4"):
                runs.append(Run(f"llmcompressor-{method}-{tag}", "llmcompressor", method, pattern,
                                sparsity if sparsity is not None else 0.5))
    # One-pass calibration (every layer's statistics from the dense model in one forward pass, no propagation)
    for method in ("sparsegpt", "wanda"):
        runs.append(Run(f"{method}-50-onepass", "prunekit", method, "unstructured", 0.5,
                        (("calibration", "one-pass"),)))
    for method in ("wanda", "owl", "sparsegpt", "owl-sparsegpt"):
        runs.append(Run(f"{method}-70", "prunekit", method, "unstructured", 0.7))
    # OWL's two hyperparameters (the paper tunes M in 3..10 and lambda in 0.02..0.25 per model family)
    for m, lam in ((3, 0.08), (7, 0.08), (10, 0.08), (5, 0.04), (5, 0.15), (10, 0.15)):
        runs.append(Run(f"owl-70-M{m}-L{lam:g}", "prunekit", "owl", "unstructured", 0.7,
                        (("owl_m", float(m)), ("owl_lambda", lam))))
    # the sweep's best outlier threshold for Wanda, over SparseGPT
    for m, lam in ((7, 0.08), (10, 0.08)):
        runs.append(Run(f"owl-sparsegpt-70-M{m}-L{lam:g}", "prunekit", "owl-sparsegpt", "unstructured", 0.7,
                        (("owl_m", float(m)), ("owl_lambda", lam))))
    return runs


RUNS = _runs()
RUNS_BY_NAME = {run.name: run for run in RUNS}
QUICK_RUNS = ["dense", "magnitude-50", "sparsegpt-50", "llmcompressor-sparsegpt-50", "wanda-50",
              "llmcompressor-wanda-50", "sparsegpt-2:4", "llmcompressor-sparsegpt-2:4", "wanda-70", "owl-70"]


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by the parent and the children
# ----------------------------------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """Peak resident memory of this process since it started (exec), in MiB.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child's ru_maxrss starts at the
    parent's resident size; VmHWM belongs to the process's own address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(payload: dict[str, Any]) -> None:
    print(RESULT_MARK + json.dumps(payload, default=str), flush=True)


def load_samples(path: Path):
    import torch

    return [torch.tensor([ids], dtype=torch.long) for ids in json.loads(path.read_text())["samples"]]


def short_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Children (each a fresh process: its peak RSS is its own)
# ----------------------------------------------------------------------------------------------------------------


def child_floor(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from prunekit.zoo import load_causal_lm

    started = time.perf_counter()
    model, _ = load_causal_lm(args.model)
    load_seconds = time.perf_counter() - started
    samples = load_samples(Path(args.calib))
    with torch.no_grad():
        model(samples[0])  # warm-up (first-call allocations), not timed
        started = time.perf_counter()
        for ids in samples:
            model(ids)
        seconds = time.perf_counter() - started
    emit({"floor_seconds": seconds, "load_seconds": load_seconds, "samples": len(samples),
          "tokens": sum(int(s.numel()) for s in samples), "peak_rss_mib": peak_rss_mib()})


def child_prune(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import prunekit
    from prunekit.export import save_pretrained
    from prunekit.zoo import load_causal_lm

    run = RUNS_BY_NAME[args.run]
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(args.model)
    load_seconds = time.perf_counter() - started
    rss_load = peak_rss_mib()
    result: dict[str, Any] = {"load_seconds": load_seconds, "peak_rss_after_load_mib": rss_load,
                              "threads": torch.get_num_threads()}
    if run.tool == "dense":
        result.update(prune_seconds=None, peak_rss_mib=rss_load)
        emit(result)
        return
    samples = load_samples(Path(args.calib))
    kwargs: dict[str, Any] = {"pattern": run.pattern, "apply": "bake", **dict(run.options)}
    if run.method != "magnitude":
        kwargs.update(data=samples, progress=False)
    started = time.perf_counter()
    report = prunekit.prune(model, run.method, run.sparsity, **kwargs)
    prune_seconds = time.perf_counter() - started
    rss_prune = peak_rss_mib()
    started = time.perf_counter()
    save_pretrained(model, args.out, tokenizer=tokenizer, report=report, extra={"benchmark_run": run.name})
    result.update(prune_seconds=prune_seconds, peak_rss_mib=rss_prune, save_seconds=time.perf_counter() - started,
                  peak_rss_with_save_mib=peak_rss_mib(), method_reported=report.method)
    for key in ("block_sparsities", "calibration_tokens"):
        if key in report.extra:
            result[key] = report.extra[key]
    emit(result)


def child_eval(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunekit.calibration import load_text
    from prunekit.evaluate import PROTOCOL_EVAL_CHARS, PROTOCOL_WINDOW, perplexity, protocol_perplexity
    from prunekit.hf import find_decoder_blocks

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model.eval()
    load_seconds = time.perf_counter() - started
    head = model.get_output_embeddings()
    _, blocks = find_decoder_blocks(model)
    zeros = total = 0
    for module in blocks.modules():
        if isinstance(module, nn.Linear) and module is not head:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    text = load_text(args.text)
    started = time.perf_counter()
    if args.eval_tokens == FULL_EVAL_TOKENS:
        ppl = protocol_perplexity(model, tokenizer, text, progress=False)
    else:  # --quick: the protocol's held-out text and windows, fewer tokens
        ppl = perplexity(model, tokenizer, text[-PROTOCOL_EVAL_CHARS:], window=PROTOCOL_WINDOW,
                         max_tokens=args.eval_tokens, progress=False)
    emit({"perplexity": ppl, "linear_sparsity": zeros / total, "linear_weights": total,
          "head_zeros": int((head.weight == 0).sum()) if head is not None else None,
          "eval_seconds": time.perf_counter() - started, "eval_load_seconds": load_seconds,
          "eval_peak_rss_mib": peak_rss_mib()})


# ----------------------------------------------------------------------------------------------------------------
# The parent: settings, results file, orchestration
# ----------------------------------------------------------------------------------------------------------------


def child_env(for_peer: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), PYTHONUNBUFFERED="1")
    if for_peer:
        env.pop("PYTHONPATH", None)  # the peer venv must not see prunekit or the main venv
    else:
        env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_child(cmd: list[str], log: Path, for_peer: bool, timeout: float | None) -> dict[str, Any]:
    """Run one child; its stderr (and stdout noise) go to `log`; returns the JSON it printed after RESULT_MARK."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as sink:
        sink.write(("$ " + " ".join(cmd) + "\n").encode())
        sink.flush()
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=sink, env=child_env(for_peer), cwd=str(REPO))
        timer = threading.Timer(timeout, process.kill) if timeout else None
        if timer:
            timer.start()
        chunks = []
        # stdout is read to the end (the peer's loguru writes lots of it) and copied to the log.
        assert process.stdout is not None
        try:
            for line in process.stdout:
                chunks.append(line)
                sink.write(line)
        finally:
            process.wait()
            if timer:
                timer.cancel()
    result = None
    for raw in reversed(chunks):
        line = raw.decode(errors="replace").strip()
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
            break
    if process.returncode != 0 or result is None:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(f"exit status {process.returncode}; last lines of {log}:\n  " + "\n  ".join(tail))
    return result


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a crash: ignore it
    return records


def append_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def prepare(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], Path, Path]:
    """Model folder, calibration token ids (written to workdir/calib.json) and the settings that key the results."""
    from transformers import AutoTokenizer

    from prunekit.calibration import load_text, protocol_calibration_samples
    from prunekit.zoo import smollm2_135m

    model = Path(args.model) if args.model else smollm2_135m()
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    text = load_text(args.text)
    samples = protocol_calibration_samples(text, tokenizer)
    if args.quick:
        samples = samples[:: len(samples) // QUICK_SAMPLES][:QUICK_SAMPLES]  # spread over the calibration part
    ids = [s[0].tolist() for s in samples]
    calib = workdir / "calib.json"
    calib.write_text(json.dumps({"samples": ids}))
    weights = sorted(model.glob("*.safetensors"))
    settings = {
        "protocol": "BENCH-PROTOCOLS.md LLM post-training pruning",
        "model": str(model),
        "model_sha256": short_hash([sha256_file(w) for w in weights]),
        "text": str(args.text), "text_sha256": sha256_file(Path(args.text))[:16],
        "samples": len(ids), "calibration_tokens": sum(map(len, ids)), "calibration_ids_sha256": short_hash(ids),
        "eval_tokens": QUICK_EVAL_TOKENS if args.quick else FULL_EVAL_TOKENS,
        "threads": THREADS, "dtype": "float32", "quick": bool(args.quick), "peak_rss": "VmHWM",
    }
    return settings, model, calib


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}"


def execute(args: argparse.Namespace) -> int:
    results_path = Path(args.results) if args.results else (QUICK_RESULTS if args.quick else FULL_RESULTS)
    names = select_runs(args)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="prunekit-llm-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    print(f"[bench] work folder {workdir} (child logs in {logs}); results -> {results_path}", flush=True)
    started_all = time.perf_counter()
    settings, model, calib = prepare(args, workdir)
    settings_id = short_hash(settings)
    print(f"[bench] model {model}; {settings['samples']} calibration samples ({settings['calibration_tokens']} tokens);"
          f" {settings['eval_tokens']} evaluation tokens; settings {settings_id}", flush=True)
    done = {r["key"] for r in read_records(results_path) if r.get("status") == "ok" and r.get("settings_id") == settings_id}
    todo = [n for n in names if args.force or f"{n}|{settings_id}" not in done]
    skipped = [n for n in names if n not in todo]
    if skipped:
        print(f"[bench] already finished, skipped (use --force to rerun): {', '.join(skipped)}", flush=True)
    invocation = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"
    machine = machine_info()
    failures = 0
    floor = None
    if todo:
        print("[bench] floor: one no-grad forward pass of the calibration samples through the dense model ...",
              flush=True)
        floor_result = run_child([sys.executable, __file__, "--child", "floor", "--model", str(model), "--calib",
                                  str(calib), "--threads", str(THREADS)], logs / "floor.log", False, args.timeout)
        floor = floor_result["floor_seconds"]
        append_record(results_path, {"key": f"floor|{settings_id}", "name": "floor", "kind": "floor", "status": "ok",
                                     "settings_id": settings_id, "settings": settings, "invocation": invocation,
                                     "time": _now(), "machine": machine, **floor_result})
        print(f"[bench] floor = {floor:.1f} s", flush=True)
    for index, name in enumerate(todo, 1):
        run = RUNS_BY_NAME[name]
        prefix = f"[bench {index}/{len(todo)}] {name}"
        out = workdir / "out" / name.replace(":", "-")
        shutil.rmtree(out, ignore_errors=True)
        record: dict[str, Any] = {"key": f"{name}|{settings_id}", "name": name, "kind": "run", **asdict(run),
                                  "settings_id": settings_id, "settings": settings, "invocation": invocation,
                                  "floor_seconds": floor, "machine": machine}
        run_started = time.perf_counter()
        try:
            if run.tool == "llmcompressor":
                python = Path(args.llmc_python)
                if not python.exists():
                    raise RuntimeError(f"the llmcompressor venv's python {python} does not exist (--llmc-python)")
                print(f"{prefix}: pruning with llmcompressor ({python}) ...", flush=True)
                cmd = [str(python), str(PEER_SCRIPT), "--calib", str(calib), "--model", str(model), "--method",
                       run.method, "--sparsity", str(run.sparsity), "--pattern", run.pattern, "--out", str(out),
                       "--threads", str(THREADS)]
                pruned = run_child(cmd, logs / f"{name}.log", True, args.timeout)
            else:
                print(f"{prefix}: {'loading' if run.tool == 'dense' else 'pruning'} ...", flush=True)
                cmd = [sys.executable, __file__, "--child", "prune", "--run", name, "--model", str(model),
                       "--calib", str(calib), "--out", str(out), "--threads", str(THREADS)]
                pruned = run_child(cmd, logs / f"{name}.log", False, args.timeout)
            record.update(pruned)
            if record.get("prune_seconds") is not None:
                print(f"{prefix}: pruned in {record['prune_seconds']:.1f} s "
                      f"({record['prune_seconds'] / floor:.2f}x floor), load {record['load_seconds']:.1f} s, "
                      f"peak RSS {record['peak_rss_mib']:.0f} MiB; evaluating ...", flush=True)
            else:
                print(f"{prefix}: loaded in {record['load_seconds']:.1f} s; evaluating ...", flush=True)
            folder = model if run.tool == "dense" else out
            cmd = [sys.executable, __file__, "--child", "eval", "--folder", str(folder), "--text", str(args.text),
                   "--eval-tokens", str(settings["eval_tokens"]), "--threads", str(THREADS)]
            record.update(run_child(cmd, logs / f"{name}.eval.log", False, args.timeout))
            record.update(status="ok", time=_now(), wall_seconds=time.perf_counter() - run_started)
            print(f"{prefix}: perplexity {record['perplexity']:.2f}, Linear sparsity {record['linear_sparsity']:.4f}"
                  f" ({time.perf_counter() - run_started:.0f} s for this run, "
                  f"{(time.perf_counter() - started_all) / 60:.1f} min so far)", flush=True)
        except Exception as error:  # noqa: BLE001 -- one failed run must not stop the others
            failures += 1
            record.update(status="failed", error=str(error)[-3000:], time=_now())
            print(f"{prefix}: FAILED: {error}", flush=True)
        append_record(results_path, record)
        if not args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)
    if todo and floor is not None:
        print(f"[bench] all runs done in {(time.perf_counter() - started_all) / 60:.1f} min", flush=True)
    if not args.keep_outputs and not args.workdir and not failures:
        shutil.rmtree(workdir, ignore_errors=True)
    elif failures:
        print(f"[bench] {failures} run(s) failed; logs kept in {logs}", flush=True)
    records = latest_records(read_records(results_path), settings_id)
    print(summary_table(records, names), flush=True)
    report_path = report_destination(args)
    if report_path is not None:  # the section always shows every finished run, not just this invocation's
        every = [n for n in RUNS_BY_NAME if n in records]
        write_section(report_path, render_section(records, every, settings, args))
        print(f"[bench] wrote the LLM section of {report_path}", flush=True)
    return 1 if failures else 0


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def select_runs(args: argparse.Namespace) -> list[str]:
    if not args.only:
        return list(QUICK_RUNS if args.quick else RUNS_BY_NAME)
    chosen = []
    for pattern in args.only:
        matches = [n for n in RUNS_BY_NAME if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            raise SystemExit(f"--only {pattern!r} matches no run; runs: {', '.join(RUNS_BY_NAME)}")
        chosen += [m for m in matches if m not in chosen]
    return [n for n in RUNS_BY_NAME if n in chosen]  # the canonical order (peers next to their counterparts)


def report_destination(args: argparse.Namespace) -> Path | None:
    if args.no_report:
        return None
    if args.report:
        path = Path(args.report)
        if args.quick and path.resolve() == BENCHMARKS_MD.resolve():
            raise SystemExit("--quick results never go into BENCHMARKS.md; pass another --report path")
        return path
    return None if args.quick else BENCHMARKS_MD


def latest_records(records: list[dict[str, Any]], settings_id: str) -> dict[str, Any]:
    """The newest record per run name for these settings ('floor' records kept as a list under 'floors')."""
    latest: dict[str, Any] = {"floors": []}
    for record in records:
        if record.get("settings_id") != settings_id:
            continue
        if record.get("kind") == "floor":
            latest["floors"].append(record)
        elif record.get("status") == "ok" or record.get("name") not in latest:
            latest[record["name"]] = record
    return latest


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _ok(records: dict[str, Any], name: str) -> dict[str, Any] | None:
    record = records.get(name)
    return record if record and record.get("status") == "ok" else None


# An invocation whose floor took this many times the fastest floor ran on a machine busy with other work: its
# times say nothing about prunekit, so its rows show perplexity, sparsity and memory only.
CONTENDED_FLOOR = 1.5


def _cpu(record: dict[str, Any]) -> str:
    return str((record.get("machine") or {}).get("cpu"))


def contended_invocations(floors: list[dict[str, Any]]) -> set[str]:
    """Invocations whose floor is over CONTENDED_FLOOR times the fastest one on the same kind of CPU."""
    fastest: dict[str, float] = {}
    for floor in floors:
        fastest[_cpu(floor)] = min(fastest.get(_cpu(floor), float("inf")), floor["floor_seconds"])
    return {f.get("invocation") for f in floors if f["floor_seconds"] > CONTENDED_FLOOR * fastest[_cpu(f)]}


def _x_floor(record: dict[str, Any], contended: set[str] = frozenset()) -> float | None:
    if record.get("prune_seconds") is None or not record.get("floor_seconds") or record.get("invocation") in contended:
        return None
    return record["prune_seconds"] / record["floor_seconds"]


def summary_table(records: dict[str, Any], names: list[str]) -> str:
    lines = [f"{'run':30s} {'sparsity':>8s} {'ppl':>9s} {'prune s':>9s} {'x floor':>8s} {'RSS MiB':>8s} {'load s':>7s}"]
    for name in names:
        record = records.get(name)
        if record is None:
            continue
        if record.get("status") != "ok":
            lines.append(f"{name:30s} FAILED")
            continue
        xf = _x_floor(record)
        lines.append(f"{name:30s} {record['linear_sparsity']:8.4f} {record['perplexity']:9.2f} "
                     f"{fmt_s(record.get('prune_seconds')):>9s} {('-' if xf is None else f'{xf:.2f}'):>8s} "
                     f"{record['peak_rss_mib']:8.0f} {record['load_seconds']:7.1f}")
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def _held(flag: bool | None) -> str:
    return "not measured" if flag is None else ("**held**" if flag else "**did not hold**")


def render_section(records: dict[str, Any], names: list[str], settings: dict[str, Any],
                   args: argparse.Namespace) -> str:
    ran = [records[n] for n in names if n in records]
    ok = [r for r in ran if r.get("status") == "ok"]
    machine = next((r["machine"] for r in reversed(ran) if r.get("machine")), None) or machine_info()
    floors = records.get("floors", [])
    invocations = sorted({r.get("invocation") for r in ok if r.get("invocation")})
    used_floors = [f for f in floors if f.get("invocation") in invocations]
    peer = next((r for r in ok if r.get("tool") == "llmcompressor"), None)
    times = sorted(r["time"] for r in ok if r.get("time"))
    lines = [SECTION_HEADING, ""]
    if settings.get("quick"):
        lines += ["**QUICK CHECK ONLY** (--quick: 8 calibration samples, 2048 evaluation tokens, a subset of the runs)"
                  " -- these numbers are not the protocol's.", ""]
    versions = machine.get("versions", {})
    ram = f"{machine['ram_gib']:.1f} GiB RAM" if machine.get("ram_gib") else "RAM unknown"
    peer_versions = (f"; llmcompressor {peer['llmcompressor_version']} (transformers {peer['transformers_version']},"
                     f" torch {peer['torch_version']}, in its own venv)") if peer else ""
    command = ".venv/bin/python benchmarks/llm_posttraining.py" + (" --quick" if settings.get("quick") else "")
    lines += [
        "Protocol: `../shared/BENCH-PROTOCOLS.md`, \"LLM post-training pruning (SmolLM2-135M)\".",
        "",
        f"- Machine: {' and '.join(dict.fromkeys(_cpu(r) for r in ok if r.get('machine'))) or machine.get('cpu')}"
        f" (the CPU of each invocation's machine), {machine.get('cores')} cores, {ram}; shared with other work, so "
        "absolute times drift from run to run: compare ratios within one invocation.",
        f"- Software: Python {machine.get('python')}, torch {versions.get('torch')}, transformers "
        f"{versions.get('transformers')}{peer_versions}; {THREADS} threads, fp32; prunekit {machine.get('commit')}.",
        f"- Command: `{command}`",
        f"- Date: {times[0][:16].replace('T', ' ') if times else '?'} to {times[-1][:16].replace('T', ' ') if times else '?'}"
        f" UTC ({len(invocations)} invocation{'s' if len(invocations) != 1 else ''}).",
        f"- Calibration: {settings['samples']} samples, {settings['calibration_tokens']} tokens (protocol samples from"
        " `kjv.txt`, the same token ids for every tool). Evaluation: perplexity of the pruned output folder loaded"
        f" with plain `AutoModelForCausalLM.from_pretrained` (fp32), first {settings['eval_tokens']} tokens of the last"
        " 200,000 characters, windows of 512.",
    ]
    contended = contended_invocations(used_floors)
    if used_floors:
        values = ", ".join(f"{f['floor_seconds']:.1f} s ({_cpu(f)})" for f in used_floors)
        lines.append(f"- **Floor** (one no-grad forward pass of the {settings['samples']} calibration samples through "
                     f"the dense model, `model(ids)` per sample, measured at the start of each invocation): {values}."
                     " Every run's \"x floor\" uses the floor of its own invocation.")
    if contended:
        lines.append(f"- Runs marked *contended* ran in an invocation whose floor took over {CONTENDED_FLOOR}x the "
                     "fastest floor on the same CPU (the machine was busy with other jobs): their prune times are shown but not "
                     "comparable, and get no \"x floor\"; their perplexity, sparsity and memory are unaffected.")
    dense = _ok(records, "dense")
    if dense:
        if settings["eval_tokens"] == FULL_EVAL_TOKENS:
            verdict = "matches" if abs(dense["perplexity"] - EXPECTED_DENSE_PPL) < 0.01 else "DOES NOT match"
            lines.append(f"- Dense check: perplexity {dense['perplexity']:.2f} (protocol: {EXPECTED_DENSE_PPL};"
                         f" {verdict}).")
        else:
            lines.append(f"- Dense perplexity on {settings['eval_tokens']} tokens: {dense['perplexity']:.2f} (the "
                         f"protocol's {EXPECTED_DENSE_PPL} is for {FULL_EVAL_TOKENS} tokens).")
    lines += ["", "| run | tool | pattern | sparsity reached | perplexity | prune s | x floor | peak RSS MiB | load s |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for record in ran:
        if record.get("status") != "ok":
            lines.append(f"| {record['name']} | {record.get('tool')} | - | failed | | | | | |")
            continue
        xf = _x_floor(record, contended)
        busy = " *contended*" if record.get("invocation") in contended and record.get("prune_seconds") else ""
        pattern = "dense" if record["tool"] == "dense" else Run(record["name"], record["tool"], record.get("method"),
                                                                 record["pattern"], record.get("sparsity")).label
        lines.append(
            f"| {record['name']} | {record['tool']} | {pattern} | {record['linear_sparsity']:.4f} | "
            f"{record['perplexity']:.2f} | {fmt_s(record.get('prune_seconds'))}{busy} | "
            f"{'-' if xf is None else f'{xf:.2f}'} | {record['peak_rss_mib']:.0f} | {record['load_seconds']:.1f} |")
    lines += [
        "",
        "Sparsity reached: zeros over all `nn.Linear` weights inside the decoder blocks of the saved folder (output head"
        " and embeddings excluded). Prune s: wall time of the pruning call alone (model load and save excluded;"
        " for llmcompressor the whole `oneshot(...)` call, its graph tracing included). Peak RSS: the pruning"
        " process's own peak resident size (VmHWM) after pruning, before saving (load + prune, Python/torch baseline"
        " included). Load s: loading the model folder in that process.",
    ]
    pairs = [(f"{m}-{t}", f"llmcompressor-{m}-{t}", f"{label} {t if t != '50' else '50% unstructured'}")
             for t in ("50", "2:4") for m, label in (("sparsegpt", "SparseGPT"), ("wanda", "Wanda"))]
    rows = []
    for ours, theirs, label in pairs:
        a, b = _ok(records, ours), _ok(records, theirs)
        if a and b:
            rows.append(f"| {label} | {_ratio(a['prune_seconds'], b['prune_seconds'])} ({a['prune_seconds']:.1f} s / "
                        f"{b['prune_seconds']:.1f} s) | {_ratio(a['perplexity'], b['perplexity'])} "
                        f"({a['perplexity']:.2f} / {b['perplexity']:.2f}) | {_ratio(a['peak_rss_mib'], b['peak_rss_mib'])}"
                        f" ({a['peak_rss_mib']:.0f} / {b['peak_rss_mib']:.0f} MiB) |")
    onepass = []
    for method, label in (("sparsegpt", "SparseGPT"), ("wanda", "Wanda")):
        a, b = _ok(records, f"{method}-50-onepass"), _ok(records, f"{method}-50")
        if a and b:
            xa, xb = _x_floor(a, contended), _x_floor(b, contended)
            onepass.append(f"| {label} 50% | {a['prune_seconds']:.1f} s ({'-' if xa is None else f'{xa:.2f}x'} floor)"
                           f" | {b['prune_seconds']:.1f} s ({'-' if xb is None else f'{xb:.2f}x'} floor) | "
                           f"{a['perplexity']:.2f} | {b['perplexity']:.2f} |")
    if onepass:
        lines += ["", "### One-pass calibration vs sequential (prunekit, `calibration=\"one-pass\"`)", "",
                  "| method | one-pass time | sequential time | one-pass perplexity | sequential perplexity |",
                  "|---|---:|---:|---:|---:|", *onepass, "",
                  "One-pass: every layer's statistics from one forward pass of the dense model (stopped at the last "
                  "decoder block), no propagation of pruned outputs; faster, but later blocks are not fitted to the "
                  "earlier blocks' pruning errors."]
    lines += ["", "### prunekit / llmcompressor (same run, same token ids, same model folder)", ""]
    if rows:
        lines += ["| method | wall time | perplexity | peak RSS |", "|---|---:|---:|---:|", *rows, "",
                  "Below 1 means prunekit is faster / better / smaller. llmcompressor: `oneshot` with the sequential "
                  "pipeline (one decoder layer at a time, pruned outputs fed to the next layer), targets = the "
                  "Linear layers of `model.layers.N`, lm_head ignored, batch size 1 without shuffling, padding or "
                  "truncation; SparseGPT block size 128, dampening 0.01. It forces eager attention during calibration"
                  " (prunekit runs the model's own SDPA attention); its saved folder is evaluated by the same code as "
                  "prunekit's."]
    else:
        lines.append("Not measured in this run.")
    lines += ["", "### Targets of the issue", ""] + targets(records)
    return "\n".join(lines) + "\n"


def targets(records: dict[str, Any]) -> list[str]:
    def ppl(name: str) -> float | None:
        record = _ok(records, name)
        return record["perplexity"] if record else None

    out = []
    # (1) ordering
    parts, flags = [], []
    for tag, label in (("50", "50%"), ("2:4", "2:4"), ("4:8", "4:8")):
        m, w, s = ppl(f"magnitude-{tag}"), ppl(f"wanda-{tag}"), ppl(f"sparsegpt-{tag}")
        if None in (m, w, s):
            continue
        flag = m >= CLEARLY_WORST * max(w, s)
        flags.append(flag)
        parts.append(f"{label}: magnitude {m:.2f} vs Wanda {w:.2f}, SparseGPT {s:.2f} ({'yes' if flag else 'no'})")
    worst = None if not flags else all(flags)
    w, s = ppl("wanda-50"), ppl("sparsegpt-50")
    close = None if None in (w, s) else abs(s / w - 1) <= ABOUT_EQUAL
    owl_parts, owl_flags = [], []
    for base, owl in (("wanda-70", "owl-70"), ("sparsegpt-70", "owl-sparsegpt-70")):
        b, o = ppl(base), ppl(owl)
        if None in (b, o):
            continue
        owl_flags.append(o < b)
        owl_parts.append(f"{owl} {o:.2f} vs {base} {b:.2f}")
    owl_helps = None if not owl_flags else all(owl_flags)
    overall = None if None in (worst, close, owl_helps) else (worst and close and owl_helps)
    out.append(f"1. Ordering -- {_held(overall)}. Magnitude clearly worst (perplexity >= {CLEARLY_WORST}x the worse of "
               f"Wanda and SparseGPT at each pattern): {_held(worst)}" + (f" ({'; '.join(parts)})" if parts else "")
               + f". SparseGPT ~ Wanda at 50% (within {ABOUT_EQUAL:.0%}): {_held(close)}"
               + (f" (SparseGPT {s:.2f}, Wanda {w:.2f})" if close is not None else "")
               + f". OWL helps at 70%: {_held(owl_helps)}" + (f" ({'; '.join(owl_parts)})" if owl_parts else "") + ".")
    for prefix, base_name, solver in (("owl-70-M", "wanda-70", "Wanda"), ("owl-sparsegpt-70-M", "sparsegpt-70",
                                                                         "SparseGPT")):
        sweep = sorted((ppl(run.name), run.name) for run in RUNS if run.name.startswith(prefix) and ppl(run.name))
        base = ppl(base_name)
        if not sweep or base is None:
            continue
        helped = [f"{name} {value:.2f}" for value, name in sweep if value < base]
        out.append(f"   OWL's hyperparameters over {solver} at 70% (paper defaults M=5, lambda=0.08; the paper tunes M "
                   f"in 3..10): " + ", ".join(f"{name} {value:.2f}" for value, name in sweep)
                   + f"; {solver} uniform {base:.2f}. "
                   + (f"Settings where OWL beats uniform {solver}: {', '.join(helped)}." if helped
                      else f"No setting tried beats uniform {solver}."))
    # (2) SparseGPT vs llmcompressor
    a, b = _ok(records, "sparsegpt-50"), _ok(records, "llmcompressor-sparsegpt-50")
    if a and b:
        p_ok, t_ok = a["perplexity"] <= b["perplexity"], a["prune_seconds"] <= b["prune_seconds"]
        out.append(f"2. SparseGPT 50% perplexity <= llmcompressor's and wall time <= llmcompressor's -- "
                   f"{_held(p_ok and t_ok)}: perplexity {a['perplexity']:.2f} vs {b['perplexity']:.2f} "
                   f"({'yes' if p_ok else 'no'}), prune time {a['prune_seconds']:.1f} s vs {b['prune_seconds']:.1f} s "
                   f"({'yes' if t_ok else 'no'}).")
    else:
        out.append("2. SparseGPT 50% perplexity and wall time <= llmcompressor's -- not measured.")
    # (3) Wanda vs the floor
    wr = _ok(records, "wanda-50")
    xf = _x_floor(wr) if wr else None
    if xf is not None:
        out.append(f"3. Wanda 50% wall time <= {WANDA_FLOOR_TARGET}x floor -- {_held(xf <= WANDA_FLOOR_TARGET)}: "
                   f"{wr['prune_seconds']:.1f} s = {xf:.2f}x the floor of {wr['floor_seconds']:.1f} s.")
    else:
        out.append(f"3. Wanda 50% wall time <= {WANDA_FLOOR_TARGET}x floor -- not measured.")
    # (4) peak RSS
    parts, flags = [], []
    for ours, theirs in (("sparsegpt-50", "llmcompressor-sparsegpt-50"), ("wanda-50", "llmcompressor-wanda-50"),
                         ("sparsegpt-2:4", "llmcompressor-sparsegpt-2:4"), ("wanda-2:4", "llmcompressor-wanda-2:4")):
        a, b = _ok(records, ours), _ok(records, theirs)
        if a and b:
            flags.append(a["peak_rss_mib"] <= b["peak_rss_mib"])
            parts.append(f"{ours} {a['peak_rss_mib']:.0f} MiB vs {b['peak_rss_mib']:.0f} MiB")
    out.append(f"4. Peak RSS <= llmcompressor's -- {_held(None if not flags else all(flags))}"
               + (f": {'; '.join(parts)}." if parts else "."))
    return out


def write_section(path: Path, section: str) -> None:
    """Replace (or add) the LLM section of a markdown file, leaving every other section as it is."""
    text = path.read_text() if path.is_file() else f"{TOP_HEADING}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION_HEADING), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        # the section ends at the next heading, or at the marker comment that opens another script's section
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith(("## ", "<!-- "))), len(lines))
        rest = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + rest if rest else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(new)
    os.replace(temp, path)


def report_only(args: argparse.Namespace) -> int:
    results_path = Path(args.results) if args.results else (QUICK_RESULTS if args.quick else FULL_RESULTS)
    records = read_records(results_path)
    if not records:
        raise SystemExit(f"no results in {results_path}")
    want_quick = bool(args.quick)
    candidates = [r for r in records if r.get("settings", {}).get("quick", False) == want_quick]
    if not candidates:
        raise SystemExit(f"no {'quick' if want_quick else 'full'} results in {results_path}")
    settings = candidates[-1]["settings"]  # the newest settings
    latest = latest_records(records, candidates[-1]["settings_id"])
    names = [n for n in (select_runs(args)) if n in latest] if args.only else [n for n in RUNS_BY_NAME if n in latest]
    print(summary_table(latest, names))
    path = report_destination(args)
    if path is not None:  # the section always shows every finished run; --only narrows the printed table
        every = [n for n in RUNS_BY_NAME if n in latest]
        write_section(path, render_section(latest, every, settings, args))
        print(f"[bench] wrote the LLM section of {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog="runs: " + ", ".join(RUNS_BY_NAME))
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SAMPLES} samples, {QUICK_EVAL_TOKENS} eval tokens, "
                        "a subset of runs; results to llm_posttraining.quick.jsonl, never to BENCHMARKS.md")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these runs (names or globs, e.g. 'llmcompressor-*')")
    parser.add_argument("--force", action="store_true", help="rerun runs already finished with these settings")
    parser.add_argument("--report", metavar="PATH", help="write the markdown section here (default: BENCHMARKS.md, "
                        "not for --quick)")
    parser.add_argument("--no-report", action="store_true", help="do not write any markdown")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from the results file")
    parser.add_argument("--results", metavar="PATH", help="results JSON-lines file (default under benchmarks/results/)")
    parser.add_argument("--model", help="model folder (default: prunekit.zoo.smollm2_135m())")
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="kjv.txt of the protocol")
    parser.add_argument("--llmc-python", default=str(DEFAULT_LLMC_PYTHON), help="python of the llmcompressor venv")
    parser.add_argument("--workdir", help="folder for calibration ids, outputs and logs (default: a temp folder)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the pruned output folders")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per child process")
    # internal: the child processes
    parser.add_argument("--child", choices=("floor", "prune", "eval"), help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--calib", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--eval-tokens", type=int, default=FULL_EVAL_TOKENS, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=THREADS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        {"floor": child_floor, "prune": child_prune, "eval": child_eval}[args.child](args)
        return 0
    if args.report_only:
        return report_only(args)
    return execute(args)


if __name__ == "__main__":
    sys.exit(main())
