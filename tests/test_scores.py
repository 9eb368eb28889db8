"""Score oracles: SynFlow conservation, Taylor (per-batch squares), SNIP (one batch, normalised), GraSP against
hand-written autograd, random determinism."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from helpers import cnn_batch, same_state, small_cnn, small_mlp, state_copy
from prunekit import masks
from prunekit.errors import ArgumentError, ModelError
from prunekit.graph.importance import gradient_group_scores
from prunekit.graph.prune import prune_structured
from prunekit.graph.trace import build_graph
from prunekit.scores import SCORES, ScoreContext
from prunekit.scores.synflow import synaptic_flow
from prunekit.selection import select


def _ctx(model, **kw):
    return ScoreContext(model=model, targets=select(model).targets, **kw)


def test_synflow_per_layer_scores_sum_to_R():
    # Conservation of synaptic flow (Tanaka et al. 2020): for a bias-free ReLU network, each layer's
    # sum of w * dR/dw equals R.
    model = small_mlp(bias=False, widths=(12, 20, 16, 5))
    names = [t.name for t in select(model).targets]
    scores, total = synaptic_flow(model, names, torch.randn(3, 12))
    assert total > 0
    for s in scores:
        assert float(s.sum()) == pytest.approx(total, rel=1e-9)


def test_synflow_is_data_free_and_leaves_model_untouched():
    model = small_cnn()
    saved = state_copy(model)
    x, _ = cnn_batch()
    a = SCORES["synflow"](_ctx(model, example_inputs=x))
    b = SCORES["synflow"](_ctx(model, example_inputs=torch.zeros_like(x) + 7))  # values of the input do not matter
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert same_state(model, saved)
    assert all((s >= 0).all() for s in a)


def _manual_grads(model, x, y):
    weights = [t.weight for t in select(model).targets]
    loss = F.cross_entropy(model(x), y)
    return weights, torch.autograd.grad(loss, weights)


def _signed_loss(output, y):
    # linear in the output, so flipping the label's sign flips the gradient exactly
    return (output * y.reshape(-1, 1)).sum()


def _opposite_batches():
    x = torch.tensor([[1.0, 2.0]])
    return [(x, torch.tensor([1.0])), (x, torch.tensor([-1.0]))]


def test_taylor_squares_per_batch_so_opposite_gradients_do_not_cancel():
    # Molchanov et al. 2019: I = mean_b (w g_b)^2. Two batches with g_2 = -g_1: mean-then-abs gives exactly 0.
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -3.0]]))
    batches = _opposite_batches()
    g1 = torch.tensor([[1.0, 2.0]])  # d(w.x * y)/dw = x * y
    w = model.weight.detach()
    assert torch.equal((w * (g1 + -g1) / 2).abs(), torch.zeros(1, 2))  # the old rule: noise-free zero
    (score,) = SCORES["taylor"](_ctx(model, data=batches, n_batches=2, loss_fn=_signed_loss))
    assert (score > 0).all()
    torch.testing.assert_close(score, (w * g1) ** 2, rtol=0, atol=0)  # [[0.25, 36]]


def test_taylor_second_order_is_the_empirical_fisher_form():
    # Eq. 4 of Molchanov et al. 2019 with diag H ~ F = mean_b g_b^2: I = mean_b (w g_b - F w^2 / 2)^2
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -3.0]], dtype=torch.float64))
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    batches = [(x, torch.tensor([1.0], dtype=torch.float64)), (x, torch.tensor([-0.5], dtype=torch.float64))]
    w = model.weight.detach()
    g = [x * 1.0, x * -0.5]
    fisher = (g[0] ** 2 + g[1] ** 2) / 2
    expected = sum((w * gb - 0.5 * fisher * w**2) ** 2 for gb in g) / 2
    (score,) = SCORES["taylor"](_ctx(model, data=batches, n_batches=2, loss_fn=_signed_loss,
                                     options={"taylor_order": 2}))
    torch.testing.assert_close(score.double(), expected, rtol=1e-6, atol=0)
    (first,) = SCORES["taylor"](_ctx(model, data=batches, n_batches=2, loss_fn=_signed_loss))
    assert not torch.allclose(first.double() / first.sum(), score.double() / score.sum())  # not order 1 rescaled


def test_taylor_rejects_an_unknown_order():
    model = small_cnn()
    with pytest.raises(ArgumentError, match="taylor_order=3"):
        SCORES["taylor"](_ctx(model, data=cnn_batch(), options={"taylor_order": 3}))


def test_taylor_matches_per_batch_autograd_on_a_cnn():
    model = small_cnn()
    batches = [cnn_batch(seed=s) for s in (1, 2)]
    weights, g1 = _manual_grads(model, *batches[0])
    _, g2 = _manual_grads(model, *batches[1])
    scores = SCORES["taylor"](_ctx(model, data=batches, n_batches=2))
    for w, a, b, s in zip(weights, g1, g2, scores):
        torch.testing.assert_close(s, (((w * a) ** 2 + (w * b) ** 2) / 2).detach(), rtol=1e-5, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched


def test_snip_is_normalised_sensitivity_on_one_batch():
    # Lee et al. 2019: s_j = |g_j w_j| / sum_k |g_k w_k| over every weight considered
    model = small_cnn()
    x, y = cnn_batch()
    weights, grads = _manual_grads(model, x, y)
    scores = SCORES["snip"](_ctx(model, data=[(x, y), cnn_batch(seed=2)]))  # a list: only the first batch
    total = sum(float((w * g).detach().abs().sum()) for w, g in zip(weights, grads))
    assert sum(float(s.double().sum()) for s in scores) == pytest.approx(1.0, rel=1e-6)
    for w, g, s in zip(weights, grads, scores):
        torch.testing.assert_close(s, (w * g).abs().detach() / total, rtol=1e-5, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_snip_refuses_more_than_one_batch():
    model = small_cnn()
    with pytest.raises(ArgumentError, match="n_batches=2"):
        SCORES["snip"](_ctx(model, data=[cnn_batch(seed=1), cnn_batch(seed=2)], n_batches=2))


def _mask_of(method, batches, n_batches):
    model = small_cnn()
    prunekit.prune(model, method, 0.5, data=batches, n_batches=n_batches)
    return [m.clone() for _, _, _, m in masks.masked_modules(model)]


def test_taylor_and_snip_give_different_masks_over_several_batches():
    batches = [cnn_batch(seed=s) for s in (1, 2, 3, 4)]
    snip = _mask_of("snip", batches, 1)
    taylor = _mask_of("taylor", batches, 4)
    assert any(not torch.equal(a, b) for a, b in zip(snip, taylor))
    # on the one batch SNIP sees, (w g)^2 and |w g| rank alike: the methods differ by the batch rule only
    assert all(torch.equal(a, b) for a, b in zip(snip, _mask_of("taylor", batches, 1)))


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("name", ["taylor", "snip", "grasp"])
def test_a_weight_without_gradient_is_an_error_naming_it(name):
    model = _WithUnused()
    with pytest.raises(ModelError, match=r"unused\.weight"):
        SCORES[name](_ctx(model, data=(torch.randn(5, 4), torch.randint(0, 3, (5,)))))


def test_synflow_refuses_a_weight_the_output_does_not_use():
    # a zero score would mark the unused layer as the first to prune, silently
    with pytest.raises(ModelError, match=r"synflow.*unused"):
        synaptic_flow(_WithUnused(), ["used", "unused"], torch.randn(2, 4))


def test_layer_drop_snip_refuses_a_block_the_loss_does_not_use():
    from prunekit.training.layer_drop import block_scores

    model = _WithUnused()
    with pytest.raises(ModelError, match=r"unused"):
        block_scores(model, ["used", "unused"], criterion="snip",
                     data=[(torch.randn(5, 4), torch.randint(0, 3, (5,)))])


def _hidden_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].bias.fill_(5.0)  # every hidden unit active on the test input
    (group,) = build_graph(model, torch.randn(1, 2)).groups
    return model, group


def test_structured_taylor_squares_the_group_sum_per_batch():
    # Molchanov et al. 2019 for a group: mean_b (sum over the unit's parameters of w g_b)^2
    model, group = _hidden_group()
    batches = [(torch.tensor([[1.0, 2.0]]), torch.tensor([1.0])), (torch.tensor([[1.0, 2.0]]), torch.tensor([-1.0]))]
    x, y = batches[0]
    params = [model[0].weight, model[0].bias, model[2].weight]
    g = torch.autograd.grad(_signed_loss(model(x), y), params)
    unit_sum = ((params[0] * g[0]).sum(1) + params[1] * g[1] + (params[2] * g[2]).sum(0)).detach().double()
    (score,) = gradient_group_scores(model, [group], "taylor", {}, batches, _signed_loss, 2)
    assert (score > 0).all()  # mean-then-abs would give exactly 0: g_2 = -g_1
    torch.testing.assert_close(score, unit_sum**2, rtol=1e-6, atol=0)


def _random_batches():
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(6, 2, generator=generator), torch.randn(6, generator=generator)) for _ in range(2)]


def test_structured_taylor_leaves_grad_and_requires_grad_untouched():
    model, group = _hidden_group()
    generator = torch.Generator().manual_seed(5)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
    model[2].weight.requires_grad_(False)  # a frozen layer stays frozen
    saved = {n: p.grad.clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    gradient_group_scores(model, [group], "taylor", {}, _random_batches(), _signed_loss, 2)
    assert all(torch.equal(p.grad, saved[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    prune_structured(model, torch.randn(1, 2), 0.5, score="taylor", data=_random_batches(), loss_fn=_signed_loss,
                     n_batches=2)
    assert not model[2].weight.requires_grad


def test_grasp_is_weight_times_hessian_gradient_product():
    model = small_mlp(widths=(6, 8, 4))
    x = torch.randn(10, 6)
    y = torch.randint(0, 4, (10,))
    T = 200.0
    weights = [t.weight for t in select(model).targets]

    def loss_of(*ws):
        h = F.relu(F.linear(x, ws[0], model[0].bias))
        return F.cross_entropy(F.linear(h, ws[1], model[2].bias) / T, y)

    g = torch.autograd.grad(loss_of(*weights), weights)
    _, hg = torch.autograd.functional.hvp(loss_of, tuple(w.detach() for w in weights), tuple(g))
    scores = SCORES["grasp"](_ctx(model, data=(x, y)))
    for w, h, s in zip(weights, hg, scores):
        torch.testing.assert_close(s, (w.detach() * h), rtol=1e-4, atol=1e-10)


def test_random_scores_depend_only_on_seed():
    model = small_cnn()
    a = SCORES["random"](_ctx(model, seed=3))
    b = SCORES["random"](_ctx(model, seed=3))
    c = SCORES["random"](_ctx(model, seed=4))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_magnitude_is_abs_weight():
    model = nn.Linear(5, 3)
    (s,) = SCORES["magnitude"](_ctx(model))
    assert torch.equal(s, model.weight.detach().abs())
