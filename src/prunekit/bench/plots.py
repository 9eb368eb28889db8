"""PNG plots of a benchmark with matplotlib's Agg renderer (no display, no pyplot global state): accuracy against
sparsity per method, and the sparsity each method left in each layer."""

from __future__ import annotations

import io
from typing import Any, Sequence

from .config import BenchConfig
from .tables import cell_stats, metric_format, metric_title, select

MARKERS = "osD^v<>pP*Xh"


def _figure(rows: int, cols: int, width: float, height: float) -> Any:
    """A Figure rendered by Agg, with an axes grid."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # the plots are an optional extra: say which one
        raise ImportError("benchmark plots need matplotlib: pip install 'prunekit[bench]'") from error
    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, axes


def _style(index: int) -> dict[str, Any]:
    """A distinct colour and marker per method (tab20 covers twenty methods)."""
    from matplotlib import colormaps

    colour = colormaps["tab10" if index < 10 else "tab20"](index % 10 if index < 10 else index % 20)
    return {"color": colour, "marker": MARKERS[index % len(MARKERS)]}


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def accuracy_plot(config: BenchConfig, records: Sequence[dict[str, Any]]) -> bytes:
    """One panel per model: mean test accuracy (or perplexity, log scale) against sparsity with std error bars, the dense reference as a
    dashed line with its std band."""
    figure, axes = _figure(1, len(config.models), 5.5, 4.2)
    methods = [m for m in config.methods if m != "dense"]
    scale, _, higher = metric_format(config.metric)
    for ax, spec in zip(axes[0], config.models):
        for index, method in enumerate(methods):
            points = [(s, cell_stats(records, spec.label, method, s, config.metric)) for s in config.sparsities]
            points = [(s, v) for s, v in points if v is not None]
            if points:
                ax.errorbar([100 * s for s, _ in points], [scale * v.mean for _, v in points],
                            yerr=[scale * v.std for _, v in points], capsize=3, linewidth=1.2, markersize=4,
                            label=method, **_style(index))
        dense = cell_stats(records, spec.label, "dense", None, config.metric)
        if dense is not None:
            ax.axhline(scale * dense.mean, color="black", linestyle="--", linewidth=1, label="dense")
            ax.axhspan(scale * (dense.mean - dense.std), scale * (dense.mean + dense.std), color="black", alpha=0.08)
        if not higher:
            ax.set_yscale("log")  # perplexities of different methods differ by orders of magnitude
        ax.set_title(f"{spec.label} on {config.dataset}")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel(metric_title(config))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left" if higher else "upper left")
    return _png(figure)


def layer_plot(config: BenchConfig, records: Sequence[dict[str, Any]]) -> bytes:
    """A panel per model and sparsity: each method's sparsity in each layer (the first seed's cell)."""
    figure, axes = _figure(len(config.models), len(config.sparsities), 4.5, 3.6)
    methods = [m for m in config.methods if m != "dense"]
    seed = config.seeds[0]
    for row, spec in zip(axes, config.models):
        for ax, sparsity in zip(row, config.sparsities):
            names: list[str] = []
            for index, method in enumerate(methods):
                found = select(records, model=spec.label, method=method, sparsity=sparsity, seed=seed)
                if not found:
                    continue
                layers = dict(found[0]["layers"])  # [[name, sparsity], ...] in the model's order
                names = names or list(layers)
                ax.plot(range(len(names)), [100 * layers.get(n, 0.0) for n in names], linewidth=1, markersize=3,
                        label=method, **_style(index))
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
            ax.set_ylim(-2, 102)
            ax.set_title(f"{spec.label}, {100 * sparsity:g}% (seed {seed})", fontsize=9)
            ax.set_ylabel("layer sparsity (%)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, loc="best")
    return _png(figure)
