"""Image views: how one picture becomes the crops a vision tower encodes, and how their tokens are put
back together into the tokens the picture puts in the prompt.

* ``single``: the whole image, resized to the tower's input (LLaVA-1.5, SigLIP's own processor);
* ``anyres`` (LLaVA-NeXT, Liu et al. 2024; LLaVA-OneVision, Li et al. 2024; LLaDA-V): the image is
  resized and padded onto the grid canvas that keeps most of its pixels
  (:func:`select_best_resolution` over ``grid_pinpoints``), cut into tower-sized tiles, and encoded
  together with a base view (the whole image resized). The tiles' token grids are stitched into one
  feature map, the padding is cut off again (:func:`unpad`), a map larger than ``max_tiles`` tiles'
  worth of tokens is shrunk by bilinear interpolation (``anyres_max_N``), and each of its rows ends
  with the learned ``image_newline`` token (``mm_patch_merge_type: spatial_unpad``). The prompt gets
  the base view's tokens, then the map's, row by row.

Either strategy can first pool each view's projected token grid (``pool``: LLaVA-OneVision's
``get_2dPool`` with ``mm_spatial_pool_mode``; bilinear to ``ceil(side / stride)``, or average / max
pooling), as LaViDa does for every image view (``ALWASY_DO_2DPOOL``: 27 x 27 -> 14 x 14 per view).

The arithmetic is LLaVA-NeXT's ``llava/mm_utils.py`` (``select_best_resolution``,
``resize_and_pad_image``, ``divide_to_patches``, ``process_anyres_image``) and ``llava_arch.py``
(``unpad_image`` and the ``spatial_unpad`` branch of ``prepare_inputs_labels_for_multimodal``);
``tests/test_views.py`` checks it against their code's output recorded as data. Merging runs after the
adapter (LLaVA projects every view, then stitches in the LLM's width), so a strategy is used by
:meth:`mmdiff.model.MultimodalDiffusionLM.image_tokens` around the tower and the adapter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..registry import Registry

IMAGE_VIEWS: Registry[type["ImageViews"]] = Registry("image views")
#: a feature map this much larger than ``max_tiles`` tiles' worth is shrunk (LLaVA's 1.1)
SHRINK_ABOVE = 1.1
#: per-view pooling of the projected token grid (LLaVA's ``mm_spatial_pool_mode``; ``none``: off)
VIEW_POOLS: tuple[str, ...] = ("none", "bilinear", "average", "max")


@dataclass(frozen=True)
class Layout:
    """Where an image's views came from: what :meth:`ImageViews.merge` needs to put them together."""

    size: tuple[int, int]  # the original image (width, height)
    tiles: tuple[int, int]  # tile grid (columns, rows); (0, 0) for a single view


class ImageViews:
    """One picture -> crops for the tower; the crops' tokens -> the picture's tokens.

    Args:
        grid_pinpoints: candidate canvases (width, height) in pixels (anyres).
        max_tiles: shrink the stitched map to about this many tiles' worth of tokens (anyres_max_N).
        pool: pooling of each view's projected token grid before merging (:data:`VIEW_POOLS`).
        pool_stride: its stride (bilinear: output side ``ceil(side / pool_stride)``).
    """

    single = True  # one view per image: the tower and adapter run on a batch of images at once

    def __init__(self, *, grid_pinpoints: Sequence[tuple[int, int]] = (), max_tiles: int | None = None,
                 pool: str = "none", pool_stride: int = 2) -> None:
        self.grid_pinpoints = [tuple(int(v) for v in p) for p in grid_pinpoints]
        self.max_tiles = max_tiles
        if pool not in VIEW_POOLS:
            raise ValueError(f"unknown view pooling {pool!r}; known: {', '.join(VIEW_POOLS)}")
        if pool_stride < 1:
            raise ValueError(f"view pooling stride must be >= 1, got {pool_stride}")
        self.pool, self.pool_stride = pool, pool_stride

    def pool_views(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """(V, h*w, D) view tokens on a row-major ``grid`` (h, w) -> pooled (V, h'*w', D) and (h', w')
        (LLaVA-OneVision's ``get_2dPool``; unchanged when ``pool`` is ``none``)."""
        if self.pool == "none":
            return tokens, grid
        V, _, D = tokens.shape
        x = tokens.view(V, *grid, D).permute(0, 3, 1, 2)  # (V, D, h, w)
        if self.pool == "average":
            x = F.avg_pool2d(x, self.pool_stride)
        elif self.pool == "max":
            x = F.max_pool2d(x, self.pool_stride)
        else:
            h, w = grid
            x = F.interpolate(x, size=[math.ceil(h / self.pool_stride), math.ceil(w / self.pool_stride)],
                              mode="bilinear")
        return x.flatten(2).transpose(1, 2), tuple(x.shape[2:])

    def split(self, image: Image.Image, *, tile: int) -> tuple[list[Image.Image], Layout]:
        """The crops to encode (each resized to ``tile`` x ``tile`` by the tower's preprocessing)."""
        return [image], Layout(image.size, (0, 0))

    def merge(self, tokens: torch.Tensor, layout: Layout, *, grid: tuple[int, int],
              newline: torch.Tensor | None) -> torch.Tensor:
        """(V, N, D) tokens of the views (after the adapter) -> (M, D), the image's prompt tokens."""
        return self.pool_views(tokens, grid)[0][0]

    def num_tokens(self, size: tuple[int, int], *, tile: int, grid: tuple[int, int], n_per_view: int) -> int:
        """Prompt tokens of an image of ``size`` (width, height), without running the tower."""
        if self.single and self.pool == "none":
            return n_per_view
        crops, layout = self.split(Image.new("RGB", size), tile=tile)
        dummy = torch.zeros(len(crops), n_per_view, 1)  # the merge only moves and resizes tokens
        return self.merge(dummy, layout, grid=grid, newline=torch.zeros(1)).shape[0]


IMAGE_VIEWS.register("single")(ImageViews)


@IMAGE_VIEWS.register("anyres")
class AnyResViews(ImageViews):
    """LLaVA-NeXT / OneVision ``anyres`` (``anyres_max_N``) with ``spatial_unpad`` merging (module docstring)."""

    single = False

    def __init__(self, *, grid_pinpoints: Sequence[tuple[int, int]] = (), max_tiles: int | None = None,
                 pool: str = "none", pool_stride: int = 2) -> None:
        super().__init__(grid_pinpoints=grid_pinpoints, max_tiles=max_tiles, pool=pool, pool_stride=pool_stride)
        if not self.grid_pinpoints:
            raise ValueError("anyres views need grid_pinpoints: the candidate (width, height) canvases")
        if max_tiles is not None and max_tiles < 1:
            raise ValueError(f"anyres max_tiles must be >= 1, got {max_tiles}")

    def split(self, image: Image.Image, *, tile: int) -> tuple[list[Image.Image], Layout]:
        """Base view (the whole image), then the tiles of its padded canvas, row by row."""
        if any(w % tile or h % tile for w, h in self.grid_pinpoints):
            raise ValueError(f"grid_pinpoints {self.grid_pinpoints} are not multiples of the tower's {tile}-pixel "
                             "input: every canvas must cut into whole tiles")
        width, height = select_best_resolution(image.size, self.grid_pinpoints)
        canvas = resize_and_pad(image, (width, height))
        tiles = [canvas.crop((x, y, x + tile, y + tile)) for y in range(0, height, tile) for x in range(0, width, tile)]
        return [image, *tiles], Layout(image.size, (width // tile, height // tile))

    def merge(self, tokens: torch.Tensor, layout: Layout, *, grid: tuple[int, int],
              newline: torch.Tensor | None) -> torch.Tensor:
        """Base tokens, then the stitched, unpadded (and shrunk) tile map with ``newline`` ending each row
        (every view's grid pooled first when ``pool`` is set)."""
        if newline is None:
            raise ValueError("anyres views need the adapter's image_newline token (ProjectorConfig.newline)")
        tokens, grid = self.pool_views(tokens, grid)
        h, w = grid
        cols, rows = layout.tiles
        base, tiles = tokens[0], tokens[1:]  # (N, D), (rows*cols, N, D)
        D = tokens.shape[-1]
        x = tiles.view(rows, cols, h, w, D).permute(4, 0, 2, 1, 3).reshape(D, rows * h, cols * w)  # (D, H, W)
        x = unpad(x, layout.size)
        if self.max_tiles is not None:
            H, W = x.shape[1:]
            times = math.sqrt(H * W / (self.max_tiles * h * h))
            if times > SHRINK_ABOVE:
                x = F.interpolate(x[None], [int(H // times), int(W // times)], mode="bilinear")[0]
        x = torch.cat([x, newline.to(x)[:, None, None].expand(D, x.shape[1], 1)], dim=2)  # (D, H', W' + 1)
        return torch.cat([base, x.flatten(1).transpose(0, 1)], dim=0)  # (N + H' (W' + 1), D)


def build_views(kind: str, *, grid_pinpoints: Sequence[tuple[int, int]] = (), max_tiles: int | None = None,
                pool: str = "none", pool_stride: int = 2) -> ImageViews:
    """The views strategy registered under ``kind`` (``single``, ``anyres``), with per-view ``pool``."""
    return IMAGE_VIEWS.get(kind)(grid_pinpoints=grid_pinpoints, max_tiles=max_tiles, pool=pool,
                                 pool_stride=pool_stride)


# ------------------------------------------------------------------------------------------------
# LLaVA-NeXT's geometry (llava/mm_utils.py, llava_arch.py)
# ------------------------------------------------------------------------------------------------
def select_best_resolution(size: tuple[int, int], candidates: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The canvas (width, height) that shows most of the image's pixels once it is scaled to fit, the
    least wasted canvas breaking ties (LLaVA-NeXT's ``select_best_resolution``)."""
    width, height = size
    best, best_effective, best_waste = None, 0, math.inf
    for cw, ch in candidates:
        scale = min(cw / width, ch / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = cw * ch - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (cw, ch), effective, waste
    return best


def resize_and_pad(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Scale ``image`` to fit ``target`` (width, height) keeping its aspect ratio (bicubic), centred on
    black (LLaVA-NeXT's ``resize_and_pad_image``)."""
    width, height = image.size
    tw, th = target
    if tw / width < th / height:
        nw, nh = tw, min(math.ceil(height * tw / width), th)
    else:
        nw, nh = min(math.ceil(width * th / height), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((nw, nh), Image.Resampling.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def unpad(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Cut the rows (or columns) of a (C, H, W) feature map that only saw :func:`resize_and_pad`'s
    padding of an image of ``size`` (width, height) (LLaVA-NeXT's ``unpad_image``)."""
    width, height = size
    H, W = x.shape[1:]
    if width / height > W / H:  # padded above and below
        pad = (H - int(height * (W / width))) // 2
        return x[:, pad:H - pad, :]
    pad = (W - int(width * (H / height))) // 2
    return x[:, :, pad:W - pad]
