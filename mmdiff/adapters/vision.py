"""Vision adapters: patch tokens -> (optional k x k grid pooling) -> projection -> (optional position embedding).

``mlp2x_gelu`` is LLaVA-1.5's projector (Linear -> GELU -> Linear); its ``proj.0`` / ``proj.2`` are
LLaDA-V's ``mm_projector.0`` / ``mm_projector.2``. ``mlp2x_silu`` is the same with SiLU, Dimple's
``img_projector`` (``linear_1`` / ``linear_2``, after Qwen2.5-VL's patch merger). Pooling the grid before projecting is LaViDa's
token compression (2 x 2 there); a 9 x 9 grid pooled 3 x 3 gives one token per cell of a 3 x 3 scene.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import ADAPTERS, AdapterConfig

POS_EMBED_SCALE = 0.5  # std of the initial position embedding: large enough to tell positions apart


@dataclass
class ProjectorConfig(AdapterConfig):
    """A projector's sizes (``mlp2x_gelu``, ``linear``): ``in_dim`` patch tokens -> ``out_dim`` tokens."""

    pool: int = 1  # k x k average pooling of the patch grid before projection (LaViDa: 2)
    grid: tuple[int, int] | None = None  # patch grid (h, w); needed when pool > 1 or pos_embed
    norm: bool = False  # RMS-normalise the projected tokens (before the position embedding)
    pos_embed: bool = False  # learned embedding per output token, N(0, 1) * 0.5 at init

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid is not None:
            self.grid = (int(self.grid[0]), int(self.grid[1]))  # JSON gives a list


class VisionAdapter(nn.Module):
    """Pool the patch grid, project with ``proj``, optionally RMS-normalise, add a learned embedding per output token.

    ``norm`` keeps the visual tokens at a fixed scale (RMS 1 per channel, learned gain) whatever the
    encoder's feature scale. Unnormalised, a jointly trained projector drifts to token norms hundreds
    of times the text embeddings', where the decoder's residual updates can no longer rewrite them.

    Args:
        cfg: sizes (``pool``, ``grid``, ``norm``, ``pos_embed``, ``in_dim``, ``out_dim``).
        proj: maps (..., in_dim) -> (..., out_dim).
    """

    modality, emits, config_class = "image", "embeddings", ProjectorConfig

    def __init__(self, cfg: ProjectorConfig, proj: nn.Module) -> None:
        super().__init__()
        if cfg.pool < 1:
            raise ValueError(f"{cfg.kind}: pool must be >= 1, got {cfg.pool}")
        if (cfg.pool > 1 or cfg.pos_embed) and cfg.grid is None:
            raise ValueError(f"{cfg.kind}: grid (patch grid h, w) is required when pool > 1 or pos_embed")
        if cfg.grid is not None and (cfg.grid[0] % cfg.pool or cfg.grid[1] % cfg.pool):
            raise ValueError(f"{cfg.kind}: grid {cfg.grid} is not divisible by pool {cfg.pool}")
        self.cfg = cfg
        self.proj = proj
        self.norm = nn.RMSNorm(cfg.out_dim, eps=1e-6) if cfg.norm else None
        self.pos_embed = None
        if cfg.pos_embed:
            n_out = (cfg.grid[0] // cfg.pool) * (cfg.grid[1] // cfg.pool)
            self.pos_embed = nn.Parameter(torch.randn(n_out, cfg.out_dim) * POS_EMBED_SCALE)  # (N', out)

    def num_tokens(self, n_in: int) -> int:
        """Output tokens for ``n_in`` input patch tokens."""
        self._check_grid(n_in)
        return n_in // (self.cfg.pool * self.cfg.pool)

    def _check_grid(self, n_in: int) -> None:
        grid = self.cfg.grid
        if grid is not None and n_in != grid[0] * grid[1]:
            raise ValueError(f"{self.cfg.kind}: {n_in} tokens do not form the {grid[0]}x{grid[1]} grid")

    def pool_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """k x k average pooling of row-major patch tokens: (B, h*w, D) -> (B, (h/k)*(w/k), D)."""
        if self.cfg.pool == 1:
            return tokens
        self._check_grid(tokens.shape[1])
        B, N, D = tokens.shape
        x = tokens.transpose(1, 2).reshape(B, D, *self.cfg.grid)  # (B, D, h, w)
        return F.avg_pool2d(x, self.cfg.pool).flatten(2).transpose(1, 2)  # (B, h*w/k^2, D)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, in_dim) patch tokens -> (B, N', out_dim)."""
        self._check_grid(tokens.shape[1])
        x = self.proj(self.pool_grid(tokens))  # (B, N', out_dim)
        if self.norm is not None:
            x = self.norm(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x


@ADAPTERS.register("mlp2x_gelu")
class MLP2xGELU(VisionAdapter):
    """LLaVA-1.5 / LLaDA-V projector: Linear(in, out) -> GELU -> Linear(out, out)."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__(cfg, nn.Sequential(nn.Linear(cfg.in_dim, cfg.out_dim), nn.GELU(),
                                            nn.Linear(cfg.out_dim, cfg.out_dim)))


@ADAPTERS.register("linear")
class LinearAdapter(VisionAdapter):
    """LLaVA-1's projector: one Linear(in, out)."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__(cfg, nn.Linear(cfg.in_dim, cfg.out_dim))



@ADAPTERS.register("mlp2x_silu")
class MLP2xSiLU(VisionAdapter):
    """Dimple's projector (LLaVA's with the LLM's activation, SiLU): Linear(in, out) -> SiLU -> Linear(out, out)."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__(cfg, nn.Sequential(nn.Linear(cfg.in_dim, cfg.out_dim), nn.SiLU(),
                                            nn.Linear(cfg.out_dim, cfg.out_dim)))
