"""What a benchmark trains on: real image data (scikit-learn's digits, a Fashion-MNIST subset) and the models a
configuration may name, each built from a seed so every method starts from the same initialisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import ArgumentError, unknown_choice

FASHION_DEFAULT_SIZES = {"train_size": 6000, "test_size": 2000}  # a subset: minutes, not hours, on one core
SUBSET_SEED = 0  # the subset and split never depend on a cell's seed: every cell sees the same examples


@dataclass
class ImageTask:
    """Train and test tensors of one image classification data set."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int = 10

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])

    def batches(self, batch_size: int, seed: int, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The training batches of `epoch` for `seed`: every method sees the same order at the same epoch."""
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(self.y_train), generator=generator)
        return [(self.x_train[i], self.y_train[i]) for i in order.split(batch_size)]

    def calibration(self, batch_size: int, seed: int, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Batches for data-driven scores, from an order of their own (the same for every method of a seed)."""
        return self.batches(batch_size, seed, epoch=50_000)[:n_batches]

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-len(self.y_train) // batch_size)


def _subset(x: torch.Tensor, y: torch.Tensor, size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `size` examples of a fixed shuffled order (all of them when size is None or larger)."""
    if size is None or size >= len(y):
        return x, y
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SUBSET_SEED))[:size]
    return x[order], y[order]


def load_digits_task(options: Mapping[str, Any]) -> ImageTask:
    """scikit-learn's 8x8 digits, the stratified 75/25 split of prunekit's digits example."""
    from ..examples import load_digits_data

    data = load_digits_data()
    x_train, y_train = _subset(data.x_train, data.y_train, options.get("train_size"))
    x_test, y_test = _subset(data.x_test, data.y_test, options.get("test_size"))
    return ImageTask("digits", x_train, y_train, x_test, y_test)


def load_fashion_task(options: Mapping[str, Any]) -> ImageTask:
    """Fashion-MNIST (Debian's dataset-fashion-mnist), a fixed subset of the train and test sets."""
    from ..datasets import load_fashion_mnist

    sizes = {**FASHION_DEFAULT_SIZES, **options}
    x_train, y_train = _subset(*load_fashion_mnist("train"), sizes["train_size"])
    x_test, y_test = _subset(*load_fashion_mnist("test"), sizes["test_size"])
    return ImageTask("fashion-mnist", x_train, y_train, x_test, y_test)


@dataclass
class TextTask:
    """Calibration and held-out text for post-training pruning of causal language models (metric: perplexity)."""

    name: str
    calibration_text: str
    eval_text: str
    n_samples: int
    seq_len: int
    eval_tokens: int

    @property
    def window(self) -> int:
        """The perplexity window: at most 512 tokens, and never more than the evaluated tokens."""
        return min(512, self.eval_tokens)


TEXT_DEFAULTS = {"n_samples": 32, "seq_len": 128, "eval_tokens": 4096}


def load_text_task(options: Mapping[str, Any], name: str = "pydoc-topics") -> TextTask:
    """A text (the embedded pydoc topics, or `path`), its last tenth held out for perplexity."""
    from ..calibration import load_text
    from ..pipeline import split_held_out

    calibration, held_out = split_held_out(load_text(options.get("path")))
    sizes = {**TEXT_DEFAULTS, **{k: v for k, v in options.items() if k in TEXT_DEFAULTS}}
    return TextTask(name, calibration, held_out, sizes["n_samples"], sizes["seq_len"], sizes["eval_tokens"])


# name -> (loader(options), kind, {option: type}); image options are sizes, text options sizes or a path
DATASETS: dict[str, tuple[Callable[[Mapping[str, Any]], Any], str, dict[str, type]]] = {
    "digits": (load_digits_task, "image", {"train_size": int, "test_size": int}),
    "fashion-mnist": (load_fashion_task, "image", {"train_size": int, "test_size": int}),
    "pydoc-topics": (lambda o: load_text_task(o, "pydoc-topics"), "text",
                     {"n_samples": int, "seq_len": int, "eval_tokens": int}),
    "text": (lambda o: load_text_task(o, "text"), "text",
             {"path": str, "n_samples": int, "seq_len": int, "eval_tokens": int}),
}


def dataset_kind(name: str) -> str:
    """'image' (accuracy after training) or 'text' (perplexity after post-training pruning)."""
    return DATASETS[name][1]


def check_dataset_options(dataset: str, options: Any) -> dict[str, Any]:
    """Validate dataset_options against what the data set takes."""
    allowed = DATASETS[dataset][2]
    if not isinstance(options, Mapping):
        raise ArgumentError("dataset_options", options, f"a mapping with keys among {', '.join(allowed)}")
    out = {}
    for key, value in options.items():
        if key not in allowed:
            raise unknown_choice(f"dataset_options key (for {dataset})", key, allowed)
        if allowed[key] is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArgumentError(f"dataset_options.{key}", value, "an integer >= 1")
        elif not isinstance(value, str) or not value:
            raise ArgumentError(f"dataset_options.{key}", value, "a path to a UTF-8 text file")
        out[key] = value
    if dataset == "text" and "path" not in out:
        raise ArgumentError("dataset_options.path", None, "a path to a UTF-8 text file (dataset 'text' needs one)")
    if out.get("seq_len") == 1:
        raise ArgumentError("dataset_options.seq_len", 1, "an integer >= 2")
    return out


def load_task(name: str, options: Mapping[str, Any]) -> Any:
    """The data set a configuration names: an ImageTask or a TextTask."""
    if name not in DATASETS:
        raise unknown_choice("dataset", name, DATASETS)
    return DATASETS[name][0](options)


# --- models --------------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """Conv-BN-ReLU (width), Conv-BN-ReLU (2 x width), max pooling, pooling to 4x4 and a Linear classifier.

    At width 16 on 8x8 digits it is prunekit's DigitsCNN; the adaptive pooling lets it take 28x28 images too.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes)."""
        return self.classifier(self.features(x).flatten(1))


class MLP(nn.Module):
    """Flatten, `depth` hidden Linear-ReLU layers of `width` units, and a Linear classifier."""

    def __init__(self, in_features: int, num_classes: int = 10, width: int = 128, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        size = in_features
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.ReLU()]
            size = width
        layers.append(nn.Linear(size, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes)."""
        return self.net(x)


def _convnet(task: ImageTask, width: int = 16) -> nn.Module:
    return ConvNet(task.in_channels, task.num_classes, width)


def _mlp(task: ImageTask, width: int = 128, depth: int = 2) -> nn.Module:
    return MLP(task.in_channels * task.image_size ** 2, task.num_classes, width, depth)


def _resnet(task: ImageTask, width: int = 16) -> nn.Module:
    from ..nets import resnet_small

    return resnet_small(in_channels=task.in_channels, num_classes=task.num_classes, width=width)


def _vit(task: ImageTask, dim: int = 64) -> nn.Module:
    from ..nets import vit_tiny

    patch = 4 if task.image_size % 7 else 7  # 8x8 digits: 2x2 patches of 4; 28x28: 4x4 patches of 7
    return vit_tiny(image_size=task.image_size, patch=patch, in_channels=task.in_channels,
                    num_classes=task.num_classes, dim=dim)


# name -> (builder(task, **options), {option: (default, minimum)}); options are integers
MODELS: dict[str, tuple[Callable[..., nn.Module], dict[str, tuple[int, int]]]] = {
    "convnet": (_convnet, {"width": (16, 1)}),
    "mlp": (_mlp, {"width": (128, 1), "depth": (2, 1)}),
    "resnet-small": (_resnet, {"width": (16, 1)}),
    "vit-tiny": (_vit, {"dim": (64, 4)}),
}
# Transformers models of the zoo for post-training pruning on text data sets (loaded once per run): causal LMs are
# scored by held-out perplexity, encoders by how close their sentence embeddings stay to the dense model's.
CAUSAL_LANGUAGE_MODELS = ("smollm2-135m",)
ENCODER_MODELS = ("minilm",)
LANGUAGE_MODELS = CAUSAL_LANGUAGE_MODELS + ENCODER_MODELS


def text_metric(model_names: list[str], key: str = "models") -> str:
    """'perplexity' for causal LMs, 'embedding_cosine' for encoders; one grid compares one metric."""
    kinds = {"embedding_cosine" if name in ENCODER_MODELS else "perplexity" for name in model_names}
    if len(kinds) > 1:
        raise ArgumentError(key, model_names, "causal language models (" + ", ".join(CAUSAL_LANGUAGE_MODELS)
                            + ") or encoders (" + ", ".join(ENCODER_MODELS) + "), not both in one grid: "
                            "they are scored by different metrics")
    return kinds.pop() if kinds else "perplexity"


def held_out_sentences(text: str, limit: int = 64, min_chars: int = 40) -> list[str]:
    """The first `limit` lines of held-out text long enough to be sentences (what encoders are scored on)."""
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) >= min_chars]
    return lines[:limit]


def models_for(dataset: str) -> tuple[str, ...]:
    """The model names a data set can be paired with."""
    return LANGUAGE_MODELS if dataset_kind(dataset) == "text" else tuple(MODELS)


def check_model_options(name: str, options: Mapping[str, Any], dataset: str, key: str) -> None:
    """Refuse options a model does not take, or values of the wrong type, naming the key."""
    allowed = MODELS[name][1] if name in MODELS else {}
    for option, value in options.items():
        if option not in allowed:
            raise unknown_choice(f"{key} option", option, [*allowed, "label"])
        minimum = allowed[option][1]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ArgumentError(f"{key}.{option}", value, f"an integer >= {minimum}")
    if name == "vit-tiny" and options.get("dim", 64) % 4:
        raise ArgumentError(f"{key}.dim", options["dim"], "a multiple of 4 (the ViT's heads split it)")


def build_model(name: str, options: Mapping[str, Any], task: ImageTask, seed: int) -> nn.Module:
    """The model initialised from `seed` (the same seed gives the same weights)."""
    torch.manual_seed(seed)
    builder = MODELS[name][0]
    return builder(task, **options)


def example_inputs(task: ImageTask) -> torch.Tensor:
    """One training image, the input example structured pruning traces with."""
    return task.x_train[:1]
