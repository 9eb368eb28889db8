"""Peer runs for benchmarks/structured_vs_torch_pruning.py: torch-pruning's DependencyGraph and MetaPruner.

Runs in the torch-pruning virtualenv (/work/venv-tp: torch-pruning 1.6.1, the same torch 2.13 CPU wheel as prunekit's
venv, transformers 5.24 for the MiniLM and SmolLM2 rows). From prunekit it loads only two torch-only files, the model
definitions (prunekit/nets.py) and the cost counters (prunekit/measure.py), under a bare `prunekit` package that skips
the real package's __init__ (which imports safetensors, the pruning methods and more). So both tools prune the very
same modules, built from the same seeds, on the same example inputs (a file the main script writes), and are
measured by the same MAC counter (torch's FlopCounterMode via prunekit.measure.count_macs).

The main script also imports this file (in prunekit's venv) for the helpers shared by both sides: building a model
from a spec, loading the example inputs, the weight fingerprint that shows both sides started from the same weights,
and the bisection on the pruning ratio.

Tasks, from the JSON file given by --spec:
  time  graph build: `tp.DependencyGraph().build_dependency(model, example_inputs)`, warm-up + repeats on the same
        model; prune: on a fresh deep copy each time, `tp.pruner.MetaPruner(copy, example_inputs, ...)` (its
        constructor builds its own graph) and `.step()`, timed apart; then params/MACs of the pruned copy and a
        forward pass on it.
  macs  the smallest pruning ratio whose pruned copy keeps at most `target` of the dense MACs (bisection, each trial
        a MetaPruner + step on a deep copy), then the model pruned at that ratio is saved whole (torch.save) for the
        main script's latency and recovery children.

MetaPruner settings (torch-pruning's documented API and its examples): importance
tp.importance.GroupMagnitudeImportance(p=2) (group L2 norm, mean reduction, mean normaliser), pruning_ratio,
global_pruning as asked, ignored_layers = [the final classifier / lm_head / BERT pooler], round_to as asked;
nn.MultiheadAttention modules get num_heads (as torchvision's ViT example); transformers models as its
prune_hf_bert.py and prune_llm.py examples: num_heads per q/k/v projection (num_key_value_heads for k/v),
prune_num_heads=True, prune_head_dims=False, head_pruning_ratio = pruning_ratio, an output_transform that picks one
tensor of the model output, and the examples' attribute updates after step() (heads and sizes per attention module).

Prints '@@PROGRESS {json}' lines while it works (so a timed-out run still reports what it finished) and one
'@@RESULT {json}' line at the end.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

RESULT_MARK = "@@RESULT "
PROGRESS_MARK = "@@PROGRESS "
DEFAULT_SRC = Path(__file__).resolve().parents[2] / "src"


def emit(payload: dict[str, Any], mark: str = RESULT_MARK) -> None:
    print(mark + json.dumps(payload, default=str), flush=True)


def progress(payload: dict[str, Any]) -> None:
    emit(payload, PROGRESS_MARK)


def light_prunekit(src: str | os.PathLike) -> None:
    """Make `import prunekit.nets` / `prunekit.measure` work with torch alone: a bare package, no __init__ run."""
    if "prunekit" in sys.modules:
        return
    package = types.ModuleType("prunekit")
    package.__path__ = [str(Path(src) / "prunekit")]  # type: ignore[attr-defined]
    sys.modules["prunekit"] = package


# ----------------------------------------------------------------------------------------------------------------
# Shared by both sides: models, inputs, fingerprints, outputs, the ratio search
# ----------------------------------------------------------------------------------------------------------------


def build_model(spec: dict[str, Any]):
    """The model a spec describes, in eval mode: a prunekit.nets factory built after torch.manual_seed(seed) (weights
    from a safetensors / torch file when given), or a transformers folder loaded in float32."""
    import torch

    if spec["kind"] == "net":
        from prunekit.nets import build_net

        torch.manual_seed(int(spec.get("seed", 0)))
        model = build_net(spec["factory"], **spec.get("kwargs", {}))
        weights = spec.get("weights")
        if weights:
            if str(weights).endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(str(weights))
            else:
                state = torch.load(str(weights), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        return model.eval()
    if spec["kind"] == "hf":
        import transformers

        loader = getattr(transformers, spec["loader"])
        model = loader.from_pretrained(spec["path"], dtype=torch.float32)
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False  # plain forward passes: no KV cache built and returned
        return model.eval()
    raise ValueError(f"unknown model kind {spec['kind']!r}")


def load_inputs(path: str | os.PathLike) -> Any:
    """The example inputs the main script saved: a tuple of positional tensors or a dict of keyword tensors."""
    import torch

    saved = torch.load(str(path), map_location="cpu", weights_only=True)
    if "kwargs" in saved:
        return dict(saved["kwargs"])
    return tuple(saved["args"])


def call(model, inputs: Any):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def output_tensor(output: Any):
    """One tensor of a model output: the tensor itself, logits, or the last hidden state."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"no tensor in a model output of type {type(output).__name__}")


def traced_sum(output: Any):
    """torch-pruning's output_transform for transformers outputs: one scalar reached from every output tensor that
    depends on the hidden size (BERT's pooler included, so its input columns are pruned with the hidden size)."""
    total = output_tensor(output).sum()
    pooled = getattr(output, "pooler_output", None)
    return total + pooled.sum() if pooled is not None else total


def check_forward(model, inputs: Any) -> dict[str, Any]:
    """A no-grad forward pass of a pruned model: its output shape and whether every value is finite."""
    import torch

    with torch.no_grad():
        out = output_tensor(call(model.eval(), inputs))
    return {"output_shape": list(out.shape), "output_finite": bool(torch.isfinite(out).all())}


def weights_fingerprint(model) -> str:
    """A short hash of every parameter's name, shape, sum and absolute sum: equal on both sides for equal weights."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            t = tensor.detach().double()
            digest.update(f"{name}:{tuple(t.shape)}:{float(t.sum()):.6e}:{float(t.abs().sum()):.6e};".encode())
    return digest.hexdigest()[:16]


def costs(model, inputs: Any) -> dict[str, int]:
    from prunekit.measure import count_macs, count_params

    return {"params": count_params(model), "macs": count_macs(model, inputs)}


def search_ratio(measure: Callable[[float], float], target: float, high: float, steps: int) -> tuple[float, list]:
    """The smallest ratio in [0, high] whose pruned copy keeps at most `target` of the dense cost (bisection, as
    prunekit's budget search does); returns it and the trials [(ratio, share)]."""
    trials = []

    def share(ratio: float) -> float:
        value = measure(ratio)
        trials.append((ratio, value))
        return value

    low, top = 0.0, high
    if share(top) > target:
        return top, trials
    for _ in range(steps):
        middle = (low + top) / 2
        if share(middle) <= target:
            top = middle
        else:
            low = middle
    return top, trials


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------------------------------------------
# torch-pruning
# ----------------------------------------------------------------------------------------------------------------


def _is_bert_attention(module) -> bool:
    return all(hasattr(module, name) for name in ("query", "key", "value", "num_attention_heads"))


def _is_llama_attention(module) -> bool:
    return all(hasattr(module, f"{p}_proj") for p in "qkvo") and hasattr(module, "head_dim")


def tp_settings(model, spec: dict[str, Any], ratio: float) -> dict[str, Any]:
    """MetaPruner keyword arguments for this model (see the module docstring)."""
    import torch
    import torch_pruning as tp

    settings: dict[str, Any] = {
        "importance": tp.importance.GroupMagnitudeImportance(p=2),
        "pruning_ratio": ratio,
        "global_pruning": bool(spec.get("global_pruning", False)),
        "ignored_layers": [model.get_submodule(name) for name in spec.get("ignored", [])],
    }
    if int(spec.get("round_to", 1)) > 1:
        settings["round_to"] = int(spec["round_to"])
    num_heads: dict[Any, int] = {}
    config = getattr(model, "config", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            num_heads[module] = module.num_heads
        elif _is_bert_attention(module):
            for projection in (module.query, module.key, module.value):
                num_heads[projection] = module.num_attention_heads
        elif _is_llama_attention(module) and config is not None:
            num_heads[module.q_proj] = config.num_attention_heads
            kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            num_heads[module.k_proj] = kv
            num_heads[module.v_proj] = kv
    if num_heads:
        settings["num_heads"] = num_heads
    if spec["model"]["kind"] == "hf":
        settings.update(prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
                        output_transform=traced_sum)
    return settings


def tp_fix_attributes(model) -> None:
    """After step(): the attention attributes transformers reads in forward, as torch-pruning's examples set them."""
    config = getattr(model, "config", None)
    gqa = config is not None and getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads)
    for _, module in model.named_modules():
        if _is_bert_attention(module):
            head_size = module.attention_head_size
            module.num_attention_heads = module.query.out_features // head_size
            module.all_head_size = module.query.out_features
            if config is not None:
                config.num_attention_heads = module.num_attention_heads
        elif _is_llama_attention(module):
            heads = module.q_proj.out_features // module.head_dim
            kv = module.k_proj.out_features // module.head_dim
            for name, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv),
                                ("num_key_value_groups", heads // max(kv, 1))):
                if hasattr(module, name) or name == "num_key_value_groups":
                    setattr(module, name, value)
            if config is not None:
                config.num_attention_heads = heads
                if not gqa:
                    config.num_key_value_heads = heads
    if config is not None:
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embedding is not None and hasattr(config, "hidden_size"):
            config.hidden_size = embedding.embedding_dim


def tp_prune(model, inputs: Any, spec: dict[str, Any], ratio: float) -> tuple[float, float]:
    """MetaPruner(model, ...) then step() (and the attribute updates); returns (constructor s, step s)."""
    import torch_pruning as tp

    settings = tp_settings(model, spec, ratio)
    started = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, inputs, **settings)
    built = time.perf_counter()
    pruner.step()
    tp_fix_attributes(model)
    done = time.perf_counter()
    return built - started, done - built


def tp_build(model, inputs: Any, spec: dict[str, Any]) -> float:
    import torch_pruning as tp

    transform = traced_sum if spec["model"]["kind"] == "hf" else None
    started = time.perf_counter()
    tp.DependencyGraph().build_dependency(model, example_inputs=inputs, output_transform=transform)
    return time.perf_counter() - started


def task_time(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    model = build_model(spec["model"])
    inputs = load_inputs(spec["inputs"])
    result: dict[str, Any] = {"load_seconds": time.perf_counter() - started, "fingerprint": weights_fingerprint(model),
                              "threads": torch.get_num_threads()}
    result.update({f"dense_{k}": v for k, v in costs(model, inputs).items()})
    progress(result)
    warmup, repeats = int(spec["warmup"]), int(spec["repeats"])
    builds = [tp_build(model, inputs, spec) for _ in range(warmup + repeats)]
    result.update(build_first_seconds=builds[0], build_runs=builds[warmup:], build_seconds=median(builds[warmup:]))
    progress(result)
    inits, steps, pruned = [], [], None
    for index in range(warmup + repeats):
        pruned = copy.deepcopy(model)
        init, step = tp_prune(pruned, inputs, spec, float(spec["ratio"]))
        inits.append(init)
        steps.append(step)
        result.update(prune_first_seconds=steps[0], init_first_seconds=inits[0])
        progress(result)
        if index == 0 and init + step > float(spec["slow_seconds"]):
            result["single_run"] = True  # too slow for the protocol's repeats: the first run is the only one
            break
    keep = slice(0, 1) if result.get("single_run") else slice(warmup, None)
    result.update(prune_runs=steps[keep], init_runs=inits[keep], prune_seconds=median(steps[keep]),
                  init_seconds=median(inits[keep]), oneshot_seconds=median([a + b for a, b in zip(inits[keep],
                                                                                                   steps[keep])]))
    result.update({f"pruned_{k}": v for k, v in costs(pruned, inputs).items()})
    result.update(check_forward(pruned, inputs))
    return result


def task_macs(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from prunekit.measure import count_macs

    model = build_model(spec["model"])
    inputs = load_inputs(spec["inputs"])
    dense = costs(model, inputs)
    result: dict[str, Any] = {"fingerprint": weights_fingerprint(model), "dense_params": dense["params"],
                              "dense_macs": dense["macs"], "threads": torch.get_num_threads()}
    progress(result)

    def share(ratio: float) -> float:
        candidate = copy.deepcopy(model)
        tp_prune(candidate, inputs, spec, ratio)
        return count_macs(candidate, inputs) / dense["macs"]

    started = time.perf_counter()
    ratio, trials = search_ratio(share, float(spec["target"]), float(spec.get("high", 0.95)),
                                 int(spec.get("search_steps", 12)))
    result.update(ratio=ratio, trials=trials, search_seconds=time.perf_counter() - started)
    progress(result)
    init, step = tp_prune(model, inputs, spec, ratio)
    result.update(prune_seconds=init + step)
    result.update({f"pruned_{k}": v for k, v in costs(model, inputs).items()})
    result.update(check_forward(model, inputs))
    out = Path(spec["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    model.zero_grad(set_to_none=True)
    torch.save(model, out)
    result["out"] = str(out)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="JSON file written by benchmarks/structured_vs_torch_pruning.py")
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    light_prunekit(spec.get("src", DEFAULT_SRC))
    import warnings

    import torch

    torch.set_num_threads(int(spec.get("threads", 2)))
    warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
    import torch_pruning as tp
    from importlib import metadata

    header = {"torch_pruning_version": metadata.version("torch-pruning"), "torch_version": torch.__version__,
              "tp_module_version": getattr(tp, "__version__", None), "task": spec["task"]}
    try:
        header["transformers_version"] = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        pass
    task = {"time": task_time, "macs": task_macs}[spec["task"]]
    result = task(spec)
    emit({**header, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
