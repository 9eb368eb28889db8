"""Benchmark cells for causal language models: post-training pruning (Wanda, SparseGPT, OWL, magnitude, random,
...) of the decoder's Linear layers from calibration text, scored by perplexity on held-out text. No fine-tuning:
every method of a seed gets the same calibration samples and the same evaluation tokens."""

from __future__ import annotations

import copy
import re
from typing import Any, Callable

from torch import nn

from .methods import CellOutcome, kind_of
from .tasks import TextTask

# The Linear layers inside the decoder blocks (the runners prune exactly these; the embedding and the output head
# stay dense), for the data-free methods and for counting sparsity.
DECODER_LINEARS = r"re:(^|.*\.)layers?\.\d+\..*"  # model.layers.N (Llama-style), encoder.layer.N (BERT)


class LanguageModels:
    """Each causal LM loaded once per run; every cell prunes its own deep copy."""

    def __init__(self) -> None:
        self._loaded: dict[str, tuple[nn.Module, Any]] = {}

    def dense(self, name: str) -> tuple[nn.Module, Any]:
        """The loaded dense model itself (never to be pruned) and its tokenizer."""
        if name not in self._loaded:
            self._loaded[name] = _load(name)
        return self._loaded[name]

    def get(self, name: str) -> tuple[nn.Module, Any]:
        """(a fresh copy of the dense model, its tokenizer)."""
        model, tokenizer = self.dense(name)
        return copy.deepcopy(model), tokenizer


def _load(name: str) -> tuple[nn.Module, Any]:
    """A zoo causal LM, or the embedded MiniLM encoder, in eval mode, with its tokenizer."""
    from .tasks import ENCODER_MODELS

    if name in ENCODER_MODELS:
        from ..zoo import load_minilm

        model, tokenizer = load_minilm()
    else:
        from ..zoo import load_causal_lm

        model, tokenizer = load_causal_lm(name)
    return model.eval(), tokenizer


def decoder_layer(name: str) -> bool:
    """Whether a module name is a Linear inside a decoder block."""
    return re.fullmatch(DECODER_LINEARS[3:], name) is not None


def run_language_cell(method: str, sparsity: float, seed: int, task: TextTask, model_name: str,
                      models: LanguageModels, prune_options: dict[str, Any]) -> tuple[CellOutcome, float]:
    """Prune a copy of the dense model (nothing for 'dense') and return it with its score: held-out perplexity for
    causal LMs, the mean cosine similarity of sentence embeddings to the dense model's for encoders."""
    from ..api import prune
    from ..calibration import calibration_samples
    from ..evaluate import embedding_agreement, perplexity
    from ..methods import get_method
    from .tasks import ENCODER_MODELS, held_out_sentences

    model, tokenizer = models.get(model_name)
    if kind_of(method) != "dense":
        recipe = get_method(method)
        if recipe.runner is not None:
            samples = calibration_samples(task.calibration_text, tokenizer, task.n_samples, task.seq_len, seed)
            # the seed picked the samples; the calibration methods have no other randomness (prune refuses seed=)
            prune(model, method, sparsity, data=samples, apply="bake", progress=False, **prune_options)
        else:
            prune(model, method, sparsity, include=DECODER_LINEARS, apply="bake", seed=seed, **prune_options)
    if model_name in ENCODER_MODELS:
        dense, _ = models.dense(model_name)
        value = embedding_agreement(dense, model, tokenizer, held_out_sentences(task.eval_text),
                                    max_length=task.seq_len)
    else:
        value = perplexity(model, tokenizer, task.eval_text, window=task.window, max_tokens=task.eval_tokens,
                           progress=False)
    return CellOutcome(model, steps=0), value


def layer_filter(task: Any) -> Callable[[str], bool] | None:
    """Which layers a task's sparsity is counted over (None: every Linear/Conv/Embedding)."""
    return decoder_layer if isinstance(task, TextTask) else None
