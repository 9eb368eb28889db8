"""Block-by-block calibration ("sequential onloading", as in SparseGPT and Wanda), generic across decoder LLMs.

The model runs once per sample up to the decoder blocks, with every block replaced by a recorder, to capture what each
block is called with: the hidden states entering block 0 and, for every block, the other positional and keyword
arguments (attention masks, rotary `position_embeddings`, position ids, ...). Those can differ between blocks (Gemma's
sliding and global layers, Mistral's sliding window), hence one record per block. Then, for each block in order, a
callback may collect statistics and prune it; the block is re-run on every sample *after* the callback so the next
block is fed the already pruned outputs. Only one set of hidden states (per sample) is kept: outputs replace inputs.

With `checkpoint_dir`, each finished block's weights and the next block's inputs are saved atomically, so an
interrupted run resumes where it stopped and ends with the same model as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.errors import ArgumentError, ModelError, PruneError

CHECKPOINT_VERSION = 1
PROGRESS_FILE = "progress.json"

# The benchmark protocol's calibration (BENCH-PROTOCOLS.md, "LLM post-training pruning").
PROTOCOL_CALIBRATION_CHARS = 1_500_000
PROTOCOL_SAMPLES = 128
PROTOCOL_LINES_PER_SAMPLE = 8
PROTOCOL_MIN_LINE_CHARS = 40
PROTOCOL_MAX_TOKENS = 256


# --------------------------------------------------------------------------------------------------------------------
# Calibration text
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetText:
    """Calibration or evaluation text from a Hugging Face `datasets` dataset: a hub name (with internet) or a folder
    written by `Dataset.save_to_disk`. Rows of `column` are joined with newlines; empty rows are skipped."""

    name: str
    config: str | None = None
    split: str = "train"
    column: str = "text"


def _load_dataset(source: DatasetText) -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError("calibration from a `datasets` dataset needs the datasets package: "
                          "pip install datasets") from None
    if Path(source.name).is_dir():
        loaded = datasets.load_from_disk(source.name)
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise ArgumentError("split", source.split, "one of the saved dataset's splits: "
                                    + ", ".join(sorted(loaded)))
            loaded = loaded[source.split]
        return loaded
    try:
        return datasets.load_dataset(source.name, source.config, split=source.split)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise ArgumentError("dataset", source.name, "a dataset name `datasets.load_dataset` can load (or a folder "
                            "written by save_to_disk)", hint=str(error).split("\n")[0]) from None


def text_from_dataset(dataset: Any, column: str = "text") -> str:
    """The non-empty rows of one string column of a `datasets` dataset, joined with newlines."""
    names = list(getattr(dataset, "column_names", None) or [])
    if column not in names:
        raise ArgumentError("column", column, "a column of the dataset: " + (", ".join(names) or "(none)"))
    rows = [row for row in dataset[column] if isinstance(row, str) and row.strip()]
    if not rows:
        raise ArgumentError("column", column, "a column holding text (every row is empty or not a string)")
    return "\n".join(rows)


def load_text(path: Any = None, argument: str = "path") -> str:
    """The text of a UTF-8 file, of a `datasets` dataset (a `DatasetText`, or a loaded dataset with a "text" column),
    or with None an embedded default (Python's own pydoc topics, always installed).

    `argument` is how the caller's user named the path (a keyword such as "calib", or a flag such as "--calib"),
    so that an error names it.
    """
    if isinstance(path, DatasetText):
        return text_from_dataset(_load_dataset(path), path.column)
    if hasattr(path, "column_names") and hasattr(path, "__getitem__"):  # an already loaded datasets.Dataset
        return text_from_dataset(path)
    if path is None:
        from pydoc_data.topics import topics

        # Sorted keys: the same text whatever order the dict was written in.
        return "\n".join(topics[key] for key in sorted(topics))
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentError(argument, path, "a path to a UTF-8 text file, a DatasetText, a datasets.Dataset, or "
                            "None for the embedded default text")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArgumentError(argument, os.fspath(path), "an existing UTF-8 text file", hint="no such file") from None
    except IsADirectoryError:
        raise ArgumentError(argument, os.fspath(path), "a UTF-8 text file", hint="this is a folder") from None
    except UnicodeDecodeError as error:
        raise ArgumentError(argument, os.fspath(path), "a UTF-8 text file", hint=str(error)) from None
    if not text.strip():
        raise ArgumentError(argument, os.fspath(path), "a UTF-8 text file holding some text", hint="the file is empty")
    return text


def check_calibration_tokens(text: str, tokenizer: Any, n_samples: int, seq_len: int, argument: str = "calib",
                             source: Any = None) -> int:
    """Refuse a calibration text with fewer tokens than n_samples x seq_len (the samples would mostly repeat it).

    Needs only the tokenizer, so it runs before the model is loaded; `source` (the path or dataset the text came
    from, None for the embedded text) is the value the error shows. Returns the text's token count.
    """
    from prunekit.evaluate import encode, tokenizer_adds_bos

    _check_count("n_samples", n_samples)
    _check_count("seq_len", seq_len, minimum=2)
    body = seq_len - 1 if tokenizer_adds_bos(tokenizer) else seq_len
    needed = n_samples * body
    count = int(encode(tokenizer, text, add_special_tokens=False).numel())
    if count < needed:
        value = os.fspath(source) if isinstance(source, (str, os.PathLike)) else source
        raise ArgumentError(argument, value, f"a text of at least {needed} tokens for {n_samples} samples of "
                            f"{body} text tokens (seq_len={seq_len})", hint=f"Its calibration part holds {count} "
                            f"tokens ({len(text)} characters); use a longer text, fewer samples or a shorter seq_len")
    return count


def _check_count(argument: str, value: Any, minimum: int = 1) -> int:
    """Validate a positive integer argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(argument, value, f"an integer >= {minimum}")
    return value


def calibration_samples(text: str, tokenizer: Any, n_samples: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """`n_samples` windows of exactly `seq_len` tokens at random places in `text` (seeded), each of shape (1, seq_len).

    Where the tokenizer starts every text with BOS, each window is BOS + seq_len-1 text tokens.
    """
    from prunekit.evaluate import encode, tokenizer_adds_bos

    _check_count("n_samples", n_samples)
    _check_count("seq_len", seq_len, minimum=2)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ArgumentError("seed", seed, "an integer")
    if not isinstance(text, str):
        raise ArgumentError("text", type(text).__name__, "a str")
    bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    body = seq_len - 1 if bos is not None else seq_len
    ids = encode(tokenizer, text, add_special_tokens=False)
    if ids.numel() < body:
        raise ArgumentError(
            "text", f"<{len(text)} characters, {ids.numel()} tokens>",
            f"at least {body} tokens for one window of seq_len={seq_len}", hint="use a longer text or a smaller seq_len",
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body + 1, (n_samples,), generator=generator).tolist()
    prefix = [bos] if bos is not None else []
    return [torch.tensor(prefix + ids[start : start + body].tolist(), dtype=torch.long).unsqueeze(0) for start in starts]


def protocol_lines(text: str, n_chars: int = PROTOCOL_CALIBRATION_CHARS, min_chars: int = PROTOCOL_MIN_LINE_CHARS) -> list[str]:
    """The protocol's candidate lines: of the first `n_chars` characters, the lines longer than `min_chars` (stripped)."""
    return [line.strip() for line in text[:n_chars].splitlines() if len(line.strip()) > min_chars]


def protocol_calibration_texts(
    text: str,
    n_samples: int = PROTOCOL_SAMPLES,
    lines_per_sample: int = PROTOCOL_LINES_PER_SAMPLE,
    n_chars: int = PROTOCOL_CALIBRATION_CHARS,
    min_chars: int = PROTOCOL_MIN_LINE_CHARS,
) -> list[str]:
    """The protocol's calibration texts: `n_samples` runs of `lines_per_sample` consecutive qualifying lines.

    Deterministic, no random numbers: the qualifying lines are cut into consecutive, non-overlapping runs of
    `lines_per_sample`; run j = floor(i * runs / n_samples) is taken for sample i, so the samples are spread
    evenly over the whole calibration part. Lines of a run are joined with newlines.
    """
    _check_count("n_samples", n_samples)
    _check_count("lines_per_sample", lines_per_sample)
    lines = protocol_lines(text, n_chars, min_chars)
    runs = len(lines) // lines_per_sample
    if runs < n_samples:
        raise ArgumentError(
            "text", f"<{len(text)} characters, {len(lines)} lines longer than {min_chars} characters>",
            f"at least {n_samples * lines_per_sample} such lines in the first {n_chars} characters "
            f"({n_samples} samples of {lines_per_sample} lines)",
        )
    picks = [i * runs // n_samples for i in range(n_samples)]
    return ["\n".join(lines[j * lines_per_sample : (j + 1) * lines_per_sample]) for j in picks]


def protocol_calibration_samples(text: str, tokenizer: Any, max_tokens: int = PROTOCOL_MAX_TOKENS) -> list[torch.Tensor]:
    """The benchmark protocol's 128 calibration samples from kjv.txt, tokenized (BOS if the tokenizer adds it) and cut at 256 tokens."""
    _check_count("max_tokens", max_tokens)
    samples = []
    for chunk in protocol_calibration_texts(text):
        ids = tokenizer(chunk, add_special_tokens=True)["input_ids"][:max_tokens]
        samples.append(torch.tensor(ids, dtype=torch.long).unsqueeze(0))
    return samples


# --------------------------------------------------------------------------------------------------------------------
# Capturing what each block is called with
# --------------------------------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the needed inputs are captured."""


@dataclass
class BlockCall:
    """The arguments a block is called with, apart from the hidden states: `block(hidden, *args, **kwargs)`."""

    args: tuple
    kwargs: dict


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    """Separate the hidden states (first positional argument, or `hidden_states=`) from the rest of a block call."""
    kwargs = dict(kwargs)
    if args:
        return args[0], BlockCall(tuple(args[1:]), kwargs)
    if "hidden_states" in kwargs:
        return kwargs.pop("hidden_states"), BlockCall((), kwargs)
    raise ModelError("a decoder block was called without hidden states (no positional argument, no hidden_states=)")


def call_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """Run one block on one sample's hidden states and return its output hidden states."""
    output = block(hidden, *call.args, **call.kwargs)
    # Some architectures return (hidden, attentions, ...), newer transformers a bare tensor.
    return output[0] if isinstance(output, (tuple, list)) else output


def _input_device(model: nn.Module) -> torch.device:
    """Device of the model's input embedding."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embedding.weight.device if embedding is not None else next(model.parameters()).device


def _forward_to_hooks(model: nn.Module, ids: torch.Tensor) -> bool:
    """Run the model on `ids` without KV cache; True when a hook stopped it early."""
    try:
        model(input_ids=ids.to(_input_device(model)), use_cache=False)
    except _StopForward:
        return True
    return False


@dataclass
class CapturedInputs:
    """Per sample: the hidden states entering block 0, and for every block the rest of its call."""

    hidden: list[torch.Tensor]
    calls: list[list[BlockCall]]  # calls[sample][block]
    template: Any = None  # what block 0 returned for the first sample: the structure stand-in blocks must return


def _first_block_call(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor) -> tuple[torch.Tensor, BlockCall]:
    """Hidden states and call of block 0 for one sample, stopping the model right there."""
    seen: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["hidden"], seen["call"] = _split_hidden(args, kwargs)
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        stopped = _forward_to_hooks(model, ids)
    finally:
        handle.remove()
    if not stopped:
        raise ModelError(f"{type(model).__name__}: the forward pass never reached the first decoder block")
    return seen["hidden"], seen["call"]


def _passthrough_like(template: Any) -> Callable[..., Any]:
    """A stand-in forward returning its hidden states in the same structure as the real block's output."""
    rest = tuple(template[1:]) if isinstance(template, (tuple, list)) else None

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden if rest is None else (hidden, *rest)

    return forward


def _shared(call: BlockCall, known: dict[tuple, list[torch.Tensor]]) -> BlockCall:
    """The call with every tensor argument equal to one seen before replaced by that one: samples of one length get
    the same rotary tables and position ids, which then take memory once instead of once per sample."""

    def share(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            same = known.setdefault((tuple(value.shape), value.dtype, value.device), [])
            for seen in same:
                if seen is value or torch.equal(seen, value):
                    return seen
            if len(same) < 8:  # a few distinct values per shape (per layer type); beyond that, keep as is
                same.append(value)
            return value
        if isinstance(value, tuple):
            return tuple(share(item) for item in value)
        if isinstance(value, list):
            return [share(item) for item in value]
        return value

    return BlockCall(share(call.args), {key: share(value) for key, value in call.kwargs.items()})


@torch.no_grad()
def capture_block_inputs(model: nn.Module, samples: Sequence[torch.Tensor], blocks: nn.ModuleList | None = None,
                         keep: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> CapturedInputs:
    """Capture, per sample, the hidden states entering block 0 and every block's other arguments.

    `keep(sample, hidden)` may store each sample's hidden states elsewhere (a file) and return what to hold instead.
    """
    from prunekit.hf import find_decoder_blocks

    if blocks is None:
        blocks = find_decoder_blocks(model)[1]
    # One real call of block 0 shows what a block returns, so stand-ins can return the same structure.
    hidden, call = _first_block_call(model, blocks, samples[0])
    template = blocks[0](hidden, *call.args, **call.kwargs)
    last = len(blocks) - 1
    result = CapturedInputs(hidden=[], calls=[], template=template)
    record: dict[int, Any] = {}

    def make_hook(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            record[index] = _split_hidden(args, kwargs)
            if index == last:  # nothing after the last block is needed (final norm, output head)
                raise _StopForward

        return hook

    known: dict[tuple, list[torch.Tensor]] = {}
    handles = [block.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    # Instance attributes shadow the class's forward; blocks become identities so capturing costs no block compute.
    for block in blocks:
        block.forward = _passthrough_like(template)
    try:
        for ids in samples:
            record.clear()
            stopped = _forward_to_hooks(model, ids)
            missing = [i for i in range(len(blocks)) if i not in record]
            if not stopped or missing:
                raise ModelError(
                    f"{type(model).__name__}: decoder blocks {missing or [last]} were not called in the forward pass; "
                    "block-by-block calibration needs every block on the forward path, once, in order"
                )
            hidden_states = record[0][0]
            result.hidden.append(keep(len(result.hidden), hidden_states) if keep else hidden_states)
            result.calls.append([_shared(record[i][1], known) for i in range(len(blocks))])
    finally:
        for handle in handles:
            handle.remove()
        for block in blocks:
            del block.forward
    return result


# --------------------------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------------------------


class BlockFeed:
    """What a `process_block` callback gets to run its block over the stored calibration samples."""

    def __init__(self, index: int, total: int, block: nn.Module, inputs: list[torch.Tensor], calls: list[BlockCall],
                 progress: bool, after_sample: Callable[[int], None] | None = None) -> None:
        self.index, self.total, self.block = index, total, block
        self.inputs = inputs  # the hidden states entering this block, one (1, seq, hidden) tensor per sample
        self.calls = calls
        self.progress = progress
        self.after_sample = after_sample  # called with each sample's index once it has run (e.g. to free its pages)

    def __len__(self) -> int:
        """Number of calibration samples."""
        return len(self.inputs)

    def run_sample(self, sample: int) -> torch.Tensor:
        """Run the block on one sample (hooks on the block fire) and return its output hidden states."""
        try:
            return call_block(self.block, self.inputs[sample], self.calls[sample])
        finally:
            if self.after_sample is not None:
                self.after_sample(sample)

    @torch.no_grad()
    def run(self, keep_outputs: bool = False, desc: str = "calibrate") -> list[torch.Tensor] | None:
        """Run the block on every sample so hooks registered on it see all activations; outputs if asked."""
        outputs = [] if keep_outputs else None
        for sample in tqdm(range(len(self)), desc=f"block {self.index + 1}/{self.total} {desc}", disable=not self.progress, leave=False):
            output = self.run_sample(sample)
            if outputs is not None:
                outputs.append(output)
        return outputs


ProcessBlock = Callable[[int, str, nn.Module, BlockFeed], Any]


def check_samples(model: nn.Module, samples: Any) -> list[torch.Tensor]:
    """Validate calibration samples: token id tensors of shape (n,) or (1, n), within vocabulary and length limits."""
    from prunekit.hf import check_sequence_length

    if not isinstance(samples, (list, tuple)) or not samples:
        raise ArgumentError("samples", type(samples).__name__, "a non-empty list of token id tensors")
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embedding, "num_embeddings", None)
    checked = []
    for i, ids in enumerate(samples):
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ArgumentError(f"samples[{i}]", type(ids).__name__, "an integer tensor of token ids")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ArgumentError(f"samples[{i}]", f"<tensor of shape {tuple(ids.shape)}>", "shape (n,) or (1, n) with n >= 1")
        check_sequence_length(model, int(ids.shape[1]), argument=f"samples[{i}] length")
        if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ArgumentError(f"samples[{i}]", f"<ids from {int(ids.min())} to {int(ids.max())}>", f"token ids in [0, {vocab})")
        checked.append(ids.long().cpu())
    return checked


_check_samples = check_samples  # the name prunekit.llm imports


def _check_finite(hidden: list[torch.Tensor], where: str) -> None:
    """Raise PruneError when any activation is NaN or infinite."""
    for sample, tensor in enumerate(hidden):
        if not torch.isfinite(tensor).all():
            raise PruneError(
                f"{where} produced non-finite activations (NaN or inf) on calibration sample {sample}; "
                "after pruning this means the block became numerically unstable (too high a sparsity, a broken "
                "weight update, or fp16 overflow)"
            )


@torch.no_grad()
def run_blocks(
    model: nn.Module,
    samples: Sequence[torch.Tensor],
    process_block: ProcessBlock,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    settings: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> list[torch.Tensor]:
    """Calibrate block by block: `process_block(index, name, block, feed)` per block, each fed the pruned outputs of the last.

    `samples` are token id tensors (their length is the user's explicit calibration length, checked against the
    model's limit). The callback runs under torch.no_grad; it may register hooks on the block, call `feed.run()`
    and change the block's weights, but must not change `feed.inputs`. `settings` (JSON-serialisable, e.g. the
    pruning arguments) go into the checkpoint fingerprint: a checkpoint made with other settings, samples, config
    or starting weights is refused. Returns the last block's outputs, one (1, seq, hidden) tensor per sample.
    """
    from prunekit.hf import find_decoder_blocks

    if not callable(process_block):
        raise ArgumentError("process_block", process_block, "a callable (index, name, block, feed)")
    samples = check_samples(model, samples)
    prefix, blocks = find_decoder_blocks(model)
    state = _Checkpoint(Path(checkpoint_dir), _fingerprint(model, samples, settings)) if checkpoint_dir is not None else None
    was_training = model.training
    model.eval()
    try:
        captured = capture_block_inputs(model, samples, blocks)
        hidden, start = captured.hidden, 0
        captured.hidden = []  # the loop below owns the hidden states and replaces them block by block
        if state is not None:
            start, restored = state.resume(blocks, captured.calls)
            if restored is not None:
                hidden = [tensor.to(hidden[0].device) for tensor in restored]
        _check_finite(hidden, "the embedding layer" if start == 0 else f"the checkpoint's inputs of block {start}")
        for index in tqdm(range(start, len(blocks)), desc="blocks", initial=start, total=len(blocks), disable=not progress):
            name = f"{prefix}.{index}"
            block = blocks[index]
            calls = [sample_calls[index] for sample_calls in captured.calls]
            feed = BlockFeed(index, len(blocks), block, hidden, calls, progress)
            process_block(index, name, block, feed)
            # Re-run after the callback: the next block must see this block's pruned outputs. In place, so only
            # one set of hidden states is ever resident.
            for sample in tqdm(range(len(hidden)), desc=f"block {index + 1}/{len(blocks)} propagate", disable=not progress, leave=False):
                hidden[sample] = call_block(block, hidden[sample], calls[sample])
            _check_finite(hidden, f"block {index} ({name})")
            if state is not None:
                state.save(index, blocks, hidden, captured.calls)
    finally:
        model.train(was_training)
    return hidden


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------------


def _digest(payload: Any) -> str:
    """Short stable hash of a JSON-able payload (non-JSON values by their str)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _weights_digest(model: nn.Module) -> str:
    """Hash of a strided sample of every parameter: tells one set of starting weights from another, cheaply."""
    hasher = hashlib.sha256()
    for name, parameter in model.named_parameters():
        flat = parameter.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // 4096)].contiguous().cpu()
        hasher.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode())
        hasher.update(picked.view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()[:16]


def _samples_digest(samples: Sequence[torch.Tensor]) -> str:
    """Hash of the calibration token ids (shapes included)."""
    hasher = hashlib.sha256()
    for ids in samples:
        hasher.update(str(tuple(ids.shape)).encode())
        hasher.update(ids.numpy().tobytes())
    return hasher.hexdigest()[:16]


def _fingerprint(model: nn.Module, samples: Sequence[torch.Tensor], settings: Mapping[str, Any] | None) -> dict[str, str]:
    """What must match for a checkpoint to be resumed: model config, starting weights, samples, caller settings."""
    if settings is not None and not isinstance(settings, Mapping):
        raise ArgumentError("settings", settings, "a dict of JSON-serialisable pruning arguments, or None")
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    config_dict.pop("_name_or_path", None)  # the same model loaded from another folder is still the same model
    return {
        "model": _digest({"class": type(model).__name__, "config": config_dict}),
        "weights": _weights_digest(model),
        "samples": _samples_digest(samples),
        "settings": _digest(dict(settings or {})),
    }


def _tensor_leaves(value: Any, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors inside nested tuples/lists/dicts, by dotted path (the parts of a block call that safetensors can hold)."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    leaves: dict[str, torch.Tensor] = {}
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            leaves.update(_tensor_leaves(item, f"{prefix}.{i}"))
    elif isinstance(value, dict):
        for key, item in value.items():
            leaves.update(_tensor_leaves(item, f"{prefix}.{key}"))
    return leaves


def _call_tensors(calls: Sequence[BlockCall]) -> dict[str, torch.Tensor]:
    """The tensor arguments of one block's calls, keyed `call.<sample>.<arg path>`."""
    tensors: dict[str, torch.Tensor] = {}
    for sample, call in enumerate(calls):
        tensors.update(_tensor_leaves(list(call.args), f"call.{sample}.args"))
        tensors.update(_tensor_leaves(call.kwargs, f"call.{sample}.kwargs"))
    return tensors


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file via a temp file and os.replace, so a crash never leaves a half file under `path`."""
    from safetensors.torch import save_file

    # Clones: safetensors refuses views and tensors sharing storage (tied weights, slices of one buffer).
    plain = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(plain, str(temp), metadata=metadata)
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _write_json_atomic(payload: dict, path: Path) -> None:
    """Write JSON via a temp file and os.replace."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


@dataclass
class _Checkpoint:
    """A checkpoint folder: block_XXXX.safetensors per finished block, inputs_XXXX.safetensors for the next, progress.json."""

    folder: Path
    fingerprint: dict[str, str]

    def _block_file(self, index: int) -> Path:
        """Weights of finished block `index`."""
        return self.folder / f"block_{index:04d}.safetensors"

    def _inputs_file(self, index: int) -> Path:
        """Hidden states (and tensor arguments) entering block `index`."""
        return self.folder / f"inputs_{index:04d}.safetensors"

    def resume(self, blocks: nn.ModuleList, calls: list[list[BlockCall]]) -> tuple[int, list[torch.Tensor] | None]:
        """Restore finished blocks' weights; return (first block to process, its inputs or None to start afresh)."""
        from safetensors.torch import load_file

        if self.folder.exists() and not self.folder.is_dir():
            raise ArgumentError("checkpoint_dir", str(self.folder), "a folder (or a path where one can be made)", hint="this is a file")
        progress_path = self.folder / PROGRESS_FILE
        if not progress_path.is_file():
            return 0, None
        try:
            progress = json.loads(progress_path.read_text(encoding="utf-8"))
            done = int(progress["blocks_done"])
            saved = dict(progress["fingerprint"])
        except (ValueError, KeyError, TypeError) as error:
            raise PruneError(f"checkpoint {progress_path} is unreadable ({error}); delete the folder to start afresh") from None
        differs = sorted(key for key in set(saved) | set(self.fingerprint) if saved.get(key) != self.fingerprint.get(key))
        if differs or progress.get("num_blocks") != len(blocks):
            raise PruneError(
                f"checkpoint in {self.folder} was made with different {', '.join(differs) or 'number of blocks'} "
                f"(fingerprint {saved} vs now {self.fingerprint}); use another checkpoint_dir or delete this one to start afresh"
            )
        for index in range(done):
            blocks[index].load_state_dict(load_file(str(self._block_file(index))), strict=True)
        inputs = load_file(str(self._inputs_file(done)))
        hidden = [inputs[f"hidden.{sample}"] for sample in range(len(calls))]
        # Non-tensor arguments come from the fresh capture; its tensor arguments must match the saved ones.
        if done < len(blocks):
            now = _call_tensors([sample_calls[done] for sample_calls in calls])
            saved_calls = {key: value for key, value in inputs.items() if key.startswith("call.")}
            if set(now) != set(saved_calls) or any(not torch.equal(now[key].cpu(), saved_calls[key]) for key in now):
                raise PruneError(f"checkpoint in {self.folder}: the block arguments captured now differ from the saved ones")
        return done, hidden

    def save(self, index: int, blocks: nn.ModuleList, hidden: list[torch.Tensor], calls: list[list[BlockCall]]) -> None:
        """Record that block `index` is done: its weights, the next block's inputs, then progress.json (the commit)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _save_atomic(blocks[index].state_dict(), self._block_file(index))
        tensors = {f"hidden.{sample}": tensor for sample, tensor in enumerate(hidden)}
        if index + 1 < len(blocks):
            tensors.update(_call_tensors([sample_calls[index + 1] for sample_calls in calls]))
        _save_atomic(tensors, self._inputs_file(index + 1), metadata={"block": str(index + 1)})
        _write_json_atomic(
            {"version": CHECKPOINT_VERSION, "blocks_done": index + 1, "num_blocks": len(blocks), "fingerprint": self.fingerprint},
            self.folder / PROGRESS_FILE,
        )
        # Only now is the previous inputs file stale: progress.json no longer points at it.
        self._inputs_file(index).unlink(missing_ok=True)
