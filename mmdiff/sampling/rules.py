"""Which masked positions to fix at a step: a score per position and a transfer rule.

* scores (``REMASKING``): how sure the model is of its prediction at each masked position;
  the least sure positions stay masked ("remasked") this step.
* transfer rules (``TRANSFER``): how many top-scoring positions to fix this step.
"""
from __future__ import annotations

import torch

from ..registry import Registry

REMASKING: Registry = Registry("remasking rule")
TRANSFER: Registry = Registry("transfer rule")


# -- scores: (probs (B, L, V), x0 (B, L), generator) -> (B, L); higher = fix sooner ---------------
@REMASKING.register("low_confidence")
def low_confidence(probs: torch.Tensor, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """p(x0_i), the probability of the chosen token (LLaDA, Nie et al. 2025, Alg. 5)."""
    return probs.gather(-1, x0[..., None]).squeeze(-1)


@REMASKING.register("random")
def random_score(probs: torch.Tensor, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform random scores: the original random remasking of MDLM / LLaDA Alg. 4."""
    return torch.rand(x0.shape, generator=generator, device=x0.device)


@REMASKING.register("margin")
def margin(probs: torch.Tensor, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """p_top1 - p_top2 (margin confidence, Kim et al. 2025)."""
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


@REMASKING.register("entropy")
def neg_entropy(probs: torch.Tensor, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """-H(p_i) = sum p log p (entropy-bounded unmasking: low entropy first)."""
    return (probs * probs.clamp(min=1e-12).log()).sum(-1)


# -- transfer rules: (score (B,L) with -inf off-candidates, conf (B,L), k (B,), cfg) -> bool (B,L) ---
def _top_k(score: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean mask of each row's ``k[b]`` highest scores (ties broken by position)."""
    order = score.argsort(dim=-1, descending=True, stable=True)  # (B, L)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))
    return (ranks < k[:, None]) & torch.isfinite(score)


@TRANSFER.register("schedule")
def by_schedule(score: torch.Tensor, conf: torch.Tensor, k: torch.Tensor, *, threshold: float, factor: float) -> torch.Tensor:
    """Fix the ``k`` best-scoring positions that the schedule allots to this step (LLaDA)."""
    return _top_k(score, k)


@TRANSFER.register("threshold")
def by_threshold(score: torch.Tensor, conf: torch.Tensor, k: torch.Tensor, *, threshold: float, factor: float) -> torch.Tensor:
    """Confident decoding (Dimple, Yu et al. 2025): fix every candidate with confidence >= threshold,
    and at least the best one, so each step makes progress."""
    cand = torch.isfinite(score)
    pick = cand & (conf >= threshold)
    return pick | _top_k(score, torch.ones_like(k) * cand.any(-1).long())


@TRANSFER.register("factor")
def by_factor(score: torch.Tensor, conf: torch.Tensor, k: torch.Tensor, *, threshold: float, factor: float) -> torch.Tensor:
    """Fast-dLLM's factor rule (Wu et al. 2025, Thm. 1): with candidates sorted by confidence
    c_1 >= c_2 >= ..., fix the largest n such that (n + 1) * (1 - c_n) < factor (at least one)."""
    cand = torch.isfinite(score)
    c = torch.where(cand, conf, torch.zeros_like(conf)).sort(dim=-1, descending=True).values  # (B, L)
    n = torch.arange(1, c.shape[-1] + 1, device=c.device)[None, :]
    ok = ((n + 1) * (1 - c) < factor) & (c > 0)
    count = ok.long().cumprod(-1).sum(-1).clamp(min=1) * cand.any(-1).long()  # (B,)
    conf_score = torch.where(cand, conf, torch.full_like(conf, float("-inf")))
    return _top_k(conf_score, count)
