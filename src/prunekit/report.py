"""Sparsity accounting: per-layer and total counts, as a table or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from .selection import Target, module_kind


@dataclass
class LayerSparsity:
    """Counts for one weight."""

    name: str
    kind: str
    shape: list[int]
    total: int
    zeros: int
    pattern: str = ""

    @property
    def kept(self) -> int:
        return self.total - self.zeros

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


@dataclass
class Report:
    """What a pruning run did: per-layer sparsity, totals, what was left alone, and how long it took."""

    layers: list[LayerSparsity]
    method: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(layer.total for layer in self.layers)

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Share of zeros over all pruned weights."""
        return self.zeros / self.total if self.total else 0.0

    def layer(self, name: str) -> LayerSparsity:
        """One layer's row by module name."""
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        return {
            "method": self.method,
            "arguments": self.arguments,
            "total": {"weights": self.total, "zeros": self.zeros, "sparsity": self.sparsity},
            "layers": [dict(asdict(row), sparsity=row.sparsity, kept=row.kept) for row in self.layers],
            "skipped": [{"module": name, "reason": reason} for name, reason in self.skipped],
            "notes": list(self.notes),
            "seconds": self.seconds,
            **({"extra": self.extra} if self.extra else {}),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON text."""
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def table(self) -> str:
        """A plain-text table: one row per layer, a total, then what was left alone and notes."""
        headers = ("layer", "shape", "weights", "zeros", "sparsity")
        rows = [
            (r.name, "x".join(map(str, r.shape)), f"{r.total:,}", f"{r.zeros:,}", f"{100 * r.sparsity:.2f}%")
            for r in self.layers
        ]
        rows.append(("TOTAL", "", f"{self.total:,}", f"{self.zeros:,}", f"{100 * self.sparsity:.2f}%"))
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

        def line(cells: Iterable[str]) -> str:
            cells = list(cells)
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        out = [line(headers), line("-" * w for w in widths)]
        out += [line(row) for row in rows[:-1]] + [line("-" * w for w in widths), line(rows[-1])]
        if self.skipped:
            out.append("")
            out.append("left dense:")
            out += [f"  {name}: {reason}" for name, reason in self.skipped]
        if self.notes:
            out.append("")
            out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def layer_sparsity(target: Target, pattern: str = "") -> LayerSparsity:
    """Count the zeros of one target weight."""
    weight = target.weight.detach()
    return LayerSparsity(
        name=target.name,
        kind=target.kind,
        shape=list(weight.shape),
        total=weight.numel(),
        zeros=int((weight == 0).sum()),
        pattern=pattern,
    )


def sparsity_report(model: nn.Module, targets: list[Target] | None = None) -> Report:
    """Zeros per prunable weight of a model (every Linear/Conv/Embedding, or the given targets), each tensor once."""
    if targets is None:
        targets, seen = [], set()
        for name, module in model.named_modules():
            kind = module_kind(module)
            weight = getattr(module, "weight", None)
            if kind is None or not isinstance(weight, torch.Tensor) or id(weight) in seen:
                continue
            seen.add(id(weight))
            targets.append(Target(name=name, module=module, kind=kind))
    return Report(layers=[layer_sparsity(t) for t in targets])
