"""Tiny vision models with the patterns that break naive structured pruning, written here after the torchvision
and timm designs (no dependency on either): a ViT whose patch embedding reshapes with a stored hidden size, a
Swin-style stage (shifted windows, torch.roll, relative position bias table), a MaxViT-style multi-axis attention
block (block and grid attention, per-head relative bias), and a model with a hard-coded view literal."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TorchvisionEncoderBlock(nn.Module):
    """torchvision's ViT EncoderBlock: ln_1, nn.MultiheadAttention, ln_2, MLP."""

    def __init__(self, hidden_dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, hidden_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + attention, then + MLP."""
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class TorchvisionStyleViT(nn.Module):
    """torchvision.models.VisionTransformer's layout: `_process_input` reshapes with `self.hidden_dim`."""

    def __init__(self, image_size: int = 16, patch_size: int = 4, hidden_dim: int = 32, num_heads: int = 4,
                 mlp_dim: int = 64, depth: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch_size, hidden_dim
        self.conv_proj = nn.Conv2d(3, hidden_dim, patch_size, stride=patch_size)
        tokens = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(torch.randn(1, 1, hidden_dim) * 0.02)
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens, hidden_dim) * 0.02)
        self.layers = nn.Sequential(*(TorchvisionEncoderBlock(hidden_dim, num_heads, mlp_dim) for _ in range(depth)))
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.heads = nn.Linear(hidden_dim, num_classes)

    def _process_input(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.patch_size
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, (h // p) * (w // p))  # the stored hidden size, as torchvision does
        return x.permute(0, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the class token."""
        x = self._process_input(x)
        n = x.shape[0]
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1) + self.pos_embedding
        x = self.ln(self.layers(x))
        return self.heads(x[:, 0])


# --- Swin ---------------------------------------------------------------------------------------------------------


def relative_position_index(window: int) -> torch.Tensor:
    """(window^2, window^2) indices into a ((2 window - 1)^2, heads) bias table, as in Swin."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[:, :, 0] * (2 * window - 1) + relative[:, :, 1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, window, window, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window, window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of window_partition."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, h, w, c)


class WindowAttention(nn.Module):
    """timm's WindowAttention: fused qkv, per-head relative position bias from a table, optional shift mask."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads, self.window_area = num_heads, window * window
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, num_heads) * 0.02)
        self.register_buffer("relative_position_index", relative_position_index(window).view(-1), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)

    def _bias(self) -> torch.Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).contiguous()
        return bias.unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention inside each window: (B * windows, N, C) -> same shape."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + self._bias()
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.view(-1, windows, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.softmax(attn)
        x = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(x)


def shift_mask(size: int, window: int, shift: int) -> torch.Tensor:
    """Swin's attention mask for the cyclically shifted windows: (windows, N, N) of 0 and -100."""
    regions = torch.zeros(1, size, size, 1)
    count = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[:, hs, ws, :] = count
            count += 1
    windows = window_partition(regions, window).view(-1, window * window)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class SwinBlock(nn.Module):
    """A Swin transformer block on (B, H, W, C): (shifted) window attention, then an MLP, both residual."""

    def __init__(self, dim: int, num_heads: int, size: int, window: int, shift: int) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.register_buffer("attn_mask", shift_mask(size, window, shift) if shift else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same shape as x."""
        b, h, w, c = x.shape
        shortcut = x
        x = self.norm1(x)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = window_partition(x, self.window).view(-1, self.window * self.window, c)
        windows = self.attn(windows, mask=self.attn_mask)
        x = window_reverse(windows.view(-1, self.window, self.window, c), self.window, h, w)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Swin's 2x2 patch merging: concatenate the four neighbours (4C), LayerNorm, Linear to 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H/2, W/2, 2C)."""
        x0, x1 = x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :]
        x2, x3 = x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]
        return self.reduction(self.norm(torch.cat([x0, x1, x2, x3], -1)))


class TinySwin(nn.Module):
    """Patch embedding, two stages of (regular, shifted) Swin blocks with a patch merging between, a linear head."""

    def __init__(self, image_size: int = 16, patch: int = 2, dim: int = 16, heads: tuple[int, int] = (2, 4),
                 window: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        size = image_size // patch
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.embed_norm = nn.LayerNorm(dim)
        self.stage1 = nn.Sequential(SwinBlock(dim, heads[0], size, window, 0),
                                    SwinBlock(dim, heads[0], size, window, window // 2))
        self.merge = PatchMerging(dim)
        self.stage2 = nn.Sequential(SwinBlock(2 * dim, heads[1], size // 2, window, 0),
                                    SwinBlock(2 * dim, heads[1], size // 2, window, window // 2))
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the mean token."""
        x = self.embed_norm(self.patch_embed(x).permute(0, 2, 3, 1))
        x = self.stage2(self.merge(self.stage1(x)))
        return self.head(self.norm(x).mean(dim=(1, 2)))


# --- MaxViT --------------------------------------------------------------------------------------------------------


class RelativeAttention(nn.Module):
    """MaxViT's RelativePositionalMultiHeadAttention on (B, G, P, D): heads by einsum, per-head relative bias."""

    def __init__(self, dim: int, head_dim: int, partition: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.size = dim // head_dim, head_dim, partition
        self.max_seq_len = partition * partition
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.scale_factor = head_dim ** -0.5
        self.merge = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * partition - 1) ** 2, self.n_heads) * 0.02)
        self.register_buffer("relative_position_index", relative_position_index(partition), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same shape as x."""
        b, g, p, _ = x.shape
        q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
        q = q.reshape(b, g, p, self.n_heads, self.head_dim).permute(0, 1, 3, 2, 4)
        k = k.reshape(b, g, p, self.n_heads, self.head_dim).permute(0, 1, 3, 2, 4)
        v = v.reshape(b, g, p, self.n_heads, self.head_dim).permute(0, 1, 3, 2, 4)
        k = k * self.scale_factor
        dot = torch.einsum("bghid,bghjd->bghij", q, k)
        bias = self.relative_position_bias_table[self.relative_position_index]
        bias = bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        dot = F.softmax(dot + bias, dim=-1)
        out = torch.einsum("bghij,bghjd->bghid", dot, v)
        out = out.permute(0, 1, 3, 2, 4).reshape(b, g, p, self.n_heads * self.head_dim)
        return self.merge(out)


class PartitionAttention(nn.Module):
    """MaxViT's PartitionAttentionLayer: block ("window") or grid partition, pre-norm attention and MLP, both
    residual, then the inverse partition."""

    def __init__(self, dim: int, head_dim: int, partition: int, kind: str) -> None:
        super().__init__()
        self.p, self.kind = partition, kind
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = RelativeAttention(dim, head_dim, partition)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> same shape."""
        b, c, h, w = x.shape
        p = self.p
        gh, gw = h // p, w // p
        if self.kind == "window":  # (B, C, gh, p, gw, p) -> (B, gh*gw, p*p, C)
            x = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p, c)
        else:  # grid: (B, C, p, gh, p, gw) -> (B, gh*gw, p*p, C)
            x = x.reshape(b, c, p, gh, p, gw).permute(0, 3, 5, 2, 4, 1).reshape(b, gh * gw, p * p, c)
        x = x + self.attn(self.attn_norm(x))
        x = x + self.mlp(self.mlp_norm(x))
        if self.kind == "window":
            x = x.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        else:
            x = x.reshape(b, gh, gw, p, p, c).permute(0, 5, 3, 1, 4, 2).reshape(b, c, h, w)
        return x


class TinyMaxViT(nn.Module):
    """A stem conv, one MaxViT block (MBConv-style depthwise conv, block attention, grid attention), a head."""

    def __init__(self, dim: int = 32, head_dim: int = 8, partition: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim), nn.GELU())
        self.mbconv = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1), nn.BatchNorm2d(2 * dim), nn.GELU(),
                                    nn.Conv2d(2 * dim, 2 * dim, 3, padding=1, groups=2 * dim), nn.GELU(),
                                    nn.Conv2d(2 * dim, dim, 1))
        self.block = PartitionAttention(dim, head_dim, partition, "window")
        self.grid = PartitionAttention(dim, head_dim, partition, "grid")
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the pooled features."""
        x = self.stem(x)
        x = x + self.mbconv(x)
        x = self.grid(self.block(x))
        return self.head(x.mean(dim=(2, 3)))


# --- an untracked literal -----------------------------------------------------------------------------------------


class HardCodedView(nn.Module):
    """A conv whose output is reshaped with a literal 32 that comes from no attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.mid = nn.Conv2d(32, 16, 3, padding=1)
        self.fc = nn.Linear(32, 10)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        y = self.conv(x)
        n = y.shape[0]
        z = self.mid(y).mean(dim=(2, 3))
        y = y.view(n, 32, -1).mean(-1)  # the literal: not tied to any attribute
        return self.fc(y) + self.fc2(z)


def parameters(model: nn.Module) -> int:
    """Number of parameter elements."""
    return sum(p.numel() for p in model.parameters())


class RuntimeSizeAttention(nn.Module):
    """torchvision's shifted_window_attention style: head width and merged width computed from x.shape at run time."""

    def __init__(self, dim: int = 16, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.embed = nn.Linear(8, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, 8) -> (B, 3)."""
        x = self.embed(x)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.head(x + self.proj(y)).mean(dim=1)
