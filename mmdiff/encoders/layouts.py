"""Image layouts: how one image becomes the views a vision tower reads, and how the views' projected
tokens are arranged into the image's token sequence.

One layout so far, LLaVA-NeXT's ``anyres`` (Liu et al. 2024, "LLaVA-NeXT: Improved reasoning, OCR,
and world knowledge"; LLaVA-OneVision, Li et al. 2024), in the ``spatial_unpad`` arrangement that
LaViDa (Li et al. 2025, §3.1) and LLaDA-V use:

1. views (:meth:`AnyresLayout.views`): the whole image resized to the tower's input (the base view),
   then the image resized to fit the best of the ``grid_pinpoints`` canvases (aspect ratio kept,
   black padding) and cut into tower-sized tiles, row by row;
2. tokens (:meth:`AnyresLayout.arrange`), from each view's projected patch grid: an optional 2-D
   pooling per view (LaViDa: bilinear, stride 2, so a 27 x 27 grid becomes 14 x 14), the base view's
   tokens, then the tiles' grids joined into one map, the rows and columns that only show padding
   cut away (``unpad``), and a learned ``image_newline`` token after each row.

The tiling and the unpadding repeat the integer arithmetic of LLaVA-NeXT's ``mm_utils`` /
``llava_arch`` (``select_best_resolution``, ``resize_and_pad_image``, ``divide_to_patches``,
``unpad_image``), so the token count and order are those of the released models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..io import JsonConfig
from ..registry import Registry

IMAGE_LAYOUTS: Registry[Callable[..., "AnyresLayout"]] = Registry("image layout")
POOL_MODES: tuple[str, ...] = ("none", "bilinear", "average", "max")  # LLaVA's mm_spatial_pool_mode values


@dataclass
class ImageLayoutConfig(JsonConfig):
    """Views and token arrangement of one image. Saved as JSON with the model."""

    kind: str = "anyres"  # layout: anyres
    grid_pinpoints: list[tuple[int, int]] = field(default_factory=list)  # tile canvases (width, height), px
    pool: str = "none"  # 2-D pooling of each view's projected grid: none | bilinear | average | max
    pool_stride: int = 2  # pooling stride (bilinear: output side ceil(side / stride))
    unpad: bool = True  # cut the tile map's padding rows/columns (LLaVA's spatial_unpad)
    newline: bool = True  # a learned image_newline token after each row of the tile map

    def __post_init__(self) -> None:
        self.grid_pinpoints = [tuple(int(v) for v in p) for p in self.grid_pinpoints]  # JSON gives lists
        if self.pool not in POOL_MODES:
            raise ValueError(f"image layout pool {self.pool!r} not in {POOL_MODES}")
        if self.pool_stride < 1:
            raise ValueError(f"image layout pool_stride must be >= 1, got {self.pool_stride}")
        if self.kind == "anyres" and not self.grid_pinpoints:
            raise ValueError("an anyres image layout needs grid_pinpoints, the (width, height) tile canvases")


def build_image_layout(cfg: ImageLayoutConfig, dim: int) -> "AnyresLayout":
    """The layout registered under ``cfg.kind``, for ``dim``-wide (decoder-space) tokens."""
    return IMAGE_LAYOUTS.get(cfg.kind)(cfg, dim)


# ------------------------------------------------------------------------------------------------
# anyres tiling (pixels): LLaVA-NeXT mm_utils
# ------------------------------------------------------------------------------------------------
def select_best_resolution(size: tuple[int, int], candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """The canvas (width, height) that keeps the most of an image of ``size`` (width, height) when it
    is scaled to fit, and wastes the least canvas among those that keep as much."""
    w, h = size
    best, best_kept, best_waste = None, 0, float("inf")
    for cw, ch in candidates:
        scale = min(cw / w, ch / h)
        kept = min(int(w * scale) * int(h * scale), w * h)
        waste = cw * ch - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (cw, ch), kept, waste
    return best


def resize_and_pad(image: Image.Image, canvas: tuple[int, int]) -> Image.Image:
    """Scale ``image`` to fit ``canvas`` (width, height), aspect ratio kept (bicubic), centred on black."""
    w, h = image.size
    cw, ch = canvas
    scale_w, scale_h = cw / w, ch / h
    if scale_w < scale_h:  # (products in this order: the float rounding, and so the ceil, are LLaVA's)
        nw, nh = cw, min(math.ceil(h * scale_w), ch)
    else:
        nw, nh = min(math.ceil(w * scale_h), cw), ch
    out = Image.new("RGB", (cw, ch), (0, 0, 0))
    out.paste(image.resize((nw, nh), Image.Resampling.BICUBIC), ((cw - nw) // 2, (ch - nh) // 2))
    return out


def divide(image: Image.Image, side: int) -> list[Image.Image]:
    """Row-major ``side`` x ``side`` tiles of ``image``."""
    w, h = image.size
    return [image.crop((x, y, x + side, y + side)) for y in range(0, h, side) for x in range(0, w, side)]


def unpad(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(D, H, W) token map of a padded canvas -> the rows or columns that show the image of ``size``
    (width, height), as LLaVA-NeXT's ``unpad_image`` (same integer rounding)."""
    w, h = size
    H, W = tokens.shape[1:]
    if w / h > W / H:  # padding was added above and below
        pad = (H - int(h * (W / w))) // 2
        return tokens[:, pad:H - pad, :]
    pad = (W - int(w * (H / h))) // 2  # padding left and right
    return tokens[:, :, pad:W - pad]


def pool_grid(x: torch.Tensor, mode: str, stride: int) -> torch.Tensor:
    """(V, D, h, w) -> pooled (V, D, h', w'), as LLaVA-OneVision's ``get_2dPool`` (bilinear: ceil(side/stride))."""
    if mode == "none":
        return x
    if mode == "average":
        return F.avg_pool2d(x, stride)
    if mode == "max":
        return F.max_pool2d(x, stride)
    h, w = x.shape[2:]
    return F.interpolate(x, size=[math.ceil(h / stride), math.ceil(w / stride)], mode="bilinear")


@IMAGE_LAYOUTS.register("anyres")
class AnyresLayout(nn.Module):
    """LLaVA-NeXT ``anyres`` + ``spatial_unpad``: base view, then the unpadded tile map with row ends.

    Args:
        cfg: pinpoints, pooling, unpadding, newline.
        dim: token width (the decoder's); the ``image_newline`` parameter has this size.
    """

    def __init__(self, cfg: ImageLayoutConfig, dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_newline = nn.Parameter(torch.zeros(dim)) if cfg.newline else None  # (D,)

    def views(self, image: Image.Image, side: int) -> tuple[list[Image.Image], tuple[int, int]]:
        """The base view (the whole image; the tower's transform resizes it) and the tiles of the best
        canvas, with the tile grid (columns, rows).

        Args:
            image: an RGB image.
            side: the tower's input side in pixels (tile side).
        """
        canvas = select_best_resolution(image.size, self.cfg.grid_pinpoints)
        tiles = divide(resize_and_pad(image, canvas), side)
        return [image, *tiles], (canvas[0] // side, canvas[1] // side)

    def arrange(self, feats: torch.Tensor, grid: tuple[int, int], patch_grid: tuple[int, int],
                size: tuple[int, int]) -> torch.Tensor:
        """Projected view tokens -> the image's token sequence.

        Args:
            feats: (1 + cols*rows, h*w, D) tokens of the base view and the tiles (row-major patches).
            grid: tile grid (columns, rows), from :meth:`views`.
            patch_grid: the tower's patch grid (h, w).
            size: the image's (width, height).

        Returns:
            (N, D): base tokens, then the tile map (unpadded), each row followed by ``image_newline``.
        """
        V, _, D = feats.shape
        x = feats.view(V, *patch_grid, D).permute(0, 3, 1, 2)  # (V, D, h, w)
        x = pool_grid(x, self.cfg.pool, self.cfg.pool_stride).permute(0, 2, 3, 1)  # (V, h', w', D)
        base = x[0].flatten(0, 1)  # (h'*w', D)
        if V == 1:  # no tiles: the base view, then one newline
            return base if self.image_newline is None else torch.cat([base, self.image_newline[None].to(base)])
        cols, rows = grid
        h, w = x.shape[1:3]
        tiles = x[1:].reshape(rows, cols, h, w, D).permute(4, 0, 2, 1, 3).reshape(D, rows * h, cols * w)
        if self.cfg.unpad:
            tiles = unpad(tiles, size)  # (D, H', W')
        if self.image_newline is not None:
            ends = self.image_newline[:, None, None].expand(D, tiles.shape[1], 1).to(tiles)
            tiles = torch.cat([tiles, ends], dim=2)  # (D, H', W'+1)
        return torch.cat([base, tiles.flatten(1).transpose(0, 1)])  # (N, D)
