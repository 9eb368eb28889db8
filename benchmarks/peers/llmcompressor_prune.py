"""Peer run for benchmarks/llm_posttraining.py: prune with llmcompressor's SparseGPT or Wanda, save a plain HF folder.

Runs ONLY in the llmcompressor virtualenv (/work/venv-llmc: llmcompressor 0.14, transformers <= 5.17); it imports
nothing from prunekit. The main script writes the calibration token ids (one list per sample) to a JSON file; this
script feeds exactly those rows to `llmcompressor.oneshot` as a pre-tokenized `datasets.Dataset` (an `input_ids`
column), batch size 1, no shuffling, no padding, no truncation, and checks afterwards (a hook on the input
embedding) that the pipeline saw exactly those sequences.

Settings matched to prunekit: sequential (block-by-block) pipeline over the decoder layers with the pruned outputs
propagated to the next layer (llmcompressor's default `propagate_error=True`); targets = every Linear inside the
decoder layers (`re:model.layers.N$`), lm_head ignored; SparseGPT block size 128 and dampening 0.01.

Timing: the model is loaded first (timed apart as load_seconds); prune_seconds is the whole `oneshot(...)` call
(its pipeline tracing, calibration and pruning). The folder is written with transformers' own `save_pretrained`
(dense safetensors, no compressed-tensors config), so plain transformers in the main venv loads it; the tokenizer
files are copied byte-for-byte from the model folder, so every tool is evaluated with the same tokenizer.

Prints one line `@@RESULT {json}` on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")


def peak_rss_mib() -> float:
    """This process's own peak RSS in MiB: VmHWM (ru_maxrss would start at the parent's size, carried over fork+exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", required=True, help="JSON file: {'samples': [[token ids], ...]}")
    parser.add_argument("--model", required=True, help="plain HF model folder (the same one prunekit uses)")
    parser.add_argument("--method", required=True, choices=("sparsegpt", "wanda"))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M (e.g. 2:4)")
    parser.add_argument("--out", required=True, help="output folder (created; must not exist or be empty)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocksize", type=int, default=128)
    parser.add_argument("--dampening", type=float, default=0.01)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    samples = [list(map(int, s)) for s in json.loads(Path(args.calib).read_text())["samples"]]
    if not samples or any(not s for s in samples):
        raise SystemExit("calibration file holds no samples, or an empty one")

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model.eval()
    load_seconds = time.perf_counter() - started
    rss_after_load = peak_rss_mib()

    # mask_structure "N:M" in llmcompressor means "prune N of every M" (prune_n, prune_m); "0:0" = unstructured.
    if args.pattern == "unstructured":
        mask_structure = "0:0"
    else:
        keep, group = (int(x) for x in args.pattern.split(":"))
        mask_structure = f"{group - keep}:{group}"
    common = dict(sparsity=args.sparsity, mask_structure=mask_structure,
                  targets=[r"re:model\.layers\.\d+$"], ignore=["re:.*lm_head"])
    if args.method == "sparsegpt":
        modifier = SparseGPTModifier(**common, block_size=args.blocksize, dampening_frac=args.dampening)
    else:
        modifier = WandaPruningModifier(**common)

    dataset = Dataset.from_dict({"input_ids": samples})
    seen: list[tuple[int, ...]] = []

    def record(_module, inputs):
        ids = inputs[0] if inputs else None
        if isinstance(ids, torch.Tensor) and not isinstance(ids, torch.fx.Proxy) and ids.dim() == 2:
            seen.extend(tuple(row.tolist()) for row in ids)

    handle = model.get_input_embeddings().register_forward_pre_hook(record)
    started = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        recipe=[modifier],
        dataset=dataset,
        num_calibration_samples=len(samples),
        shuffle_calibration_samples=False,
        batch_size=1,
        max_seq_length=None,
        pipeline="sequential",
    )
    prune_seconds = time.perf_counter() - started
    handle.remove()
    rss_after_prune = peak_rss_mib()

    # The pipeline must have fed exactly the given sequences, each the same number of times, none cut or padded.
    expected = Counter(tuple(s) for s in samples)
    got = Counter(seen)
    passes = {got[key] // count for key, count in expected.items() if got[key] % count == 0}
    calibration_ok = set(got) == set(expected) and len(passes) == 1 and min(passes) >= 1
    calibration_check = {"ok": calibration_ok, "sequences_expected": len(samples), "distinct_seen": len(got),
                         "calls_seen": len(seen), "tokens_expected": sum(map(len, samples))}
    if not calibration_ok:
        print(f"calibration check failed: {calibration_check}", file=sys.stderr)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # transformers' own save_pretrained (the class method: llmcompressor wraps the instance's one to write a
    # compressed-tensors config that plain transformers without compressed-tensors cannot read).
    type(model).save_pretrained(model, str(out), safe_serialization=True)
    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config or "compression_config" in config:
        raise SystemExit("the saved config carries a quantization/compression config; plain transformers cannot load it")
    for name in TOKENIZER_FILES:
        source = Path(args.model) / name
        if source.is_file():
            shutil.copyfile(source, out / name)

    linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    zeros = sum(int((m.weight == 0).sum()) for m in linear)
    total = sum(m.weight.numel() for m in linear)
    result = {
        "tool": "llmcompressor", "llmcompressor_version": llmcompressor.__version__,
        "transformers_version": transformers.__version__, "torch_version": torch.__version__,
        "method": args.method, "pattern": args.pattern, "sparsity_requested": args.sparsity,
        "mask_structure": mask_structure, "load_seconds": load_seconds, "prune_seconds": prune_seconds,
        "peak_rss_mib": rss_after_prune, "peak_rss_after_load_mib": rss_after_load,
        "peak_rss_with_save_mib": peak_rss_mib(), "in_memory_linear_sparsity": zeros / total,
        "calibration_check": calibration_check, "threads": torch.get_num_threads(),
    }
    print("@@RESULT " + json.dumps(result), flush=True)
    return 0 if calibration_ok else 3


if __name__ == "__main__":
    sys.exit(main())
