"""Benchmark configurations: a YAML file read with yaml.safe_load, validated key by key, defaults filled in, and
hashed so a run folder can refuse results of a different configuration.

Every error names the key as a path (``models[1].name``, ``training.epochs``), the bad value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import ArgumentError, FormatError, PruneError, unknown_choice

TOP_KEYS = ("name", "dataset", "dataset_options", "models", "methods", "sparsities", "seeds", "training",
            "method_options")
REQUIRED_KEYS = ("dataset", "models", "methods", "sparsities")
BASELINES = ("random", "global-magnitude")  # always in every grid (Gupta et al. 2022; Liu et al. 2022)

TRAINING_DEFAULTS: dict[str, Any] = {
    "epochs": 6,  # training from initialisation (the dense model's, or a sparse one's first phase)
    "finetune_epochs": 3,  # after one-shot pruning; from-initialisation methods train epochs + finetune_epochs
    "batch_size": 64,
    "lr": 3e-3,
    "finetune_lr": 1e-3,  # the learning rate of the last finetune_epochs, for every method alike
    "optimizer": "adam",
    "weight_decay": 0.0,
    "calibration_batches": 4,  # batches for data-driven scores (GraSP, Taylor, ...; SNIP scores the first only)
    "lottery_rounds": 3,  # iterative magnitude pruning rounds; each prunes 1 - (1 - s)^(1/rounds) of the rest
    "structured_budget": "uniform",
}
OPTIMIZERS = ("adam", "sgd")
STRUCTURED_BUDGETS = ("uniform", "global")


class ConfigError(PruneError):
    """A benchmark configuration that cannot run, or a run folder that belongs to another configuration."""


@dataclass(frozen=True)
class ModelSpec:
    """One model of the grid: a registered name, its constructor options and the label shown in tables."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The normalised form stored in the run folder."""
        return {"name": self.name, "options": dict(sorted(self.options.items())), "label": self.label}


@dataclass
class BenchConfig:
    """A validated benchmark grid: models x methods x sparsities x seeds on one data set."""

    name: str
    dataset: str
    dataset_options: dict[str, Any]
    models: list[ModelSpec]
    methods: list[str]
    sparsities: list[float]
    seeds: list[int]
    training: dict[str, Any]
    method_options: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)  # what validation added (baselines), said in every report
    source: str = ""  # the YAML text as read

    def as_dict(self) -> dict[str, Any]:
        """Everything that decides the results (not the notes or the YAML's formatting), JSON-ready."""
        return {
            "name": self.name, "dataset": self.dataset, "dataset_options": dict(sorted(self.dataset_options.items())),
            "models": [m.as_dict() for m in self.models], "methods": list(self.methods),
            "sparsities": list(self.sparsities), "seeds": list(self.seeds),
            "training": dict(sorted(self.training.items())),
            "method_options": {k: dict(sorted(v.items())) for k, v in sorted(self.method_options.items())},
        }

    @property
    def metric(self) -> str:
        """What the tables compare: test accuracy (image data); on text, held-out perplexity (causal LMs) or the
        cosine similarity of sentence embeddings to the dense model's (encoders)."""
        from .tasks import dataset_kind, text_metric

        if dataset_kind(self.dataset) != "text":
            return "accuracy"
        return text_metric([m.name for m in self.models])

    @property
    def digest(self) -> str:
        """sha256 of the normalised configuration (key order and YAML comments do not change it)."""
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- reading --------------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike) -> BenchConfig:
    """Read and validate a benchmark YAML file (yaml.safe_load only: no Python objects from the file)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ArgumentError("CONFIG", str(path), "a readable YAML file (it does not exist)")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise FormatError(f"{path} is not valid YAML{where}: {problem}") from None
    return parse_config(raw, default_name=path.stem, source=text)


def parse_config(raw: Any, default_name: str = "bench", source: str = "") -> BenchConfig:
    """Validate a configuration mapping (as yaml.safe_load returns it) and fill in the defaults."""
    from .tasks import DATASETS, check_dataset_options

    if not isinstance(raw, Mapping):
        raise ConfigError(f"the configuration must be a mapping of keys ({', '.join(TOP_KEYS)}), "
                          f"not {_kind(raw)}")
    for key in raw:
        if key not in TOP_KEYS:
            raise unknown_choice("config key", key, TOP_KEYS)
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise ConfigError(f"the configuration misses the required key(s) {', '.join(missing)} "
                          f"(required: {', '.join(REQUIRED_KEYS)})")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise ArgumentError("name", name, "a non-empty string")
    dataset = raw["dataset"]
    if not isinstance(dataset, str) or dataset not in DATASETS:
        raise unknown_choice("dataset", dataset, DATASETS)
    dataset_options = check_dataset_options(dataset, raw.get("dataset_options", {}))
    models = _models(raw["models"], dataset)
    from .tasks import dataset_kind, text_metric

    if dataset_kind(dataset) == "text":
        text_metric([m.name for m in models])  # one metric per grid: causal LMs and encoders are not mixed
    training = _training(raw.get("training", {}))
    methods, notes = _methods(raw["methods"], dataset)
    sparsities = _sparsities(raw["sparsities"])
    seeds = _seeds(raw.get("seeds", [0]))
    method_options = _method_options(raw.get("method_options", {}), methods)
    return BenchConfig(name.strip(), dataset, dataset_options, models, methods, sparsities, seeds, training,
                       method_options, notes, source)


def _kind(value: Any) -> str:
    """A value's type in YAML words, for messages."""
    names = {dict: "a mapping", list: "a list", str: "a string", int: "an integer", float: "a number",
             bool: "a boolean", type(None): "nothing (null)"}
    return names.get(type(value), type(value).__name__)


def _list(value: Any, key: str, what: str) -> list[Any]:
    """A non-empty YAML list."""
    if not isinstance(value, list) or not value:
        raise ArgumentError(key, value, f"a non-empty list of {what}")
    return value


def _integer(value: Any, key: str, minimum: int) -> int:
    """An integer >= minimum (YAML booleans refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(key, value, f"an integer >= {minimum}")
    return value


def _positive(value: Any, key: str, allow_zero: bool = False) -> float:
    """A real number > 0 (or >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or (
            value < 0 if allow_zero else value <= 0):
        raise ArgumentError(key, value, "a number >= 0" if allow_zero else "a number > 0")
    return float(value)


def _models(value: Any, dataset: str) -> list[ModelSpec]:
    from .tasks import check_model_options, models_for

    specs, labels = [], set()
    for index, entry in enumerate(_list(value, "models", "model names or {name: ..., options} mappings")):
        key = f"models[{index}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, Mapping):
            raise ArgumentError(key, entry, "a model name or a mapping with a 'name' key")
        if "name" not in entry:
            raise ConfigError(f"{key} misses the required key 'name' (one of {', '.join(models_for(dataset))})")
        name = entry["name"]
        if not isinstance(name, str) or name not in models_for(dataset):
            raise unknown_choice(f"{key}.name", name, models_for(dataset))
        options = {k: v for k, v in entry.items() if k not in ("name", "label")}
        check_model_options(name, options, dataset, key)
        label = entry.get("label") or name + "".join(f"-{k}{v}" for k, v in sorted(options.items()))
        if not isinstance(label, str):
            raise ArgumentError(f"{key}.label", label, "a string")
        if label in labels:
            raise ArgumentError(f"{key}.label", label, "a label no other model of the grid has")
        labels.add(label)
        specs.append(ModelSpec(name, options, label))
    return specs


def _methods(value: Any, dataset: str) -> tuple[list[str], list[str]]:
    """The method names, with the baselines (random, global magnitude, and the scratch twin of each structured
    method) appended when missing; the notes say what was added."""
    from .methods import available_methods, scratch_twin

    valid = available_methods(dataset)
    methods: list[str] = []
    for index, name in enumerate(_list(value, "methods", "method names")):
        if not isinstance(name, str) or name not in valid:
            raise unknown_choice(f"methods[{index}]", name, valid)
        if name in methods:
            raise ArgumentError(f"methods[{index}]", name, "a method listed once")
        methods.append(name)
    notes = []
    added = [b for b in BASELINES if b not in methods]
    if added:
        notes.append(f"baseline(s) {', '.join(added)} added automatically: every grid compares against random "
                     "and global magnitude pruning")
    methods += added
    twins = [scratch_twin(m) for m in methods if scratch_twin(m) and scratch_twin(m) not in methods]
    if twins:
        notes.append(f"baseline(s) {', '.join(twins)} added automatically: the pruned architecture trained from "
                     "scratch with the same budget (Liu et al. 2019, Rethinking the Value of Network Pruning)")
    methods += twins
    return methods, notes


def _sparsities(value: Any) -> list[float]:
    out = []
    for index, item in enumerate(_list(value, "sparsities", "numbers in (0, 1)")):
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not 0 < item < 1:
            raise ArgumentError(f"sparsities[{index}]", item, "a number in (0, 1)")
        if float(item) in out:
            raise ArgumentError(f"sparsities[{index}]", item, "a sparsity listed once")
        out.append(float(item))
    return sorted(out)


def _seeds(value: Any) -> list[int]:
    out = []
    for index, item in enumerate(_list(value, "seeds", "integers >= 0")):
        out.append(_integer(item, f"seeds[{index}]", 0))
        if out.count(item) > 1:
            raise ArgumentError(f"seeds[{index}]", item, "a seed listed once")
    return out


def _training(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ArgumentError("training", value, f"a mapping with keys among {', '.join(TRAINING_DEFAULTS)}")
    training = dict(TRAINING_DEFAULTS)
    for key, item in value.items():
        if key not in TRAINING_DEFAULTS:
            raise unknown_choice("training key", key, TRAINING_DEFAULTS)
        path = f"training.{key}"
        if key in ("epochs", "batch_size", "calibration_batches", "lottery_rounds"):
            training[key] = _integer(item, path, 1)
        elif key == "finetune_epochs":
            training[key] = _integer(item, path, 0)
        elif key in ("lr", "finetune_lr"):
            training[key] = _positive(item, path)
        elif key == "weight_decay":
            training[key] = _positive(item, path, allow_zero=True)
        elif key == "optimizer":
            if item not in OPTIMIZERS:
                raise unknown_choice(path, item, OPTIMIZERS)
            training[key] = item
        elif key == "structured_budget":
            if item not in STRUCTURED_BUDGETS:
                raise unknown_choice(path, item, STRUCTURED_BUDGETS)
            training[key] = item
    return training


def _method_options(value: Any, methods: list[str]) -> dict[str, dict[str, Any]]:
    """Extra prunekit.prune keywords per one-shot method (min_keep, n_batches, pattern, ...)."""
    from .methods import ONE_SHOT_OPTIONS, kind_of

    if not isinstance(value, Mapping):
        raise ArgumentError("method_options", value, "a mapping: method name -> mapping of options")
    out = {}
    for method, options in value.items():
        if method not in methods:
            raise unknown_choice("method_options key", method, methods)
        if not isinstance(options, Mapping):
            raise ArgumentError(f"method_options.{method}", options, "a mapping of options")
        if kind_of(method) != "one-shot":
            raise ArgumentError(f"method_options.{method}", dict(options),
                                "options only for one-shot methods (the prunekit.prune registry)")
        for key, item in options.items():
            if key not in ONE_SHOT_OPTIONS:
                raise unknown_choice(f"method_options.{method} key", key, ONE_SHOT_OPTIONS)
            if key == "min_keep":
                _positive(item, f"method_options.{method}.min_keep", allow_zero=True)
            elif key == "n_batches":
                _integer(item, f"method_options.{method}.n_batches", 1)
            elif not isinstance(item, str):
                raise ArgumentError(f"method_options.{method}.{key}", item, "a string")
        out[method] = dict(options)
    return out
