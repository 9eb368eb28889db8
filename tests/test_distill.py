"""Knowledge-distillation recovery: the loss formula, real recovery on the digits, causal LMs, masks and errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import same_state, small_cnn, small_mlp, state_copy
from prunekit import masks
from prunekit.distill import (DistillResult, accuracy, agreement, distill, distillation_loss, is_causal_lm,
                              split_batch)
from prunekit.errors import ArgumentError, ModelError


# One intra-op thread for the module (conftest.one_intra_op_thread): the models here are tiny.
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _batch(n: int = 6, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, classes, generator=g), torch.randn(n, classes, generator=g), torch.randint(0, classes, (n,),
                                                                                                      generator=g)


def test_copy_of_the_teacher_has_zero_kd_loss():
    # An MLP: a BatchNorm student trains on batch statistics while the teacher evaluates with running ones.
    teacher = small_mlp()
    student = copy.deepcopy(teacher)
    x = torch.randn(4, 16)
    result = distill(student, teacher, [(x, torch.tensor([0, 1, 2, 3]))], alpha=1.0, lr=1e-9, progress=False)
    assert result.steps == 1 and abs(result.final_loss) < 1e-6
    cnn = small_cnn().eval()
    x = torch.randn(4, 8, 10, 10)
    with torch.no_grad():
        assert abs(float(distillation_loss(copy.deepcopy(cnn)(x), cnn(x)))) < 1e-6  # eval mode: BatchNorm agrees


def test_loss_equals_a_hand_computation():
    student, teacher, labels = _batch()
    t, alpha = 3.0, 0.7
    p_teacher = torch.softmax(teacher / t, dim=1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(student / t, dim=1))).sum(1).mean()
    expected = alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student, labels)
    got = distillation_loss(student, teacher, labels, temperature=t, alpha=alpha)
    assert torch.allclose(got, expected, atol=1e-6)
    # torch's own batchmean KL agrees with the formula
    torch_kl = F.kl_div(torch.log_softmax(student / t, 1), p_teacher, reduction="batchmean")
    assert torch.allclose(distillation_loss(student, teacher, temperature=t), t * t * torch_kl, atol=1e-6)
    assert torch.allclose(distillation_loss(student, teacher, labels, alpha=0.0), F.cross_entropy(student, labels))


def test_token_kl_respects_the_attention_mask_and_causal_labels_are_shifted():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    masked = distillation_loss(student, teacher, attention_mask=mask, temperature=1.0)
    kept = mask.bool()
    assert torch.allclose(masked, distillation_loss(student[kept], teacher[kept], temperature=1.0), atol=1e-6)
    labels = torch.randint(0, 7, (2, 4), generator=g)
    ce = distillation_loss(student, teacher, labels, alpha=0.0, shift_labels=True)
    assert torch.allclose(ce, F.cross_entropy(student[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1)))


class TinyStudent(nn.Module):
    """A smaller CNN than DigitsCNN: one 8-channel conv and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from prunekit.examples import load_digits_data, train_dense

    data = load_digits_data()
    return data, train_dense(data, epochs=8, seed=0)


def test_distilling_a_small_student_on_digits_matches_the_teacher(digits):
    data, teacher = digits
    torch.manual_seed(0)
    student = TinyStudent()
    test = [(data.x_test, data.y_test)]
    before = agreement(student, teacher, test)
    saved = state_copy(teacher)
    bare = [x for x, _ in data.batches(batch_size=64, seed=3)]  # inputs only: pure distillation
    result = distill(student, teacher, bare, epochs=6, lr=1e-2, temperature=2.0, progress=False)
    after = agreement(student, teacher, test)
    assert isinstance(result, DistillResult) and len(result.epoch_losses) == 6
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert before < 0.3 and after > 0.9  # chance is ~0.1
    assert accuracy(student, test) > 0.9
    assert same_state(teacher, saved) and not teacher.training


def test_labelled_batches_masks_stay_zero_and_modes_are_restored(digits):
    data, teacher = digits
    student = copy.deepcopy(teacher)
    conv = student.features[0]
    mask = torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    masks.attach(conv, mask)
    student.train()
    teacher.train()
    saved = state_copy(teacher)
    result = distill(student, teacher, data.batches(seed=1)[:10], max_steps=7, epochs=2, weight_decay=0.01,
                     optimizer="adam", progress=False)
    assert result.steps == 7 and len(result.epoch_losses) == 1
    assert bool((conv.weight[~mask] == 0).all())
    assert student.training and teacher.training  # each model's mode as the caller left it
    assert same_state(teacher, saved)  # eval mode inside: not even BatchNorm statistics moved
    masks.remove(student)


def test_causal_lm_with_dict_batches():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(config)
    torch.manual_seed(1)
    student = transformers.LlamaForCausalLM(config)
    assert is_causal_lm(student)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 12), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 8:] = 0  # right padding
    labels = ids.masked_fill(attention == 0, -100)
    batches = [{"input_ids": ids, "attention_mask": attention, "labels": labels}]
    saved = state_copy(teacher)
    result = distill(student, teacher, batches, epochs=8, lr=1e-2, alpha=0.9, progress=False)
    assert result.steps == 8 and result.epoch_losses[-1] < result.epoch_losses[0]
    assert same_state(teacher, saved)
    no_labels = distill(student, teacher, [{"input_ids": ids}], progress=False)
    assert no_labels.steps == 1


def test_split_batch_forms():
    x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    assert split_batch((x, y))[1] is y and split_batch(x)[1] is None and split_batch([x])[1] is None
    inputs, labels = split_batch({"input_ids": x, "labels": y})
    assert labels is y and "labels" not in inputs
    with pytest.raises(ArgumentError, match="batches"):
        split_batch((x, y, y))


@pytest.mark.parametrize("kwargs, argument", [
    ({"temperature": 0}, "temperature"), ({"temperature": -1.0}, "temperature"), ({"lr": float("inf")}, "lr"),
    ({"alpha": "high"}, "alpha"),
    ({"alpha": 1.5}, "alpha"), ({"alpha": -0.1}, "alpha"), ({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"),
    ({"max_steps": 0}, "max_steps"), ({"weight_decay": -1}, "weight_decay"),
])
def test_argument_errors(kwargs, argument):
    teacher = small_cnn()
    with pytest.raises(ArgumentError, match=argument):
        distill(copy.deepcopy(teacher), teacher, [torch.randn(1, 8, 10, 10)], progress=False, **kwargs)


def test_other_errors():
    teacher = small_cnn()
    student = copy.deepcopy(teacher)
    x = torch.randn(1, 8, 10, 10)
    with pytest.raises(ArgumentError, match="Did you mean 'adamw'"):
        distill(student, teacher, [x], optimizer="adamww", progress=False)
    with pytest.raises(ArgumentError, match="student"):
        distill(teacher, teacher, [x], progress=False)
    with pytest.raises(ArgumentError, match="re-iterable"):
        distill(student, teacher, iter([x]), epochs=2, progress=False)
    with pytest.raises(ArgumentError, match="at least one batch"):
        distill(student, teacher, [], progress=False)
    with pytest.raises(ArgumentError, match="single batch"):
        distill(student, teacher, x, progress=False)
    with pytest.raises(ModelError, match="differ in shape"):
        distill(nn.Sequential(nn.Flatten(), nn.Linear(800, 3)), teacher, [x], progress=False)
