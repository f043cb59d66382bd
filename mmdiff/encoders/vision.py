"""Vision towers: image -> patch tokens (B, N, D), as LLaVA's ``multimodal_encoder``.

Following LLaVA (Liu et al. 2023), the tokens are the hidden states of one transformer block
(``layer``, default the second-to-last) *before* the final norm and projection, with the CLS /
prefix tokens removed. Blocks after the chosen one are pruned at build time (they would never
run and never receive a gradient).

Three backends, one registry (:data:`VISION_ENCODERS`):

* ``timm``: any timm ViT (``patch_embed`` + ``forward_intermediates``); sizes can be overridden,
  e.g. the shipped scene encoder is ``vit_tiny_patch16_224`` at 72 px, patch 8, width 128.
* ``open_clip``: the vision tower of an open_clip ``VisionTransformer`` config; tokens have the
  tower's *width* (not the CLIP embedding dim, which only exists after pooling and projection).
* ``siglip``: a SigLIP tower (LLaDA-V's), written out in plain torch under transformers' names
  (end of this file).

Weights come from a local file only (``weights``); nothing is downloaded.
"""
from __future__ import annotations

import functools
import logging
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
        input_size: side of the (square) input in pixels (an ``anyres`` tile's side).
    """

    out_dim: int
    grid: tuple[int, int]
    input_size: int
    transform: Callable[[Image.Image], torch.Tensor]  # the backbone's eval transform
    mean: tuple[float, float, float]  # normalisation mean, also the padding colour

    def __init__(self, cfg: VisionEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def preprocess(self, images: Sequence[str | Path | Image.Image]) -> torch.Tensor:
        """Load, pad to square, resize and normalise with the backbone's data config -> (B, 3, H, W)."""
        if not images:
            raise ValueError("preprocess needs at least one image")
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
        import timm
        from timm.data import create_transform, resolve_model_data_config

        path = _check_weights(cfg.weights)
        # custom_load=False: some default tags (augreg .npz) route file loads to a numpy loader.
        overlay = dict(file=str(path), custom_load=False) if path else None
        try:
            model = timm.create_model(cfg.name, pretrained=path is not None, pretrained_cfg_overlay=overlay,
                                      num_classes=0, **cfg.overrides())
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ValueError(f"unknown timm model {cfg.name!r}") from None
            raise
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
        self.input_size = int(visual.image_size[0])  # (h, w)
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

    def preprocess(self, images: Sequence[str | Path | Image.Image]) -> torch.Tensor:
        """Load and resize each whole image (no padding), normalise -> (B, 3, H, W)."""
        if not images:
            raise ValueError("preprocess needs at least one image")
        return torch.stack([self.transform(load_image(im)) for im in images])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)  # (B, N, D)
        for block in self.encoder["layers"]:
            x = block(x)
        return x  # (B, N, D): output of block ``index``, before any final norm
