"""KV-cached autoregressive decoding: the baseline for the phase-1 (causal) checkpoint.

This is not a diffusion sampler: it is the standard left-to-right decoder that Dimple's hybrid
recipe produces after phase 1, kept as the same-size AR baseline for benchmarks.
"""
from __future__ import annotations

import time

import torch

from ..decoder import Decoder
from .sampler import SampleOutput


@torch.no_grad()
def ar_generate(decoder: Decoder, prompt_embeds: torch.Tensor, prompt_valid: torch.Tensor, *, max_new_tokens: int,
                eos_id: int, pad_id: int) -> SampleOutput:
    """Greedy causal decoding with a KV cache: one forward for the prompt, then one per token.

    Args:
        decoder: a decoder trained with the causal mask.
        prompt_embeds: (B, P, D) left-padded prompt embeddings.
        prompt_valid: (B, P) bool.
        max_new_tokens: length of the output canvas; finished rows are filled with ``pad_id``.

    Returns:
        A :class:`SampleOutput` whose ``nfe`` counts decoder forwards (prompt pass included).
    """
    t0 = time.perf_counter()
    B = prompt_embeds.shape[0]
    out = decoder(inputs_embeds=prompt_embeds, valid=prompt_valid, attn_mode="causal", store_cache=True)
    cache, valid = out.cache, prompt_valid
    next_tok = out.logits[:, -1].argmax(-1)  # (B,)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=prompt_embeds.device)
    done = torch.zeros(B, dtype=torch.bool, device=prompt_embeds.device)
    nfe = 1
    for i in range(max_new_tokens):
        tokens[:, i] = torch.where(done, torch.full_like(next_tok, pad_id), next_tok)
        done = done | (next_tok == eos_id)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=valid.device)], dim=1)
        out = decoder(tokens[:, i:i + 1], valid=valid, attn_mode="causal", cache=cache, store_cache=True)
        nfe += 1
        next_tok = out.logits[:, -1].argmax(-1)
    fixed_at = torch.arange(1, max_new_tokens + 1, device=tokens.device).expand(B, -1).clone()
    return SampleOutput(tokens, nfe, [B] * nfe, fixed_at, time.perf_counter() - t0)
