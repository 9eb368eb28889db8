"""Score oracles: SynFlow conservation, SNIP/Taylor/GraSP against hand-written autograd, random determinism."""

import torch
import torch.nn.functional as F
from torch import nn

from helpers import cnn_batch, same_state, small_cnn, small_mlp, state_copy
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
        assert float(s.sum()) == __import__("pytest").approx(total, rel=1e-9)


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


def test_snip_and_taylor_are_abs_grad_times_weight():
    model = small_cnn()
    x, y = cnn_batch()
    weights, grads = _manual_grads(model, x, y)
    snip = SCORES["snip"](_ctx(model, data=(x, y)))
    taylor = SCORES["taylor"](_ctx(model, data=(x, y)))
    for w, g, s, t in zip(weights, grads, snip, taylor):
        torch.testing.assert_close(s, (w * g).abs().detach())
        torch.testing.assert_close(t, (w * g).abs().detach())
    assert all(p.grad is None for p in model.parameters())  # .grad untouched


def test_taylor_second_order_adds_curvature_term():
    model = small_cnn()
    x, y = cnn_batch()
    weights, grads = _manual_grads(model, x, y)
    scores = SCORES["taylor"](_ctx(model, data=(x, y), options={"taylor_order": 2}))
    for w, g, s in zip(weights, grads, scores):
        wg = (w * g).detach()
        torch.testing.assert_close(s, (-wg + 0.5 * wg**2).abs())


def test_taylor_averages_over_batches():
    model = small_cnn()
    batches = [cnn_batch(seed=s) for s in (1, 2)]
    weights, g1 = _manual_grads(model, *batches[0])
    _, g2 = _manual_grads(model, *batches[1])
    scores = SCORES["taylor"](_ctx(model, data=batches, n_batches=2))
    for w, a, b, s in zip(weights, g1, g2, scores):
        torch.testing.assert_close(s, (w * (a + b) / 2).abs().detach())


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
