"""Recovery fine-tuning by knowledge distillation: the pruned model (student) learns the original's (teacher's) outputs.

Loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy(student, labels).
The T^2 factor keeps the soft-target gradients on the scale of the hard-label ones (Hinton et al., 2015). Works for
classifiers returning logits (CNNs, ViTs, sequence classifiers) and for causal LMs, whose KL runs over every token
position the attention mask keeps. Masks attached by prunekit stay enforced: any torch optimizer re-zeroes them.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ArgumentError, ModelError, unknown_choice

IGNORE_INDEX = -100  # the label value transformers and torch's cross_entropy skip

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": lambda params, **kw: torch.optim.SGD(params, momentum=0.9, **kw),
}


@dataclass
class DistillResult:
    """What a distillation run did: the mean loss of each epoch, optimizer steps taken and wall time."""

    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        """The last epoch's mean loss (nan before any epoch)."""
        return self.epoch_losses[-1] if self.epoch_losses else float("nan")


def _check_number(argument: str, value: Any, low: float, high: float | None = None, low_open: bool = False) -> float:
    """Validate a finite real number in [low, high] (or (low, high] with low_open)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not math.isfinite(number) or (number <= low if low_open else number < low) or (
            high is not None and number > high):
        bounds = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
        raise ArgumentError(argument, value, f"a number in {bounds}")
    return number


def _check_count(argument: str, value: Any, minimum: int = 1) -> int:
    """Validate an integer >= minimum (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(argument, value, f"an integer >= {minimum}")
    return value


def split_batch(batch: Any, labels_key: str = "labels") -> tuple[Any, torch.Tensor | None]:
    """(inputs, labels or None) from an (inputs, labels) pair, a bare input, or a dict of model kwargs."""
    if isinstance(batch, Mapping):
        inputs = {key: value for key, value in batch.items() if key != labels_key}  # the model must not see labels
        return inputs, batch.get(labels_key)
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 1:  # a DataLoader over TensorDataset(x)
        return batch[0], None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ArgumentError("batches", f"an item of type {type(batch).__name__}",
                        "items that are (inputs, labels) pairs, bare input tensors or dicts of model kwargs")


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model output: a tensor, an object or dict with `logits`, or the first item of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelError(f"cannot find logits in a model output of type {type(output).__name__}: return a tensor or an "
                     "object with .logits")


def _to(value: Any, device: torch.device) -> Any:
    """Move tensors (alone, in tuples or in dicts) to a device; other values pass through."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: _to(item, device) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to(item, device) for item in value)
    return value


def _run(model: nn.Module, inputs: Any) -> torch.Tensor:
    """The model's logits for inputs given as a tensor, positional tuple or kwargs dict, on the model's device."""
    inputs = _to(inputs, _device_of(model))
    if isinstance(inputs, Mapping):
        return logits_of(model(**inputs))
    if isinstance(inputs, (tuple, list)):
        return logits_of(model(*inputs))
    return logits_of(model(inputs))


def _device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU when it has none)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def is_causal_lm(model: nn.Module) -> bool:
    """Whether the model is a transformers causal LM (its labels are the inputs, predicted one position ahead)."""
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                      *, temperature: float = 4.0, alpha: float = 0.9, attention_mask: torch.Tensor | None = None,
                      shift_labels: bool = False) -> torch.Tensor:
    """alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * cross-entropy; without labels, the KL.

    Logits are (batch, classes) or (batch, positions, vocab); the KL is averaged over rows (examples or token
    positions), skipping positions whose attention_mask is 0. shift_labels compares the logits at position i with
    labels[i + 1], as causal LMs do; labels equal to -100 are ignored.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ModelError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape: distillation needs the same output classes")
    classes = student_logits.shape[-1]
    student, teacher = student_logits.float(), teacher_logits.float()  # half-precision softmax loses the tails
    log_p_student = F.log_softmax(student.reshape(-1, classes) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.reshape(-1, classes) / temperature, dim=-1)
    per_row = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    if attention_mask is not None and student.dim() == 3 and attention_mask.shape == student.shape[:2]:
        keep = attention_mask.reshape(-1).to(per_row.device).bool()
        per_row = per_row[keep]
    kd = per_row.mean() * temperature ** 2 if per_row.numel() else student.sum() * 0.0
    if labels is None or alpha == 1.0:
        return kd
    ce = _cross_entropy(student, labels.to(student.device), shift_labels)
    return kd if ce is None else alpha * kd + (1.0 - alpha) * ce


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> torch.Tensor | None:
    """Cross-entropy against labels (shifted one position for causal LMs); None when every label is ignored."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.reshape(-1).long()
    if not bool((labels != IGNORE_INDEX).any()):
        return None
    return F.cross_entropy(logits.reshape(labels.numel(), -1), labels, ignore_index=IGNORE_INDEX)


def _modes(*models: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every submodule's training flag, to restore afterwards."""
    return [(module, module.training) for model in models for module in model.modules()]


def _restore(modes: list[tuple[nn.Module, bool]]) -> None:
    """Put back training flags saved by _modes."""
    for module, training in modes:
        module.training = training


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable[Any], *, epochs: int = 1, lr: float = 1e-3,
            temperature: float = 4.0, alpha: float = 0.9, optimizer: str = "adamw", weight_decay: float = 0.0,
            labels_key: str = "labels", progress: bool = True, max_steps: int | None = None,
            shift_labels: bool | None = None) -> DistillResult:
    """Fine-tune `student` to match `teacher` (kept frozen in eval mode) on `batches`; returns per-epoch mean losses.

    batches is re-iterable (a list or DataLoader) for epochs > 1 and yields (inputs, labels) pairs, bare inputs
    (pure distillation: alpha is taken as 1) or dicts of model kwargs with optional labels under labels_key.
    shift_labels=None shifts labels for transformers causal LMs only. max_steps caps optimizer steps over all epochs.
    Both models' training flags are restored at the end.
    """
    from tqdm import tqdm

    optimizer = optimizer.lower() if isinstance(optimizer, str) else optimizer  # 'AdamW' as torch spells it
    _check_inputs(student, teacher, batches, epochs, max_steps, optimizer)
    temperature = _check_number("temperature", temperature, 0.0, low_open=True)
    alpha = _check_number("alpha", alpha, 0.0, 1.0)
    lr = _check_number("lr", lr, 0.0, low_open=True)
    weight_decay = _check_number("weight_decay", weight_decay, 0.0)
    shift = is_causal_lm(student) if shift_labels is None else bool(shift_labels)
    params = [param for param in student.parameters() if param.requires_grad]
    if not params:
        raise ModelError("the student has no trainable parameters (every requires_grad is False)")
    teacher_params = {id(param) for param in teacher.parameters()}
    if any(id(param) in teacher_params for param in params):
        raise ModelError("the student shares parameters with the teacher: distil into a copy "
                         "(copy.deepcopy(teacher) before pruning)")
    opt = OPTIMIZERS[optimizer](params, lr=lr, weight_decay=weight_decay)

    modes = _modes(student, teacher)
    result = DistillResult()
    started = time.perf_counter()
    total = _total_steps(batches, epochs, max_steps)
    bar = tqdm(total=total, desc="distilling", unit="step", disable=None if progress else True, file=sys.stderr,
               leave=False)
    try:
        student.train()
        teacher.eval()
        for _ in range(epochs):
            losses: list[float] = []
            for batch in batches:
                if max_steps is not None and result.steps >= max_steps:
                    break
                loss = _step(student, teacher, opt, batch, labels_key, temperature, alpha, shift)
                losses.append(loss)
                result.steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            if not losses:
                if result.steps == 0:
                    raise ArgumentError("batches", "an empty iterable", "at least one batch")
                break  # max_steps reached at an epoch boundary
            result.epoch_losses.append(sum(losses) / len(losses))
    finally:
        bar.close()
        _restore(modes)
    result.seconds = time.perf_counter() - started
    return result


def _check_inputs(student: nn.Module, teacher: nn.Module, batches: Any, epochs: Any, max_steps: Any,
                  optimizer: Any) -> None:
    """Validate the models, the batches' iterability, epochs, max_steps and the optimizer name."""
    for argument, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module):
            raise ArgumentError(argument, type(model).__name__, "a torch.nn.Module")
    if student is teacher:
        raise ArgumentError("student", "the teacher itself", "a separate model (copy.deepcopy the teacher first)")
    _check_count("epochs", epochs)
    if max_steps is not None:
        _check_count("max_steps", max_steps)
    if isinstance(batches, (torch.Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise ArgumentError("batches", type(batches).__name__,
                            "an iterable of batches (a list or DataLoader), not a single batch")
    if epochs > 1 and iter(batches) is batches:  # a generator would be empty from the second epoch on
        raise ArgumentError("batches", type(batches).__name__, "a re-iterable (list or DataLoader) when epochs > 1")
    if optimizer not in OPTIMIZERS:
        raise unknown_choice("optimizer", optimizer, OPTIMIZERS)


def _total_steps(batches: Any, epochs: int, max_steps: int | None) -> int | None:
    """Steps the progress bar expects, when the batches have a length."""
    try:
        total = len(batches) * epochs
    except TypeError:
        return max_steps
    return total if max_steps is None else min(total, max_steps)


def _step(student: nn.Module, teacher: nn.Module, opt: torch.optim.Optimizer, batch: Any, labels_key: str,
          temperature: float, alpha: float, shift: bool) -> float:
    """One optimizer step on one batch; returns its loss."""
    inputs, labels = split_batch(batch, labels_key)
    with torch.no_grad():
        teacher_logits = _run(teacher, inputs)
    student_logits = _run(student, inputs)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    loss = distillation_loss(student_logits, teacher_logits.to(student_logits.device), labels,
                             temperature=temperature, alpha=alpha if labels is not None else 1.0,
                             attention_mask=mask, shift_labels=shift)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def _predictions(model: nn.Module, batches: Iterable[Any], labels_key: str) -> list[tuple[torch.Tensor, Any]]:
    """(predicted class per example, labels or None) for each batch, in eval mode (training flags restored)."""
    modes = _modes(model)
    model.eval()
    found = []
    try:
        for batch in batches:
            inputs, labels = split_batch(batch, labels_key)
            logits = _run(model, inputs)
            if logits.dim() != 2:
                raise ModelError(f"accuracy needs (batch, classes) logits, got shape {tuple(logits.shape)}")
            found.append((logits.argmax(dim=-1), labels))
    finally:
        _restore(modes)
    if not found:
        raise ArgumentError("batches", "an empty iterable", "at least one batch")
    return found


def accuracy(model: nn.Module, batches: Iterable[Any], labels_key: str = "labels") -> float:
    """Share of examples whose arg-max class equals the label, over (inputs, labels) pairs or dicts with labels."""
    correct = total = 0
    for predicted, labels in _predictions(model, batches, labels_key):
        if labels is None:
            raise ArgumentError("batches", "a batch without labels", "(inputs, labels) pairs or dicts with labels")
        correct += int((predicted == labels.to(predicted.device)).sum())
        total += predicted.numel()
    return correct / total


def agreement(student: nn.Module, teacher: nn.Module, batches: Iterable[Any], labels_key: str = "labels") -> float:
    """Share of examples on which the two classifiers predict the same class (labels, if any, are ignored)."""
    batches = list(batches)  # walked once per model
    ours, theirs = _predictions(student, batches, labels_key), _predictions(teacher, batches, labels_key)
    same = sum(int((a == b.to(a.device)).sum()) for (a, _), (b, _) in zip(ours, theirs))
    return same / sum(a.numel() for a, _ in ours)
