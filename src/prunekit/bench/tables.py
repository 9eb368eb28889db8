"""Markdown tables of a benchmark's results: mean +- std over seeds, one table per model, best value in bold."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .config import BenchConfig
from .machine import describe_all


@dataclass(frozen=True)
class Stats:
    """Mean and sample standard deviation (0 for one value) of n values."""

    mean: float
    std: float
    n: int

    def text(self, scale: float = 100.0, digits: int = 2) -> str:
        """'mean ± std' scaled (percent by default)."""
        return f"{scale * self.mean:.{digits}f} ± {scale * self.std:.{digits}f}"


def stats(values: Iterable[float]) -> Stats | None:
    """Stats of the finite values (None when there are none)."""
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return None
    return Stats(statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0, len(finite))


def select(records: Sequence[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    """The records whose fields equal `match`."""
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def cell_stats(records: Sequence[dict[str, Any]], model: str, method: str, sparsity: float | None,
               metric: str = "accuracy") -> Stats | None:
    """Stats over seeds of one (model, method, sparsity) for `metric` (sparsity None: the dense reference)."""
    match = {"model": model, "method": method}
    if sparsity is not None:
        match["sparsity"] = sparsity
    return stats(r.get(metric) for r in select(records, **match))


def _percent(value: float) -> str:
    return f"{100 * value:g}%"


def metric_format(metric: str) -> tuple[float, int, bool]:
    """(scale, digits, higher is better) of a metric: shares in percent, perplexity as it is."""
    if metric == "perplexity":
        return 1.0, 3, False
    if metric == "embedding_cosine":
        return 1.0, 4, True
    return 100.0, 2, True


def metric_title(config: BenchConfig) -> str:
    """The compared metric in words."""
    if config.metric == "perplexity":
        return "held-out perplexity (lower is better)"
    if config.metric == "embedding_cosine":
        return "cosine similarity of sentence embeddings to the dense model's (higher is better)"
    return "test accuracy (%)"


def result_rows(config: BenchConfig, records: Sequence[dict[str, Any]], model: str,
                metric: str | None = None) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) for one model: a row per method, a column per sparsity with mean ± std (accuracy in %),
    the best mean of each column in bold, then the mean optimizer steps of the method's cells."""
    metric = metric or config.metric
    scale, digits, higher = metric_format(metric)
    methods = [m for m in config.methods if m != "dense"]
    headers = ["method", *(_percent(s) for s in config.sparsities), "steps"]
    table = {(m, s): cell_stats(records, model, m, s, metric) for m in methods for s in config.sparsities}
    best = {}
    for s in config.sparsities:
        means = [table[m, s].mean for m in methods if table[m, s] is not None]
        best[s] = (max(means) if higher else min(means)) if means else None
    rows = []
    for method in methods:
        cells = [f"`{method}`"]
        for s in config.sparsities:
            value = table[method, s]
            if value is None:
                cells.append("—")
                continue
            text = value.text(scale, digits) + (f" (n={value.n})" if value.n != len(config.seeds) else "")
            cells.append(f"**{text}**" if value.mean == best[s] else text)
        steps = stats(r.get("steps") for r in select(records, model=model, method=method))
        cells.append(f"{steps.mean:,.0f}" if steps else "—")
        rows.append(cells)
    return headers, rows


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(out)


def dense_line(config: BenchConfig, records: Sequence[dict[str, Any]], model: str) -> str:
    """The dense reference of a model in words."""
    dense = cell_stats(records, model, "dense", None, config.metric)
    if config.metric == "perplexity":
        return ("dense reference: not run" if dense is None else
                f"dense reference: perplexity {dense.text(1.0, 3)} (n={dense.n})")
    if config.metric == "embedding_cosine":
        return ("dense reference: not run" if dense is None else
                f"dense reference: cosine {dense.text(1.0, 4)} to itself (n={dense.n})")
    budget = config.training["epochs"] + config.training["finetune_epochs"]
    if dense is None:
        return f"dense reference: not run ({budget} epochs)"
    return f"dense reference: {dense.text()}% ({budget} epochs, n={dense.n})"


def budget_sentence(config: BenchConfig) -> str:
    """What every cell got, in one sentence."""
    training = config.training
    if config.metric in ("perplexity", "embedding_cosine"):
        return ("Post-training pruning of the Linear layers inside the transformer blocks, no fine-tuning; every "
                "method of a seed gets the same calibration samples and the same held-out text. Columns are target "
                "sparsities.")
    return (f"Every cell: {training['epochs']} epochs at lr {training['lr']:g} then {training['finetune_epochs']} "
            f"at {training['finetune_lr']:g} ({training['optimizer']}, batch {training['batch_size']}); the same "
            "data order for every method. Columns are target sparsities of the Linear/Conv weights "
            "(structured methods: the share of channels removed).")


def machine_sentence(records: Sequence[dict[str, Any]]) -> str:
    """Where the cells ran, as each recorded it."""
    return f"Machine: {describe_all(r.get('machine') for r in records)}."


def tables_markdown(config: BenchConfig, records: Sequence[dict[str, Any]], heading_level: int = 2) -> str:
    """Every model's accuracy table (after fine-tuning / training), and the one-shot accuracy before fine-tuning."""
    hashes = "#" * heading_level
    out = [f"{hashes} {config.name}: {metric_title(config)} on {config.dataset}, mean ± std over seeds "
           f"{', '.join(map(str, config.seeds))}", ""]
    out.append(budget_sentence(config))
    out += [f"- note: {note}" for note in config.notes]
    out += ["", machine_sentence(records)]
    for spec in config.models:
        model = spec.label
        out += ["", f"{hashes}# {model}", "", dense_line(config, records, model), ""]
        out.append(markdown_table(*result_rows(config, records, model)))
        before = [m for m in config.methods if any(r.get("pruned_accuracy") is not None
                                                   for r in select(records, model=model, method=m))]
        if before:
            headers, rows = result_rows(config, records, model, metric="pruned_accuracy")
            rows = [row[:-1] for row in rows if row[0].strip("`") in before]
            out += ["", "Right after pruning, before fine-tuning:", "", markdown_table(headers[:-1], rows)]
        measured = result_rows(config, records, model, metric="measured_sparsity")
        when = "after pruning" if config.metric in ("perplexity", "embedding_cosine") else "after training"
        out += ["", f"Measured sparsity of the weights (%), {when}:", "",
                markdown_table(measured[0][:-1], [[c.replace("**", "") for c in row[:-1]] for row in measured[1]])]
    return "\n".join(out) + "\n"
