"""Data augmentation of the speech encoder's inputs in the ASR stage."""
from __future__ import annotations

import random

import torch


def spec_augment(mels: torch.Tensor, rng: random.Random, *, freq_masks: int = 2, freq_width: int = 10,
                 time_masks: int = 2, time_frac: float = 0.08) -> torch.Tensor:
    """SpecAugment (Park et al. 2019) without time warping: per clip, ``freq_masks`` bands of up to
    ``freq_width`` mel bins and ``time_masks`` spans of up to ``time_frac`` of the frames are set
    to the clip's mean log-mel.

    Args:
        mels: (B, n_mels, T) log-mels (a new tensor is returned).
        rng: random source.
        freq_masks: frequency bands masked per clip.
        freq_width: widest band, in mel bins.
        time_masks: time spans masked per clip.
        time_frac: longest span, as a fraction of the clip's frames.
    """
    out = mels.clone()
    B, M, T = out.shape
    for b in range(B):
        fill = out[b].mean()
        for _ in range(freq_masks):
            w = rng.randint(0, freq_width)
            f0 = rng.randint(0, M - w)
            out[b, f0:f0 + w] = fill
        for _ in range(time_masks):
            w = rng.randint(0, max(1, int(time_frac * T)))
            t0 = rng.randint(0, max(0, T - w))
            out[b, :, t0:t0 + w] = fill
    return out


def state_augment(states: torch.Tensor, rng: random.Random, *, time_masks: int = 2, time_frac: float = 0.08,
                  channel_drop: float = 0.1) -> torch.Tensor:
    """SpecAugment's time masks applied to a frozen encoder's cached states (its input mels are gone), plus
    channel dropout: per clip, ``time_masks`` spans of up to ``time_frac`` of the frames are zeroed, and
    each channel is zeroed with probability ``channel_drop`` (the rest scaled by 1 / (1 - p)).

    Args:
        states: (B, T, D) encoder states (a new tensor is returned).
        rng: random source.
        time_masks: time spans masked per clip.
        time_frac: longest span, as a fraction of the frames.
        channel_drop: probability of zeroing a channel of a clip.
    """
    out = states.clone()
    B, T, D = out.shape
    g = torch.Generator().manual_seed(rng.getrandbits(63))
    keep = (torch.rand(B, 1, D, generator=g) >= channel_drop).to(out.dtype) / (1 - channel_drop)  # (B, 1, D)
    out = out * keep
    for b in range(B):
        for _ in range(time_masks):
            w = rng.randint(0, max(1, int(time_frac * T)))
            t0 = rng.randint(0, max(0, T - w))
            out[b, t0:t0 + w] = 0
    return out
