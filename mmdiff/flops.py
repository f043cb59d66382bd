"""Decoder FLOPs, counted analytically from the shapes a forward actually ran.

A matmul of (m, k) by (k, n) costs 2mkn FLOPs (a multiply and an add per term). Per layer, for a
sequence whose ``rows`` tokens run against ``keys`` keys (cached + new, after pruning):

* projections, only for the tokens that run: q and o  2·rows·D·(H·d) each, k and v  2·rows·D·(H_kv·d) each,
* attention, against every key in the tensor (the cached slots attended, then the new rows; a
  pruned cached key leaves the tensor): QKᵀ and AV  2·H·rows·keys·d each,
* explicit attention scores for probed queries (FastV's probe): 2·H·probe_rows·keys·d,
* SwiGLU MLP: 3 · 2·rows·D·F;

plus the output head 2·T·D·V over the T rows the head runs on. Element-wise work (norms, RoPE,
softmax, SiLU) is left out, as in the usual 2·N·params accounting (Kaplan et al. 2020).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from .decoder import Decoder, DecoderConfig, DecoderOutput, LayerShape


def layer_flops(cfg: DecoderConfig, shape: LayerShape) -> int:
    """FLOPs of one transformer block for one sequence."""
    D, H, Hkv, d, Fh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_hidden
    n, k = shape.rows, shape.keys
    projections = 2 * n * D * (2 * H * d + 2 * Hkv * d)  # q, o + k, v
    attention = 2 * (2 * H * n * k * d)  # QK^T and AV
    probe = 2 * H * shape.probe_rows * k * d
    mlp = 3 * 2 * n * D * Fh
    return projections + attention + probe + mlp


def head_flops(cfg: DecoderConfig, rows: int) -> int:
    """FLOPs of the output head over ``rows`` positions of one sequence."""
    return 2 * rows * cfg.d_model * cfg.vocab_size


def forward_flops(cfg: DecoderConfig, out: DecoderOutput) -> int:
    """FLOPs of one decoder forward, per sequence, from ``out.layers_run`` and the logits' rows."""
    if out.layers_run is None:
        raise ValueError("this DecoderOutput does not record the shapes it ran (layers_run is None)")
    return sum(layer_flops(cfg, s) for s in out.layers_run if s is not None) + head_flops(cfg, out.logits.shape[1])


@dataclass
class FlopCounter:
    """Accumulates decoder FLOPs per sequence (= per answer) over the forwards of a generation.

    A denoiser calls :meth:`add` after each decoder forward; :meth:`watch` counts every forward
    of a decoder from the outside (for decoding loops that take no counter, e.g. ``ar_generate``).
    """

    cfg: DecoderConfig
    flops: int = 0  # per sequence
    forwards: int = 0

    def add(self, out: DecoderOutput) -> None:
        self.flops += forward_flops(self.cfg, out)
        self.forwards += 1

    def reset(self) -> None:
        self.flops, self.forwards = 0, 0

    @contextmanager
    def watch(self, decoder: Decoder) -> Iterator["FlopCounter"]:
        """Count every forward of ``decoder`` inside the ``with`` block."""
        handle = decoder.register_forward_hook(lambda module, args, output: self.add(output))
        try:
            yield self
        finally:
            handle.remove()
