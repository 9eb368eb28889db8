"""Pickle-free save/load: round trips, tied weights, bit packing, corruption, atomic writes, manifest contents."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import prunekit
from prunekit import io as pio
from prunekit import masks
from prunekit.errors import ArgumentError, FormatError


# ----------------------------------------------------------------------------------------------------------------
# Models


class CNN(nn.Module):
    """Conv -> BN -> ReLU -> Conv -> pool -> Linear; every layer fits 2:4."""

    def __init__(self, seed: int, classes: int = 12) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(4, 16, 3)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.head(x)


class TiedMLP(nn.Module):
    """Two Linear modules sharing one weight Parameter (fc2.weight is fc1.weight)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc2.weight = self.fc1.weight
        self.out = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def cnn_input() -> torch.Tensor:
    return torch.randn(6, 4, 10, 10, generator=torch.Generator().manual_seed(7))


def mlp_input() -> torch.Tensor:
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(7))


def trained_cnn(seed: int = 0) -> CNN:
    """A CNN whose BatchNorm statistics moved away from their defaults (so a load must really carry them)."""
    model = CNN(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(cnn_input() * 3 + 1)
    return model.eval()


def mask_map(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{param}": mask.clone() for name, _, param, mask in masks.masked_modules(model)}


def states_differ(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return any(not torch.equal(sa[k], sb[k]) for k in sa if sa[k].is_floating_point())


def assert_round_trip(original: nn.Module, fresh: nn.Module, x: torch.Tensor, folder: Path) -> prunekit.Report:
    """Load into `fresh` and check outputs, state and masks are exactly the original's."""
    assert states_differ(original, fresh), "the fresh model must start different for the test to mean anything"
    report = pio.load(fresh, folder)
    original.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(original(x), fresh(x))
    so, sf = original.state_dict(), fresh.state_dict()
    assert so.keys() == sf.keys() and all(torch.equal(so[k], sf[k]) for k in so)
    saved, loaded = mask_map(original), mask_map(fresh)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    return report


def assert_masks_enforced(model: nn.Module, x: torch.Tensor) -> None:
    """Training with momentum must leave every masked weight at zero while the kept ones move."""
    entries = list(masks.masked_modules(model))
    assert entries
    before = [getattr(m, p).detach().clone() for _, m, p, _ in entries]
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    for (name, module, param, mask), old in zip(entries, before):
        weight = getattr(module, param).detach()
        assert torch.all(weight[~mask] == 0), f"{name}.{param} revived pruned weights"
        assert not torch.equal(weight[mask], old[mask]), f"{name}.{param} did not train at all"


# ----------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("method, kwargs", [
    ("magnitude", {"sparsity": 0.6}),
    ("magnitude", {"pattern": "2:4"}),
    ("global-magnitude", {"sparsity": 0.6}),
])
def test_cnn_round_trip(tmp_path: Path, method: str, kwargs: dict) -> None:
    model = trained_cnn()
    report = prunekit.prune(model, method, **kwargs)
    folder = pio.save(model, tmp_path / "saved", report)
    assert folder == tmp_path / "saved"
    assert sorted(p.name for p in folder.iterdir()) == ["masks.safetensors", "model.safetensors", "prunekit.json"]

    fresh = CNN(seed=123)
    loaded = assert_round_trip(model, fresh, cnn_input(), folder)
    assert loaded.method == report.method == method
    assert loaded.arguments == report.arguments
    assert [(r.name, r.total, r.zeros) for r in loaded.layers] == [(r.name, r.total, r.zeros) for r in report.layers]
    assert loaded.sparsity == pytest.approx(report.sparsity)
    assert_masks_enforced(fresh, cnn_input())


def test_tied_weight_stored_once_and_stays_tied(tmp_path: Path) -> None:
    model = TiedMLP(seed=0)
    report = prunekit.prune(model, "magnitude", 0.6)
    folder = pio.save(model, tmp_path / "tied", report)

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    manifest = pio.read_manifest(folder)
    # Exactly one of the two names is stored; the other is an alias of it.
    assert len(keys & {"fc1.weight", "fc2.weight"}) == 1
    assert manifest["tensors"]["aliases"] in ({"fc2.weight": "fc1.weight"}, {"fc1.weight": "fc2.weight"})
    assert manifest["totals"]["tensors"] == len(model.state_dict())

    fresh = TiedMLP(seed=99)
    assert_round_trip(model, fresh, mlp_input(), folder)
    assert fresh.fc1.weight is fresh.fc2.weight
    assert masks.get_mask(fresh.fc2, "weight") is not None  # the mask follows the shared Parameter
    assert_masks_enforced(fresh, mlp_input())


def test_load_replaces_masks_already_on_the_target(tmp_path: Path) -> None:
    model = trained_cnn()
    pio.save(model, tmp_path / "s", prunekit.prune(model, "magnitude", 0.6))
    fresh = CNN(seed=5)
    prunekit.prune(fresh, "random", 0.8)  # different masks: their load hook must not zero the incoming weights
    assert_round_trip(model, fresh, cnn_input(), tmp_path / "s")


def test_save_without_masks(tmp_path: Path) -> None:
    model = trained_cnn()
    prunekit.prune(model, "magnitude", 0.5, apply="bake")
    assert not masks.has_masks(model)
    folder = pio.save(model, tmp_path / "baked")  # no report: the manifest counts zeros itself
    manifest = pio.read_manifest(folder)
    assert manifest["masks"] == [] and manifest["totals"]["masked_weights"] == 0
    assert manifest["sparsity"]["sparsity"] == pytest.approx(0.5, abs=0.01)

    fresh = CNN(seed=3)
    report = assert_round_trip(model, fresh, cnn_input(), folder)
    assert not masks.has_masks(fresh)
    assert report.layer("head").zeros == int((model.head.weight == 0).sum()) > 0


def test_manifest_records_method_sparsity_and_layers(tmp_path: Path) -> None:
    model = trained_cnn()
    report = prunekit.prune(model, "magnitude", 0.6, seed=11)
    folder = pio.save(model, tmp_path / "m", report, extra={"dataset": "toy", "epoch": 3})
    manifest = json.loads((folder / "prunekit.json").read_text())
    assert manifest == pio.read_manifest(folder)

    assert manifest["format"] == "prunekit" and manifest["format_version"] == pio.FORMAT_VERSION
    assert manifest["prunekit_version"] == prunekit.__version__
    assert manifest["torch_version"] == torch.__version__
    assert manifest["method"] == "magnitude"
    assert manifest["arguments"]["sparsity"] == 0.6 and manifest["seed"] == 11
    assert manifest["extra"] == {"dataset": "toy", "epoch": 3}

    layers = {row["name"]: row for row in manifest["layers"]}
    assert set(layers) == {"conv1", "conv2", "head"}
    for name in layers:
        weight = getattr(model, name).weight
        assert layers[name]["shape"] == list(weight.shape)
        assert layers[name]["zeros"] == int((weight == 0).sum())
        assert layers[name]["sparsity"] == pytest.approx(0.6, abs=0.02)
    assert manifest["sparsity"]["weights"] == sum(row["total"] for row in layers.values())
    assert manifest["sparsity"]["sparsity"] == pytest.approx(0.6, abs=0.01)

    saved_masks = {e["key"]: e for e in manifest["masks"]}
    assert set(saved_masks) == {"conv1.weight", "conv2.weight", "head.weight"}
    for key, entry in saved_masks.items():
        mask = mask_map(model)[key]
        assert entry["shape"] == list(mask.shape) and entry["kept"] == int(mask.sum())
    assert manifest["totals"]["masked_pruned"] == sum(e["pruned"] for e in saved_masks.values())

    for name in ("model.safetensors", "masks.safetensors"):
        data = (folder / name).read_bytes()
        assert manifest["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    # The masks file holds packed bits: one byte per 8 weights, not one per weight.
    with safe_open(str(folder / "masks.safetensors"), "pt") as f:
        head = f.get_tensor("head.weight")
    assert head.dtype == torch.uint8 and head.numel() == math.ceil(model.head.weight.numel() / 8)


def test_manifest_counts_current_zeros_not_stale_report(tmp_path: Path) -> None:
    model = trained_cnn()
    report = prunekit.prune(model, "magnitude", 0.6, apply="bake")
    with torch.no_grad():
        model.head.weight.fill_(1.0)  # e.g. dense fine-tuning after baking revived the zeros
    manifest = pio.read_manifest(pio.save(model, tmp_path / "s", report))
    assert {r["name"]: r["zeros"] for r in manifest["layers"]}["head"] == 0


# ----------------------------------------------------------------------------------------------------------------
# Bit packing


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000003])
def test_pack_unpack_round_trip(n: int) -> None:
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.4
    packed = pio.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(n / 8),)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy()))  # numpy's bit order
    assert torch.equal(pio.unpack_bits(packed, (n,)), mask)


def test_pack_bits_order_and_shapes() -> None:
    mask = torch.tensor([True, False, False, False, False, False, False, True, True])
    assert pio.pack_bits(mask).tolist() == [0b10000001, 0b10000000]
    grid = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    unpacked = pio.unpack_bits(pio.pack_bits(grid), grid.shape)
    assert unpacked.shape == grid.shape and unpacked.dtype == torch.bool and torch.equal(unpacked, grid)
    assert torch.equal(pio.unpack_bits(pio.pack_bits(torch.tensor(True)), ()), torch.tensor(True))


def test_pack_bits_rejects_bad_input() -> None:
    with pytest.raises(ArgumentError, match="bool"):
        pio.pack_bits(torch.ones(4))
    with pytest.raises(ArgumentError, match="2 bytes"):
        pio.unpack_bits(torch.zeros(3, dtype=torch.uint8), (9,))


# ----------------------------------------------------------------------------------------------------------------
# Corrupt files and mismatched models


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = trained_cnn()
    return pio.save(model, tmp_path / "saved", prunekit.prune(model, "magnitude", 0.6))


def test_corrupted_byte_is_detected_and_model_untouched(saved: Path) -> None:
    file = saved / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    fresh = CNN(seed=4)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(FormatError, match=r"model\.safetensors.*corrupted"):
        pio.load(fresh, saved)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert not masks.has_masks(fresh)


def test_corrupted_masks_file_is_detected(saved: Path) -> None:
    file = saved / "masks.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"masks\.safetensors"):
        pio.load(CNN(seed=4), saved)


def test_truncated_file_is_detected(saved: Path) -> None:
    file = saved / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(FormatError, match=r"model\.safetensors.*truncated"):
        pio.load(CNN(seed=4), saved)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_unreadable_safetensors_is_a_format_error(saved: Path, damage: str) -> None:
    # Even with a manifest whose hash matches (written by hand, say), safetensors' own error is wrapped.
    file = saved / "model.safetensors"
    data = file.read_bytes()
    data = {"truncate": data[: len(data) // 2], "garbage": b"\x00not safetensors at all" * 10, "empty": b""}[damage]
    file.write_bytes(data)
    manifest = json.loads((saved / "prunekit.json").read_text())
    manifest["files"]["model.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (saved / "prunekit.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=r"model\.safetensors is not a valid safetensors file"):
        pio.load(CNN(seed=4), saved)


def test_different_architecture_names_the_key(saved: Path) -> None:
    other = CNN(seed=4, classes=10)
    with pytest.raises(FormatError, match=r"head\.weight saved \[12, 32\] vs model \[10, 32\]") as info:
        pio.load(other, saved)
    assert "head.bias" in str(info.value)
    with pytest.raises(FormatError, match="shape mismatch"):  # never tolerated, even when not strict
        pio.load(other, saved, strict=False)


def test_missing_and_unexpected_keys(saved: Path) -> None:
    bigger = CNN(seed=4)
    bigger.extra = nn.Linear(3, 3)
    with pytest.raises(FormatError, match=r"missing from model\.safetensors: extra\.weight \[3, 3\]"):
        pio.load(bigger, saved)
    extra_weight = bigger.extra.weight.detach().clone()
    pio.load(bigger, saved, strict=False)  # the known keys load, the extra layer keeps its weights
    assert torch.equal(bigger.extra.weight, extra_weight) and masks.get_mask(bigger.head) is not None

    smaller = CNN(seed=4)
    del smaller.bn
    with pytest.raises(FormatError, match=r"not in the model: bn\.bias \[16\], .*bn\.weight \[16\]"):
        pio.load(smaller, saved)


def test_not_a_prunekit_folder(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="prunekit.json is missing"):
        pio.load(CNN(seed=0), tmp_path)
    (tmp_path / "prunekit.json").write_text("{not json")
    with pytest.raises(FormatError, match="not a readable JSON manifest"):
        pio.read_manifest(tmp_path)
    (tmp_path / "prunekit.json").write_text(json.dumps({"format": "prunekit", "format_version": 99}))
    with pytest.raises(FormatError, match="newer"):
        pio.read_manifest(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes and overwriting


class Boom(RuntimeError):
    pass


def fail_on_second_write(monkeypatch: pytest.MonkeyPatch, error: type[BaseException] = Boom) -> list[Path]:
    """Let model.safetensors be written, then fail while writing masks.safetensors (midway through a save)."""
    real, written = pio._write_safetensors, []

    def flaky(path: Path, tensors):
        if written:
            raise error("interrupted")
        written.append(path)
        return real(path, tensors)

    monkeypatch.setattr(pio, "_write_safetensors", flaky)
    return written


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_interrupted_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error) -> None:
    model = trained_cnn()
    report = prunekit.prune(model, "magnitude", 0.6)
    written = fail_on_second_write(monkeypatch, error)
    with pytest.raises(error):
        pio.save(model, tmp_path / "out", report)
    assert written and written[0].name == "model.safetensors"  # it really failed midway
    assert list(tmp_path.iterdir()) == []  # no destination, no staging folder


def test_interrupted_overwrite_keeps_the_old_save(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    other = CNN(seed=8)
    prunekit.prune(other, "random", 0.3)
    fail_on_second_write(monkeypatch)
    with pytest.raises(Boom):
        pio.save(other, saved, overwrite=True)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["saved"]


def test_failed_rename_restores_the_old_save(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".saved.tmp-"):
            raise OSError("disk vanished")
        return real_rename(src, dst)

    monkeypatch.setattr(pio.os, "rename", rename)
    with pytest.raises(OSError, match="disk vanished"):
        pio.save(CNN(seed=8), saved, overwrite=True)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["saved"]


def test_resave_refuses_a_previous_save_unless_overwrite(saved: Path) -> None:
    model = trained_cnn(seed=2)
    report = prunekit.prune(model, "global-magnitude", 0.7)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in saved.iterdir()}
    with pytest.raises(ArgumentError, match="^" + re.escape(f"path='{saved}' ") + ".*overwrite=True"):
        pio.save(model, saved, report)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in saved.iterdir()} == before  # never touched
    assert sorted(p.name for p in saved.parent.iterdir()) == ["saved"]
    pio.save(model, saved, report, overwrite=True)
    assert pio.read_manifest(saved)["method"] == "global-magnitude"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["saved"]  # no backup or staging left behind
    assert_round_trip(model, CNN(seed=77), cnn_input(), saved)


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    model = trained_cnn()
    with pytest.raises(ArgumentError, match="overwrite=True"):
        pio.save(model, target)
    assert (target / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]

    pio.save(model, target, overwrite=True)
    assert not (target / "notes.txt").exists() and (target / "prunekit.json").exists()


def test_save_into_empty_folder_and_new_parents(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    model = trained_cnn()
    assert (pio.save(model, tmp_path / "empty") / "model.safetensors").exists()
    assert (pio.save(model, str(tmp_path / "a" / "b")) / "prunekit.json").exists()


def test_refuses_a_file_path_and_bad_extra(tmp_path: Path) -> None:
    file = tmp_path / "model.bin"
    file.write_bytes(b"x")
    with pytest.raises(ArgumentError, match="path"):
        pio.save(CNN(seed=0), file)
    with pytest.raises(ArgumentError, match="extra"):
        pio.save(CNN(seed=0), tmp_path / "x", extra={"bad": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_dedupe_copies_partial_views_and_keeps_contiguity() -> None:
    fused = torch.arange(12.0).reshape(4, 3)
    state = {"a": fused, "b": fused, "top": fused[:2], "t": fused.t(), "empty1": torch.empty(0), "empty2": torch.empty(0)}
    stored, aliases = pio.dedupe_state(state)
    assert aliases == {"b": "a"}
    assert set(stored) == {"a", "top", "t", "empty1", "empty2"}
    assert all(t.is_contiguous() for t in stored.values())
    pointers = [t.untyped_storage().data_ptr() for t in stored.values() if t.numel()]
    assert len(set(pointers)) == len(pointers)  # no two stored tensors share storage (safetensors would refuse)
    assert torch.equal(stored["t"], fused.t()) and torch.equal(stored["top"], fused[:2])
