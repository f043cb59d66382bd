"""Denoisers: how the sampler gets logits for the canvas, given a fixed prompt.

Cache strategies (``CACHES``, the ``cache=`` of ``model.sample`` / ``--cache``):

* ``none`` (:class:`FullRecompute`): prompt + canvas through the decoder at every step,
* ``prefix`` (:class:`PrefixCache`): the prompt's keys/values once, reused at every step; with the
  ``prefix`` attention mask (the prompt never attends to the response) this is exact (LaViDa's
  prefix-DLM cache; Dimple's prefilling),
* ``block`` / ``dual`` (:class:`BlockCache`): Fast-dLLM's approximate block-wise caches (Wu et al.
  2025, §3.2) for models trained with the full bidirectional mask: at each block start one full
  forward refreshes the keys/values; within the block only part of the canvas runs.

Prompt positions are counted over its valid tokens, unless M-RoPE ``positions`` (3, B, P) are given
(Dimple: image tokens placed by their grid); the canvas then continues one past the largest
(:func:`~mmdiff.decoder.next_positions`).

Every denoiser owns its cache object, takes an optional :class:`~mmdiff.sampling.pruning.LayerPlanner`
(token pruning, layer skipping: a :class:`~mmdiff.decoder.LayerPlan` per decoder call) and an
optional :class:`~mmdiff.flops.FlopCounter` it updates after every decoder forward.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F

from ..decoder import Decoder, DecoderOutput, KVCache, LayerPlan, next_positions, positions_from_valid
from ..registry import Registry
from .sampler import Denoiser, StepState

if TYPE_CHECKING:
    from ..flops import FlopCounter
    from .pruning import LayerPlanner

CACHES: Registry = Registry("cache")


class _Denoiser:
    """Shared plumbing: one decoder call with the step's plan, counted."""

    decoder: Decoder
    planner: LayerPlanner | None
    counter: FlopCounter | None
    positions: torch.Tensor | None = None  # (3, B, P) M-RoPE prompt positions, or None (counted over valid)

    def _plan(self, step: int, queries: torch.Tensor, *, n_cached: int) -> LayerPlan | None:
        """The plan of a decoder call at ``step``; ``queries`` (B, T) marks the call's response tokens."""
        return None if self.planner is None else self.planner.plan(step, n_cached=n_cached, queries=queries)

    def _count(self, out: DecoderOutput) -> DecoderOutput:
        if self.counter is not None:
            self.counter.add(out)
        return out

    def _forward(self, step: int, queries: torch.Tensor, *, n_cached: int, **kwargs) -> DecoderOutput:
        """Run the decoder with the plan of ``step``, counted."""
        return self._count(self.decoder(plan=self._plan(step, queries, n_cached=n_cached), **kwargs))

    def _forward_response(self, step: int, canvas: torch.Tensor, **kwargs) -> tuple[torch.Tensor, DecoderOutput]:
        """Prompt + canvas in one forward with the plan of ``step``, counted: (B, L, V) logits and the output."""
        queries = torch.cat([torch.zeros_like(self.prompt_valid, dtype=torch.float),
                             torch.ones_like(canvas, dtype=torch.float)], dim=1)  # (B, P+L): the response rows
        logits, out = self.decoder.forward_response(self.prompt_embeds, self.prompt_valid, canvas,
                                                    prompt_positions=self.positions,
                                                    plan=self._plan(step, queries, n_cached=0), **kwargs)
        return logits, self._count(out)


class FullRecompute(_Denoiser):
    """Recompute the whole sequence each step.

    Args:
        decoder: the decoder.
        prompt_embeds: (B, P, D) prompt embeddings (media tokens merged in), left padded.
        prompt_valid: (B, P) bool, False at padding.
        attn_mode: attention mask kind for the whole sequence.
        planner: per-step token pruning / layer skipping.
        counter: FLOP counter to update.
        positions: (3, B, P) M-RoPE prompt positions, or None.
    """

    def __init__(self, decoder: Decoder, prompt_embeds: torch.Tensor, prompt_valid: torch.Tensor, *,
                 attn_mode: str = "bidirectional", planner: LayerPlanner | None = None,
                 counter: FlopCounter | None = None, positions: torch.Tensor | None = None) -> None:
        self.decoder, self.prompt_embeds, self.prompt_valid = decoder, prompt_embeds, prompt_valid
        self.attn_mode, self.planner, self.counter, self.positions = attn_mode, planner, counter, positions

    @torch.no_grad()
    def logits(self, state: StepState) -> torch.Tensor:
        return self._forward_response(state.step, state.canvas, attn_mode=self.attn_mode)[0]  # (B, L, V)


class PrefixCache(_Denoiser):
    """Exact prompt KV cache for models run with the ``prefix`` mask.

    The prompt is encoded once (its keys/values and its last position's logits are kept); each
    step then runs only the L canvas tokens against the cached keys. Token pruning here only masks
    cached image keys: the image tokens never run again after the prompt pass.
    """

    def __init__(self, decoder: Decoder, prompt_embeds: torch.Tensor, prompt_valid: torch.Tensor, *,
                 planner: LayerPlanner | None = None, counter: FlopCounter | None = None,
                 positions: torch.Tensor | None = None) -> None:
        self.decoder, self.prompt_valid = decoder, prompt_valid
        self.planner, self.counter = planner, counter
        self.P = prompt_embeds.shape[1]
        prompt_positions = positions_from_valid(prompt_valid) if positions is None else positions
        self.first_position = next_positions(prompt_positions, prompt_valid, 1)  # (B, 1): canvas token 0
        with torch.no_grad():
            out = self._count(decoder(inputs_embeds=prompt_embeds, valid=prompt_valid, attn_mode="prefix",
                                      prefix_len=self.P, position_ids=prompt_positions, store_cache=True))
        self.cache: KVCache = out.cache
        self.last_prompt_logits = out.logits[:, -1:]  # (B, 1, V): Dream-style shift reads it

    def split(self) -> list[PrefixCache]:
        """One prefix cache per row of this batch (its prompt as padded in the batch); :meth:`stack`
        joins rows of different batches again."""
        out = []
        for b in range(self.prompt_valid.shape[0]):
            row = PrefixCache.__new__(PrefixCache)
            row.decoder, row.planner, row.counter, row.P = self.decoder, self.planner, self.counter, self.P
            row.prompt_valid, row.last_prompt_logits = self.prompt_valid[b:b + 1], self.last_prompt_logits[b:b + 1]
            row.first_position = self.first_position[b:b + 1]
            row.cache = KVCache([k[b:b + 1] for k in self.cache.keys], [v[b:b + 1] for v in self.cache.values],
                                [None if a is None else a[b:b + 1] for a in self.cache.alive])
            out.append(row)
        return out

    @classmethod
    def stack(cls, parts: Sequence[PrefixCache], *, counter: FlopCounter | None = None) -> PrefixCache:
        """One batch from prefix caches built apart (requests admitted at different times): each
        prompt's keys/values are left-padded to the longest prompt and the padding marked invalid, so
        every row's canvas attends to exactly its own prompt at its own RoPE positions (positions
        count valid slots only). No forward pass runs.

        Args:
            parts: prefix caches of the same decoder, without token pruning.
            counter: FLOP counter of the stacked batch's forwards.
        """
        if any(p.planner is not None or any(a is not None for a in p.cache.alive) for p in parts):
            raise ValueError("prefix caches with token pruning cannot be stacked")
        P = max(p.P for p in parts)
        out = cls.__new__(cls)
        out.decoder, out.planner, out.counter, out.P = parts[0].decoder, None, counter, P
        out.prompt_valid = torch.cat([F.pad(p.prompt_valid, (P - p.P, 0), value=False) for p in parts])  # (B, P)
        pad = [(0, 0, P - p.P, 0) for p in parts]  # left-pad the key axis of (B_i, H, P_i, hd)
        n_layers = len(parts[0].cache.keys)
        out.cache = KVCache([torch.cat([F.pad(p.cache.keys[i], d) for p, d in zip(parts, pad)]) for i in range(n_layers)],
                            [torch.cat([F.pad(p.cache.values[i], d) for p, d in zip(parts, pad)])
                             for i in range(n_layers)], [None] * n_layers)
        out.last_prompt_logits = torch.cat([p.last_prompt_logits for p in parts])  # (B, 1, V)
        out.first_position = torch.cat([p.first_position for p in parts])  # (B, 1): unchanged by left padding
        return out

    @torch.no_grad()
    def logits(self, state: StepState) -> torch.Tensor:
        valid = torch.cat([self.prompt_valid, torch.ones_like(state.canvas, dtype=torch.bool)], dim=1)
        positions = self.first_position + torch.arange(state.canvas.shape[1], device=state.canvas.device)  # (B, L)
        out = self._forward(state.step, torch.ones_like(state.canvas, dtype=torch.float), n_cached=self.P,
                            input_ids=state.canvas, valid=valid, attn_mode="prefix", prefix_len=self.P,
                            position_ids=positions, cache=self.cache)
        return self.decoder.shifted(torch.cat([self.last_prompt_logits, out.logits], dim=1))  # (B, L, V)


class BlockCache(_Denoiser):
    """Fast-dLLM's approximate block-wise KV cache (Wu et al. 2025, §3.2, Fig. 3).

    At the first step of each block, one forward over prompt + canvas gives that step's logits and
    refreshes the cache. Later steps of the block reuse it:

    * ``dual=False`` (prefix cache): the keys/values of the prompt and the earlier blocks are
      cached; the current block and every position after it run,
    * ``dual=True`` (dual cache): the positions after the block are cached too; only the current
      block's tokens run (its stale cached slots are masked out).

    Cached keys go stale as the block is decoded, so this is approximate for bidirectional models;
    it is exact when nothing cached can depend on the running tokens (a causal model with
    ``dual=False``; one block covering the canvas under the ``prefix`` mask).

    Args:
        decoder: the decoder.
        prompt_embeds: (B, P, D) prompt embeddings, left padded.
        prompt_valid: (B, P) bool.
        dual: also cache the positions after the block.
        attn_mode: attention mask kind (``dual`` needs ``bidirectional`` or ``prefix``).
        planner: per-step token pruning / layer skipping (a refresh pass that prunes stores the
            cache without the dropped tokens' keys in the later layers).
        counter: FLOP counter to update.
        positions: (3, B, P) M-RoPE prompt positions, or None.
    """

    def __init__(self, decoder: Decoder, prompt_embeds: torch.Tensor, prompt_valid: torch.Tensor, *,
                 dual: bool = False, attn_mode: str = "bidirectional", planner: LayerPlanner | None = None,
                 counter: FlopCounter | None = None, positions: torch.Tensor | None = None) -> None:
        if dual and attn_mode == "causal":
            raise ValueError("the dual cache runs the block after the cached suffix: it needs a bidirectional "
                             "or prefix mask, not causal")
        self.decoder, self.prompt_embeds, self.prompt_valid = decoder, prompt_embeds, prompt_valid
        self.dual, self.attn_mode, self.planner, self.counter = dual, attn_mode, planner, counter
        self.P = prompt_embeds.shape[1]
        self.positions = positions
        prompt_positions = positions_from_valid(prompt_valid) if positions is None else positions
        self.first_position = next_positions(prompt_positions, prompt_valid, 1)  # (B, 1): RoPE position of canvas token 0
        self.cache: KVCache | None = None
        self.block: int | None = None
        self.raw: torch.Tensor | None = None  # (B, 1+L, V) raw logits of the last prompt row and the canvas

    @torch.no_grad()
    def logits(self, state: StepState) -> torch.Tensor:
        canvas, blk, P = state.canvas, state.block_slice, self.P
        B, L = canvas.shape
        ones = torch.ones(B, L, dtype=torch.bool, device=canvas.device)
        if state.block != self.block:  # block start: full forward, refresh the cache
            logits, out = self._forward_response(state.step, canvas, attn_mode=self.attn_mode, store_cache=True)
            self.cache, self.block, self.raw = out.cache, state.block, out.logits[:, P - 1:].clone()
            if not self.dual:
                self.cache.crop(P + blk.start)
            return logits
        if self.dual:  # the block against prompt + canvas slots, the block's own (stale) slots masked
            run = slice(blk.start, blk.stop)
            stale = ones.clone()
            stale[:, run] = False
            valid = torch.cat([self.prompt_valid, stale, ones[:, run]], dim=1)  # (B, P+L+|blk|)
        else:  # block + suffix against prompt + earlier blocks
            run = slice(blk.start, L)
            valid = torch.cat([self.prompt_valid, ones], dim=1)  # (B, P+L)
        positions = self.first_position + torch.arange(run.start, run.stop, device=canvas.device)  # (B, T)
        out = self._forward(state.step, ones[:, run].float(), n_cached=self.cache.length, input_ids=canvas[:, run],
                            valid=valid, attn_mode=self.attn_mode, prefix_len=P, position_ids=positions,
                            cache=self.cache)
        self.raw[:, 1 + run.start:1 + run.stop] = out.logits
        return self.decoder.shifted(self.raw)  # (B, L, V)


# ------------------------------------------------------------------------------------------------
# registry: cache name -> denoiser
# ------------------------------------------------------------------------------------------------
DenoiserFactory = Callable[..., Denoiser]


@CACHES.register("none")
def _no_cache(decoder: Decoder, embeds: torch.Tensor, valid: torch.Tensor, *, attn_mode: str,
              planner: LayerPlanner | None, counter: FlopCounter | None,
              positions: torch.Tensor | None = None) -> Denoiser:
    return FullRecompute(decoder, embeds, valid, attn_mode=attn_mode, planner=planner, counter=counter,
                         positions=positions)


@CACHES.register("prefix")
def _prefix_cache(decoder: Decoder, embeds: torch.Tensor, valid: torch.Tensor, *, attn_mode: str,
                  planner: LayerPlanner | None, counter: FlopCounter | None,
                  positions: torch.Tensor | None = None) -> Denoiser:
    return PrefixCache(decoder, embeds, valid, planner=planner, counter=counter,
                       positions=positions)


@CACHES.register("block")
def _block_cache(decoder: Decoder, embeds: torch.Tensor, valid: torch.Tensor, *, attn_mode: str,
                 planner: LayerPlanner | None, counter: FlopCounter | None,
                 positions: torch.Tensor | None = None) -> Denoiser:
    return BlockCache(decoder, embeds, valid, dual=False, attn_mode=attn_mode, planner=planner, counter=counter,
                      positions=positions)


@CACHES.register("dual")
def _dual_cache(decoder: Decoder, embeds: torch.Tensor, valid: torch.Tensor, *, attn_mode: str,
                planner: LayerPlanner | None, counter: FlopCounter | None,
                positions: torch.Tensor | None = None) -> Denoiser:
    return BlockCache(decoder, embeds, valid, dual=True, attn_mode=attn_mode, planner=planner, counter=counter,
                      positions=positions)


def build_denoiser(cache: str, decoder: Decoder, embeds: torch.Tensor, valid: torch.Tensor, *,
                   attn_mode: str = "bidirectional", planner: LayerPlanner | None = None,
                   counter: FlopCounter | None = None, positions: torch.Tensor | None = None) -> Denoiser:
    """The denoiser of cache strategy ``cache`` (``CACHES``: none, prefix, block, dual).

    Args:
        cache: cache strategy name.
        decoder: the decoder.
        embeds: (B, P, D) prompt embeddings; valid: (B, P) bool.
        attn_mode: the model's attention mask (``prefix`` always runs the prefix mask).
        planner: token pruning / layer skipping, or None.
        counter: FLOP counter, or None.
        positions: (3, B, P) M-RoPE prompt positions, or None (counted over valid tokens).
    """
    return CACHES.get(cache)(decoder, embeds, valid, attn_mode=attn_mode, planner=planner, counter=counter,
                             positions=positions)
