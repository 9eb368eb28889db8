"""Merge recipes and their YAML configs, close to mergekit's format.

```yaml
merge_method: dare_ties          # linear | task_arithmetic | ties | dare_linear | dare_ties
base_model: ./minilm
models:
  - model: ./minilm-topics
    parameters: {weight: 0.5, density: 0.5}
  - model: ./minilm-kjv
    parameters: {weight: 0.5, density: 0.5}
parameters: {lambda: 1.0, normalize: false, rescale: paper, seed: 0}
dtype: float32
```
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import ArgumentError, unknown_choice
from .checkpoint import DTYPES, parse_size
from .ops import check_density, check_rescale


@dataclass(frozen=True)
class Recipe:
    """What a named merge does: how each delta is sparsified, whether signs must agree, the defaults."""

    sparsify: str | None  # None, "magnitude" (TIES trim) or "random" (DARE drop)
    consensus: bool       # TIES sign election, keep only agreeing entries
    normalize: bool       # divide by the summed weights of the contributing models
    needs_base: bool
    paper: str


METHODS: dict[str, Recipe] = {
    "linear": Recipe(None, False, True, False,
                     "Wortsman et al. 2022, Model soups: averaging weights of multiple fine-tuned models"),
    "task_arithmetic": Recipe(None, False, False, True,
                              "Ilharco et al. 2023, Editing Models with Task Arithmetic"),
    "ties": Recipe("magnitude", True, True, True,
                   "Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models"),
    "dare_linear": Recipe("random", False, False, True,
                          "Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from Homologous "
                          "Models as a Free Lunch (DARE)"),
    "dare_ties": Recipe("random", True, False, True,
                        "Yu et al. 2024 (DARE) with the sign consensus of Yadav et al. 2023 (TIES)"),
}

SHARED_KEYS = ("lambda", "normalize", "rescale", "seed")
MODEL_KEYS = ("weight", "density")
TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "max_shard_size")


@dataclass(frozen=True)
class ModelEntry:
    """One fine-tuned model and its per-model parameters."""

    model: str
    weight: float = 1.0
    density: float = 1.0


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge: method, base, models and shared parameters."""

    merge_method: str
    models: tuple[ModelEntry, ...]
    base_model: str | None = None
    lam: float = 1.0
    normalize: bool | None = None  # None: the method's default
    rescale: str = "paper"
    seed: int = 0
    dtype: str | None = None
    max_shard_size: str = "5GB"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def recipe(self) -> Recipe:
        """The named method's recipe."""
        return METHODS[self.merge_method]

    @property
    def do_normalize(self) -> bool:
        """normalize as given, or the method's default."""
        return self.recipe.normalize if self.normalize is None else self.normalize

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (written into the output's prunekit.json)."""
        data = asdict(self)
        data["models"] = [asdict(m) for m in self.models]
        data["normalize"] = self.do_normalize
        return data


def _number(value: Any, argument: str) -> float:
    if isinstance(value, (list, tuple, dict)):
        raise ArgumentError(argument, value, "one number (per-layer gradients of parameters are not supported)")
    if isinstance(value, bool):
        raise ArgumentError(argument, value, "a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ArgumentError(argument, value, "a number") from None
    if number != number:
        raise ArgumentError(argument, value, "a number (not NaN)")
    return number


def _bool(value: Any, argument: str) -> bool:
    if not isinstance(value, bool):
        raise ArgumentError(argument, value, "true or false")
    return value


def _keys(mapping: Any, allowed: tuple[str, ...], argument: str) -> dict[str, Any]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise ArgumentError(argument, mapping, "a mapping of " + ", ".join(allowed))
    for key in mapping:
        if key not in allowed:
            raise unknown_choice(f"{argument} key", key, allowed)
    return dict(mapping)


def _model_entry(item: Any, index: int) -> ModelEntry:
    argument = f"models[{index}]"
    if isinstance(item, str):
        return ModelEntry(item)
    entry = _keys(item, ("model", "parameters"), argument)
    if not isinstance(entry.get("model"), str) or not entry["model"]:
        raise ArgumentError(f"{argument}.model", entry.get("model"), "a model folder (a non-empty string)")
    params = _keys(entry.get("parameters"), MODEL_KEYS, f"{argument}.parameters")
    weight = _number(params.get("weight", 1.0), f"{argument}.parameters.weight")
    density = check_density(params.get("density", 1.0), f"{argument}.parameters.density")
    return ModelEntry(entry["model"], weight, density)


def config_from_dict(data: Any) -> MergeConfig:
    """Validate a parsed config mapping; every error names the key, the value and what is allowed."""
    data = _keys(data, TOP_KEYS, "config")
    method = data.get("merge_method")
    if method not in METHODS:
        raise unknown_choice("merge_method", method, METHODS)
    recipe = METHODS[method]
    base = data.get("base_model")
    if base is not None and (not isinstance(base, str) or not base):
        raise ArgumentError("base_model", base, "a model folder (a non-empty string)")
    if recipe.needs_base and base is None:
        raise ArgumentError("base_model", None, f"a model folder: {method} merges deltas from a base model")
    items = data.get("models")
    if not isinstance(items, list) or not items:
        raise ArgumentError("models", items, "a non-empty list of {model: FOLDER, parameters: {weight, density}}")
    entries = [_model_entry(item, i) for i, item in enumerate(items)]
    if recipe.needs_base:
        # As in mergekit, the base may be listed among the models; it contributes no delta.
        entries = [e for e in entries if os.path.normpath(e.model) != os.path.normpath(base)]
        if not entries:
            raise ArgumentError("models", items, "at least one model besides base_model")
    if recipe.sparsify is None:
        for i, entry in enumerate(entries):
            if entry.density != 1.0:
                raise ArgumentError(f"models[{i}].parameters.density", entry.density,
                                    f"1 (or absent): {method} does not sparsify deltas; use ties, dare_linear or dare_ties")
    shared = _keys(data.get("parameters"), SHARED_KEYS, "parameters")
    dtype = data.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise unknown_choice("dtype", dtype, DTYPES)
    seed = shared.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ArgumentError("parameters.seed", seed, "a non-negative integer")
    max_shard = data.get("max_shard_size", "5GB")
    parse_size(max_shard)
    return MergeConfig(
        merge_method=method, models=tuple(entries), base_model=base,
        lam=_number(shared.get("lambda", 1.0), "parameters.lambda"),
        normalize=_bool(shared["normalize"], "parameters.normalize") if "normalize" in shared else None,
        rescale=check_rescale(shared.get("rescale", "paper")), seed=seed, dtype=dtype, max_shard_size=str(max_shard),
    )


def load_config(path: str | os.PathLike) -> MergeConfig:
    """Read and validate a YAML merge config."""
    file = Path(path)
    if not file.is_file():
        raise ArgumentError("config", str(path), "a YAML file that exists")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ArgumentError("config", str(path), f"valid YAML ({error})") from None
    return config_from_dict(data)
