"""Vision towers: image -> patch tokens (B, N, D), as LLaVA's ``multimodal_encoder``.

Following LLaVA (Liu et al. 2023), the tokens are the hidden states of one transformer block
(``layer``, default the second-to-last) *before* the final norm and projection, with the CLS /
prefix tokens removed. Blocks after the chosen one are pruned at build time (they would never
run and never receive a gradient).

Three backends, one registry (:data:`VISION_ENCODERS`):

* ``timm``: any timm ViT (``patch_embed`` + ``forward_intermediates``); sizes can be overridden,
  e.g. the shipped scene encoder is ``vit_tiny_patch16_224`` at 72 px, patch 8, width 128.
* ``timm_cnn``: a timm convolutional backbone read at one feature stage (e.g. EfficientNet-Lite0's stride-16
  map), with frozen BatchNorm statistics.
* ``open_clip``: the vision tower of an open_clip ``VisionTransformer`` config; tokens have the
  tower's *width* (not the CLIP embedding dim, which only exists after pooling and projection).
* ``siglip``: a SigLIP tower (LLaDA-V's), written out in plain torch under transformers' names;
* ``qwen2_5_vl``: Qwen2.5-VL's native-resolution tower (Dimple's), transformers' own module
  (end of this file). Its images keep their aspect ratio, so each gives its own number of tokens:
  ``forward`` returns a list of (N_i, D) tensors and ``token_grids`` the (t, h, w) grid of each.

Weights come from a local file only (``weights``); nothing is downloaded. How a picture becomes the
crops the tower sees (the whole image, or LLaVA-NeXT's ``anyres`` tiles) is the config's ``views``
strategy (:mod:`mmdiff.encoders.views`).
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..io import JsonConfig, load_safetensors, load_state_checked
from ..media import load_image
from ..registry import Registry
from .views import IMAGE_VIEWS, VIEW_POOLS, ImageViews, build_views

logger = logging.getLogger("mmdiff")

VISION_ENCODERS: Registry[type["VisionEncoder"]] = Registry("vision encoder")


@dataclass
class VisionEncoderConfig(JsonConfig):
    """Which backbone, at which size, read from which layer. Saved as JSON with the model."""

    kind: str = "timm"  # backend: timm | open_clip | siglip
    name: str = "vit_tiny_patch16_224"  # timm model, open_clip config or SIGLIP_TOWERS name
    img_size: int | None = None  # input side in pixels (None = model default)
    patch_size: int | None = None  # patch side (None = model default)
    embed_dim: int | None = None  # token width (open_clip: vision ``width``)
    depth: int | None = None  # transformer blocks (open_clip: vision ``layers``)
    num_heads: int | None = None  # attention heads (open_clip: vision ``heads``)
    layer: int = -2  # block whose output is returned; negative counts from the end (LLaVA: -2)
    weights: str | None = None  # local weight file (timm: safetensors/pth; open_clip: CLIP checkpoint)
    views: str = "single"  # how an image becomes crops: single (whole image) | anyres (tiles + base view)
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # anyres: candidate (width, height) canvases, pixels
    max_tiles: int | None = None  # anyres: shrink the tile map to about this many tiles' tokens (anyres_max_N)
    view_pool: str = "none"  # pool each view's projected grid: none | bilinear | average | max (LaViDa: bilinear)
    view_pool_stride: int = 2  # its stride (bilinear: side ceil(side / stride), LLaVA's get_2dPool)

    #: a pretrained tower kept as it is: fine-tuning's default ``--train all`` leaves it frozen and reads its features
    #: once; ``--train vision`` or ``encoders`` trains it. Recipe stages ignore it (their ``train`` lists say what
    #: trains). None: the kind's default (``timm_cnn``: True, else False)
    frozen: bool | None = None
    #: timm_cnn: also hand on each token's cell of the input image itself, average-pooled to p x p and folded into
    #: 3 p^2 channels after the stage's (0: off); what a ViT's patch embedding reads, e.g. colour a deep stage drops
    pixel_cells: int = 0
    min_pixels: int | None = None  # qwen2_5_vl: fewest pixels after the resize (None = the tower's)
    max_pixels: int | None = None  # qwen2_5_vl: most pixels after the resize (None = the tower's)

    def __post_init__(self) -> None:
        self.grid_pinpoints = tuple((int(w), int(h)) for w, h in self.grid_pinpoints)  # JSON gives lists
        if self.frozen is None:
            self.frozen = self.kind == "timm_cnn"  # a released ImageNet tower (see TimmCNNVisionEncoder)
        if self.views not in IMAGE_VIEWS.names():
            raise ValueError(f"unknown image views {self.views!r}; known: {', '.join(IMAGE_VIEWS.names())}")
        if self.view_pool not in VIEW_POOLS:
            raise ValueError(f"unknown view_pool {self.view_pool!r}; known: {', '.join(VIEW_POOLS)}")
        if self.pixel_cells < 0 or (self.pixel_cells and self.kind != "timm_cnn"):
            raise ValueError(f"pixel_cells {self.pixel_cells}: a cell side >= 0, for kind timm_cnn only")
        if self.view_pool_stride < 1:
            raise ValueError(f"view_pool_stride must be >= 1, got {self.view_pool_stride}")

    def overrides(self) -> dict[str, int]:
        """The size fields that are set, under timm's keyword names."""
        sizes = dict(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                     depth=self.depth, num_heads=self.num_heads)
        return {k: v for k, v in sizes.items() if v is not None}




#: Named presets (data). ``mmdiff-scenes`` reads 64 px scenes at 72 px as a 9x9 patch grid.
PRESETS: dict[str, dict] = {
    "tiny-test": dict(kind="timm", name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                      depth=2, num_heads=2),
    "mmdiff-scenes": dict(kind="timm", name="vit_tiny_patch16_224", img_size=72, patch_size=8, embed_dim=128,
                          depth=4, num_heads=4),
}


def preset(name: str, **overrides) -> VisionEncoderConfig:
    """A :class:`VisionEncoderConfig` from a named preset, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"Unknown vision encoder preset {name!r}; known: {sorted(PRESETS)}")
    return VisionEncoderConfig(**{**PRESETS[name], **overrides})


def build_vision_encoder(cfg: VisionEncoderConfig) -> "VisionEncoder":
    """Build the encoder registered under ``cfg.kind``."""
    return VISION_ENCODERS.get(cfg.kind)(cfg)


def pad_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre ``img`` on a square canvas of colour ``fill`` (LLaVA-1.5's ``expand2square``).

    A later resize + centre crop to a square then keeps the whole image instead of cutting its sides.
    """
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


class VisionEncoder(nn.Module):
    """Images -> patch tokens. Subclasses set ``out_dim``, ``grid``, ``input_size``, ``transform`` and ``mean``.

    Attributes:
        out_dim: token width D.
        grid: patch grid (h, w); ``num_tokens = h * w``.
        input_size: side of the square input in pixels (an ``anyres`` tile).
        views: how an image becomes crops (:mod:`mmdiff.encoders.views`), from ``cfg.views``.
    """

    out_dim: int
    grid: tuple[int, int]
    input_size: int
    transform: Callable[[Image.Image], torch.Tensor]  # the backbone's eval transform
    mean: tuple[float, float, float]  # normalisation mean, also the padding colour
    pad: bool = True  # preprocess pads each image to a square of the mean colour (False: the whole image as is)
    emits: str = "features"  # forward's output: "features" (B, N, out_dim) or "ids" (B, N) codes (encoders.vq)

    def __init__(self, cfg: VisionEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.views: ImageViews = build_views(cfg.views, grid_pinpoints=cfg.grid_pinpoints, max_tiles=cfg.max_tiles,
                                             pool=cfg.view_pool, pool_stride=cfg.view_pool_stride)

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def preprocess(self, images: Sequence[str | Path | Image.Image]) -> torch.Tensor:
        """Load, pad to square (when ``pad``), resize and normalise with the backbone's data config -> (B, 3, H, W)."""
        if not images:
            raise ValueError("preprocess needs at least one image")
        if not self.pad:
            return torch.stack([self.transform(load_image(im)) for im in images])
        fill = tuple(round(255 * m) for m in self.mean)
        return torch.stack([self.transform(pad_to_square(load_image(im), fill)) for im in images])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> patch tokens (B, N, out_dim), no CLS / prefix tokens."""
        raise NotImplementedError


def _resolve_layer(layer: int, depth: int) -> int:
    """Absolute block index of ``layer`` (negative counts from the end) in a ``depth``-block tower."""
    if not -depth <= layer < depth:
        raise ValueError(f"layer {layer} is out of range for a {depth}-block vision tower")
    return layer % depth


def _check_weights(weights: str | None) -> Path | None:
    if weights is None:
        return None
    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"vision encoder weights {path}: file not found (weights are never downloaded)")
    return path


def create_timm_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, an unknown name as one ValueError line."""
    import timm

    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"unknown timm model {name!r}") from None
        raise


def _log_init(cfg: VisionEncoderConfig, path: Path | None) -> None:
    source = f"loaded weights from {path}" if path else "random init"
    logger.info("vision encoder %s:%s: %s", cfg.kind, cfg.name, source)


@VISION_ENCODERS.register("timm")
class TimmVisionEncoder(VisionEncoder):
    """A timm ViT read at block ``cfg.layer`` via ``forward_intermediates``.

    The transform uses the model's data config (mean, std, interpolation) at the model's actual
    input size, with ``crop_pct=1.0`` so nothing is cropped away. Weight files go through timm's
    own loader: classifier-head keys are dropped (``num_classes=0``), position embeddings are
    resampled when ``img_size`` differs from the file's, and the rest is loaded non-strictly.
    """

    def __init__(self, cfg: VisionEncoderConfig) -> None:
        super().__init__(cfg)
        from timm.data import create_transform, resolve_model_data_config

        path = _check_weights(cfg.weights)
        # custom_load=False: some default tags (augreg .npz) route file loads to a numpy loader.
        overlay = dict(file=str(path), custom_load=False) if path else None
        model = create_timm_model(cfg.name, pretrained=path is not None, pretrained_cfg_overlay=overlay,
                                  num_classes=0, **cfg.overrides())
        if not (hasattr(model, "patch_embed") and hasattr(model, "forward_intermediates")):
            raise ValueError(f"timm model {cfg.name!r} is not a ViT with patch_embed and forward_intermediates")
        _log_init(cfg, path)
        self.index = _resolve_layer(cfg.layer, len(model.blocks))
        model.prune_intermediate_layers([self.index], prune_norm=True, prune_head=True)
        self.model = model
        self.grid = tuple(model.patch_embed.grid_size)
        self.input_size = int(model.patch_embed.img_size[0])
        self.out_dim = model.embed_dim
        data = resolve_model_data_config(model)
        data.update(input_size=(3, *model.patch_embed.img_size), crop_pct=1.0, crop_mode="center")
        self.mean = tuple(data["mean"])
        self.transform = create_transform(**data, is_training=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        (tokens,) = self.model.forward_intermediates(pixels, indices=[self.index], intermediates_only=True,
                                                      output_fmt="NLC")  # prefix tokens removed by timm
        return tokens  # (B, N, D)


@VISION_ENCODERS.register("timm_cnn")
class TimmCNNVisionEncoder(VisionEncoder):
    """A timm convolutional backbone (EfficientNet, MobileNet, ResNet, ...) read at one feature stage.

    ``layer`` indexes the backbone's feature stages (``feature_info``; negative counts from the end), e.g.
    ``tf_efficientnet_lite0`` has stages of stride 2, 4, 8, 16, 32 with 16, 24, 40, 112, 320 channels. The stage's
    (B, C, h, w) map, read through ``forward_intermediates`` with the later stages pruned, becomes h * w tokens of
    width C in reading order. ``img_size`` is required (a CNN takes any size; it fixes the grid). The transform is
    the model's data config (mean, std, interpolation) at that size with nothing cropped.

    BatchNorm layers always run in eval mode with their stored statistics (frozen BatchNorm, as detection
    backbones are fine-tuned; Wu & He 2018, "Group Normalization", sec. 2): batches of a few small images would
    corrupt pretrained statistics, and a frozen tower (a recipe stage that does not train ``vision``) must
    not change at all.

    Weights (``weights``): a safetensors file of the whole timm model under timm's names (``mmdiff
    convert-timm-cnn`` writes one from a released state dict); the classifier and the pruned stages' tensors
    are ignored, every kept tensor must be in the file.

    ``pixel_cells`` p > 0 appends to each token the (normalised) input pixels of its cell, average-pooled to
    p x p and folded into 3 p^2 channels by space-to-depth, the fine features YOLOv2's passthrough layer
    concatenates onto a coarse map (Redmon & Farhadi 2017, "YOLO9000", sec. 2) taken from the input itself: what a
    ViT's patch embedding reads (Dosovitskiy et al. 2021). An ImageNet stage at stride 16 is largely invariant to
    brightness and hue shades (navy vs blue, lime vs green: ``bench/results/byod.md``); the cell's pixels keep them.
    Tokens are then ``C + 3 p^2`` wide; there are no new weights.
    """

    def __init__(self, cfg: VisionEncoderConfig) -> None:
        super().__init__(cfg)
        from timm.data import create_transform, resolve_model_data_config

        if cfg.img_size is None:
            raise ValueError(f"timm_cnn {cfg.name!r}: img_size must be set (it fixes the token grid)")
        path = _check_weights(cfg.weights)
        model = create_timm_model(cfg.name, pretrained=False, num_classes=0)
        stages = getattr(model, "feature_info", None)
        if not stages or not hasattr(model, "prune_intermediate_layers") or hasattr(model, "patch_embed"):
            raise ValueError(f"timm model {cfg.name!r} is not a convolutional backbone with feature stages "
                             "(use kind 'timm' for a ViT)")
        self.index = _resolve_layer(cfg.layer, len(stages))
        model.prune_intermediate_layers([self.index], prune_head=True)
        if path is not None:
            state = load_safetensors(path)
            kept = model.state_dict()  # BatchNorm's num_batches_tracked counters are never read in eval mode
            missing = sorted(k for k in kept if k not in state and not k.endswith("num_batches_tracked"))
            if missing:
                raise ValueError(f"{path}: not weights of timm {cfg.name!r}: {len(missing)} tensors missing, e.g. "
                                 f"{missing[0]}")
            load_state_checked(model, {k: state.get(k, v) for k, v in kept.items()}, source=str(path))
        _log_init(cfg, path)
        self.model = model
        self.out_dim = int(stages[self.index]["num_chs"]) + 3 * cfg.pixel_cells ** 2
        self.input_size = int(cfg.img_size)
        data = resolve_model_data_config(model)
        data.update(input_size=(3, self.input_size, self.input_size), crop_pct=1.0, crop_mode="center")
        self.mean = tuple(data["mean"])
        self.transform = create_transform(**data, is_training=False)
        with torch.no_grad():
            h, w = self.model.eval().forward_intermediates(
                torch.zeros(1, 3, self.input_size, self.input_size), indices=[self.index],
                intermediates_only=True)[0].shape[-2:]
        self.grid = (int(h), int(w))
        p = cfg.pixel_cells
        if p and (self.input_size % (self.grid[0] * p) or self.input_size % (self.grid[1] * p)):
            raise ValueError(f"timm_cnn {cfg.name!r}: pixel_cells {p} needs img_size {self.input_size} to split into "
                             f"{self.grid[0]} x {self.grid[1]} cells of {p} x {p} whole pixels")

    def train(self, mode: bool = True) -> "TimmCNNVisionEncoder":
        super().train(mode)
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()  # frozen statistics (see the class docstring)
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        (fmap,) = self.model.forward_intermediates(pixels, indices=[self.index], intermediates_only=True)
        p = self.cfg.pixel_cells
        if p:  # (B, 3, h p, w p) -> (B, 3 p^2, h, w): each cell's pixels beside its features
            h, w = fmap.shape[-2:]
            cells = F.pixel_unshuffle(F.adaptive_avg_pool2d(pixels, (h * p, w * p)), p)
            fmap = torch.cat([fmap, cells.to(fmap.dtype)], dim=1)
        return fmap.flatten(2).transpose(1, 2)  # (B, h * w, C [+ 3 p^2])


@VISION_ENCODERS.register("open_clip")
class OpenClipVisionEncoder(VisionEncoder):
    """The vision tower of an open_clip model, read at block ``cfg.layer``; tokens are ``width`` wide.

    Size fields of ``cfg`` override the config's ``vision_cfg`` (``embed_dim`` -> ``width``,
    ``depth`` -> ``layers``, ``num_heads`` -> ``head_width = width // num_heads``). Only the vision
    tower is kept.
    """

    def __init__(self, cfg: VisionEncoderConfig) -> None:
        super().__init__(cfg)
        import open_clip
        from open_clip.transformer import VisionTransformer

        path = _check_weights(cfg.weights)
        model_cfg = open_clip.get_model_config(cfg.name)
        if model_cfg is None:
            raise ValueError(f"unknown open_clip model config {cfg.name!r}; see open_clip.list_models() "
                             "or register one with open_clip.add_model_config")
        vision_cfg = _open_clip_vision_cfg(model_cfg["vision_cfg"], cfg)
        model, _, transform = open_clip.create_model_and_transforms(
            cfg.name, pretrained=str(path) if path else None, vision_cfg=vision_cfg)
        visual = model.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"open_clip model {cfg.name!r} has a {type(visual).__name__} vision tower; "
                             "only VisionTransformer towers give patch tokens")
        _log_init(cfg, path)
        self.index = _resolve_layer(cfg.layer, len(visual.transformer.resblocks))
        visual.prune_intermediate_layers([self.index], prune_norm=True, prune_head=True)
        self.visual = visual
        self.grid = tuple(visual.grid_size)
        self.input_size = int(visual.image_size[0])
        self.out_dim = visual.transformer.width
        self.mean = tuple(visual.preprocess_cfg["mean"])
        self.transform = transform

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(pixels, indices=[self.index], intermediates_only=True,
                                                output_fmt="NLC")  # CLS token removed by open_clip
        return out["image_intermediates"][0]  # (B, N, width)


def _open_clip_vision_cfg(base: dict, cfg: VisionEncoderConfig) -> dict:
    """open_clip ``vision_cfg`` with the size fields of ``cfg`` applied (open_clip counts heads by width)."""
    names = dict(img_size="image_size", patch_size="patch_size", embed_dim="width", depth="layers")
    out = {**base, **{names[k]: v for k, v in cfg.overrides().items() if k in names}}
    if cfg.num_heads is not None:
        if out["width"] % cfg.num_heads:
            raise ValueError(f"open_clip width {out['width']} is not divisible by num_heads {cfg.num_heads}")
        out["head_width"] = out["width"] // cfg.num_heads
    return out


# ================================================================================================
# SigLIP (Zhai et al. 2023): the vision tower of LLaDA-V / LLaVA-OneVision, in plain torch
# ================================================================================================
#: Released SigLIP towers by Hugging Face repository name (without the owner). ``depth`` counts
#: every block of the released tower; LLaVA drops the last one and reads the block before it
#: (``layer = -2``), so a LLaVA checkpoint stores ``depth - 1`` blocks. ``mlp_dim`` is the MLP width.
SIGLIP_TOWERS: dict[str, dict[str, int]] = {
    "siglip-so400m-patch14-384": dict(img_size=384, patch_size=14, embed_dim=1152, depth=27, num_heads=16,
                                      mlp_dim=4304),
    "siglip2-so400m-patch14-384": dict(img_size=384, patch_size=14, embed_dim=1152, depth=27, num_heads=16,
                                       mlp_dim=4304),
    "siglip-base-patch16-224": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                    mlp_dim=3072),
    "siglip-tiny-test": dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_dim=64),
    # tests/fixtures/lavida-*-tiny: an odd 5 x 5 patch grid, as so400m's 27 x 27 (pooling rounds up)
    "siglip-tiny-lavida-test": dict(img_size=40, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_dim=64),
}
SIGLIP_MEAN = (0.5, 0.5, 0.5)  # SigLIP normalises every channel to [-1, 1]
SIGLIP_STD = (0.5, 0.5, 0.5)
SIGLIP_EPS = 1e-6  # LayerNorm epsilon of every SigLIP tower


class SiglipEmbeddings(nn.Module):
    """Non-overlapping patches -> linear embedding + a learned position embedding; no CLS token."""

    def __init__(self, dim: int, patch_size: int, n_patches: int) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.position_embedding = nn.Embedding(n_patches, dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, D, h, w)
        return x.flatten(2).transpose(1, 2) + self.position_embedding.weight  # (B, h*w, D)


class SiglipAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (all with bias)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"SigLIP width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = (p(x).view(B, N, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, N, hs)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hs), scale hs^-0.5
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))


class SiglipMLP(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=SIGLIP_EPS)
        self.self_attn = SiglipAttention(dim, heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=SIGLIP_EPS)
        self.mlp = SiglipMLP(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def siglip_transform(image: Image.Image, *, size: int) -> torch.Tensor:
    """SigLIP's processor: bicubic resize of the whole image to ``size`` x ``size``, scale to [-1, 1]."""
    x = torch.from_numpy(np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0)
    mean, std = torch.tensor(SIGLIP_MEAN), torch.tensor(SIGLIP_STD)
    return ((x - mean) / std).permute(2, 0, 1)  # (3, size, size)


@VISION_ENCODERS.register("siglip")
class SiglipVisionEncoder(VisionEncoder):
    """A SigLIP tower read at block ``cfg.layer``, with transformers' ``SiglipVisionModel`` names.

    ``cfg.name`` picks a :data:`SIGLIP_TOWERS` entry; the size fields of ``cfg`` override it. Blocks
    after the read one, the final LayerNorm and the pooling head are not built (LLaVA removes them
    too). Parameter names are those of ``SiglipVisionModel.vision_model`` (``embeddings.*``,
    ``encoder.layers.{i}.*``), so a checkpoint maps by prefix. ``preprocess`` resizes the whole image
    without padding: the base view of LLaVA-NeXT's ``anyres`` and SigLIP's own processor.
    ``weights``: a safetensors file of a ``SiglipVisionModel`` / ``SiglipModel`` (names with or
    without the ``vision_model.`` prefix; text-tower tensors are ignored).
    Plain torch only (no buffers), so it can be built on the meta device and loaded by assignment.
    """

    pad = False  # preprocess resizes the whole image (see above)

    def __init__(self, cfg: VisionEncoderConfig) -> None:
        super().__init__(cfg)
        if cfg.name not in SIGLIP_TOWERS:
            raise ValueError(f"unknown SigLIP tower {cfg.name!r}; known: {sorted(SIGLIP_TOWERS)}")
        size = {**SIGLIP_TOWERS[cfg.name], **cfg.overrides()}
        self.index = _resolve_layer(cfg.layer, size["depth"])
        side = size["img_size"] // size["patch_size"]
        self.grid = (side, side)
        self.input_size = size["img_size"]
        self.out_dim = size["embed_dim"]
        self.mean = SIGLIP_MEAN
        self.transform = functools.partial(siglip_transform, size=size["img_size"])
        self.embeddings = SiglipEmbeddings(size["embed_dim"], size["patch_size"], side * side)
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(
            SiglipBlock(size["embed_dim"], size["num_heads"], size["mlp_dim"]) for _ in range(self.index + 1))})
        path = _check_weights(cfg.weights)
        if path is not None:
            self._load_file(path)
        _log_init(cfg, path)

    def _load_file(self, path: Path) -> None:
        """Load the vision tensors of ``path``, minus those of the parts not built."""

        state = load_safetensors(path)
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        load_state_checked(self, {k: v for k, v in state.items() if not self._unbuilt(k)}, source=str(path))

    def _unbuilt(self, name: str) -> bool:
        """Whether a tensor name (``vision_model.`` prefix removed) belongs to a part not built."""
        if name.startswith(("post_layernorm.", "head.")):
            return True
        parts = name.split(".")
        return parts[:2] == ["encoder", "layers"] and int(parts[2]) > self.index

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)  # (B, N, D)
        for block in self.encoder["layers"]:
            x = block(x)
        return x  # (B, N, D): output of block ``index``, before any final norm


# ================================================================================================
# Qwen2.5-VL (Bai et al. 2025): native-resolution tower with window attention (Dimple's)
# ================================================================================================
#: Released Qwen2.5-VL towers: transformers' ``Qwen2_5_VLVisionConfig`` fields, plus the image
#: processor's pixel bounds. ``qwen2.5-vl-7b`` is ``DimpleVisionConfig``'s defaults (Dimple-7B).
QWEN_VL_TOWERS: dict[str, dict] = {
    "qwen2.5-vl-7b": dict(depth=32, hidden_size=1280, hidden_act="silu", intermediate_size=3420, num_heads=16,
                          in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                          out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31]),
    "qwen2.5-vl-tiny-test": dict(depth=3, hidden_size=32, hidden_act="silu", intermediate_size=64, num_heads=2,
                                 in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                                 window_size=56, out_hidden_size=24, fullatt_block_indexes=[1]),
}
QWEN_VL_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, as Qwen2-VL's image processor
QWEN_VL_STD = (0.26862954, 0.26130258, 0.27577711)
QWEN_VL_MIN_PIXELS = 56 * 56  # Qwen2-VL / Dimple image processor defaults
QWEN_VL_MAX_PIXELS = 28 * 28 * 1280


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize target: both sides multiples of ``factor`` (patch * merge), the pixel count
    within [min_pixels, max_pixels], the aspect ratio kept as closely as possible."""
    if height < factor or width < factor:
        raise ValueError(f"image of {width}x{height} px is smaller than the {factor} px the vision tower needs")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {width}x{height} px: aspect ratio above 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


@dataclass
class PatchBatch:
    """Flattened patches of several images (Qwen2-VL's ``pixel_values``) and their patch grids."""

    patches: torch.Tensor  # (sum_i t_i*h_i*w_i, C * temporal * patch * patch)
    grid_thw: torch.Tensor  # (n_images, 3) patch grid (t, h, w) of each image

    def to(self, *args, **kwargs) -> "PatchBatch":
        return PatchBatch(self.patches.to(*args, **kwargs), self.grid_thw.to(kwargs.get("device", self.grid_thw.device)))


@VISION_ENCODERS.register("qwen2_5_vl")
class QwenVLVisionEncoder(VisionEncoder):
    """Qwen2.5-VL's vision tower, transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` (under
    ``visual``, so a checkpoint's ``visual.*`` tensors map by prefix), read after its patch merger.

    ``cfg.name`` picks a :data:`QWEN_VL_TOWERS` entry; ``cfg.min_pixels`` / ``cfg.max_pixels`` bound
    the resize. Each image is resized to multiples of 28 px keeping its aspect ratio
    (:func:`smart_resize`), normalised with CLIP's statistics, repeated over the 2-frame temporal
    patch and cut into 14 px patches in the merger's 2x2 order (Qwen2-VL's image processor); the
    tower gives one token per 2x2 patches. The LLM places the tokens by their (t, h, w) grid
    (:meth:`token_grids`, M-RoPE).
    """

    def __init__(self, cfg: VisionEncoderConfig) -> None:
        super().__init__(cfg)
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        if cfg.name not in QWEN_VL_TOWERS:
            raise ValueError(f"unknown Qwen2.5-VL tower {cfg.name!r}; known: {sorted(QWEN_VL_TOWERS)}")
        if cfg.weights is not None:
            raise ValueError("qwen2_5_vl towers load with their checkpoint (mmdiff.load), not from a weights file")
        self.size = dict(QWEN_VL_TOWERS[cfg.name])
        tower_cfg = Qwen2_5_VLVisionConfig(**self.size)
        tower_cfg._attn_implementation = "sdpa"
        self.visual = Qwen2_5_VisionTransformerPretrainedModel(tower_cfg)
        self.out_dim = self.size["out_hidden_size"]
        self.merge = self.size["spatial_merge_size"]
        self.grid = (0, 0)  # no fixed grid: see token_grids
        self.mean = QWEN_VL_MEAN
        self.min_pixels = cfg.min_pixels or QWEN_VL_MIN_PIXELS
        self.max_pixels = cfg.max_pixels or QWEN_VL_MAX_PIXELS
        _log_init(cfg, None)

    def reset_buffers(self) -> None:
        """Recompute the rotary table (a non-persistent buffer, absent when built on the meta device)."""
        rope = self.visual.rotary_pos_emb
        device = self.visual.patch_embed.proj.weight.device
        inv_freq, _ = rope.compute_axial_rope_parameters(rope.config, device)
        rope.inv_freq, rope.original_inv_freq = inv_freq, inv_freq.clone()

    def _target(self, image: Image.Image) -> tuple[int, int]:
        factor = self.size["patch_size"] * self.merge
        return smart_resize(image.height, image.width, factor=factor, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)

    def token_grids(self, images: Sequence[str | Path | Image.Image]) -> list[tuple[int, int, int]]:
        """The (t, h, w) grid of tokens each image becomes (after the 2x2 merge)."""
        p = self.size["patch_size"] * self.merge
        return [(1, h // p, w // p) for h, w in (self._target(load_image(im)) for im in images)]

    def preprocess(self, images: Sequence[str | Path | Image.Image]) -> PatchBatch:
        """Resize (bicubic), rescale to [0, 1], normalise, patchify as Qwen2-VL's image processor."""
        if not images:
            raise ValueError("preprocess needs at least one image")
        P, T, M = self.size["patch_size"], self.size["temporal_patch_size"], self.merge
        patches, grids = [], []
        for im in images:
            im = load_image(im)
            h, w = self._target(im)
            x = (np.asarray(im.resize((w, h), Image.Resampling.BICUBIC)).astype(np.float64) * (1 / 255)).astype(np.float32)
            x = (x - np.array(QWEN_VL_MEAN, dtype=np.float32)) / np.array(QWEN_VL_STD, dtype=np.float32)
            x = torch.from_numpy(x).permute(2, 0, 1)[None].expand(T, -1, -1, -1)  # (T, C, h, w): a still frame
            gh, gw = h // P, w // P
            x = x.reshape(1, T, 3, gh // M, M, P, gw // M, M, P).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
            patches.append(x.reshape(gh * gw, 3 * T * P * P))  # (gh*gw, C*T*P*P), merger 2x2 units contiguous
            grids.append((1, gh, gw))
        return PatchBatch(torch.cat(patches), torch.tensor(grids))

    def forward(self, pixels: PatchBatch) -> list[torch.Tensor]:
        """Patches of several images -> per image (N_i, out_dim) merged tokens, row-major over its grid."""
        dtype = self.visual.patch_embed.proj.weight.dtype
        out = self.visual(pixels.patches.to(dtype), grid_thw=pixels.grid_thw).pooler_output  # (sum N_i, out_dim)
        sizes = (pixels.grid_thw.prod(-1) // (self.merge * self.merge)).tolist()
        return list(out.split(sizes))
