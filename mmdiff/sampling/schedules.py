"""Noise schedules: the masked fraction sigma(t) as a function of diffusion time t in [0, 1].

t = 1 is the fully masked canvas and t = 0 the clean answer. Sampling walks t from 1 to 0 in
``steps`` equal increments; the number of tokens unmasked at a step is the drop in
``round(n * sigma(t))`` across it (at least one, so every step does work). The linear schedule allots
exactly as LLaDA's ``get_num_transfer_tokens``: ``n // steps`` a step, one more on each of the first
``n % steps`` steps (rounding the grid would put those extra tokens elsewhere, e.g. 3, 2, 3 instead of
LLaDA's 3, 3, 2 for 8 tokens in 3 steps, and decode other tokens than the reference samplers).
"""
from __future__ import annotations

import math

import torch

from ..registry import Registry

SCHEDULES: Registry = Registry("schedule")


@SCHEDULES.register("linear")
def linear(t: float, shift: float = 1.0) -> float:
    """sigma(t) = t (LLaDA: the same number of tokens every step)."""
    return t


@SCHEDULES.register("shifted")
def shifted(t: float, shift: float = 3.0) -> float:
    """sigma(t) = s*t / (1 + (s-1)*t) (LaViDa's time shift; s > 1 unmasks more tokens late)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


@SCHEDULES.register("cosine")
def cosine(t: float, shift: float = 1.0) -> float:
    """sigma(t) = sin(pi*t/2), i.e. MaskGIT's cos(pi/2 * progress) mask ratio."""
    return math.sin(math.pi * t / 2)


def num_transfer(n_masked: torch.Tensor, steps: int, *, schedule: str = "linear", shift: float = 3.0) -> torch.Tensor:
    """Tokens to unmask at each of ``steps`` steps, per sample.

    Args:
        n_masked: (B,) masked tokens at the start of the block.
        steps: number of steps for the block.

    Returns:
        (B, steps) long tensor whose rows sum to ``n_masked``.
    """
    sigma = SCHEDULES.get(schedule)
    if sigma is linear:  # LLaDA's allotment (see the module docstring)
        base, extra = n_masked[:, None] // steps, n_masked[:, None] % steps  # (B, 1)
        return base + (torch.arange(steps, device=n_masked.device)[None, :] < extra).long()  # (B, S)
    ts = torch.tensor([sigma(1 - i / steps, shift) for i in range(steps + 1)], dtype=torch.float64)  # (S+1,)
    remaining = torch.round(n_masked[:, None].double() * ts[None, :]).long()  # (B, S+1)
    remaining[:, 0], remaining[:, -1] = n_masked, 0
    return (remaining[:, :-1] - remaining[:, 1:]).clamp(min=0)
