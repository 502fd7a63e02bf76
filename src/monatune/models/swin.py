"""Where Mona goes in a timm Swin Transformer block, and the release's window partition.

Two adapters per block, each on the residual stream right after a residual add
(spec section 3; the release's ``my_module_1`` / ``my_module_2``)::

    x = x + DropPath(WindowAttention(LN1(x)))
    x = Mona_1(x)                                   # slot "after_attn"
    x = x + DropPath(MLP(LN2(x)))
    x = Mona_2(x)                                   # slot "after_mlp"

The stream is a channels-last (B, H, W, C) map throughout, so Mona never copies it.

Window partition. timm 1.0 (without ``always_partition``) shrinks the window and drops the
shift on maps smaller than the window, and with dynamic sizes pads *after* the cyclic
shift. The release's dense backbone keeps the window fixed, pads the map to whole windows
*before* the shift and builds the shift mask on the padded map. ``release_windows = True``
(set by :class:`monatune.dense.DenseBackbone`) selects that behaviour.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import Tensor

from .base import TunedBlockMixin

__all__ = ["TunedSwinBlock", "release_shift_mask"]


def release_shift_mask(
    hp: int, wp: int, window: tuple[int, int], shift: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Shifted-window attention mask (num_windows, N, N) for a padded hp x wp map, as the release builds it."""
    img_mask = torch.zeros((1, hp, wp, 1), device=device, dtype=dtype)
    region = 0
    for h in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for w in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            img_mask[:, h, w, :] = region
            region += 1
    windows = window_partition(img_mask, window).flatten(1)  # nW, N
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class TunedSwinBlock(SwinTransformerBlock, TunedBlockMixin):
    """A timm ``SwinTransformerBlock`` with adapter slots (class swapped in, never built)."""

    release_windows: bool = False

    def forward(self, x: Tensor) -> Tensor:  # B, H, W, C
        attn = self._release_attn if self.release_windows else self._attn
        x = x + self.drop_path1(attn(self.norm1(x)))
        x = self._adapt("after_attn", x)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        x = self._adapt("after_mlp", x)
        return x

    def _release_attn(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        wh, ww = self.window_size
        pad_h, pad_w = (wh - H % wh) % wh, (ww - W % ww) % ww
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # pad to whole windows BEFORE the shift
        Hp, Wp = H + pad_h, W + pad_w
        shifted = any(self.shift_size)
        if shifted:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
            mask = self._cached_mask(Hp, Wp, x)
        else:
            mask = None
        windows = window_partition(x, self.window_size).view(-1, wh * ww, C)  # nW*B, N, C
        windows = self.attn(windows, mask=mask).view(-1, wh, ww, C)
        x = window_reverse(windows, self.window_size, Hp, Wp)  # B, Hp, Wp, C
        if shifted:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :H, :W, :]

    def _cached_mask(self, hp: int, wp: int, x: Tensor) -> Tensor:
        key = (hp, wp, x.device, x.dtype)
        cache = self.__dict__.setdefault("_release_mask_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = release_shift_mask(hp, wp, self.window_size, self.shift_size, x.device, x.dtype)
        return cache[key]
