"""Vision adapters: patch tokens -> (optional k x k grid pooling) -> projection -> (optional position embedding).

``mlp2x_gelu`` is LLaVA-1.5's projector (Linear -> GELU -> Linear); its ``proj.0`` / ``proj.2`` are
LLaDA-V's ``mm_projector.0`` / ``mm_projector.2``. ``mlp2x_silu`` is the same with SiLU, Dimple's
``img_projector`` (``linear_1`` / ``linear_2``, after Qwen2.5-VL's patch merger). Pooling the grid before projecting is LaViDa's
token compression (2 x 2 there); a 9 x 9 grid pooled 3 x 3 gives one token per cell of a 3 x 3 scene.
``vq_ids`` places a discrete tokenizer's codes (:mod:`mmdiff.encoders.vq`) in the decoder's vocabulary.
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
    newline: bool = False  # a learned image_newline token ending each row of a tiled image (anyres views)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid is not None:
            self.grid = (int(self.grid[0]), int(self.grid[1]))  # JSON gives a list


class VisionAdapter(nn.Module):
    """Pool the patch grid, project with ``proj``, optionally RMS-normalise, add a learned embedding per output token.

    With ``newline`` it also holds the ``image_newline`` token that tiled (``anyres``) views put at the
    end of every row of their stitched feature map (:mod:`mmdiff.encoders.views`).

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
        self.image_newline = None  # (out_dim,): LLaVA-NeXT's row separator, N(0, 1/out_dim) at init as there
        if cfg.newline:
            self.image_newline = nn.Parameter(torch.randn(cfg.out_dim) * cfg.out_dim ** -0.5)
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



@dataclass
class VQTokensConfig(AdapterConfig):
    """How a discrete image tokenizer's codes enter the decoder's vocabulary (``vq_ids``).

    ``in_dim`` is the codebook size, ``out_dim`` the decoder width. Code ``c`` becomes vocabulary id
    ``offset + c``; the image's ids are wrapped in ``prefix_ids`` ... ``suffix_ids`` (Show-o / MMaDA:
    ``<|mmu|> <|soi|>`` ... ``<|eoi|>``, which the model was trained to see around every image).
    """

    offset: int = 0  # vocabulary id of code 0 (MMaDA: the text tokenizer's length)
    prefix_ids: tuple[int, ...] = ()  # vocabulary ids before the image's codes
    suffix_ids: tuple[int, ...] = ()  # vocabulary ids after them

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prefix_ids, self.suffix_ids = tuple(map(int, self.prefix_ids)), tuple(map(int, self.suffix_ids))

    def resolve(self, decoder) -> "VQTokensConfig":
        """Check that every id falls inside the decoder's vocabulary."""
        top = self.offset + self.in_dim
        if self.offset < 0 or top > decoder.vocab_size:
            raise ValueError(f"vq_ids: codes at ids {self.offset}..{top - 1} do not fit the decoder's "
                             f"{decoder.vocab_size}-token vocabulary")
        bad = [i for i in (*self.prefix_ids, *self.suffix_ids) if not 0 <= i < decoder.vocab_size]
        if bad:
            raise ValueError(f"vq_ids: marker ids {bad} are outside the decoder's {decoder.vocab_size}-token vocabulary")
        if self.out_dim != decoder.d_model:
            raise ValueError(f"vq_ids: out_dim {self.out_dim} differs from the decoder width {decoder.d_model}")
        return self


@ADAPTERS.register("vq_ids")
class VQTokens(nn.Module):
    """Image code ids (B, N) -> vocabulary ids (B, len(prefix) + N + len(suffix)); no parameters.

    ``emits = "ids"``: the model embeds them with the decoder's own token table, exactly as if the
    ids had been typed in the prompt (how MMaDA and Show-o see an image).
    """

    modality, emits, config_class = "image", "ids", VQTokensConfig

    def __init__(self, cfg: VQTokensConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def num_tokens(self, n_in: int) -> int:
        return len(self.cfg.prefix_ids) + n_in + len(self.cfg.suffix_ids)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, N) long codes in [0, in_dim) -> (B, N') long vocabulary ids."""
        if codes.dtype != torch.long:
            raise ValueError(f"vq_ids takes integer code ids, got a {codes.dtype} tensor (a feature encoder's output?)")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cfg.in_dim):
            raise ValueError(f"vq_ids: codes outside the {self.cfg.in_dim}-entry codebook")
        B = codes.shape[0]
        prefix = torch.tensor(self.cfg.prefix_ids, dtype=torch.long, device=codes.device).expand(B, -1)
        suffix = torch.tensor(self.cfg.suffix_ids, dtype=torch.long, device=codes.device).expand(B, -1)
        return torch.cat([prefix, codes + self.cfg.offset, suffix], dim=1)  # (B, N')


@ADAPTERS.register("mlp2x_silu")
class MLP2xSiLU(VisionAdapter):
    """Dimple's projector (LLaVA's with the LLM's activation, SiLU): Linear(in, out) -> SiLU -> Linear(out, out)."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__(cfg, nn.Sequential(nn.Linear(cfg.in_dim, cfg.out_dim), nn.SiLU(),
                                            nn.Linear(cfg.out_dim, cfg.out_dim)))
