"""Training objectives of the hybrid recipe (Dimple, Yu et al. 2025).

* phase 1, autoregressive: next-token cross-entropy on response tokens under a causal mask;
* phase 2, masked diffusion: mask each response token with probability t ~ U(eps, 1) and minimise
  the negative ELBO of masked diffusion (LLaDA, Nie et al. 2025, Eq. 3 / SFT Eq. 5):
      L = E_t [ (1/t) * sum_{i masked} -log p(x_i | x_t) ] / L_response.
  LaViDa's complementary masking adds a second copy of each sample whose mask is the complement,
  so every response token contributes to the loss once per pair.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ar_loss(logits: torch.Tensor, response: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Next-token loss on the response under a causal mask.

    Args:
        logits: (B, P+L, V) logits of the whole sequence (prompt + response).
        response: (B, L) target response ids.
        prompt_len: P.
    """
    pred = logits[:, prompt_len - 1:-1]  # (B, L, V): position j predicts token j+1
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), response.reshape(-1))


def forward_mask(response: torch.Tensor, *, generator: torch.Generator | None = None, eps: float = 1e-3,
                 complementary: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample the forward (masking) process q(x_t | x_0).

    Args:
        response: (B, L) clean response ids.
        complementary: return 2B rows, the second half masked exactly where the first is not.

    Returns:
        targets (B', L), masked (B', L) bool, t (B',) mask probabilities (B' = B or 2B).
    """
    B, L = response.shape
    t = eps + (1 - eps) * torch.rand(B, generator=generator)  # (B,)
    masked = torch.rand(B, L, generator=generator) < t[:, None]  # (B, L)
    if complementary:
        return torch.cat([response, response]), torch.cat([masked, ~masked]), torch.cat([t, 1 - t])
    return response, masked, t


def diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Masked-diffusion negative ELBO: CE on masked tokens weighted by 1/t, averaged per token.

    Args:
        logits: (B, L, V) response logits (aligned: position i predicts token i).
        targets: (B, L) clean ids; masked: (B, L) bool; t: (B,) masking probabilities.
    """
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, L)
    return ((ce * masked) / t[:, None]).sum() / targets.numel()
