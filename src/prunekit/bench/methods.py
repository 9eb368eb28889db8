"""The methods a benchmark grid can compare, and how one cell (model, method, sparsity, seed) is run.

Fair comparison: every cell gets the same training budget, data order, learning-rate schedule and seed.
With E = training.epochs and F = training.finetune_epochs, epoch k always sees the same batches at the same
learning rate (lr for k < E, finetune_lr from E on, with a fresh optimizer state at E):

- ``dense``: the reference; trained E + F epochs without pruning.
- one-shot (any method of the prunekit.prune registry): the dense model trained E epochs, pruned once, fine-tuned
  F epochs with the masks enforced.
- training callbacks (``TRAINING_CALLBACKS``): pruned at initialisation (SNIP, GraSP, SynFlow, ERK-random, ...)
  or gradually while training (Zhu & Gupta 2017), over the same E + F epochs from the same initialisation.
- ``lottery``: iterative magnitude pruning with rewinding to the initialisation (Frankle & Carbin 2019), R rounds
  of E epochs each to find the mask, then the ticket trained E + F epochs; its extra search steps are counted.
- ``structured-<score>``: channels / heads physically removed from the dense model trained E epochs, then
  fine-tuned F epochs; ``structured-<score>-scratch`` trains that same smaller architecture from a fresh
  initialisation for E + F epochs (Liu et al. 2019, Rethinking the Value of Network Pruning).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ArgumentError
from ..training import GradualPruning, LotteryTicket, PruneAtInit, PruningCallback, fit
from .tasks import ImageTask, build_model, example_inputs

STRUCTURED_SCORES = ("l1", "l2", "bn-scale", "random", "taylor", "fpgm")
ONE_SHOT_OPTIONS = ("min_keep", "score", "budget", "n_batches")
SCRATCH_SUFFIX = "-scratch"


@dataclass
class CellContext:
    """Everything a method needs to run one cell; the same for every method of a (model, seed)."""

    task: ImageTask
    model_name: str
    model_options: dict[str, Any]
    seed: int
    training: dict[str, Any]
    dense_trained: Callable[[], nn.Module]  # the dense model after E epochs (cached per model and seed)
    prune_options: dict[str, Any] = field(default_factory=dict)  # method_options of this method

    @property
    def steps_per_epoch(self) -> int:
        return self.task.steps_per_epoch(self.training["batch_size"])

    @property
    def calibration(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.task.calibration(self.training["batch_size"], self.seed, self.training["calibration_batches"])

    @property
    def example(self) -> torch.Tensor:
        return example_inputs(self.task)

    def fresh_model(self) -> nn.Module:
        """The model at its seeded initialisation."""
        return build_model(self.model_name, self.model_options, self.task, self.seed)

    def gradual_schedule(self) -> dict[str, int]:
        """Zhu & Gupta's schedule over the training phase: from the end of the first epoch (when there are two or
        more) to the end of epoch E, re-pruning about four times an epoch."""
        spe, epochs = self.steps_per_epoch, self.training["epochs"]
        start = spe if epochs >= 2 else 0
        return {"start_step": start, "end_step": epochs * spe, "frequency": max(1, spe // 4)}


CallbackFactory = Callable[[nn.Module, float, CellContext], PruningCallback]


def _at_init(method: str) -> CallbackFactory:
    """PruneAtInit with `method`, given the calibration batches and the input example every method gets."""
    def make(model: nn.Module, sparsity: float, ctx: CellContext) -> PruningCallback:
        from ..api import inputs_for

        preset = {"data": ctx.calibration, "n_batches": len(ctx.calibration), "example_inputs": ctx.example}
        return PruneAtInit(model, method, sparsity, seed=ctx.seed, **inputs_for(preset, method))
    return make


# name -> factory(model, sparsity, context) -> a callback driven through all E + F epochs from initialisation.
# A new training-time method is one line here.
TRAINING_CALLBACKS: dict[str, CallbackFactory] = {
    "snip-init": _at_init("snip"),
    "grasp-init": _at_init("grasp"),
    "synflow-init": _at_init("synflow"),
    "erk-random-init": _at_init("erk-random"),
    "random-init": _at_init("random"),
    "magnitude-init": _at_init("magnitude"),
    "gradual-magnitude": lambda m, s, c: GradualPruning(m, "magnitude", final_sparsity=s, **c.gradual_schedule()),
    "gradual-global-magnitude": lambda m, s, c: GradualPruning(m, "global-magnitude", final_sparsity=s,
                                                               **c.gradual_schedule()),
}


def one_shot_methods() -> list[str]:
    """The prunekit.prune registry's methods that prune any Linear/Conv model (not the LLM runners)."""
    from ..methods import METHODS

    return [name for name, method in METHODS.items() if method.runner is None]


# Methods for causal language models (post-training, no fine-tuning): calibration-driven runners and data-free ones
TEXT_DATA_FREE = ("magnitude", "global-magnitude", "random", "erk-random", "lamp")


def text_methods() -> list[str]:
    """The prunekit.prune methods a text benchmark can run on a causal LM."""
    from ..methods import METHODS

    return [name for name, method in METHODS.items() if method.runner is not None or name in TEXT_DATA_FREE]


def available_methods(dataset: str = "digits") -> list[str]:
    """Every method name a configuration on `dataset` may list."""
    from .tasks import dataset_kind

    if dataset_kind(dataset) == "text":
        return ["dense", *text_methods()]
    structured = [f"structured-{s}" for s in STRUCTURED_SCORES]
    return ["dense", *one_shot_methods(), *TRAINING_CALLBACKS, "lottery", *structured,
            *(s + SCRATCH_SUFFIX for s in structured)]


def kind_of(method: str) -> str:
    """dense, one-shot, callback, lottery, structured or scratch."""
    if method == "dense":
        return "dense"
    if method in TRAINING_CALLBACKS:
        return "callback"
    if method == "lottery":
        return "lottery"
    if method.startswith("structured-"):
        return "scratch" if method.endswith(SCRATCH_SUFFIX) else "structured"
    from ..methods import METHODS

    if method in METHODS:
        return "one-shot"
    raise ArgumentError("method", method, "one of " + ", ".join(available_methods()))


def scratch_twin(method: str) -> str | None:
    """The from-scratch baseline of a structured method (None for other methods)."""
    return method + SCRATCH_SUFFIX if kind_of(method) == "structured" else None


def uses_sparsity(method: str) -> bool:
    """Whether the method's cells vary with the sparsity (the dense reference does not)."""
    return kind_of(method) != "dense"


# --- training phases ---------------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, training: dict[str, Any], lr: float) -> torch.optim.Optimizer:
    """A fresh optimizer of the configured kind."""
    if training["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=training["weight_decay"])
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=training["weight_decay"])


class _Shifted(PruningCallback):
    """Passes a callback's hooks on with steps and epochs counted from the start of the whole run, so a callback
    driven through two training phases (lr, then finetune_lr) sees one continuous run."""

    def __init__(self, inner: Any, step_offset: int, epoch_offset: int, first: bool, last: bool) -> None:
        self.inner, self.step_offset, self.epoch_offset, self.first, self.last = (
            inner, step_offset, epoch_offset, first, last)

    def on_train_begin(self) -> None:
        if self.first:
            self.inner.on_train_begin()

    def on_step_end(self, step: int) -> None:
        self.inner.on_step_end(step + self.step_offset)

    def on_epoch_end(self, epoch: int) -> None:
        self.inner.on_epoch_end(epoch + self.epoch_offset)

    def on_train_end(self) -> None:
        if self.last:
            self.inner.on_train_end()


def train_epochs(model: nn.Module, ctx: CellContext, first_epoch: int, last_epoch: int,
                 callbacks: list[Any] = ()) -> int:
    """Train epochs [first_epoch, last_epoch) of the common schedule; returns the optimizer steps taken.

    Epochs before E use lr, later ones finetune_lr with a fresh optimizer state, whichever method trains.
    """
    training, epochs = ctx.training, ctx.training["epochs"]
    spe = ctx.steps_per_epoch
    steps = 0
    phases = [(first_epoch, min(last_epoch, epochs), training["lr"]),
              (max(first_epoch, epochs), last_epoch, training["finetune_lr"])]
    phases = [p for p in phases if p[1] > p[0]]
    for index, (start, stop, lr) in enumerate(phases):
        shifted = [_Shifted(c, start * spe, start, first=index == 0 and start == first_epoch,
                            last=index == len(phases) - 1) for c in callbacks]
        torch.manual_seed(ctx.seed * 7919 + start)  # dropout and other randomness: the same for every method
        result = fit(model, lambda e, s=start: ctx.task.batches(training["batch_size"], ctx.seed, s + e),
                     stop - start, make_optimizer(model, training, lr), shifted, progress=False)
        steps += result.steps
    return steps


def train_dense(ctx: CellContext) -> nn.Module:
    """The seeded dense model trained the first E epochs (what one-shot and structured methods start from)."""
    model = ctx.fresh_model()
    train_epochs(model, ctx, 0, ctx.training["epochs"])
    return model.eval()


# --- running one cell ------------------------------------------------------------------------------------------


@dataclass
class CellOutcome:
    """The trained model of a cell, what it cost and what it measured on the way."""

    model: nn.Module
    steps: int  # optimizer steps, all phases together (pretraining, search rounds, fine-tuning)
    pruned_accuracy: float | None = None  # right after one-shot pruning, before fine-tuning
    notes: list[str] = field(default_factory=list)


def run_method(method: str, sparsity: float, ctx: CellContext) -> CellOutcome:
    """Run one cell with the method's own recipe (see the module docstring)."""
    kind = kind_of(method)
    spe, epochs, total = ctx.steps_per_epoch, ctx.training["epochs"], (
        ctx.training["epochs"] + ctx.training["finetune_epochs"])
    if kind == "dense":
        model = ctx.dense_trained()
        steps = epochs * spe + train_epochs(model, ctx, epochs, total)
        return CellOutcome(model, steps)
    if kind == "one-shot":
        return _one_shot(method, sparsity, ctx)
    if kind == "callback":
        model = ctx.fresh_model()
        callback = TRAINING_CALLBACKS[method](model, sparsity, ctx)
        return CellOutcome(model, train_epochs(model, ctx, 0, total, [callback]))
    if kind == "lottery":
        return _lottery(sparsity, ctx)
    return _structured(method, sparsity, ctx, scratch=kind == "scratch")


def _one_shot(method: str, sparsity: float, ctx: CellContext) -> CellOutcome:
    from ..api import inputs_for, prune
    from ..examples import accuracy

    model = ctx.dense_trained()
    calibration = ctx.calibration
    preset = {"data": calibration, "n_batches": len(calibration), "example_inputs": ctx.example}
    options = {**inputs_for(preset, method, ctx.prune_options.get("score"), ctx.prune_options.get("budget")),
               "seed": ctx.seed, **ctx.prune_options}
    model.eval()  # data-driven scores run forward passes: BatchNorm keeps its trained statistics
    prune(model, method, sparsity, **options)
    pruned = accuracy(model, ctx.task.x_test, ctx.task.y_test)
    epochs, total = ctx.training["epochs"], ctx.training["epochs"] + ctx.training["finetune_epochs"]
    steps = epochs * ctx.steps_per_epoch + train_epochs(model, ctx, epochs, total)
    return CellOutcome(model, steps, pruned_accuracy=pruned)


def _lottery(sparsity: float, ctx: CellContext) -> CellOutcome:
    """R rounds of E epochs, each pruning 1 - (1 - s)^(1/R) of the remaining weights, rewinding to theta_0."""
    rounds, epochs = ctx.training["lottery_rounds"], ctx.training["epochs"]
    total = epochs + ctx.training["finetune_epochs"]
    model = ctx.fresh_model()
    ticket = LotteryTicket(model, rate=1.0 - (1.0 - sparsity) ** (1.0 / rounds), rewind_step=0)
    steps = 0
    for _ in range(rounds):
        steps += train_epochs(model, ctx, 0, epochs, [ticket])
        ticket.prune_round()
        ticket.rewind()
    steps += train_epochs(model, ctx, 0, total)
    note = f"lottery: {rounds} rounds of {epochs} epochs to find the mask, then E + F epochs"
    return CellOutcome(model, steps, notes=[note])


def _structured(method: str, ratio: float, ctx: CellContext, scratch: bool) -> CellOutcome:
    """Remove a share `ratio` of the units of every channel group (or globally), then fine-tune; or train the
    resulting architecture from scratch."""
    from ..examples import accuracy
    from ..graph.prune import prune_structured

    score = method[len("structured-"):]
    if scratch:
        score = score[: -len(SCRATCH_SUFFIX)]
    model = ctx.dense_trained().eval()
    calibration = ctx.calibration
    # bn-scale/FPGM on a model with groups they cannot score (an MLP, a ViT): those groups use the group L2 norm,
    # and the cell's notes say how many did
    fallback = "l2" if score in ("bn-scale", "fpgm") else None
    from ..graph.importance import NEEDS_GRADIENTS

    # only gradient scores read the batches (prune_structured refuses them for the others)
    inputs = {"data": calibration, "n_batches": len(calibration)} if score in NEEDS_GRADIENTS else {}
    result = prune_structured(model, ctx.example, ratio, score=score, budget=ctx.training["structured_budget"],
                              seed=ctx.seed, fallback=fallback, **inputs)
    substituted = [d for d in result.decisions if any("fallback=" in note for note in d.notes)]
    notes = [f"{len(substituted)} of {len(result.decisions)} groups scored by group L2 norm instead of {score} "
             "(no BatchNorm or no producing layer in them)"] if substituted else []
    epochs, total = ctx.training["epochs"], ctx.training["epochs"] + ctx.training["finetune_epochs"]
    if not scratch:
        pruned = accuracy(model, ctx.task.x_test, ctx.task.y_test)
        steps = epochs * ctx.steps_per_epoch + train_epochs(model, ctx, epochs, total)
        return CellOutcome(model, steps, pruned_accuracy=pruned, notes=notes)
    reinitialise(model, ctx.seed)
    return CellOutcome(model, train_epochs(model, ctx, 0, total),
                       notes=[*notes, "the pruned architecture, re-initialised and trained from scratch"])


@torch.no_grad()
def reinitialise(model: nn.Module, seed: int) -> None:
    """Fresh seeded weights for every module that can reset itself (BatchNorm statistics too)."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()
        if hasattr(module, "reset_running_stats"):
            module.reset_running_stats()


def timed(function: Callable[[], CellOutcome]) -> tuple[CellOutcome, float]:
    """Run and time a cell."""
    started = time.perf_counter()
    outcome = function()
    return outcome, time.perf_counter() - started
