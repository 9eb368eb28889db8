"""Pruning during and before training: schedules against the papers' formulas, gradual pruning, pruning at init,
lottery tickets with rewinding, sparse soups and the transformers Trainer adapter, on real digits training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prunekit import masks
from prunekit.errors import ArgumentError
from prunekit.examples import DigitsCNN
from prunekit.training import (FitResult, GradualPruning, LotteryTicket, PruneAtInit, PruningCallback,
                               average_same_mask, clone_with_masks, cubic_sparsity, fit, imp_density,
                               prune_keeping_masks, sparse_soup_round)

from prunekit.examples import accuracy  # noqa: E402
from digits_training import batches_of, digits_split, mlp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # conftest: tiny models, one thread

# Held-out accuracy (256 digits) each training test reaches, measured with this file's seeds on one intra-op thread
# (torch 2.13 CPU): run the test and read the value it reports on failure. ACCURACY_TOL = 0.02 is 5 of the 256
# images: room for float rounding across CPUs, not for a regression. For scale, the dense MLP with the same seeds
# and epochs reaches 0.80 (seed 0, 3 epochs) and 0.39 (seed 3, 1 epoch); chance is 0.1.
ACCURACY = {"gradual": 0.848, "snip": 0.770, "synflow": 0.723, "erk-random": 0.801, "soup": 0.484,
            "soup-round": 0.777}
ACCURACY_TOL = 0.02


@pytest.fixture(scope="module")
def digits():
    return digits_split(256)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def pruned_counts(model: nn.Module) -> dict[str, int]:
    return {name: int((~mask).sum()) for name, _, _, mask in masks.masked_modules(model)}


def linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def assert_masked_zero(model: nn.Module) -> None:
    for name, module, param, mask in masks.masked_modules(model):
        assert torch.equal(getattr(module, param).detach()[~mask], torch.zeros(int((~mask).sum()))), name


class Probe(PruningCallback):
    """Records, after every step, the masks and whether the masked weights are exactly zero."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.masks, self.zero = model, [], []

    def on_step_end(self, step: int) -> None:
        self.masks.append((step, {n: m.clone() for n, _, _, m in masks.masked_modules(self.model)}))
        self.zero.append(all(bool((getattr(mod, p).detach()[~m] == 0).all())
                             for _, mod, p, m in masks.masked_modules(self.model)))


# --- schedules --------------------------------------------------------------------------------------------------


def test_cubic_schedule_matches_zhu_and_gupta():
    s = [cubic_sparsity(t, 0.0, 0.9, 0, 1000, 1) for t in range(0, 1201)]
    assert s[0] == 0.0 and s[1000] == pytest.approx(0.9, abs=0) and s[1200] == 0.9
    assert s[500] == pytest.approx(0.7875, abs=1e-12)  # 0.9 - 0.9 * (1 - 0.5)^3
    assert s[250] == pytest.approx(0.9 - 0.9 * 0.75 ** 3, abs=1e-12)
    assert all(a <= b for a, b in zip(s, s[1:]))
    # held at the initial value before start, updated only every `frequency` steps from start
    assert cubic_sparsity(5, 0.2, 0.8, 10, 110, 25) == 0.2
    assert cubic_sparsity(49, 0.2, 0.8, 10, 110, 25) == cubic_sparsity(35, 0.2, 0.8, 10, 110, 25)
    assert cubic_sparsity(35, 0.2, 0.8, 10, 110, 25) == pytest.approx(0.8 - 0.6 * 0.75 ** 3)
    assert cubic_sparsity(110, 0.2, 0.8, 10, 110, 30) == 0.8  # the end is final even off the frequency grid


def test_imp_density_is_geometric():
    assert imp_density(0) == 1.0
    assert [imp_density(n) for n in range(1, 6)] == pytest.approx([0.8 ** n for n in range(1, 6)], abs=1e-15)
    assert imp_density(3, rate=0.5) == 0.125


@pytest.mark.parametrize("make, argument", [
    (lambda m: cubic_sparsity(1, 0.0, 1.0, 0, 10), "final"),
    (lambda m: cubic_sparsity(1, 0.0, 0.5, 0, 10, 0), "frequency"),
    (lambda m: cubic_sparsity(-1, 0.0, 0.5, 0, 10), "step"),
    (lambda m: GradualPruning(m, final_sparsity=1.0, end_step=10), "final_sparsity"),
    (lambda m: GradualPruning(m, final_sparsity=-0.1, end_step=10), "final_sparsity"),
    (lambda m: GradualPruning(m, final_sparsity=0.3, initial_sparsity=0.5, end_step=10), "final_sparsity"),
    (lambda m: GradualPruning(m, final_sparsity=0.5, start_step=10, end_step=10), "end_step"),
    (lambda m: GradualPruning(m, final_sparsity=0.5, start_step=10, end_step=3), "end_step"),
    (lambda m: GradualPruning(m, final_sparsity=0.5, end_step=10, frequency=0), "frequency"),
    (lambda m: GradualPruning(m, final_sparsity=0.5, end_step=10, frequency=1.5), "frequency"),
    (lambda m: GradualPruning(m, "no-such-method", final_sparsity=0.5, end_step=10), "method"),
    (lambda m: GradualPruning(m, final_sparsity=0.5, end_step=10, apply="bake"), "apply"),
    (lambda m: GradualPruning(m, final_sparsity=0.5, end_step=10, sparsity=0.2), "sparsity"),
    (lambda m: LotteryTicket(m, rate=0.0), "rate"),
    (lambda m: LotteryTicket(m, rate=1.0), "rate"),
    (lambda m: LotteryTicket(m, rate=1.5), "rate"),
    (lambda m: LotteryTicket(m, rewind_step=-2), "rewind_step"),
    (lambda m: imp_density(2, rate=0), "rate"),
    (lambda m: imp_density(-1), "rounds"),
    (lambda m: PruneAtInit(m, "wanda", 0.5), "method"),
    (lambda m: PruneAtInit(m, "snip", 0.5), "data"),
    (lambda m: PruneAtInit(m, "synflow", 0.5), "example_inputs"),
    (lambda m: PruneAtInit(m, "random", 1.0), "sparsity"),
    (lambda m: fit(m, [], 1, object()), "optimizer"),
    (lambda m: fit(m, [], -1, sgd(m)), "epochs"),
    (lambda m: fit(m, [torch.zeros(2, 64)], 1, sgd(m)), "batches"),
    (lambda m: average_same_mask([]), "models"),
    (lambda m: sparse_soup_round(m, [0, 1]), "train_fn"),
])
def test_bad_inputs_name_the_argument(make, argument):
    model = mlp()
    with pytest.raises(ArgumentError) as caught:
        make(model)
    assert caught.value.argument == argument
    assert not masks.has_masks(model)


# --- gradual pruning --------------------------------------------------------------------------------------------


def test_gradual_pruning_reaches_final_sparsity_at_end_step_and_never_unprunes(digits):
    model = mlp()
    total = sum(m.weight.numel() for m in linears(model))
    gradual = GradualPruning(model, "global-magnitude", final_sparsity=0.8, start_step=2, end_step=40, frequency=6)
    probe = Probe(model)
    result = fit(model, batches_of(digits), 3, sgd(model), callbacks=[gradual, probe])
    assert isinstance(result, FitResult) and result.steps == 96 and math.isfinite(result.final_loss)
    assert all(probe.zero)  # SGD with momentum and weight decay never revives a masked weight
    counts = {step: sum(int((~m).sum()) for m in mask.values()) for step, mask in probe.masks}
    assert counts[1] == 0  # dense before start_step
    for step in range(2, 97):
        assert counts[step] == round(gradual.scheduled(step) * total), step
    assert counts[37] < counts[38] <= counts[40] == round(0.8 * total) == counts[96]
    assert counts[7] == 0 < counts[8] == counts[13] < counts[14]  # updates every 6 steps from start_step
    assert [s for s, _ in gradual.history] == [8, 14, 20, 26, 32, 38, 40] and gradual.done  # 0 at start: no prune
    # sparsity only grows: every weight pruned at one step is still pruned at every later one
    for (_, before), (_, after) in zip(probe.masks, probe.masks[1:]):
        assert all(not bool((after[name] & ~before[name]).any()) for name in before)
    assert accuracy(model, *digits[2:]) == pytest.approx(ACCURACY["gradual"], abs=ACCURACY_TOL)


def test_gradual_pruning_step_counts_itself_and_layerwise_counts_are_exact():
    model = mlp()
    gradual = GradualPruning(model, "magnitude", final_sparsity=0.5, end_step=4, frequency=1)
    sizes = {f"{i}": m.weight.numel() for i, m in enumerate(model) if isinstance(m, nn.Linear)}
    for step in range(1, 7):
        gradual.step()
        expected = cubic_sparsity(step, 0.0, 0.5, 0, 4)
        assert pruned_counts(model) == {n: round(expected * size) for n, size in sizes.items()}
    assert gradual.current_step == 6 and gradual.sparsity == 0.5


def test_prune_keeping_masks_never_revives_under_other_random_scores():
    model = mlp()
    prune_keeping_masks(model, "random", 0.3, seed=0)
    before = {n: m.clone() for n, _, _, m in masks.masked_modules(model)}
    weights = {n: mod.weight.detach().clone() for n, mod, _, _ in masks.masked_modules(model)}
    prune_keeping_masks(model, "random", 0.5, seed=1)  # other scores: the plain new masks would revive weights
    for name, module, _, mask in masks.masked_modules(model):
        assert not bool((mask & ~before[name]).any())
        assert int((~mask).sum()) == round(0.5 * mask.numel())
        assert torch.equal(module.weight.detach()[mask], weights[name][mask])  # survivors keep their values
    assert_masked_zero(model)


# --- pruning at initialisation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method, optimizer", [("snip", "sgd"), ("synflow", "adam"), ("erk-random", "sgd")])
def test_prune_at_init_gives_the_sparsity_and_keeps_it_through_training(digits, method, optimizer):
    model = mlp(seed=1)
    total = sum(m.weight.numel() for m in linears(model))
    data = batches_of(digits, seed=9)(0)[:2]
    # what each method reads: SNIP one batch, SynFlow the input shape (taken from data), ERK-random nothing
    inputs = {"snip": {"data": data, "n_batches": 1}, "synflow": {"data": data}, "erk-random": {}}[method]
    at_init = PruneAtInit(model, method, 0.7, **inputs)
    report = at_init.apply()  # before training
    assert sum(pruned_counts(model).values()) == round(0.7 * total) == report.zeros
    before = {n: m.clone() for n, _, _, m in masks.masked_modules(model)}
    weights = [m.weight.detach().clone() for m in linears(model)]
    opt = sgd(model) if optimizer == "sgd" else torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    probe = Probe(model)
    fit(model, batches_of(digits), 3, opt, callbacks=[at_init, probe])
    assert at_init.report is report  # pruned once
    assert all(probe.zero) and len(probe.zero) == 96
    assert {n: m for n, _, _, m in masks.masked_modules(model)}.keys() == before.keys()
    assert all(torch.equal(m, before[n]) for n, _, _, m in masks.masked_modules(model))
    assert sum(int((m.weight == 0).sum()) for m in linears(model)) == round(0.7 * total)  # exactly, after training
    assert any(not torch.equal(m.weight, w) for m, w in zip(linears(model), weights))  # survivors did train
    assert accuracy(model, *digits[2:]) == pytest.approx(ACCURACY[method], abs=ACCURACY_TOL)


def test_prune_at_init_on_a_cnn_through_fit(digits):
    torch.manual_seed(0)
    model = DigitsCNN()
    data = batches_of(digits, seed=3)(0)[0]
    at_init = PruneAtInit(model, "synflow", 0.6, data=data)  # SynFlow takes the input shape from the data
    fit(model, batches_of(digits), 1, torch.optim.Adam(model.parameters(), lr=3e-3), callbacks=[at_init])
    total = sum(m.weight.numel() for m in linears(model))
    assert sum(pruned_counts(model).values()) == round(0.6 * total)
    assert_masked_zero(model)


# --- lottery tickets --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["global-magnitude", "magnitude"])
def test_lottery_ticket_densities_and_exact_rewinding(digits, method):
    model = mlp(seed=2)
    sizes = {f"{i}": m.weight.numel() for i, m in enumerate(model) if isinstance(m, nn.Linear)}
    total = sum(sizes.values())
    ticket = LotteryTicket(model, rate=0.2, rewind_step=3, method=method)
    seen: dict[str, torch.Tensor] = {}

    class Capture(PruningCallback):  # an independent copy of the state at step 3 of the first round
        def on_step_end(self, step: int) -> None:
            if step == 3 and not seen:
                seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    rounds_trained = []

    def train(m: nn.Module, callbacks) -> None:
        rounds_trained.append(ticket.rounds_done)
        fit(m, batches_of(digits, seed=len(rounds_trained)), 1, sgd(m), callbacks=[*callbacks, Capture()])

    densities = ticket.run(3, train)
    assert rounds_trained == [0, 1, 2]
    assert len(densities) == 4 and densities[0] == 1.0
    for n in range(4):
        assert abs(densities[n] - 0.8 ** n) * total <= 1  # within one weight overall
    if method == "magnitude":
        for name, count in pruned_counts(model).items():
            assert abs((sizes[name] - count) - 0.8 ** 3 * sizes[name]) <= 1  # and within one weight per layer
    # the survivors are theta_3 exactly, the pruned weights exactly zero
    state = model.state_dict()
    for name, module, _, mask in masks.masked_modules(model):
        rewound = seen[f"{name}.weight"]
        assert torch.equal(module.weight.detach()[mask], rewound[mask])
        assert not bool(module.weight.detach()[~mask].any())
    assert all(torch.equal(state[k], v) for k, v in seen.items() if not k.endswith("weight"))
    assert not torch.equal(seen["1.bias"], mlp(seed=2)[1].bias.detach())  # theta_3 is not the initialisation


def test_lottery_ticket_refuses_a_rewind_step_never_reached(digits):
    model = mlp()
    ticket = LotteryTicket(model, rewind_step=1000)
    with pytest.raises(ArgumentError) as caught:
        ticket.run(1, lambda m, cb: fit(m, batches_of(digits)(0)[:2], 1, sgd(m), callbacks=cb))
    assert caught.value.argument == "rewind_step" and "2 steps" in str(caught.value)


# --- sparse soups -----------------------------------------------------------------------------------------------


def test_average_same_mask_keeps_the_mask_and_refuses_different_ones(digits):
    base = mlp(seed=3)
    prune_keeping_masks(base, "global-magnitude", 0.6)
    shared = {n: m.clone() for n, _, _, m in masks.masked_modules(base)}
    ingredients = [clone_with_masks(base) for _ in range(3)]
    for seed, model in enumerate(ingredients):
        fit(model, batches_of(digits, seed=seed + 1), 1, sgd(model))
        assert_masked_zero(model)  # the copies' masks are enforced too
    soup = average_same_mask(ingredients)
    assert soup not in ingredients
    assert {n: m for n, _, _, m in masks.masked_modules(soup)}.keys() == shared.keys()
    assert all(torch.equal(m, shared[n]) for n, _, _, m in masks.masked_modules(soup))
    assert sum(int((m.weight == 0).sum()) for m in linears(soup)) == sum(int((~m).sum()) for m in shared.values())
    expected = (sum(m[3].weight.detach().double() for m in ingredients) / 3).float()
    assert torch.equal(soup[3].weight.detach(), expected)
    assert accuracy(soup, *digits[2:]) == pytest.approx(ACCURACY["soup"], abs=ACCURACY_TOL)

    other = clone_with_masks(ingredients[0])
    prune_keeping_masks(other, "global-magnitude", 0.7)
    with pytest.raises(ArgumentError) as caught:
        average_same_mask([ingredients[0], other])
    assert caught.value.argument == "models" and "'1.weight'" in str(caught.value)
    dense = mlp(seed=3)
    with pytest.raises(ArgumentError, match="masked in models\\[0\\] but not in models\\[1\\]"):
        average_same_mask([ingredients[0], dense])


def test_sparse_soup_round_prunes_trains_and_averages(digits):
    model = mlp(seed=4)
    total = sum(m.weight.numel() for m in linears(model))
    calls = []

    def train(m: nn.Module, seed: int) -> None:
        calls.append(seed)
        fit(m, batches_of(digits, seed=seed), 1, sgd(m))

    returned = sparse_soup_round(model, [1, 2], train, sparsity=0.5)
    assert returned is model and calls == [1, 2]
    first = {n: m.clone() for n, _, _, m in masks.masked_modules(model)}
    assert sum(int((~m).sum()) for m in first.values()) == round(0.5 * total)
    sparse_soup_round(model, [3, 4], train, sparsity=0.75)
    assert all(not bool((m & ~first[n]).any()) for n, _, _, m in masks.masked_modules(model))
    assert sum(int((m.weight == 0).sum()) for m in linears(model)) == round(0.75 * total)
    assert accuracy(model, *digits[2:]) == pytest.approx(ACCURACY["soup-round"], abs=ACCURACY_TOL)


# --- the transformers Trainer ---------------------------------------------------------------------------------


def test_trainer_adapter_on_a_tiny_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from prunekit.training import PruningTrainerCallback

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    dataset = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 64, (8, 12), generator=g)]
    gradual = GradualPruning(model, "magnitude", final_sparsity=0.5, start_step=1, end_step=4, frequency=1)
    probe = Probe(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, learning_rate=1e-3, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                   callbacks=[PruningTrainerCallback(gradual, probe)])
    trainer.train()
    assert [s for s, _ in gradual.history] == [2, 3, 4] and gradual.sparsity == 0.5  # 0 at start_step=1
    assert [s for s, _ in probe.masks] == [1, 2, 3, 4] and all(probe.zero)
    names = [n for n, _, _, _ in masks.masked_modules(model)]
    assert len(names) == 14 and not any("embed" in n or "lm_head" in n for n in names)
    for name, module, _, mask in masks.masked_modules(model):
        assert int((module.weight == 0).sum()) == int((~mask).sum()) == round(0.5 * mask.numel()), name
    with pytest.raises(ArgumentError) as caught:
        PruningTrainerCallback(object())
    assert caught.value.argument == "callback"
