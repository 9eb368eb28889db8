"""The grid runner: one JSONL line per finished cell in the run folder, keyed by the cell; a rerun with --resume
skips what is done; a run folder is bound to one configuration (its digest) and refuses results of another."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import PruneError
from ..selection import module_kind
from ..threads import intra_op_threads
from .config import BenchConfig, ConfigError, ModelSpec
from .methods import CellContext, kind_of, run_method, timed, train_dense, uses_sparsity
from .language import LanguageModels, layer_filter, run_language_cell
from .machine import machine_info
from .tasks import ImageTask, TextTask, build_model, load_task

RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "config.json"
CONFIG_COPY = "config.yaml"
DENSE_DIR = "dense"
_SHOW = 6  # differences listed when a run folder belongs to another configuration


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    model: ModelSpec
    method: str
    sparsity: float
    seed: int

    @property
    def key(self) -> str:
        """The identity of the cell in results.jsonl."""
        return f"{self.model.label}|{self.method}|{self.sparsity:g}|seed={self.seed}"


def grid_cells(config: BenchConfig) -> list[Cell]:
    """Every cell, grouped by model and seed (they share one dense model); the dense reference once per pair."""
    cells = []
    for model in config.models:
        for seed in config.seeds:
            for method in config.methods:
                sparsities = config.sparsities if uses_sparsity(method) else [0.0]
                cells += [Cell(model, method, s, seed) for s in sparsities]
    return cells


# --- the run folder ---------------------------------------------------------------------------------------------


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """'key: old -> new' for every leaf where two normalised configurations differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in old:
                out.append(f"{sub}: (absent) -> {json.dumps(new[key])}")
            elif key not in new:
                out.append(f"{sub}: {json.dumps(old[key])} -> (absent)")
            else:
                out += differences(old[key], new[key], sub)
        return out
    return [] if old == new else [f"{path or 'config'}: {json.dumps(old)} -> {json.dumps(new)}"]


def write_text_atomic(path: Path, text: str | bytes) -> None:
    """Write a file through a temporary sibling and os.replace, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs are as readable as any other file
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8") if isinstance(text, str) else text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask (read by setting it, then putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def prepare_run_dir(config: BenchConfig, run_dir: Path, resume: bool) -> None:
    """Bind `run_dir` to the configuration, or check that it already is; refuse another configuration's folder."""
    stored_file = run_dir / CONFIG_FILE
    if stored_file.is_file():
        try:
            stored = json.loads(stored_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ConfigError(f"{stored_file} is not readable JSON ({error}); choose another --out") from None
        if stored.get("digest") != config.digest:
            changes = differences(stored.get("config", {}), config.as_dict())
            listing = "; ".join(changes[:_SHOW]) + (f"; and {len(changes) - _SHOW} more" if len(changes) > _SHOW
                                                    else "")
            raise ConfigError(
                f"run folder {run_dir} holds results of a different configuration (stored -> given: "
                f"{listing or 'digest ' + str(stored.get('digest'))}); its results cannot be mixed: choose "
                "another --out, or delete the folder")
        if not resume and read_results(run_dir):
            raise ConfigError(f"run folder {run_dir} already holds results of this configuration: pass --resume to "
                              "continue it (finished cells are skipped), or choose another --out")
        return
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"--out {run_dir} exists and is not a benchmark run folder (no {CONFIG_FILE}): "
                          "choose a new or empty folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.source:
        write_text_atomic(run_dir / CONFIG_COPY, config.source)
    payload = {"digest": config.digest, "config": config.as_dict(), "notes": config.notes}
    write_text_atomic(stored_file, json.dumps(payload, indent=2) + "\n")


def read_results(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The finished cells by key; a line cut short by an interruption (the last one) is ignored."""
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        return {}
    records = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue  # an append interrupted mid-line; that cell runs again
        if isinstance(record, dict) and "key" in record:
            records[record["key"]] = record
    return records


def append_result(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one finished cell durably (one line, flushed and synced)."""
    path = run_dir / RESULTS_FILE
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as handle:  # a line cut short earlier must not swallow this one
            handle.seek(-1, os.SEEK_END)
            newline = handle.read(1) != b"\n"
    else:
        newline = False
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(("\n" if newline else "") + json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# --- the dense model, trained once per model and seed ----------------------------------------------------------------


class DenseCache:
    """The dense model after E epochs, saved as safetensors in the run folder and handed out as fresh copies."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = run_dir / DENSE_DIR

    def path(self, label: str, seed: int) -> Path:
        return self.folder / f"{label}-seed{seed}.safetensors"

    def get(self, ctx: CellContext, label: str) -> nn.Module:
        """The trained dense model of (label, seed): loaded when saved, else trained now and saved."""
        from safetensors.torch import load_file, save_file

        path = self.path(label, ctx.seed)
        model = ctx.fresh_model()
        if path.is_file():
            model.load_state_dict(load_file(str(path)))
            return model.eval()
        model = train_dense(ctx)
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.folder)
        os.close(fd)
        try:
            os.chmod(tmp, 0o666 & ~_umask())
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return model


# --- measuring ------------------------------------------------------------------------------------------------------


def weight_counts(model: nn.Module, keep: Callable[[str], bool] | None = None) -> dict[str, tuple[int, int]]:
    """{layer: (nonzero weights, all weights)} for every Linear / Conv / Embedding weight (those `keep` accepts),
    each tensor once."""
    counts, seen = {}, set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if module_kind(module) is None or not isinstance(weight, torch.Tensor) or id(weight) in seen:
            continue
        if keep is not None and not keep(name):
            continue
        seen.add(id(weight))
        counts[name] = (int((weight.detach() != 0).sum()), weight.numel())
    return counts


def sparsity_against(dense: nn.Module, model: nn.Module, keep: Callable[[str], bool] | None = None
                     ) -> tuple[dict[str, float], int, int]:
    """Per-layer sparsity of `model` relative to the dense architecture (a weight removed by structured pruning
    counts like a zero), with the kept and dense totals."""
    before = {name: total for name, (_, total) in weight_counts(dense, keep).items()}
    after = weight_counts(model, keep)
    layers = {name: 1.0 - after.get(name, (0, 0))[0] / total for name, total in before.items() if total}
    kept = sum(after.get(name, (0, 0))[0] for name in before)
    return layers, kept, sum(before.values())


# --- the run -----------------------------------------------------------------------------------------------------------


def run_cell(cell: Cell, config: BenchConfig, task: ImageTask | TextTask, cache: DenseCache,
             language_models: LanguageModels) -> dict[str, Any]:
    """Run one cell and return its JSONL record."""
    from ..examples import accuracy

    prune_options = dict(config.method_options.get(cell.method, {}))
    acc = ppl = None
    if isinstance(task, TextTask):
        (outcome, ppl), seconds = timed(lambda: run_language_cell(
            cell.method, cell.sparsity, cell.seed, task, cell.model.name, language_models, prune_options))
        # No structural change: the pruned model is its own dense architecture; count the decoder's Linears.
        layers, kept, total = sparsity_against(outcome.model, outcome.model, layer_filter(task))
    else:
        ctx = CellContext(task=task, model_name=cell.model.name, model_options=dict(cell.model.options),
                          seed=cell.seed, training=config.training, dense_trained=lambda: None,
                          prune_options=prune_options)
        ctx.dense_trained = lambda: cache.get(ctx, cell.model.label)
        outcome, seconds = timed(lambda: run_method(cell.method, cell.sparsity, ctx))
        layers, kept, total = sparsity_against(build_model(cell.model.name, cell.model.options, task, cell.seed),
                                               outcome.model)
        acc = accuracy(outcome.model, task.x_test, task.y_test)
    return {
        "key": cell.key, "model": cell.model.label, "method": cell.method, "kind": kind_of(cell.method),
        "sparsity": cell.sparsity, "seed": cell.seed, "accuracy": acc,
        "perplexity": ppl if config.metric == "perplexity" else None,
        "embedding_cosine": ppl if config.metric == "embedding_cosine" else None,
        "pruned_accuracy": outcome.pruned_accuracy,
        "measured_sparsity": 1.0 - kept / total if total else 0.0, "kept_weights": kept, "dense_weights": total,
        "layers": [[name, value] for name, value in layers.items()],  # a list: JSON key sorting keeps no order
        "steps": outcome.steps, "seconds": round(seconds, 3), "notes": outcome.notes,
        "config_digest": config.digest, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class RunSummary:
    """What a run did and where its outputs are."""

    run_dir: Path
    cells: int
    ran: int
    skipped: int
    outputs: dict[str, Path]
    seconds: float


def run_bench(config: BenchConfig, run_dir: str | os.PathLike, *, resume: bool = False, threads: int | None = 1,
              progress: bool = True, log: Callable[[str], None] = lambda message: None) -> RunSummary:
    """Run every unfinished cell of the grid, appending each to results.jsonl, then write tables, plots and the
    HTML report from all the results."""
    from tqdm import tqdm

    from .report import write_outputs

    started = time.perf_counter()
    run_dir = Path(run_dir)
    prepare_run_dir(config, run_dir, resume)
    for note in config.notes:
        log(note)
    cells = grid_cells(config)
    done = read_results(run_dir)
    todo = [cell for cell in cells if cell.key not in done]
    log(f"{len(cells)} cells, {len(cells) - len(todo)} already finished in {run_dir}")
    task = load_task(config.dataset, config.dataset_options) if todo else None
    cache, language_models = DenseCache(run_dir), LanguageModels()
    machine = machine_info()  # each cell records where it ran: a resumed grid may span machines
    with intra_op_threads(threads or None):  # 0 or None: the caller's setting
        bar = tqdm(todo, desc="bench", unit="cell", disable=not progress, file=sys.stderr)
        for cell in bar:
            bar.set_postfix_str(f"{cell.model.label} {cell.method} {cell.sparsity:g} seed {cell.seed}")
            try:
                record = run_cell(cell, config, task, cache, language_models)
            except PruneError as error:  # say which cell could not run; the finished ones stay recorded
                raise PruneError(f"cell {cell.key} failed: {error}") from error
            append_result(run_dir, {**record, "machine": machine})
            with tqdm.external_write_mode(file=sys.stderr):  # a log line above the bar, not through it
                metric = (f"perplexity {record['perplexity']:.3f}" if record["perplexity"] is not None
                          else f"embedding cosine {record['embedding_cosine']:.4f}"
                          if record.get("embedding_cosine") is not None
                          else f"accuracy {100 * record['accuracy']:.2f}%")
                log(f"{cell.key}: {metric} at measured sparsity {100 * record['measured_sparsity']:.1f}% "
                    f"({record['seconds']:.1f} s)")
    records = [r for r in read_results(run_dir).values() if r.get("config_digest") == config.digest]
    outputs = write_outputs(config, records, run_dir)
    return RunSummary(run_dir, len(cells), len(todo), len(cells) - len(todo), outputs,
                      time.perf_counter() - started)
