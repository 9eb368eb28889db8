"""Training-time and at-initialisation pruning methods against their papers' invariants: ISS-P soft shrinkage,
MaskSparsity, PDP soft masks, the PQ Index and SAP, PreCropping and block dropping at initialisation; each trained
on real digits (and through the transformers Trainer on a tiny Llama)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prunekit import masks
from prunekit.errors import ArgumentError
from prunekit.examples import DigitsCNN
from prunekit.nets import resnet_small
from prunekit.scores.pq import pq_index, sap_keep_bound, sap_prune_count
from prunekit.training import (PDP, SAP, GradualPruning, IterativeSoftShrinkage, LayerDropAtInit, MaskSparsity,
                               PruningCallback, block_scores, fit, layer_densities, pdp_soft_mask, pdp_threshold,
                               precrop)
from prunekit.training.common import lowest
from prunekit.training.mask_sparsity import penalty_gradient

from prunekit.examples import accuracy  # noqa: E402
from digits_training import batches_of, digits_split, mlp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def digits():
    return digits_split(400)


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return DigitsCNN()


def layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=3e-3)


class Probe(PruningCallback):
    """After every step: how many weights the masks prune, and whether every masked weight is exactly zero."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.pruned, self.zero = model, [], []

    def on_step_end(self, step: int) -> None:
        entries = list(masks.masked_modules(self.model))
        self.pruned.append(sum(int((~m).sum()) for _, _, _, m in entries))
        self.zero.append(all(bool((getattr(mod, p).detach()[~m] == 0).all()) for _, mod, p, m in entries))


# --- the PQ Index and SAP's rule ------------------------------------------------------------------------------


def test_pq_index_oracles():
    for d in (1, 2, 7, 1000):
        assert pq_index(torch.full((d,), 0.37)) == pytest.approx(0.0, abs=1e-12)  # constant -> 0
        assert pq_index(torch.full((d,), -5.0)) == pytest.approx(0.0, abs=1e-12)
        one_hot = torch.zeros(d)
        one_hot[d // 2] = 3.0
        assert pq_index(one_hot) == pytest.approx(1 - 1 / d, abs=1e-12)  # one-hot -> 1 - 1/d
        assert pq_index(one_hot, p=0.25, q=2.0) == pytest.approx(1 - d ** (1 / 2 - 4), abs=1e-12)
    w = torch.randn(4, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = pq_index(w)
    assert 0 < base < 1 - 1 / w.numel()
    for scale in (1e-30, 1e-3, 7.0, -2.0, 1e20):  # scale invariant, also where p-th powers would underflow
        assert pq_index(w * scale) == pytest.approx(base, rel=1e-12)
    # by hand for a small vector: 1 - d^(1 - 2) * (sum sqrt|w|)^2 / sum |w|
    v = torch.tensor([4.0, 1.0, 0.0, 1.0])
    assert pq_index(v) == pytest.approx(1 - (2 + 1 + 0 + 1) ** 2 / (4 * 6), abs=1e-15)
    sparser = w.clone().reshape(-1)
    sparser[sparser.abs() < 1.0] = 0
    assert pq_index(sparser) > base  # zeroing the small entries makes it more compressible


def test_sap_rule_is_the_papers():
    # p=0.5, q=1: r = ceil(d (1 + eta)^-2 (1 - I)); pruned = floor(d * clip(gamma (1 - r/d), 0, beta))
    assert sap_keep_bound(0.3, 1000) == 700
    assert sap_keep_bound(0.3, 1000, eta=0.1) == math.ceil(1000 * 0.7 / 1.21)
    assert sap_prune_count(0.3, 1000) == 300
    assert sap_prune_count(0.3, 1000, gamma=0.5) == 150
    assert sap_prune_count(0.99, 1000) == 900  # beta caps one round
    assert sap_prune_count(0.0, 1000) == 0  # all alike: nothing to prune
    assert sap_prune_count(0.5, 10, p=0.25, q=2.0) == 10 - math.ceil(10 * 0.5 ** (0.5 / 1.75))


def test_sap_rounds_prune_what_the_pq_index_says_and_rewind(digits):
    model = mlp(seed=5)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    sap = SAP(model)
    seen = []

    def train(m, callbacks):
        kept = torch.cat([lin.weight.detach()[masks.get_mask(lin) if masks.get_mask(lin) is not None
                                              else torch.ones_like(lin.weight, dtype=torch.bool)].abs()
                          for lin in layers(m)])
        fit(m, batches_of(digits, seed=len(seen)), 1, adam(m), callbacks=callbacks, progress=False)
        after = torch.cat([lin.weight.detach().abs().reshape(-1) for lin in layers(m)])
        seen.append((kept.numel(), after))

    densities = sap.run(3, train)
    total = sum(lin.weight.numel() for lin in layers(model))
    for (d, trained), record in zip(seen, sap.history):
        live = trained[trained != 0]  # the survivors' trained values; SAP scores exactly these
        assert record.remaining == d == live.numel()
        assert record.index == pytest.approx(pq_index(live), rel=1e-12)
        assert record.pruned == sap_prune_count(pq_index(live), d) > 0
    assert [round(x * total) for x in densities[1:]] == [
        total - sum(r.pruned for r in sap.history[:i + 1]) for i in range(3)]
    # survivors rewound to their initial values exactly, masked weights zero
    for name, module, _, mask in masks.masked_modules(model):
        assert torch.equal(module.weight.detach()[mask], init[f"{name}.weight"][mask])
        assert not module.weight.detach()[~mask].any()
    with pytest.raises(ArgumentError) as caught:
        sap.target_density(5)
    assert caught.value.argument == "rounds"


def test_sap_layer_scope_counts_each_layer():
    model = mlp(seed=6)
    sap = SAP(model, scope="layer")
    before = [lin.weight.detach().clone() for lin in layers(model)]
    sap.prune_round()
    for lin, w in zip(layers(model), before):
        mask = masks.get_mask(lin)
        n = sap_prune_count(pq_index(w), w.numel())
        assert int((~mask).sum()) == n
        assert w.abs()[~mask].max() <= w.abs()[mask].min()  # the smallest magnitudes went


# --- ISS-P ----------------------------------------------------------------------------------------------------


def test_issp_with_shrink_zero_is_hard_gradual_pruning():
    soft_model, hard_model = mlp(seed=1), mlp(seed=1)
    issp = IterativeSoftShrinkage(soft_model, 0.7, end_step=9, shrink=0.0, start_step=1, frequency=2)
    gradual = GradualPruning(hard_model, "magnitude", final_sparsity=0.7, start_step=1, end_step=9, frequency=2)
    for step in range(1, 12):
        issp.step()
        gradual.step()
        for soft, hard in zip(layers(soft_model), layers(hard_model)):
            mask = masks.get_mask(hard)
            assert torch.equal(soft.weight == 0, torch.zeros_like(soft.weight, dtype=torch.bool)
                               if mask is None else ~mask), step
            assert torch.equal(soft.weight, hard.weight)
    assert issp.done and [s for s, _ in issp.history] == [s for s, _ in gradual.history]


def test_issp_shrinks_instead_of_zeroing_and_shrunk_weights_can_regrow(digits):
    model = cnn(seed=2)
    issp = IterativeSoftShrinkage(model, 0.8, end_step=96, shrink=0.5, frequency=4)
    before = [lin.weight.detach().clone() for lin in layers(model)]
    issp.shrink_now(0.3)
    for lin, w in zip(layers(model), before):
        chosen = lin.weight.detach() != w
        assert int(chosen.sum()) == round(0.3 * w.numel())
        assert torch.equal(lin.weight.detach()[chosen], w[chosen] * 0.5)  # halved, not zeroed
        assert w.abs()[chosen].max() <= w.abs()[~chosen].min()
    assert not masks.has_masks(model)  # nothing is masked while shrinking: the weights stay trainable

    selections: list[list[torch.Tensor]] = []

    class Selected(PruningCallback):  # what each shrink step is about to select (runs just before ISS-P)
        def on_step_end(self, step: int) -> None:
            if issp.is_shrink_step(step) and issp.scheduled(step) > 0:
                selections.append([lowest(lin.weight.abs(), round(issp.scheduled(step) * lin.weight.numel()))
                                   for lin in layers(model)])

    probe = Probe(model)
    fit(model, batches_of(digits), 5, adam(model), callbacks=[Selected(), issp, probe], progress=False)
    total = sum(lin.weight.numel() for lin in layers(model))
    assert probe.pruned[94] == 0 and probe.pruned[95] == sum(round(0.8 * lin.weight.numel())
                                                             for lin in layers(model))
    assert all(probe.zero) and probe.pruned[-1] == probe.pruned[95]
    assert sum(int((lin.weight == 0).sum()) for lin in layers(model)) == probe.pruned[-1]
    assert abs(probe.pruned[-1] - round(0.8 * total)) <= len(layers(model))  # rounded per layer
    assert len(selections) == 23  # steps 4, 8, ..., 92
    # hard gradual pruning only ever adds to its selection; here shrunk weights grow back out of it
    left = sum(int((before & ~after).sum()) for earlier, later in zip(selections, selections[1:])
               for before, after in zip(earlier, later))
    assert left > 0
    assert accuracy(model, *digits[2:]) > 0.85


# --- PDP ------------------------------------------------------------------------------------------------------


def test_pdp_soft_mask_oracles():
    w = torch.randn(30, 20, generator=torch.Generator().manual_seed(3))
    k = round(0.6 * w.numel())
    squares = torch.sort((w.double() ** 2).reshape(-1)).values
    t2 = pdp_threshold(w, k)
    assert squares[k - 1] < t2 < squares[k] and t2 == pytest.approx(float(squares[k - 1] + squares[k]) / 2)
    at_t = torch.tensor([math.sqrt(t2), -math.sqrt(t2)], dtype=torch.float64)
    assert torch.allclose(pdp_soft_mask(at_t, t2, 1e-3), torch.full((2,), 0.5, dtype=torch.float64), atol=1e-12)
    hard = (w.double() ** 2 > t2).double()
    assert int((hard == 0).sum()) == k
    gaps = [float((pdp_soft_mask(w.double(), t2, tau) - hard).abs().max()) for tau in (1e-1, 1e-2, 1e-3, 1e-5, 1e-9)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-6  # hardens to the 0/1 mask as tau -> 0
    assert pdp_threshold(w, 0) == -math.inf and torch.equal(pdp_soft_mask(w, -math.inf, 1.0), torch.ones_like(w))


def test_pdp_trains_through_soft_masks_then_hardens_exactly(digits):
    model = cnn(seed=4)
    pdp = PDP(model, 0.8, end_step=64, start_step=8, tau=1e-3)
    probe = Probe(model)
    checked = []

    class During(PruningCallback):  # in the soft phase the layer computes with w * m(w), and m is soft
        def on_step_end(self, step: int) -> None:
            if step == 40:
                lin = model.features[3]
                original = pdp.original(1).detach()
                soft = pdp.soft_masks()[1]
                assert torch.allclose(lin.weight.detach(), original * soft)
                assert 0 < float(soft.min()) and float(((soft > 0.01) & (soft < 0.99)).float().mean()) > 0
                assert not masks.has_masks(model)
                checked.append(step)

    fit(model, batches_of(digits), 4, adam(model), callbacks=[pdp, During(), probe], progress=False)
    assert checked == [40] and pdp.done
    assert not any(hasattr(m, "parametrizations") and len(m.parametrizations) for m in layers(model))
    expected = sum(round(0.8 * lin.weight.numel()) for lin in layers(model))
    assert probe.pruned[62] == 0 and probe.pruned[63] == expected == probe.pruned[-1] and all(probe.zero)
    for lin in layers(model):
        assert int((lin.weight == 0).sum()) == round(0.8 * lin.weight.numel())
    assert set(model.state_dict()) == set(cnn().state_dict())  # plain again
    assert accuracy(model, *digits[2:]) > 0.85


def test_pdp_global_budget_sets_layer_targets_by_global_magnitude():
    model = mlp(seed=7)
    with torch.no_grad():
        layers(model)[0].weight.mul_(3.0)  # layers of different scales get different shares
    everything = torch.cat([lin.weight.detach().abs().reshape(-1) for lin in layers(model)])
    threshold = torch.sort(everything).values[round(0.6 * everything.numel()) - 1]
    pdp = PDP(model, 0.6, end_step=2, budget="global")
    counts = [int((lin.weight.detach().abs() <= threshold).sum()) for lin in layers(model)]
    pdp.hard_prune()
    assert [int((~masks.get_mask(lin)).sum()) for lin in layers(model)] == counts
    assert sum(counts) == round(0.6 * everything.numel()) and len(set(c / lin.weight.numel() for c, lin in zip(
        counts, layers(model)))) == 3


# --- MaskSparsity ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_mask_sparsity_penalty_gradient_is_zero_on_kept_weights(digits, granularity):
    plain_model = cnn(seed=5)
    twin = MaskSparsity(plain_model, 0.5, end_step=100, strength=0.01, granularity=granularity, via_hooks=False)
    twin.on_train_begin()
    x, y = digits[0][:64], digits[1][:64]
    penalty_grads = torch.autograd.grad(twin.penalty(), [lin.weight for lin in layers(plain_model)])
    for lin, grad, pruned in zip(layers(plain_model), penalty_grads, twin.pruned):
        assert not grad[~pruned].any()  # kept weights feel nothing
        assert torch.allclose(grad, penalty_gradient(lin.weight, pruned, 0.01, granularity), atol=1e-9)
        if granularity == "weight":
            assert torch.allclose(grad[pruned], 0.01 * torch.sign(lin.weight.detach()[pruned]))
            assert int(pruned.sum()) == round(0.5 * lin.weight.numel())
        else:
            rows = pruned.reshape(pruned.shape[0], -1)
            assert bool((rows.all(1) | ~rows.any(1)).all()) and int(rows.all(1).sum()) == round(0.5 * len(rows))
            norms = lin.weight.detach().reshape(len(rows), -1).norm(dim=1)
            assert torch.allclose(grad.reshape(len(rows), -1)[rows.all(1)],
                                  0.01 * lin.weight.detach().reshape(len(rows), -1)[rows.all(1)]
                                  / norms[rows.all(1), None])
    # the tensor hooks add exactly the penalty's gradient to the loss gradient
    model = cnn(seed=5)
    ms = MaskSparsity(model, 0.5, end_step=100, strength=0.01, granularity=granularity)
    ms.on_train_begin()
    assert all(torch.equal(a, b) for a, b in zip(ms.pruned, twin.pruned))
    hooked = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), [lin.weight for lin in layers(model)])
    plain = torch.autograd.grad(nn.functional.cross_entropy(plain_model(x), y) + twin.penalty(),
                                [lin.weight for lin in layers(plain_model)])
    for a, b in zip(hooked, plain):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(hooked[0], torch.autograd.grad(nn.functional.cross_entropy(plain_model(x), y),
                                                             layers(plain_model)[0].weight)[0], atol=1e-6)


def test_mask_sparsity_drives_the_masked_weights_down_then_prunes(digits):
    model, reference = cnn(seed=6), cnn(seed=6)
    ms = MaskSparsity(model, 0.8, end_step=96, strength=0.02)
    probe = Probe(model)
    just_before: list[torch.Tensor] = []

    class Before(PruningCallback):  # the selected weights one step before they are pruned
        def on_step_end(self, step: int) -> None:
            if step == 95:
                just_before.extend(lin.weight.detach()[p].abs().mean() for lin, p in zip(layers(model), ms.pruned))

    fit(model, batches_of(digits), 4, adam(model), callbacks=[ms, Before(), probe], progress=False)
    assert probe.pruned[94] == 0 and probe.pruned[95] == probe.pruned[-1] == sum(
        round(0.8 * lin.weight.numel()) for lin in layers(model)) and all(probe.zero)
    assert accuracy(model, *digits[2:]) > 0.85
    # the same training without the penalty: the selected weights stay far larger
    fit(reference, batches_of(digits), 3, adam(reference), progress=False, callbacks=[])
    for mine, ref, pruned in zip(just_before, layers(reference), ms.pruned):
        assert float(mine) < 0.5 * float(ref.weight.detach()[pruned].abs().mean())


def test_mask_sparsity_channels_prune_whole_output_channels(digits):
    model = cnn(seed=7)
    ms = MaskSparsity(model, 0.5, end_step=64, strength=0.02, granularity="channel", ignore="classifier")
    fit(model, batches_of(digits), 3, adam(model), callbacks=[ms], progress=False)  # one epoch after pruning
    for lin in (model.features[0], model.features[3]):
        rows = masks.get_mask(lin).reshape(lin.weight.shape[0], -1)
        assert int((~rows.all(1)).sum()) == lin.weight.shape[0] // 2 and bool((rows.all(1) | ~rows.any(1)).all())
    assert masks.get_mask(model.classifier) is None
    assert accuracy(model, *digits[2:]) > 0.8


# --- SAP inside a training loop -------------------------------------------------------------------------------


def test_sap_prunes_every_epoch_inside_fit(digits):
    model = cnn(seed=8)
    sap = SAP(model, prune_every=1, scope="layer")
    probe = Probe(model)
    fit(model, batches_of(digits), 3, adam(model), callbacks=[sap, probe], progress=False)
    assert len(sap.history) == 3 and all(r.pruned > 0 for r in sap.history)
    counts = [probe.pruned[31], probe.pruned[32], probe.pruned[64]]  # epochs end after steps 32 and 64
    assert counts == [0, sap.history[0].pruned, sap.history[0].pruned + sap.history[1].pruned]
    assert all(probe.zero)
    total = sum(lin.weight.numel() for lin in layers(model))
    zeros = sum(int((lin.weight == 0).sum()) for lin in layers(model))
    assert zeros == sum(r.pruned for r in sap.history) == round((1 - sap.density) * total)
    assert accuracy(model, *digits[2:]) > 0.85


# --- layer dropping at initialisation -------------------------------------------------------------------------


def test_block_scores_oracles_and_the_lowest_blocks_go(digits):
    model = resnet_small(width=8)
    torch.manual_seed(0)
    model = resnet_small(width=8)
    blocks = ["layers.0.0", "layers.0.1", "layers.1.1", "layers.2.1"]
    with torch.no_grad():
        model.get_submodule("layers.1.1").conv2.weight.zero_()  # this residual branch carries nothing
    x, y = digits[0][:64], digits[1][:64]
    flow = block_scores(model, blocks, "synflow", example_inputs=x[:1])
    snip = block_scores(model, blocks, "snip", data=(x, y))
    assert flow["layers.1.1"] == pytest.approx(0.0, abs=1e-12) and min(flow.values()) == flow["layers.1.1"]
    assert all(0 < flow[b] < 1 for b in blocks if b != "layers.1.1")
    assert snip["layers.1.1"] == min(snip.values())
    drop = LayerDropAtInit(model, 2, "synflow", data=[(x, y)])
    assert drop.candidates == blocks  # the identity-shortcut blocks that keep their shape
    removed = drop.apply()
    assert removed[0] == "layers.1.1" and len(removed) == 2
    second = min((b for b in blocks if b != "layers.1.1"), key=lambda b: flow[b])
    assert removed[1] == second
    assert all(isinstance(model.get_submodule(b), nn.Identity) for b in removed)
    assert model(x[:3]).shape == (3, 10)


def test_layer_drop_at_init_then_training(digits):
    torch.manual_seed(1)
    model = resnet_small(width=8)
    dense_params = sum(p.numel() for p in model.parameters())
    drop = LayerDropAtInit(model, 2, "snip", data=batches_of(digits, seed=4)(0)[:1])
    fit(model, batches_of(digits), 3, adam(model), callbacks=[drop], progress=False)
    assert len(drop.removed) == 2
    removed_params = sum(p.numel() for b in drop.removed for p in resnet_small(width=8).get_submodule(b).parameters())
    assert sum(p.numel() for p in model.parameters()) == dense_params - removed_params
    assert accuracy(model, *digits[2:]) > 0.85


# --- PreCropping ----------------------------------------------------------------------------------------------


def test_layer_densities_follow_the_source(digits):
    model = cnn(seed=9)
    erk = layer_densities(model, 0.8, "erk")
    weights = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert sum(erk[n] * weights[n] for n in weights) == pytest.approx(0.2 * sum(weights.values()), rel=1e-9)
    snip = layer_densities(model, 0.8, "snip", data=[(digits[0][:64], digits[1][:64])])
    assert sum(round(snip[n] * weights[n]) for n in weights) == round(0.2 * sum(weights.values()))
    assert not masks.has_masks(model)  # measured on a copy


@pytest.mark.parametrize("source", ["erk", "synflow"])
def test_precrop_builds_a_narrower_model_at_the_density(digits, source):
    torch.manual_seed(2)
    model = resnet_small(width=8)
    x = digits[0][:4]
    result = precrop(model, 0.75, x, source)  # erk and synflow read no batches (refused if given)
    assert abs(result.density - 0.25) < 0.02
    assert result.weights_after == sum(m.weight.numel() for m in model.modules()
                                       if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert model(x).shape == (4, 10) and not masks.has_masks(model)
    # widths follow kappa * sqrt(group density): a group of lower density keeps a smaller share
    shares = {name: kept / size for name, (size, kept) in result.widths.items()}
    assert 0 < min(shares.values()) < max(shares.values()) <= 1
    if source == "erk":  # trains like any model: the optimizer is built on the narrow one
        fit(model, batches_of(digits), 3, adam(model), progress=False)
        assert accuracy(model, *digits[2:]) > 0.8


def test_precrop_at_zero_sparsity_changes_nothing(digits):
    torch.manual_seed(3)
    model = resnet_small(width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = precrop(model, 0.0, digits[0][:2])
    assert result.density == 1.0 and not result.plan
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- through the transformers Trainer -------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda m: IterativeSoftShrinkage(m, 0.5, end_step=4, shrink=0.5, start_step=1),
    lambda m: PDP(m, 0.5, end_step=4, start_step=1, tau=1e-4),
    lambda m: MaskSparsity(m, 0.5, end_step=4, strength=0.01),
], ids=["issp", "pdp", "mask-sparsity"])
def test_methods_run_inside_the_transformers_trainer(tmp_path, make):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from prunekit.training import PruningTrainerCallback

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    dataset = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 64, (12, 12), generator=g)]
    method = make(model)
    probe = Probe(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, learning_rate=1e-3, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                   callbacks=[PruningTrainerCallback(method, probe)])
    trainer.train()
    assert method.done
    assert probe.pruned[2] == 0 and all(probe.zero)  # nothing masked before end_step
    names = [n for n, _, _, _ in masks.masked_modules(model)]
    assert len(names) == 14 and not any("embed" in n or "lm_head" in n for n in names)
    for name, module, _, mask in masks.masked_modules(model):
        assert int((module.weight == 0).sum()) == int((~mask).sum()) == round(0.5 * mask.numel()), name
    assert set(model.state_dict()) == set(transformers.LlamaForCausalLM(config).state_dict())


def test_layer_drop_at_init_removes_decoder_layers_inside_the_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from prunekit.training import PruningTrainerCallback

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (8, 12), generator=g)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config)
    names = [f"model.layers.{i}" for i in range(4)]
    snip = block_scores(reference, names, "snip", data={"input_ids": ids[:4], "labels": ids[:4]})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    drop = LayerDropAtInit(model, 1, "snip", data={"input_ids": ids[:4], "labels": ids[:4]})
    assert drop.candidates == names
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, learning_rate=1e-3, dataloader_num_workers=0)
    dataset = [{"input_ids": row, "labels": row.clone()} for row in ids]
    transformers.Trainer(model=model, args=args, train_dataset=dataset,
                         callbacks=[PruningTrainerCallback(drop)]).train()
    assert drop.removed == [min(names, key=lambda n: snip[n])]
    assert drop.scores == pytest.approx(snip, rel=1e-9)
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    model.save_pretrained(tmp_path / "dropped")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dropped")
    with torch.no_grad():
        assert torch.allclose(again(ids[:2]).logits, model.eval()(ids[:2]).logits, atol=1e-5)


# --- bad input ------------------------------------------------------------------------------------------------


def _tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("make, argument", [
    (lambda m: pq_index(torch.zeros(5)), "w"),
    (lambda m: pq_index(torch.ones(0)), "w"),
    (lambda m: pq_index(torch.tensor([1.0, float("nan")])), "w"),
    (lambda m: pq_index(torch.ones(3), p=1.0, q=0.5), "p"),
    (lambda m: pq_index(torch.ones(3), p=-1.0), "p"),
    (lambda m: pq_index([1.0, 2.0]), "w"),
    (lambda m: IterativeSoftShrinkage(m, 0.5, 10, shrink=1.0), "shrink"),
    (lambda m: IterativeSoftShrinkage(m, 0.5, 10, shrink=-0.1), "shrink"),
    (lambda m: IterativeSoftShrinkage(m, 1.0, 10), "final_sparsity"),
    (lambda m: IterativeSoftShrinkage(m, 0.5, 0), "end_step"),
    (lambda m: IterativeSoftShrinkage(m, 0.5, 10, frequency=0), "frequency"),
    (lambda m: PDP(m, 0.5, 10, tau=0.0), "tau"),
    (lambda m: PDP(m, 0.5, 10, tau="hot"), "tau"),
    (lambda m: PDP(m, 0.5, 10, budget="erk"), "budget"),
    (lambda m: PDP(m, 1.5, 10), "sparsity"),
    (lambda m: PDP(m, 0.5, 10, start_step=10), "end_step"),
    (lambda m: MaskSparsity(m, 0.5, 10, strength=-1.0), "strength"),
    (lambda m: MaskSparsity(m, 0.5, 10, granularity="filter"), "granularity"),
    (lambda m: MaskSparsity(m, 0.5, 10, via_hooks="yes"), "via_hooks"),
    (lambda m: SAP(m, p=2.0), "p"),
    (lambda m: SAP(m, beta=1.0), "beta"),
    (lambda m: SAP(m, gamma=0.0), "gamma"),
    (lambda m: SAP(m, eta=-0.5), "eta"),
    (lambda m: SAP(m, scope="neuron"), "scope"),
    (lambda m: SAP(m, prune_every=0), "prune_every"),
    (lambda m: SAP(m, rewind_step=-1), "rewind_step"),
    (lambda m: SAP(m).run(1, lambda model, cb: None), "rewind_step"),
    (lambda m: LayerDropAtInit(resnet_small(width=4), 4, example_inputs=torch.zeros(1, 1, 8, 8)), "count"),
    (lambda m: LayerDropAtInit(resnet_small(width=4), -1, example_inputs=torch.zeros(1, 1, 8, 8)), "count"),
    (lambda m: LayerDropAtInit(resnet_small(width=4), 1, "grasp", example_inputs=torch.zeros(1, 1, 8, 8)),
     "criterion"),
    (lambda m: LayerDropAtInit(resnet_small(width=4), 1), "example_inputs"),
    (lambda m: LayerDropAtInit(resnet_small(width=4), 1, "snip", example_inputs=torch.zeros(1, 1, 8, 8)), "data"),
    (lambda m: LayerDropAtInit(resnet_small(width=4), 1, example_inputs=torch.zeros(1, 1, 8, 8),
                               blocks=["nope"]), "blocks"),
    (lambda m: LayerDropAtInit(_tiny_llama(), 1, "synflow", data={"input_ids": torch.zeros(1, 4, dtype=torch.long)}),
     "criterion"),
    (lambda m: LayerDropAtInit(_tiny_llama(), 1, "snip"), "data"),
    (lambda m: LayerDropAtInit(_tiny_llama(), 2, "snip", data={"input_ids": torch.zeros(1, 4, dtype=torch.long)}),
     "count"),
    (lambda m: precrop(m, 1.0, torch.zeros(1, 64)), "sparsity"),
    (lambda m: precrop(m, 0.5, torch.zeros(1, 64), "grasp"), "densities"),
    (lambda m: precrop(m, 0.5, torch.zeros(1, 64), "snip"), "data"),
    (lambda m: precrop(m, 0.5, torch.zeros(1, 64), round_to=0), "round_to"),
])
def test_bad_inputs_name_the_argument(make, argument):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ArgumentError) as caught:
        make(model)
    assert caught.value.argument == argument
    assert not masks.has_masks(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
