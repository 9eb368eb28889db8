"""The mask engine: forward correctness, masked weights stay zero through optimizers, bake and remove."""

import pytest
import torch
from torch import nn

import prunekit
from helpers import cnn_batch, small_cnn
from prunekit import masks


def _masked_linear(seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(8, 6)
    mask = torch.rand(6, 8) > 0.5
    return layer, mask


def test_forward_equals_dense_forward_with_zeroed_weights():
    layer, mask = _masked_linear()
    reference = nn.Linear(8, 6)
    reference.load_state_dict(layer.state_dict())
    with torch.no_grad():
        reference.weight.mul_(mask)
    masks.attach(layer, mask)
    x = torch.randn(4, 8)
    assert torch.equal(layer(x), reference(x))
    assert set(layer.state_dict()) == {"weight", "bias"}  # the mask never leaks into the state dict


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.5),
        lambda p: torch.optim.RMSprop(p, lr=0.1, momentum=0.5),
    ],
)
def test_masked_weights_stay_zero_through_optimizer_steps(make_optimizer):
    model = small_cnn()
    x, y = cnn_batch()
    optimizer = make_optimizer(model.parameters())
    # Warm the optimizer state first, so momentum at soon-to-be-masked positions is non-zero.
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    prunekit.prune(model, "magnitude", 0.7)
    pruned = {name: m.clone() for name, _, _, m in masks.masked_modules(model)}
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for name, module, _, mask in masks.masked_modules(model):
            assert (module.weight.grad[~mask] == 0).all()  # gradients masked as well
        optimizer.step()
    for name, module, _, mask in masks.masked_modules(model):
        assert torch.equal(mask, pruned[name])
        assert (module.weight[~mask] == 0).all()
        assert (module.weight[mask] != 0).float().mean() > 0.9  # survivors still train


def test_load_state_dict_reapplies_mask():
    layer, mask = _masked_linear()
    masks.attach(layer, mask)
    layer.load_state_dict({"weight": torch.ones(6, 8), "bias": torch.zeros(6)})
    assert torch.equal(layer.weight, mask.float())


def test_bake_keeps_zeros_and_drops_hooks():
    layer, mask = _masked_linear()
    masks.attach(layer, mask)
    assert masks.bake(layer) == 1
    assert masks.get_mask(layer) is None and not hasattr(layer, "weight_mask")
    assert (layer.weight[~mask] == 0).all()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    assert (layer.weight[~mask] != 0).any()  # no longer enforced: the zeros are ordinary weights now


def test_remove_with_restore_puts_original_values_back():
    layer, mask = _masked_linear()
    original = layer.weight.detach().clone()
    masks.attach(layer, mask, keep_original=True)
    assert not torch.equal(layer.weight, original)
    assert masks.remove(layer, restore=True) == 1
    assert torch.equal(layer.weight, original)


def test_restore_without_originals_is_refused_and_mask_kept():
    layer, mask = _masked_linear()
    masks.attach(layer, mask)
    with pytest.raises(prunekit.ArgumentError, match="keep_original"):
        masks.remove(layer, restore=True)
    assert masks.get_mask(layer) is not None


def test_prune_keep_original_is_reversible():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prunekit.prune(model, "magnitude", 0.6, keep_original=True)
    masks.remove(model, restore=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_attach_rejects_wrong_shape():
    layer, _ = _masked_linear()
    with pytest.raises(prunekit.ArgumentError, match="mask"):
        masks.attach(layer, torch.ones(3, 3, dtype=torch.bool))


def test_tied_weight_masked_once_and_enforced_everywhere():
    torch.manual_seed(0)
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    report = prunekit.prune(model, "magnitude", 0.5)
    assert [row.name for row in report.layers] == ["0"]
    assert any("tied" in note for note in report.notes)
    assert (model[2].weight == 0).float().mean() == 0.5


@pytest.mark.parametrize(
    "module,x",
    [
        (nn.Conv1d(8, 6, 3), torch.randn(2, 8, 9)),
        (nn.Conv3d(4, 6, 2), torch.randn(2, 4, 5, 5, 5)),
        (nn.Embedding(20, 8), torch.randint(0, 20, (3, 5))),
    ],
)
def test_every_weight_kind_prunes_exactly_and_forward_matches_zeroed_copy(module, x):
    torch.manual_seed(0)
    reference = __import__("copy").deepcopy(module)
    report = prunekit.prune(module, "magnitude", 0.5, types=["linear", "conv", "embedding"])
    assert report.zeros == module.weight.numel() // 2
    with torch.no_grad():
        reference.weight.masked_fill_(~masks.get_mask(module), 0)
    assert torch.equal(module(x), reference(x))
