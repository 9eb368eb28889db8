"""Real image data as tensors, without torchvision: Fashion-MNIST from the Debian package's idx files, and
scikit-learn's bundled 8x8 digits."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import FormatError, PruneError, unknown_choice

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


class DatasetMissing(PruneError, FileNotFoundError):
    """A data set's files are not installed where they were looked for."""


def _read_gz(path: Path) -> bytes:
    """The decompressed bytes of a .gz file; a missing file or a broken archive raises a prunekit error."""
    if not path.is_file():
        raise DatasetMissing(f"{path} does not exist: install Fashion-MNIST with "
                             f"`apt-get install {FASHION_MNIST_PACKAGE}` or pass root= the folder holding its files")
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise FormatError(f"{path} is not a readable gzip file ({error})") from error


def parse_idx_images(data: bytes, source: str = "idx data") -> np.ndarray:
    """An idx3 ubyte image file's bytes as a uint8 array of shape (count, rows, cols)."""
    if len(data) < 16:
        raise FormatError(f"{source} is truncated: {len(data)} bytes, shorter than the 16-byte idx3 header")
    magic, count, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != IDX_IMAGES_MAGIC:
        raise FormatError(f"{source} has magic number {magic}, not {IDX_IMAGES_MAGIC} (idx3 unsigned-byte images)")
    expected = count * rows * cols
    if len(data) - 16 != expected:
        raise FormatError(f"{source} holds {len(data) - 16} pixel bytes, but its header promises "
                          f"{count} images of {rows}x{cols} = {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)


def parse_idx_labels(data: bytes, source: str = "idx data") -> np.ndarray:
    """An idx1 ubyte label file's bytes as a uint8 array of shape (count,)."""
    if len(data) < 8:
        raise FormatError(f"{source} is truncated: {len(data)} bytes, shorter than the 8-byte idx1 header")
    magic, count = struct.unpack(">II", data[:8])
    if magic != IDX_LABELS_MAGIC:
        raise FormatError(f"{source} has magic number {magic}, not {IDX_LABELS_MAGIC} (idx1 unsigned-byte labels)")
    if len(data) - 8 != count:
        raise FormatError(f"{source} holds {len(data) - 8} label bytes, but its header promises {count}")
    return np.frombuffer(data, dtype=np.uint8, offset=8)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike = FASHION_MNIST_ROOT
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images as float32 in [0, 1] of shape (N, 1, 28, 28) and int64 labels 0..9 (N = 60000 or 10000).

    Reads the gzipped idx files that Debian's dataset-fashion-mnist package installs under `root`.
    """
    if split not in FASHION_MNIST_FILES:
        raise unknown_choice("split", split, FASHION_MNIST_FILES)
    image_name, label_name = FASHION_MNIST_FILES[split]
    image_path, label_path = Path(root) / image_name, Path(root) / label_name
    images = parse_idx_images(_read_gz(image_path), str(image_path))
    labels = parse_idx_labels(_read_gz(label_path), str(label_path))
    if images.shape[1:] != (28, 28):
        raise FormatError(f"{image_path} holds {images.shape[1]}x{images.shape[2]} images, not Fashion-MNIST's 28x28")
    if len(images) != len(labels):
        raise FormatError(f"{image_path} holds {len(images)} images but {label_path} {len(labels)} labels")
    if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise FormatError(f"{label_path} holds label {int(labels.max())}, outside Fashion-MNIST's 0..9")
    x = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255.0)  # copy: frombuffer arrays are read-only
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def fashion_mnist_available(root: str | os.PathLike = FASHION_MNIST_ROOT) -> bool:
    """Whether all four Fashion-MNIST files are present under root."""
    return all((Path(root) / name).is_file() for names in FASHION_MNIST_FILES.values() for name in names)


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits as float32 in [0, 1] of shape (N, 1, 8, 8) and int64 labels 0..9."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # scikit-learn is an optional extra: say which one
        raise ImportError("the digits data set needs scikit-learn: pip install 'prunekit[zoo]'") from error
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    return x, torch.tensor(digits.target, dtype=torch.long)
