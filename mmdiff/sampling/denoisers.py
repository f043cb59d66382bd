"""Denoisers: how the sampler gets logits for the canvas, given a fixed prompt.

``FullRecompute`` runs prompt + canvas through the decoder at every step (the vanilla sampler).
``PrefixCache`` computes the prompt's keys/values once and reuses them at every step; with the
``prefix`` attention mask (the prompt never attends to the response) this is exact (LaViDa's
prefix-DLM cache; Dimple's prefilling).
"""
from __future__ import annotations

import torch

from ..decoder import Decoder, KVCache
from .sampler import StepState


class FullRecompute:
    """Recompute the whole sequence each step.

    Args:
        decoder: the decoder.
        prompt_embeds: (B, P, D) prompt embeddings (media tokens merged in), left padded.
        prompt_valid: (B, P) bool, False at padding.
        attn_mode: attention mask kind for the whole sequence.
        forward_kwargs: extra decoder arguments (layer skipping, ...).
    """

    def __init__(self, decoder: Decoder, prompt_embeds: torch.Tensor, prompt_valid: torch.Tensor, *,
                 attn_mode: str = "bidirectional", **forward_kwargs) -> None:
        self.decoder, self.prompt_embeds, self.prompt_valid = decoder, prompt_embeds, prompt_valid
        self.attn_mode, self.forward_kwargs = attn_mode, forward_kwargs

    @torch.no_grad()
    def logits(self, state: StepState) -> torch.Tensor:
        P = self.prompt_embeds.shape[1]
        x = torch.cat([self.prompt_embeds, self.decoder.embed(state.canvas)], dim=1)  # (B, P+L, D)
        valid = torch.cat([self.prompt_valid, torch.ones_like(state.canvas, dtype=torch.bool)], dim=1)
        out = self.decoder(inputs_embeds=x, valid=valid, attn_mode=self.attn_mode, prefix_len=P,
                           **self.forward_kwargs)
        return self.decoder.aligned_logits(out.logits)[:, P:]  # (B, L, V)


class PrefixCache:
    """Exact prompt KV cache for models run with the ``prefix`` mask.

    The prompt is encoded once (its keys/values and its last position's logits are kept); each
    step then runs only the L canvas tokens against the cached keys.
    """

    def __init__(self, decoder: Decoder, prompt_embeds: torch.Tensor, prompt_valid: torch.Tensor,
                 **forward_kwargs) -> None:
        self.decoder, self.prompt_valid, self.forward_kwargs = decoder, prompt_valid, forward_kwargs
        self.P = prompt_embeds.shape[1]
        with torch.no_grad():
            out = decoder(inputs_embeds=prompt_embeds, valid=prompt_valid, attn_mode="prefix",
                          prefix_len=self.P, store_cache=True, **forward_kwargs)
        self.cache: KVCache = out.cache
        self.last_prompt_logits = out.logits[:, -1:]  # (B, 1, V): Dream-style shift reads it

    @torch.no_grad()
    def logits(self, state: StepState) -> torch.Tensor:
        valid = torch.cat([self.prompt_valid, torch.ones_like(state.canvas, dtype=torch.bool)], dim=1)
        out = self.decoder(state.canvas, valid=valid, attn_mode="prefix", prefix_len=self.P,
                           cache=self.cache, **self.forward_kwargs)
        logits = out.logits  # (B, L, V)
        if self.decoder.cfg.logit_shift:
            logits = torch.cat([self.last_prompt_logits, logits[:, :-1]], dim=1)
        return logits
