"""Per-example difficulty scores from a model: EL2N and GraNd (Paul et al. 2021), forgetting events
(Toneva et al. 2019), and the random baseline. Higher means harder (more informative) in every score."""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ArgumentError
from .checks import check_count, check_labels


def _as_numpy(value: Any) -> np.ndarray:
    return np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)  # no overflow for large logits
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def el2n_scores(outputs: Any, labels: Any, *, from_logits: bool = True) -> np.ndarray:
    """EL2N = ||softmax(f(x)) - onehot(y)||_2 per example, averaged over models when outputs is (models, N, C).

    Paul et al. score with networks early in training (a few epochs), averaged over several seeds. outputs are logits
    (from_logits=True) or probabilities. A confident correct prediction scores 0; uniform over C classes sqrt(1 - 1/C).
    """
    array = _as_numpy(outputs).astype(np.float64)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[-1] < 2:
        raise ArgumentError("outputs", f"an array of shape {array.shape}",
                            "logits or probabilities of shape (N, C) or (models, N, C) with C >= 2")
    if not np.isfinite(array).all():
        raise ArgumentError("outputs", f"an array with {int((~np.isfinite(array)).sum())} NaN/inf values",
                            "finite logits or probabilities")
    y = check_labels(labels, array.shape[1], other="outputs")
    if y.min() < 0 or y.max() >= array.shape[-1]:
        raise ArgumentError("labels", f"a label {int(y.max()) if y.max() >= array.shape[-1] else int(y.min())}",
                            f"class indices in 0..{array.shape[-1] - 1}")
    probs = _softmax(array) if from_logits else array
    if not from_logits and (probs.min() < -1e-6 or not np.allclose(probs.sum(-1), 1.0, atol=1e-4)):
        raise ArgumentError("outputs", "rows that are not probability distributions",
                            "probabilities (non-negative, summing to 1), or pass from_logits=True")
    error = probs.copy()
    error[:, np.arange(len(y)), y] -= 1.0
    return np.linalg.norm(error, axis=-1).mean(axis=0)


def grand_scores(models: Any, inputs: Any, labels: Any, *, batch_size: int = 256,
                 loss: Callable[..., Any] | None = None, progress: bool = True) -> np.ndarray:
    """GraNd = E ||grad_w L(f(x), y)||_2 per example, the expectation over the given models (seeds).

    Per-example gradients of every trainable parameter via torch.func (vmap over grad), batch by batch. Models run
    in eval mode (BatchNorm uses its running statistics, so each example's gradient is its own).
    """
    import torch
    from torch.func import functional_call, grad, vmap
    from tqdm import tqdm

    models = list(models) if isinstance(models, (list, tuple)) else [models]
    if not models or not all(isinstance(model, torch.nn.Module) for model in models):
        raise ArgumentError("models", type(models).__name__, "a torch.nn.Module or a list of them")
    check_count(batch_size, "batch_size")
    x = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(np.asarray(inputs))
    y = torch.as_tensor(check_labels(labels, len(x), other="inputs"))
    loss_fn = loss or torch.nn.functional.cross_entropy
    total = np.zeros(len(x), dtype=np.float64)
    bar = tqdm(total=len(models) * len(x), desc="GraNd", unit="example", file=sys.stderr,
               disable=None if progress else True, leave=False)
    for model in models:
        was_training = model.training
        model.eval()
        params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        buffers = {name: b.detach() for name, b in model.named_buffers()}

        def example_loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
            return loss_fn(out, yi.unsqueeze(0))

        per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
        try:
            for start in range(0, len(x), batch_size):
                grads = per_example(params, x[start:start + batch_size], y[start:start + batch_size])
                squared = sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values())
                total[start:start + batch_size] += squared.sqrt().double().numpy()
                bar.update(min(batch_size, len(x) - start))
        finally:
            model.train(was_training)
    bar.close()
    return total / len(models)


def forgetting_counts(history: Any, *, unlearned: float = math.inf) -> np.ndarray:
    """Forgetting events per example from correctness history (T presentations x N examples, or (T,) for one).

    An event is a correct -> incorrect flip between consecutive presentations: [1, 0, 1, 0] counts 2. Examples never
    classified correctly get `unlearned` (Toneva et al. count them as forgotten infinitely often, the hardest).
    """
    array = _as_numpy(history)
    single = array.ndim == 1
    if single:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] == 0:
        raise ArgumentError("history", f"an array of shape {array.shape}",
                            "correctness per presentation: shape (T, N) or (T,), T >= 1")
    if not np.isin(array, (0, 1)).all():
        raise ArgumentError("history", "values other than 0/1", "booleans (correct or not at each presentation)")
    correct = array.astype(bool)
    counts = (correct[:-1] & ~correct[1:]).sum(axis=0).astype(np.float64)
    counts[~correct.any(axis=0)] = unlearned
    return counts[0:1] if single else counts


class ForgettingTracker:
    """Counts forgetting events while training, one update per mini-batch, without storing the whole history."""

    def __init__(self, n_examples: int, unlearned: float = math.inf) -> None:
        self.n = check_count(n_examples, "n_examples")
        self.unlearned = unlearned
        self.previous = np.zeros(self.n, dtype=bool)
        self.learned = np.zeros(self.n, dtype=bool)
        self.events = np.zeros(self.n, dtype=np.int64)
        self.presentations = np.zeros(self.n, dtype=np.int64)

    def update(self, indices: Any, correct: Any) -> None:
        """Record whether the examples at `indices` were classified correctly at this presentation."""
        idx = _as_numpy(indices).astype(np.int64).reshape(-1)
        now = _as_numpy(correct).astype(bool).reshape(-1)
        if len(idx) != len(now):
            raise ArgumentError("correct", f"{len(now)} values", f"one per index ({len(idx)} indices)")
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            raise ArgumentError("indices", f"index {int(idx.max()) if idx.max() >= self.n else int(idx.min())}",
                                f"indices in 0..{self.n - 1}")
        seen = self.presentations[idx] > 0
        self.events[idx] += (seen & self.previous[idx] & ~now).astype(np.int64)
        self.previous[idx] = now
        self.learned[idx] |= now
        self.presentations[idx] += 1

    def counts(self) -> np.ndarray:
        """Forgetting events so far; never-learned examples get `unlearned`."""
        counts = self.events.astype(np.float64)
        counts[~self.learned] = self.unlearned
        return counts


def random_scores(n: int, seed: int = 0) -> np.ndarray:
    """Uniform random scores: selecting the top of them is a seeded uniform random subset."""
    return np.random.default_rng(seed).random(check_count(n, "n"))
