"""Phase-Shifting Coder (Yu & Da, "Phase-Shifting Coder: Predicting Accurate Orientation in
Oriented Object Detection", CVPR 2023) as H2RBox-v2+ configures it: 3 steps, one frequency, no
modulation threshold.

An le90 angle theta is coded as the three phase-shifted cosines cos(2 theta + 2 pi k / 3); the
decoder takes the phase of their first Fourier coefficient. The code has period pi, so the decoded
angle is in [-pi/2, pi/2] (either end for the same angle, as float rounding falls) whatever the input (the release: mmrotate ``PSCCoder(dual_freq=False,
thr_mod=0)``; no library implements it, so it is written here).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["PSC_STEPS", "psc_encode", "psc_decode"]

PSC_STEPS = 3


def _coefficients(num_step: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """sin and cos of the phase shifts 2 pi k / num_step, computed in float32 as mmrotate does."""
    shifts = torch.tensor([2 * k * math.pi / num_step for k in range(num_step)])
    return torch.sin(shifts).to(like), torch.cos(shifts).to(like)


def psc_encode(theta: Tensor, num_step: int = PSC_STEPS) -> Tensor:
    """Code angles (radians, any shape ``[...]``) as ``[..., num_step]`` phase-shifted cosines."""
    shifts = [2 * math.pi * k / num_step for k in range(num_step)]
    return torch.stack([torch.cos(2 * theta + s) for s in shifts], dim=-1)


def psc_decode(code: Tensor) -> Tensor:
    """Decode ``[..., num_step]`` codes to angles ``[...]`` in [-pi/2, pi/2].

    The phase is ``-atan2(S, C)`` with ``S = sum_k p_k sin(2 pi k / n)`` and ``C = sum_k p_k cos(2 pi k / n)``;
    the angle is half of it. Any code decodes (the release's ``thr_mod=0`` never zeroes an angle).
    """
    sin, cos = _coefficients(code.shape[-1], code)
    phase = -torch.atan2((code * sin).sum(-1), (code * cos).sum(-1))
    return phase / 2
