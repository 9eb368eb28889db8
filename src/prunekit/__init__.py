"""prunekit: prune neural networks the way the research literature does, and measure what was gained."""

from __future__ import annotations

__version__ = "0.1.0"

from . import masks
from .api import prune
from .io import load, read_manifest, save
from .errors import ArgumentError, FormatError, ModelError, PruneError, SelectionError
from .methods import METHODS, Method, get_method, register
from .report import Report, sparsity_report
from .selection import select

__all__ = [
    "prune", "save", "load", "read_manifest", "Report", "sparsity_report", "select", "masks", "METHODS", "Method", "get_method", "register",
    "PruneError", "ArgumentError", "SelectionError", "ModelError", "FormatError", "__version__",
]
