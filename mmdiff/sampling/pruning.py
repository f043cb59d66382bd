"""Visual-token pruning and layer skipping: what the decoder may leave out at a denoising step.

A :class:`PruningConfig` (plain values, one CLI flag per field) becomes a :class:`LayerPlanner`
bound to one prompt batch; for every decoder call a denoiser asks it for a
:class:`~mmdiff.decoder.LayerPlan`, which the decoder consults at layer boundaries. Methods
(``PRUNERS``) rank the image tokens; the planner keeps the best ``keep_ratio`` of them from layer
``prune_layer`` on:

* ``fastv``: attention the response tokens pay to each image token at layer K-1 (FastV, Chen et
  al. 2024, "An Image is Worth 1/2 Tokens After Layer 2"),
* ``divprune``: a maximally diverse subset, greedy max-min cosine distance between the image
  token embeddings (DivPrune, Alvar et al. 2025),
* ``vtw``: every image token leaves after layer K (visual tokens withdrawal, Lin et al. 2024).

When: from step ``prune_from_step`` on (until step ``prune_until_step``, when set: early-step
pruning, after which the image tokens come back), at a ``constant`` kept ratio or a ``progressive``
one that decays linearly from 1 to ``keep_ratio`` over the pruned steps. Layer skipping leaves
``skip_layers`` out from step ``skip_from_step`` on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..decoder import LayerPlan
from ..io import JsonConfig
from ..options import check_settings, setting
from ..registry import Registry

PRUNERS: Registry = Registry("token pruning method")
PRUNE_SCHEDULES: tuple[str, ...] = ("constant", "progressive")


@dataclass(frozen=True)
class PruningConfig(JsonConfig):
    """Token pruning and layer skipping settings. Saved with evaluation results; each field carries
    its help, choices and range (:func:`~mmdiff.options.setting`)."""

    prune: str = setting("none", "visual-token pruning: fastv (attention from the response at layer K-1), divprune "
                                 "(diverse subset of image embeddings), vtw (withdraw all image tokens)",
                         choices=lambda: ["none", *PRUNERS.names()])
    keep_ratio: float = setting(1.0, "fraction of image tokens kept by --prune fastv/divprune (1 = keep all)",
                                low=0.0, high=1.0)
    prune_layer: int = setting(2, "K: image tokens are dropped before decoder layer K (0-based)", low=0,
                               widget_max=64)
    prune_from_step: int = setting(0, "first denoising step that prunes (late-step pruning)", low=0, widget_max=256)
    prune_until_step: int = setting(0, "first denoising step that no longer prunes: the image tokens come back "
                                       "from it on (early-step pruning; 0 = prune to the last step)", low=0,
                                    widget_max=256)
    prune_schedule: str = setting("constant", "constant, or progressive (kept ratio decays from 1 to --keep-ratio "
                                              "over the steps)", choices=PRUNE_SCHEDULES)
    skip_layers: tuple[int, ...] = setting((), "comma-separated decoder layers to skip, e.g. 3,4", low=0)
    skip_from_step: int = setting(0, "first denoising step that skips --skip-layers", low=0, widget_max=256)

    def __post_init__(self) -> None:
        if self.prune != "none":
            PRUNERS.get(self.prune)
        object.__setattr__(self, "skip_layers", tuple(sorted(set(self.skip_layers))))
        check_settings(self)
        if self.prune_until_step and self.prune_until_step <= self.prune_from_step:
            raise ValueError(f"prune_until_step {self.prune_until_step} must be after prune_from_step "
                             f"{self.prune_from_step} (or 0: prune to the last step)")
        if self.prune == "fastv" and self.prune_layer < 1:
            raise ValueError("fastv scores tokens by the attention at layer prune_layer - 1: prune_layer must be >= 1")
        if self.prune == "fastv" and self.prune_layer - 1 in self.skip_layers:
            raise ValueError(f"fastv scores tokens at layer {self.prune_layer - 1}, which skip_layers skips")

    @property
    def prunes(self) -> bool:
        """Whether image tokens are dropped at some step (``prune_layer`` matters only then)."""
        return self.prune == "vtw" or (self.prune != "none" and self.keep_ratio < 1.0)

    @property
    def active(self) -> bool:
        """Whether anything is pruned or skipped at some step."""
        return self.prunes or bool(self.skip_layers)


# ------------------------------------------------------------------------------------------------
# ranking the image tokens
# ------------------------------------------------------------------------------------------------
class Pruner:
    """Ranks a prompt batch's image tokens; higher priority = kept longer.

    Args:
        prompt_embeds: (B, P, D) prompt embeddings (image tokens merged in).
        media: (B, P) bool, True at image token positions.
    """

    uses_attention = False  # needs the attention received at layer K-1 (the plan probes it)
    keeps_none = False  # drops every image token whatever the ratio

    def __init__(self, prompt_embeds: torch.Tensor, media: torch.Tensor) -> None:
        self.media = media

    def priority(self, received: torch.Tensor | None) -> torch.Tensor:
        """(B, P) scores over prompt positions (only image positions are read).

        Args:
            received: (B, >= P) attention received per position at layer K-1, or None.
        """
        raise NotImplementedError


@PRUNERS.register("fastv")
class FastV(Pruner):
    """Keep the image tokens that receive the most attention from the response tokens at layer
    K-1 (FastV, Chen et al. 2024: prune after layer K by the layer-K attention map)."""

    uses_attention = True

    def priority(self, received: torch.Tensor | None) -> torch.Tensor:
        if received is None:
            raise ValueError("fastv needs the attention at layer prune_layer - 1, but none was recorded")
        return received[:, :self.media.shape[1]]


def divprune_order(features: torch.Tensor) -> torch.Tensor:
    """Greedy max-min diversity order of N token features (DivPrune, Alvar et al. 2025, Alg. 1).

    With d(i, j) = 1 - cos(f_i, f_j): the first token is the one farthest from its nearest
    neighbour; each next one maximises its distance to the nearest already-selected token. The
    first k of the order are DivPrune's selection for any budget k.

    Args:
        features: (N, D).

    Returns:
        (N,) long, token indices in selection order.
    """
    f = F.normalize(features.float(), dim=-1)
    dist = 1.0 - f @ f.T  # (N, N)
    N = dist.shape[0]
    if N <= 1:
        return torch.arange(N, device=features.device)
    first = dist.topk(2, dim=0, largest=False).values[1].argmax()  # farthest from its nearest neighbour
    order, nearest = [int(first)], dist[first].clone()  # (N,) distance to the selected set
    for _ in range(N - 1):
        nearest[order[-1]] = -1.0  # never pick a selected token again
        nxt = int(nearest.argmax())
        order.append(nxt)
        nearest = torch.minimum(nearest, dist[nxt])
    return torch.tensor(order, device=features.device)


@PRUNERS.register("divprune")
class DivPrune(Pruner):
    """Keep a maximally diverse subset of the image token embeddings (query-independent, so the
    ranking is computed once per prompt)."""

    def __init__(self, prompt_embeds: torch.Tensor, media: torch.Tensor) -> None:
        super().__init__(prompt_embeds, media)
        B, P = media.shape
        self._priority = torch.zeros(B, P, device=media.device)
        for b in range(B):
            pos = media[b].nonzero().squeeze(-1)  # (N,)
            order = divprune_order(prompt_embeds[b, pos])
            rank = torch.empty_like(order)
            rank[order] = torch.arange(len(order), device=order.device)
            self._priority[b, pos] = (len(order) - rank).float()  # first selected = highest

    def priority(self, received: torch.Tensor | None) -> torch.Tensor:
        return self._priority


@PRUNERS.register("vtw")
class VisualTokenWithdrawal(Pruner):
    """Withdraw every image token from layer K on (VTW, Lin et al. 2024)."""

    keeps_none = True

    def priority(self, received: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros(self.media.shape, device=self.media.device)


def keep_mask(priority: torch.Tensor, media: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, P) bool: every non-image position, and each row's best ``ratio`` of image positions.

    Rows drop the same number of tokens (the decoder runs a rectangular batch): the smallest
    number any row would drop at ``round(ratio * n_images)`` kept.
    """
    n_media = media.sum(-1)  # (B,)
    n_drop = int((n_media - torch.round(ratio * n_media.double()).long()).min())
    score = torch.where(media, priority.float(), torch.full_like(priority, float("-inf"), dtype=torch.float))
    order = score.argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(media.shape[1], device=media.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)  # rank of each position by score
    return ~media | (rank < (n_media - n_drop)[:, None])


# ------------------------------------------------------------------------------------------------
# plans
# ------------------------------------------------------------------------------------------------
class StepPlan(LayerPlan):
    """One decoder call's plan: skip ``skip`` layers; before layer ``prune_layer`` keep the image
    tokens :func:`keep_mask` selects at ``ratio``.

    Args:
        pruner: ranks image tokens (None = no pruning).
        media: (B, P) image positions; prompt positions are the first P of every call.
        n_positions: Tc + T of the call.
        queries: (B, T) weights of the response tokens whose attention FastV reads.
    """

    def __init__(self, *, pruner: Pruner | None, ratio: float, prune_layer: int, skip: frozenset[int],
                 media: torch.Tensor, n_positions: int, queries: torch.Tensor) -> None:
        self.pruner, self.ratio, self.prune_layer, self.skip_set = pruner, ratio, prune_layer, skip
        self.media, self.n_positions, self.queries = media, n_positions, queries

    def skip(self, layer: int) -> bool:
        return layer in self.skip_set

    def probe(self, layer: int) -> torch.Tensor | None:
        wants = self.pruner is not None and self.pruner.uses_attention and layer == self.prune_layer - 1
        return self.queries if wants else None

    def keep(self, layer: int, received: torch.Tensor | None) -> torch.Tensor | None:
        if self.pruner is None or layer != self.prune_layer:
            return None
        keep = keep_mask(self.pruner.priority(received), self.media, self.ratio)  # (B, P)
        return F.pad(keep, (0, self.n_positions - keep.shape[1]), value=True)  # (B, Tc+T)


class LayerPlanner:
    """Turns a :class:`PruningConfig` into per-call :class:`StepPlan` objects for one prompt batch.

    Args:
        config: the settings.
        prompt_embeds: (B, P, D) prompt embeddings (DivPrune reads the image token embeddings).
        media: (B, P) bool image token positions (``embed_prompt(..., return_kinds=True)``).
        n_layers: decoder depth (to check layer indices).
        total_steps: planned denoising steps (the progressive schedule reaches ``keep_ratio`` at
            the last one).
    """

    def __init__(self, config: PruningConfig, *, prompt_embeds: torch.Tensor, media: torch.Tensor, n_layers: int,
                 total_steps: int) -> None:
        layers = (*config.skip_layers, *((config.prune_layer,) if config.prunes else ()))  # K unused otherwise
        bad = [i for i in layers if i >= n_layers]
        if bad:
            raise ValueError(f"layer index {bad[0]} out of range for a decoder of {n_layers} layers")
        if media.shape != prompt_embeds.shape[:2]:
            raise ValueError(f"media mask shape {tuple(media.shape)} does not match the prompt "
                             f"{tuple(prompt_embeds.shape[:2])}")
        self.config, self.media, self.total_steps = config, media.bool(), total_steps
        self.pruner = PRUNERS.get(config.prune)(prompt_embeds, self.media) if config.prunes else None

    def keep_ratio(self, step: int) -> float:
        """Kept fraction of image tokens at ``step`` (1.0 = no pruning)."""
        c = self.config
        if self.pruner is None or step < c.prune_from_step or (c.prune_until_step and step >= c.prune_until_step):
            return 1.0
        target = 0.0 if self.pruner.keeps_none else c.keep_ratio
        if c.prune_schedule == "constant":
            return target
        span = max(1, (c.prune_until_step or self.total_steps) - c.prune_from_step)
        return 1.0 - (1.0 - target) * min(1.0, (step - c.prune_from_step + 1) / span)

    def plan(self, step: int, *, n_cached: int, queries: torch.Tensor) -> StepPlan | None:
        """The plan of one decoder call at denoising ``step``, or None when it changes nothing.

        Args:
            n_cached: Tc, cached positions (the prompt's come first).
            queries: (B, T) weights over the call's new tokens: the response tokens.
        """
        ratio = self.keep_ratio(step)
        skip = frozenset(self.config.skip_layers) if step >= self.config.skip_from_step else frozenset()
        prune = ratio < 1.0 and bool(self.media.any())
        if not prune and not skip:
            return None
        return StepPlan(pruner=self.pruner if prune else None, ratio=ratio, prune_layer=self.config.prune_layer,
                        skip=skip, media=self.media, n_positions=n_cached + queries.shape[1], queries=queries)
