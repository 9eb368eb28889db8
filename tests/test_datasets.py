"""Image data loaders: Fashion-MNIST from Debian's idx files (skipped when absent) and the sklearn digits."""

from __future__ import annotations

import gzip
import struct

import pytest
import torch

from prunekit.datasets import (FASHION_MNIST_FILES, DatasetMissing, fashion_mnist_available, load_digits_tensors,
                               load_fashion_mnist)
from prunekit.errors import ArgumentError, FormatError, PruneError

needs_fashion_mnist = pytest.mark.skipif(not fashion_mnist_available(),
                                         reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def train():
    return load_fashion_mnist("train")


@needs_fashion_mnist
def test_fashion_mnist_train_shapes_and_balanced_classes(train):
    x, y = train
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.9
    assert torch.bincount(y, minlength=10).tolist() == [6000] * 10


@needs_fashion_mnist
def test_fashion_mnist_test_split():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert int(y.min()) == 0 and int(y.max()) == 9 and len(torch.unique(y)) == 10


def _idx_images(count: int, rows: int = 28, cols: int = 28, magic: int = 2051, extra: int = 0) -> bytes:
    return struct.pack(">IIII", magic, count, rows, cols) + bytes(count * rows * cols + extra)


def _write_split(folder, images: bytes, labels: bytes) -> None:
    image_name, label_name = FASHION_MNIST_FILES["test"]
    (folder / image_name).write_bytes(gzip.compress(images))
    (folder / label_name).write_bytes(gzip.compress(labels))


def test_small_valid_files_load(tmp_path):
    _write_split(tmp_path, _idx_images(3), struct.pack(">II", 2049, 3) + bytes([0, 4, 9]))
    x, y = load_fashion_mnist("test", root=tmp_path)
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [0, 4, 9]


@pytest.mark.parametrize("images, labels, message", [
    (_idx_images(3, magic=2049), struct.pack(">II", 2049, 3) + bytes(3), "magic number"),
    (_idx_images(3, extra=5), struct.pack(">II", 2049, 3) + bytes(3), "header promises"),
    (_idx_images(3), struct.pack(">II", 2049, 4) + bytes(3), "header promises"),
    (_idx_images(3), struct.pack(">II", 2049, 2) + bytes(2), "3 images but"),
    (_idx_images(2, rows=8, cols=8), struct.pack(">II", 2049, 2) + bytes(2), "28x28"),
    (_idx_images(1), struct.pack(">II", 2049, 1) + bytes([12]), "label 12"),
    (b"\x00\x00", struct.pack(">II", 2049, 0), "truncated"),
])
def test_corrupt_files_raise_format_error(tmp_path, images, labels, message):
    _write_split(tmp_path, images, labels)
    with pytest.raises(FormatError, match=message):
        load_fashion_mnist("test", root=tmp_path)


def test_not_gzip_raises_format_error(tmp_path):
    image_name, label_name = FASHION_MNIST_FILES["test"]
    (tmp_path / image_name).write_bytes(b"not a gzip file at all")
    (tmp_path / label_name).write_bytes(b"")
    with pytest.raises(FormatError, match="gzip"):
        load_fashion_mnist("test", root=tmp_path)


def test_missing_files_name_the_path_and_the_package(tmp_path):
    with pytest.raises(DatasetMissing, match="apt-get install dataset-fashion-mnist") as caught:
        load_fashion_mnist("train", root=tmp_path / "nowhere")
    assert "nowhere" in str(caught.value) and "train-images-idx3-ubyte.gz" in str(caught.value)
    assert isinstance(caught.value, PruneError) and isinstance(caught.value, FileNotFoundError)


def test_unknown_split():
    with pytest.raises(ArgumentError, match="Did you mean 'test'"):
        load_fashion_mnist("tset")


def test_digits_tensors():
    x, y = load_digits_tensors()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert y.dtype == torch.int64 and sorted(torch.unique(y).tolist()) == list(range(10))
