"""A benchmark run's outputs: tables.md, the PNG plots and one self-contained report.html (PNGs embedded as
base64, tables inline, no external assets), all written atomically into the run folder."""

from __future__ import annotations

import base64
import html
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from .config import BenchConfig
from .plots import accuracy_plot, layer_plot
from .tables import (budget_sentence, dense_line, machine_sentence, markdown_table, metric_title, result_rows,
                     select, tables_markdown)

TABLES_FILE = "tables.md"
ACCURACY_PNG = "accuracy_vs_sparsity.png"
LAYERS_PNG = "layer_sparsity.png"
REPORT_FILE = "report.html"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
.note { color: #555; }
"""


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` of a table cell as HTML (everything else escaped)."""
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table from the same (headers, rows) the Markdown tables use."""
    head = "".join(f"<th>{_inline(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def html_report(config: BenchConfig, records: Sequence[dict[str, Any]], accuracy_png: bytes, layers_png: bytes,
                cells: int) -> str:
    """The whole report as one HTML document."""
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>prunekit bench: {html.escape(config.name)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>prunekit bench: {html.escape(config.name)}</h1>",
        f"<p>Data set <b>{html.escape(config.dataset)}</b>; {len(records)} of {cells} cells finished; seeds "
        f"{', '.join(map(str, config.seeds))}; configuration sha256 <code>{config.digest[:16]}</code>; written "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.</p>",
        f"<p>{html.escape(budget_sentence(config))} Values: {html.escape(metric_title(config))}, mean ± std over "
        "seeds; the best mean of each column in bold.</p>",
        f"<p>{html.escape(machine_sentence(records))}</p>",
    ]
    if config.notes:
        parts.append("<ul>" + "".join(f'<li class="note">{html.escape(n)}</li>' for n in config.notes) + "</ul>")
    title = {"perplexity": "Perplexity", "embedding_cosine": "Embedding agreement"}.get(config.metric, "Accuracy")
    parts.append(f"<h2>{title} against sparsity</h2>" + _image(accuracy_png, f"{title.lower()} against sparsity"))
    for spec in config.models:
        parts.append(f"<h3>{html.escape(spec.label)}</h3><p>{html.escape(dense_line(config, records, spec.label))}</p>")
        parts.append(html_table(*result_rows(config, records, spec.label)))
        if any(r.get("pruned_accuracy") is not None for r in select(records, model=spec.label)):
            headers, rows = result_rows(config, records, spec.label, metric="pruned_accuracy")
            rows = [row[:-1] for row in rows if any(c != "—" for c in row[1:-1])]
            parts.append("<p>Right after pruning, before fine-tuning:</p>" + html_table(headers[:-1], rows))
    parts.append("<h2>Per-layer sparsity</h2>" + _image(layers_png, "per-layer sparsity"))
    if config.source:
        parts.append(f"<h2>Configuration</h2><pre>{html.escape(config.source)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_outputs(config: BenchConfig, records: Sequence[dict[str, Any]], run_dir: Path) -> dict[str, Path]:
    """Write tables.md, both PNGs and report.html from the finished cells; returns their paths."""
    from .runner import grid_cells, write_text_atomic

    records = list(records)
    accuracy_png, layers_png = accuracy_plot(config, records), layer_plot(config, records)
    outputs = {"tables": run_dir / TABLES_FILE, "accuracy_plot": run_dir / ACCURACY_PNG,
               "layer_plot": run_dir / LAYERS_PNG, "report": run_dir / REPORT_FILE}
    write_text_atomic(outputs["tables"], tables_markdown(config, records))
    write_text_atomic(outputs["accuracy_plot"], accuracy_png)
    write_text_atomic(outputs["layer_plot"], layers_png)
    write_text_atomic(outputs["report"], html_report(config, records, accuracy_png, layers_png,
                                                     len(grid_cells(config))))
    return outputs


__all__ = ["write_outputs", "html_report", "html_table", "markdown_table"]
