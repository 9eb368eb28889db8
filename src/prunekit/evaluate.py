"""Language-model quality: perplexity over non-overlapping windows, and the benchmark protocol's evaluation."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunekit.errors import ArgumentError

# The benchmark protocol (BENCH-PROTOCOLS.md, "LLM post-training pruning"): held-out tail of the text.
PROTOCOL_EVAL_CHARS = 200_000
PROTOCOL_EVAL_TOKENS = 8192
PROTOCOL_WINDOW = 512


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer starts every encoded text with its BOS token (Gemma does, Llama-3/SmolLM2 do not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def encode(tokenizer: Any, text: str, add_special_tokens: bool = False) -> torch.Tensor:
    """Token ids of `text` as a 1-D LongTensor (no length warning: long texts are cut into windows later)."""
    if not isinstance(text, str):
        raise ArgumentError("text", type(text).__name__, "a str")
    # verbose=False: the "longer than the model's maximum length" warning does not apply, windows are cut later.
    ids = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _as_ids(tokenizer_or_ids: Any, text: str | None, bos_token_id: int | None) -> tuple[torch.Tensor, int | None]:
    """Resolve perplexity's inputs to (1-D token ids, BOS id to put before each window or None)."""
    if isinstance(tokenizer_or_ids, torch.Tensor) or isinstance(tokenizer_or_ids, (list, tuple)):
        if text is not None:
            raise ArgumentError("text", "<str>", "None when token ids are given (the ids are the text)")
        ids = torch.as_tensor(tokenizer_or_ids, dtype=torch.long)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ArgumentError("tokenizer_or_ids", tuple(ids.shape), "a 1-D sequence of token ids (or shape (1, n))")
        return ids, bos_token_id
    if not callable(tokenizer_or_ids):
        raise ArgumentError("tokenizer_or_ids", type(tokenizer_or_ids).__name__, "a tokenizer or a 1-D tensor of token ids")
    if text is None:
        raise ArgumentError("text", None, "a str to evaluate on when a tokenizer is given")
    if bos_token_id is None and tokenizer_adds_bos(tokenizer_or_ids):
        bos_token_id = tokenizer_or_ids.bos_token_id
    return encode(tokenizer_or_ids, text, add_special_tokens=False), bos_token_id


def _windows(ids: torch.Tensor, window: int, bos_token_id: int | None) -> list[torch.Tensor]:
    """Non-overlapping full windows of `window` tokens (BOS + window-1 text tokens when a BOS id is given)."""
    step = window - 1 if bos_token_id is not None else window
    count = ids.numel() // step  # a trailing partial window is dropped: every window predicts the same number of tokens
    chunks = [ids[i * step : (i + 1) * step] for i in range(count)]
    if bos_token_id is not None:
        bos = torch.tensor([bos_token_id], dtype=torch.long)
        chunks = [torch.cat([bos, chunk]) for chunk in chunks]
    return chunks


def _input_device(model: nn.Module) -> torch.device:
    """Device of the model's input embedding (where token ids must go)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is not None:
        return embedding.weight.device
    return next(model.parameters()).device


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer: Any, texts: list[str], *, batch_size: int = 16,
                        max_length: int = 128) -> torch.Tensor:
    """Mean-pooled last hidden states (padding excluded), one row per text, fp32: sentence-transformers' pooling."""
    device = _input_device(model)
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        rows.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(rows)


def embedding_agreement(reference: nn.Module, model: nn.Module, tokenizer: Any, texts: list[str], **options: Any) -> float:
    """Mean cosine similarity between `model`'s and `reference`'s sentence embeddings of the same texts (1 = same)."""
    if not texts:
        raise ArgumentError("texts", texts, "at least one text to embed")
    ours, theirs = sentence_embeddings(model, tokenizer, texts, **options), \
        sentence_embeddings(reference, tokenizer, texts, **options)
    return float(torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).mean())


NLL_CHUNK = 128  # positions per log-softmax: a 49k-vocabulary window of 512 then needs 25 MiB at a time, not 100


def window_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed next-token NLL of one window: `logits` (positions x vocabulary), `targets` the token that follows each
    position. Computed in chunks of positions so the log-softmax never holds the whole window at once."""
    total = 0.0
    for start in range(0, logits.shape[0], NLL_CHUNK):
        chunk = logits[start:start + NLL_CHUNK].float()
        total += F.cross_entropy(chunk, targets[start:start + NLL_CHUNK], reduction="sum").item()
    return total


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer_or_ids: Any,
    text: str | None = None,
    *,
    window: int = 512,
    max_tokens: int | None = 8192,
    bos_token_id: int | None = None,
    progress: bool = True,
) -> float:
    """exp(mean token NLL) over non-overlapping windows of the first `max_tokens` tokens, in fp32, without grad.

    With a tokenizer that starts every text with BOS, each window gets its own BOS (1 + window-1 text tokens);
    with raw ids, pass `bos_token_id` to get the same. A trailing partial window is dropped.
    """
    from prunekit.hf import check_sequence_length

    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ArgumentError("window", window, "an integer >= 2 (a window must predict at least one token)")
    check_sequence_length(model, window, argument="window")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ArgumentError("max_tokens", max_tokens, "a positive integer or None (all tokens)")
    ids, bos = _as_ids(tokenizer_or_ids, text, bos_token_id)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    chunks = _windows(ids, window, bos)
    if not chunks:
        needed = window - 1 if bos is not None else window
        raise ArgumentError("text", f"<{ids.numel()} tokens>", f"at least {needed} tokens (one window of {window})")
    device = _input_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for chunk in tqdm(chunks, desc="perplexity", unit="window", disable=not progress, leave=False):
            tokens = chunk.unsqueeze(0).to(device)
            logits = model(input_ids=tokens, use_cache=False).logits[0, :-1]
            # Sum, not mean, per window: the overall mean is over all predicted tokens.
            total += window_nll(logits, tokens[0, 1:])
            count += tokens.shape[1] - 1
    finally:
        model.train(was_training)
    return math.exp(total / count)


def protocol_perplexity(model: nn.Module, tokenizer: Any, kjv_text: str, *, progress: bool = True) -> float:
    """The benchmark protocol's held-out perplexity: last 200,000 characters, first 8192 tokens, windows of 512."""
    if not isinstance(kjv_text, str):
        raise ArgumentError("kjv_text", type(kjv_text).__name__, "the text of kjv.txt as a str")
    held_out = kjv_text[-PROTOCOL_EVAL_CHARS:]
    return perplexity(model, tokenizer, held_out, window=PROTOCOL_WINDOW, max_tokens=PROTOCOL_EVAL_TOKENS, progress=progress)

