"""Test architectures for structured pruning, built from plain torch.nn: ResNet, DenseNet, MobileNetV2/V3 and ViT.

They cover the coupling patterns a structured pruner has to handle: residual adds (ResNet, MobileNet), channel
concatenation (DenseNet), depthwise convolutions (MobileNet), channel gating by squeeze-excitation (MobileNetV3),
and attention heads with a cls token and position embedding (ViT, with nn.MultiheadAttention or a fused qkv Linear).
Every model is deterministic given torch.manual_seed, traceable by torch.fx.symbolic_trace, and takes any input
channel count, resolution (the CNNs pool adaptively) and class count. The small factories train on 28x28
Fashion-MNIST on a CPU in minutes; resnet50_style and vit_b_style reproduce the ResNet-50 and ViT-B/16 layouts.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .errors import ArgumentError, unknown_choice


def _check_positive(argument: str, value: object) -> int:
    """Validate a size argument: an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArgumentError(argument, value, "an integer >= 1")
    return value


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """A bias-free 'same'-padded Conv2d followed by BatchNorm2d (the bias would be absorbed by the BN)."""
    return [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels)]


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never below 90% of it (the MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


# ---------------------------------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BN layers and a residual add; a 1x1 Conv-BN shortcut where the shape changes."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, channels, 3, stride)
        self.conv2, self.bn2 = _conv_bn(channels, channels, 3)
        self.relu = nn.ReLU()
        self.downsample = _shortcut(in_channels, channels * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as in ResNet v1.5), 1x1 expand by 4, each with BN, and a residual add."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, channels, 1)
        self.conv2, self.bn2 = _conv_bn(channels, channels, 3, stride)
        self.conv3, self.bn3 = _conv_bn(channels, channels * self.expansion, 1)
        self.relu = nn.ReLU()
        self.downsample = _shortcut(in_channels, channels * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn3(conv3(...conv1(x))) + shortcut(x))."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """The projection shortcut (1x1 Conv + BN) when the block changes shape, else None (identity)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride))


_BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """A ResNet: a stem, stages of basic or bottleneck blocks (the first of each strided but the first stage's),
    global average pooling and a Linear classifier.

    stem="imagenet" is the 7x7 stride-2 conv and 3x3 max pool of ResNet-50; stem="cifar" is one 3x3 conv that keeps
    the resolution, for small images.
    """

    def __init__(self, block: str = "basic", layers: Sequence[int] = (2, 2, 2), widths: Sequence[int] = (16, 32, 64),
                 in_channels: int = 3, num_classes: int = 10, stem: str = "cifar", stem_width: int | None = None
                 ) -> None:
        super().__init__()
        if block not in _BLOCKS:
            raise unknown_choice("block", block, _BLOCKS)
        if stem not in ("cifar", "imagenet"):
            raise unknown_choice("stem", stem, ("cifar", "imagenet"))
        if len(layers) != len(widths) or not layers:
            raise ArgumentError("layers", tuple(layers), f"one block count per stage width ({len(widths)} widths)")
        for argument, value in (("in_channels", in_channels), ("num_classes", num_classes),
                                *((f"layers[{i}]", n) for i, n in enumerate(layers)),
                                *((f"widths[{i}]", w) for i, w in enumerate(widths))):
            _check_positive(argument, value)
        kind = _BLOCKS[block]
        stem_width = _check_positive("stem_width", stem_width if stem_width is not None else widths[0])
        if stem == "imagenet":
            self.stem = nn.Sequential(*_conv_bn(in_channels, stem_width, 7, 2), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(*_conv_bn(in_channels, stem_width, 3), nn.ReLU())
        stages, channels = [], stem_width
        for index, (count, width) in enumerate(zip(layers, widths)):
            blocks = []
            for position in range(count):
                stride = 2 if index > 0 and position == 0 else 1
                blocks.append(kind(channels, width, stride))
                channels = width * kind.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes)."""
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def resnet_small(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> ResNet:
    """A CIFAR-style ResNet: 3x3 stem, 3 stages of 2 basic blocks (width, 2*width, 4*width): ~0.17M parameters."""
    width = _check_positive("width", width)
    return ResNet("basic", (2, 2, 2), (width, 2 * width, 4 * width), in_channels, num_classes, stem="cifar")


def resnet50_style(in_channels: int = 3, num_classes: int = 1000) -> ResNet:
    """The ResNet-50 layout: 7x7 stem, bottleneck stages [3, 4, 6, 3] of widths 64..512 (outputs 256..2048)."""
    return ResNet("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), in_channels, num_classes, stem="imagenet",
                  stem_width=64)


# -------------------------------------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (bottleneck to bn_size*growth) then BN-ReLU-Conv3x3 producing `growth` new channels."""

    def __init__(self, in_channels: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        hidden = bn_size * growth
        self.norm1, self.relu1 = nn.BatchNorm2d(in_channels), nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(hidden), nn.ReLU()
        self.conv2 = nn.Conv2d(hidden, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The `growth` new feature maps."""
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.Module):
    """Dense layers, each fed the channel concatenation of the block input and every earlier layer's output."""

    def __init__(self, in_channels: int, num_layers: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(in_channels + i * growth, growth, bn_size) for i in range(num_layers))
        self.out_channels = in_channels + num_layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """torch.cat of the input and all new features along channels."""
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 (compressing channels) and 2x2 average pooling between dense blocks."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm, self.relu = nn.BatchNorm2d(in_channels), nn.ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compressed, half-resolution features."""
        return self.pool(self.conv(self.relu(self.norm(x))))


class DenseNet(nn.Module):
    """A DenseNet-BC: 3x3 stem, dense blocks joined by transitions (channels times `compression`), BN-ReLU, pooling
    and a Linear classifier."""

    def __init__(self, block_layers: Sequence[int] = (4, 4, 4), growth: int = 12, init_channels: int = 24,
                 bn_size: int = 4, compression: float = 0.5, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        if not block_layers:
            raise ArgumentError("block_layers", tuple(block_layers), "at least one dense block")
        for argument, value in (("growth", growth), ("init_channels", init_channels), ("bn_size", bn_size),
                                ("in_channels", in_channels), ("num_classes", num_classes),
                                *((f"block_layers[{i}]", n) for i, n in enumerate(block_layers))):
            _check_positive(argument, value)
        if not 0.0 < compression <= 1.0:
            raise ArgumentError("compression", compression, "a number in (0, 1]")
        self.stem = nn.Conv2d(in_channels, init_channels, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        channels = init_channels
        for index, count in enumerate(block_layers):
            block = DenseBlock(channels, count, growth, bn_size)
            stages.append(block)
            channels = block.out_channels
            if index < len(block_layers) - 1:
                reduced = max(1, int(channels * compression))
                stages.append(Transition(channels, reduced))
                channels = reduced
        self.features = nn.Sequential(*stages)
        self.norm, self.relu = nn.BatchNorm2d(channels), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes)."""
        x = self.relu(self.norm(self.features(self.stem(x))))
        return self.classifier(self.pool(x).flatten(1))


def densenet_small(in_channels: int = 1, num_classes: int = 10, growth: int = 12) -> DenseNet:
    """A DenseNet-BC with 3 blocks of 4 layers, growth 12 and 24 stem channels: ~0.1M parameters."""
    return DenseNet((4, 4, 4), growth, 2 * growth, 4, 0.5, in_channels, num_classes)


# ------------------------------------------------------------------------------------------------------ MobileNetV2


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped at ratio 1), 3x3 depthwise (groups=channels), 1x1 linear project,
    with a residual add when stride is 1 and the channel count is unchanged."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [*_conv_bn(in_channels, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(),
                   *_conv_bn(hidden, out_channels, 1)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels  # fixed at build time, so fx can trace it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The projected features, plus x where the shapes match."""
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2: a strided 3x3 stem, inverted residual stages given as (expand t, channels c, repeats n,
    stride s), a 1x1 conv to `last_channels`, pooling, dropout and a Linear classifier."""

    def __init__(self, settings: Sequence[tuple[int, int, int, int]], stem_channels: int = 32, stem_stride: int = 2,
                 last_channels: int = 1280, in_channels: int = 3, num_classes: int = 1000, dropout: float = 0.2
                 ) -> None:
        super().__init__()
        if not settings:
            raise ArgumentError("settings", settings, "at least one (t, c, n, s) stage")
        for argument, value in (("stem_channels", stem_channels), ("stem_stride", stem_stride),
                                ("last_channels", last_channels), ("in_channels", in_channels),
                                ("num_classes", num_classes)):
            _check_positive(argument, value)
        layers: list[nn.Module] = [*_conv_bn(in_channels, stem_channels, 3, stem_stride), nn.ReLU6()]
        channels = stem_channels
        for t, c, n, s in settings:
            for i in range(n):
                layers.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
                channels = c
        layers += [*_conv_bn(channels, last_channels, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes)."""
        return self.classifier(self.pool(self.features(x)).flatten(1))


def mobilenet_v2_small(in_channels: int = 1, num_classes: int = 10) -> MobileNetV2:
    """A MobileNetV2 for 28x28 inputs: stride-1 16-channel stem, 7 inverted residuals, 256 last channels."""
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 1)]
    return MobileNetV2(settings, 16, 1, 256, in_channels, num_classes, dropout=0.1)


# ------------------------------------------------------------------------------------------------------ MobileNetV3


class SqueezeExcite(nn.Module):
    """Squeeze-excitation: global average pool, 1x1 conv reduce, ReLU, 1x1 conv expand, hardsigmoid gate on x."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x scaled per channel by the gate."""
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class InvertedResidualV3(nn.Module):
    """MobileNetV3 block: 1x1 expand, kxk depthwise, optional squeeze-excitation, 1x1 project, ReLU or hardswish,
    and a residual add when stride is 1 and the channel count is unchanged."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, kernel: int, stride: int, use_se: bool,
                 activation: str) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise unknown_choice("activation", activation, _ACTIVATIONS)
        act = _ACTIVATIONS[activation]
        layers: list[nn.Module] = []
        if hidden != in_channels:
            layers += [*_conv_bn(in_channels, hidden, 1), act()]
        layers += [*_conv_bn(hidden, hidden, kernel, stride, groups=hidden), act()]
        if use_se:
            layers.append(SqueezeExcite(hidden, _make_divisible(hidden / 4)))
        layers += _conv_bn(hidden, out_channels, 1)
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The projected features, plus x where the shapes match."""
        return x + self.block(x) if self.use_residual else self.block(x)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": lambda: nn.ReLU(), "hardswish": nn.Hardswish}


class MobileNetV3(nn.Module):
    """MobileNetV3: a 3x3 hardswish stem, blocks given as (kernel, expanded, out, use_se, activation, stride),
    a 1x1 conv to 6x the last width, pooling, and a Linear-hardswish-dropout-Linear classifier."""

    def __init__(self, settings: Sequence[tuple[int, int, int, bool, str, int]], stem_channels: int = 16,
                 stem_stride: int = 2, last_channels: int = 1024, in_channels: int = 3, num_classes: int = 1000,
                 dropout: float = 0.2) -> None:
        super().__init__()
        if not settings:
            raise ArgumentError("settings", settings, "at least one (k, exp, c, se, act, s) block")
        for argument, value in (("stem_channels", stem_channels), ("stem_stride", stem_stride),
                                ("last_channels", last_channels), ("in_channels", in_channels),
                                ("num_classes", num_classes)):
            _check_positive(argument, value)
        layers: list[nn.Module] = [*_conv_bn(in_channels, stem_channels, 3, stem_stride), nn.Hardswish()]
        channels = stem_channels
        for kernel, hidden, out, use_se, activation, stride in settings:
            layers.append(InvertedResidualV3(channels, hidden, out, kernel, stride, use_se, activation))
            channels = out
        layers += [*_conv_bn(channels, 6 * channels, 1), nn.Hardswish()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * channels, last_channels), nn.Hardswish(),
                                        nn.Dropout(dropout), nn.Linear(last_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes)."""
        return self.classifier(self.pool(self.features(x)).flatten(1))


def mobilenet_v3_small(in_channels: int = 1, num_classes: int = 10) -> MobileNetV3:
    """A MobileNetV3-Small-like net for 28x28 inputs (stride-1 stem, 6 blocks, SE on 4 of them)."""
    settings = [
        (3, 16, 16, True, "relu", 2),
        (3, 64, 24, False, "relu", 2),
        (3, 72, 24, False, "relu", 1),
        (5, 96, 40, True, "hardswish", 2),
        (5, 240, 40, True, "hardswish", 1),
        (5, 120, 48, True, "hardswish", 1),
    ]
    return MobileNetV3(settings, 16, 1, 256, in_channels, num_classes, dropout=0.1)


# ------------------------------------------------------------------------------------------------------------- ViT


class SelfAttention(nn.Module):
    """timm-style multi-head self-attention: one fused qkv Linear(dim, 3*dim), scaled dot product, proj Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output of the same shape as x (batch, tokens, dim)."""
        batch, tokens = x.shape[0], x.shape[1]  # proxies under fx: no Python unpacking of x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attention = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        out = (attention @ v).transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim)
        return self.proj(out)


class MultiheadSelfAttention(nn.Module):
    """Self-attention by torch's nn.MultiheadAttention (batch_first), returning only the output."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output of the same shape as x (batch, tokens, dim)."""
        return self.attn(x, x, x, need_weights=False)[0]


_ATTENTIONS: dict[str, type[nn.Module]] = {"mha": MultiheadSelfAttention, "fused": SelfAttention}


class Mlp(nn.Module):
    """The transformer MLP: Linear to the hidden width, GELU, Linear back."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fc2(gelu(fc1(x)))."""
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    """A pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, attention: str = "mha") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _ATTENTIONS[attention](dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block output, same shape as x."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A Vision Transformer: Conv2d patch embedding (stride = patch), a learnable cls token and position embedding,
    pre-norm encoder blocks, a final LayerNorm and a Linear head on the cls token."""

    def __init__(self, image_size: int = 224, patch: int = 16, in_channels: int = 3, num_classes: int = 1000,
                 dim: int = 768, depth: int = 12, heads: int = 12, mlp_dim: int = 3072, attention: str = "mha"
                 ) -> None:
        super().__init__()
        for argument, value in (("image_size", image_size), ("patch", patch), ("in_channels", in_channels),
                                ("num_classes", num_classes), ("dim", dim), ("depth", depth), ("heads", heads),
                                ("mlp_dim", mlp_dim)):
            _check_positive(argument, value)
        if image_size % patch:
            raise ArgumentError("patch", patch, f"a divisor of image_size={image_size}")
        if dim % heads:
            raise ArgumentError("heads", heads, f"a divisor of dim={dim}")
        if attention not in _ATTENTIONS:
            raise unknown_choice("attention", attention, _ATTENTIONS)
        self.image_size, self.patch = image_size, patch
        tokens = (image_size // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        # Drawn from the seeded global generator, so a fixed torch.manual_seed gives the same model.
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp_dim, attention) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes) for images of image_size x image_size."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (batch, patches, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny(image_size: int = 28, patch: int = 7, in_channels: int = 1, num_classes: int = 10, dim: int = 64,
             depth: int = 4, heads: int = 4, attention: str = "mha") -> ViT:
    """A small ViT (4 blocks of width 64, MLP 4x) for 28x28 images in 7x7 patches: ~0.2M parameters."""
    return ViT(image_size, patch, in_channels, num_classes, dim, depth, heads, 4 * dim, attention)


def vit_b_style(image_size: int = 224, patch: int = 16, in_channels: int = 3, num_classes: int = 1000,
                attention: str = "mha") -> ViT:
    """The ViT-B/16 layout: width 768, 12 blocks, 12 heads, MLP 3072 (~86.6M parameters)."""
    return ViT(image_size, patch, in_channels, num_classes, 768, 12, 12, 3072, attention)


NETS: dict[str, Callable[..., nn.Module]] = {
    "resnet-small": resnet_small,
    "resnet50-style": resnet50_style,
    "densenet-small": densenet_small,
    "mobilenet-v2-small": mobilenet_v2_small,
    "mobilenet-v3-small": mobilenet_v3_small,
    "vit-tiny": vit_tiny,
    "vit-b-style": vit_b_style,
}


def build_net(name: str, **kwargs: object) -> nn.Module:
    """The model NETS[name] builds with `kwargs`; an unknown name raises an ArgumentError listing the names."""
    if name not in NETS:
        raise unknown_choice("net", name, NETS)
    return NETS[name](**kwargs)
