"""Test-only reference of the authors' released dense-prediction Swin + Mona backbone.

This module re-implements, in plain PyTorch, the behaviour of ``SwinTransformer_mona``
as released for object detection / segmentation in the Mona authors' repository
(``Swin-Transformer-Object-Detection/mmdet/models/backbones/swin_transformer_mona.py``).
It is written independently for the test suite only: its state_dict key names and its
numerical behaviour (in eval mode, drop-path 0, no absolute position embedding) follow
the release so that parity tests can check that monatune loads release checkpoints and
reproduces the four stage feature maps. It is not part of the library.

Public names:
    ReleaseSwinMona(embed_dim, depths, num_heads, window_size, mlp_ratio, patch_size)
    randomize_(model, seed)      -> fills every parameter with random values, in place
    release_state_dict(model)    -> dict shaped like an mmdet checkpoint of the release
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ReleaseSwinMona", "randomize_", "release_state_dict"]

_MONA_HIDDEN = 64  # the release hard-codes the adapter bottleneck width


# ----------------------------------------------------------------------------- helpers
def _to_windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of w -> (B * nW, w * w, C), row-major windows."""
    b, h, wd, c = x.shape
    x = x.reshape(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def _from_windows(t: torch.Tensor, w: int, h: int, wd: int) -> torch.Tensor:
    """Inverse of :func:`_to_windows`: (B * nW, w * w, C) -> (B, H, W, C)."""
    c = t.shape[-1]
    t = t.reshape(-1, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(-1, h, wd, c)


def _relative_index(w: int) -> torch.Tensor:
    """(w*w, w*w) int64 index into the ((2w-1)^2, heads) relative position bias table."""
    ys, xs = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + (w - 1)
    dx = xs[:, None] - xs[None, :] + (w - 1)
    return dy * (2 * w - 1) + dx


def _shift_mask(hp: int, wp: int, w: int, s: int, device, dtype) -> torch.Tensor:
    """Additive (nW, w*w, w*w) mask for shifted windows on a padded (hp, wp) map."""
    region = torch.zeros(hp, wp, device=device, dtype=dtype)
    bands = (slice(0, -w), slice(-w, -s), slice(-s, None))
    label = 0
    for rows in bands:
        for cols in bands:
            region[rows, cols] = label
            label += 1
    ids = _to_windows(region[None, :, :, None], w).squeeze(-1)  # (nW, w*w)
    differs = ids[:, None, :] != ids[:, :, None]
    return torch.zeros_like(differs, dtype=dtype).masked_fill(differs, -100.0)


# ----------------------------------------------------------------------------- Mona
class _MultiScaleDW(nn.Module):
    """Mean of depthwise 3/5/7 convs plus identity, then a residual 1x1 projection."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, groups=ch)
        self.conv2 = nn.Conv2d(ch, ch, 5, padding=2, groups=ch)
        self.conv3 = nn.Conv2d(ch, ch, 7, padding=3, groups=ch)
        self.projector = nn.Conv2d(ch, ch, 1)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        m = (self.conv1(m) + self.conv2(m) + self.conv3(m)) / 3.0 + m
        return m + self.projector(m)


class _Mona(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.project1 = nn.Linear(dim, _MONA_HIDDEN)
        self.project2 = nn.Linear(_MONA_HIDDEN, dim)
        self.dropout = nn.Dropout(p=0.1)
        self.adapter_conv = _MultiScaleDW(_MONA_HIDDEN)
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.ones(dim) * 1e-6)
        self.gammax = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, _ = x.shape
        h, w = hw
        scaled = self.norm(x) * self.gamma + x * self.gammax
        z = self.project1(scaled)
        z = z.reshape(b, h, w, _MONA_HIDDEN).permute(0, 3, 1, 2)
        z = self.adapter_conv(z)
        z = z.permute(0, 2, 3, 1).reshape(b, n, _MONA_HIDDEN)
        return x + self.project2(self.dropout(F.gelu(z)))


# ----------------------------------------------------------------------------- Swin parts
class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _relative_index(window))
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        logits = (q * self.scale) @ k.transpose(-2, -1)  # (bw, heads, n, n)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        logits = logits + bias.reshape(n, n, -1).permute(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            logits = logits.reshape(bw // nw, nw, self.heads, n, n) + mask[None, :, None]
            logits = logits.reshape(bw, self.heads, n, n)
        out = logits.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _FeedForward(dim, int(dim * mlp_ratio))
        self.my_module_1 = _Mona(dim)
        self.my_module_2 = _Mona(dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], mask: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        h, w = hw
        win = self.window
        y = self.norm1(x).reshape(b, h, w, c)
        y = F.pad(y, (0, 0, 0, (-w) % win, 0, (-h) % win))  # pad first, then shift
        hp, wp = y.shape[1], y.shape[2]
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(_to_windows(y, win), mask if self.shift else None)
        y = _from_windows(y, win, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y[:, :h, :w, :].reshape(b, h * w, c)
        x = self.my_module_1(x, (h, w))
        x = x + self.mlp(self.norm2(x))
        return self.my_module_2(x, (h, w))


class _PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, _, c = x.shape
        h, w = hw
        g = F.pad(x.reshape(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
        g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(g.reshape(b, -1, 4 * c)))


class _Stage(nn.Module):
    def __init__(self, dim, depth, heads, window, mlp_ratio, merge: bool):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(
            _Block(dim, heads, window, 0 if j % 2 == 0 else window // 2, mlp_ratio) for j in range(depth)
        )
        self.downsample = _PatchMerging(dim) if merge else None

    def forward(self, x: torch.Tensor, hw: tuple[int, int]):
        win = self.window
        hp, wp = -(-hw[0] // win) * win, -(-hw[1] // win) * win
        mask = _shift_mask(hp, wp, win, win // 2, x.device, x.dtype)
        for blk in self.blocks:
            x = blk(x, hw, mask)
        if self.downsample is None:
            return x, x, hw
        return x, self.downsample(x, hw), ((hw[0] + 1) // 2, (hw[1] + 1) // 2)


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        p = self.patch
        img = F.pad(img, (0, (-img.shape[-1]) % p, 0, (-img.shape[-2]) % p))
        return self.proj(img)  # (B, C, Hp/p, Wp/p); the norm is applied on tokens


class ReleaseSwinMona(nn.Module):
    """Swin backbone with two Mona adapters per block; returns 4 NCHW stage features."""

    def __init__(self, embed_dim: int = 96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, patch_size: int = 4):
        super().__init__()
        self.patch_embed = _PatchEmbed(patch_size, embed_dim)
        self.num_features = [embed_dim * 2**i for i in range(len(depths))]
        self.layers = nn.ModuleList(
            _Stage(self.num_features[i], depths[i], num_heads[i], window_size, mlp_ratio,
                   merge=i < len(depths) - 1)
            for i in range(len(depths))
        )
        for i, dim in enumerate(self.num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(dim))

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fmap = self.patch_embed(img)
        hw = (fmap.shape[2], fmap.shape[3])
        x = self.patch_embed.norm(fmap.flatten(2).transpose(1, 2))
        feats = []
        for i, stage in enumerate(self.layers):
            out, x, next_hw = stage(x, hw)
            out = getattr(self, f"norm{i}")(out)
            feats.append(out.reshape(-1, hw[0], hw[1], self.num_features[i]).permute(0, 3, 1, 2).contiguous())
            hw = next_hw
        return tuple(feats)


# ----------------------------------------------------------------------------- test helpers
@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter with seeded random values (buffers are left alone).

    Linear/conv weights get N(0, 1/fan_in) so activations stay O(1); biases 0.1*N(0,1);
    LayerNorm weights and Mona gamma/gammax 1 + 0.1*N(0,1); bias tables 0.2*N(0,1).
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(p: torch.Tensor, std: float, mean: float = 0.0) -> None:
        p.copy_(mean + std * torch.randn(p.shape, generator=gen))

    done: set[int] = set()
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if leaf in ("gamma", "gammax") or (isinstance(owner, nn.LayerNorm) and leaf == "weight"):
            rand(p, 0.1, 1.0)
        elif leaf == "relative_position_bias_table":
            rand(p, 0.2)
        elif leaf == "weight":
            rand(p, p[0].numel() ** -0.5)
        elif leaf == "bias":
            rand(p, 0.1)
        else:
            raise AssertionError(f"randomize_: unhandled parameter {name}")
        done.add(id(p))
    assert len(done) == len(list(model.parameters()))
    return model


def release_state_dict(model: nn.Module) -> dict:
    """What an mmdet 2.x checkpoint trained with the release holds: the backbone under
    ``backbone.`` plus neck/head entries that a backbone loader must skip."""
    gen = torch.Generator().manual_seed(1234)
    weights = {f"backbone.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    c0 = model.patch_embed.proj.out_channels
    weights["neck.lateral_convs.0.conv.weight"] = torch.randn(8, c0, 1, 1, generator=gen)
    weights["neck.lateral_convs.0.conv.bias"] = torch.randn(8, generator=gen)
    weights["rpn_head.rpn_conv.weight"] = torch.randn(8, 8, 3, 3, generator=gen)
    return {"meta": {"mmdet_version": "2.11.0"}, "state_dict": weights}
