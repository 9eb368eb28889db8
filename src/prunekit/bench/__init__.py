"""The benchmark harness behind `prunekit bench CONFIG.yaml`: a grid of models x methods x sparsities x seeds on
real data, resumable (one JSONL line per finished cell), with Markdown tables, PNG plots and an HTML report."""

from __future__ import annotations

from .config import BASELINES, BenchConfig, ConfigError, ModelSpec, load_config, parse_config
from .methods import TRAINING_CALLBACKS, available_methods, kind_of
from .runner import Cell, RunSummary, grid_cells, read_results, run_bench

__all__ = ["BASELINES", "BenchConfig", "ConfigError", "ModelSpec", "load_config", "parse_config",
           "TRAINING_CALLBACKS", "available_methods", "kind_of", "Cell", "RunSummary", "grid_cells", "read_results",
           "run_bench"]
