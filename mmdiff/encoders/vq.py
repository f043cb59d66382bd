"""Discrete image tokenizers: image -> code ids (B, N), which the decoder embeds with its own table.

MAGVIT-v2 (Yu et al. 2024, "Language Model Beats Diffusion -- Tokenizer is Key to Visual Generation",
arXiv:2310.05737) as trained by Show-o (Xie et al. 2024) and read by MMaDA (Yang et al. 2025):

* a convolutional VQGAN encoder (Esser et al. 2021): ``conv_in``, per level ``num_res_blocks``
  ResNet blocks (GroupNorm(32) -> swish -> 3x3 conv, twice, plus a 1x1 shortcut when the width
  changes), self-attention blocks at the resolutions listed in ``attn_resolutions``, a stride-2 3x3
  conv (right/bottom zero padding) between levels; a middle ResNet -> attention -> ResNet; GroupNorm
  -> swish -> ``conv_out`` to ``z_channels``; a 1x1 ``quant_conv``;
* lookup-free quantisation (LFQ, the paper's Eq. 5): each of the ``z_channels = d`` latent channels
  becomes one bit, ``z > 0``; the code of a latent position is ``sum_j bit_j * 2^(d-1-j)`` (channel 0
  is the most significant bit), so the codebook has ``2^d`` entries and no stored vectors.

Codes are read row-major over the latent grid. Module names follow the released encoder
(``encoder.down.{i}.block.{j}.conv1`` ...), so a checkpoint maps by prefix. The decoder half of the
VQ model (image generation) is not built. Plain torch, no buffers: builds on the meta device.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .vision import VISION_ENCODERS, VisionEncoder, VisionEncoderConfig, _check_weights, _log_init

#: MAGVIT-v2 tokenizers by name: encoder sizes and the LFQ code width ``codebook_dim`` (= z_channels).
#: ``magvitv2`` is ``showlab/magvitv2`` (Show-o's, used by MMaDA): its class hard-codes these sizes.
MAGVIT2_TOKENIZERS: dict[str, dict] = {
    "magvitv2": dict(ch=128, ch_mult=(1, 2, 2, 4, 4), num_res_blocks=(4, 3, 4, 3, 4), attn_resolutions=(5,),
                     resolution=256, z_channels=13),
    "magvitv2-tiny-test": dict(ch=32, ch_mult=(1, 1), num_res_blocks=(1, 1), attn_resolutions=(8,), resolution=16,
                               z_channels=6),
}
VQ_MEAN = (0.5, 0.5, 0.5)  # Show-o / MMaDA normalise pixels to [-1, 1]
VQ_STD = (0.5, 0.5, 0.5)
GROUPS = 32  # GroupNorm groups of every VQGAN norm
GN_EPS = 1e-6


def _norm(channels: int) -> nn.GroupNorm:
    if channels % GROUPS:
        raise ValueError(f"VQGAN width {channels} is not a multiple of the {GROUPS} GroupNorm groups")
    return nn.GroupNorm(GROUPS, channels, eps=GN_EPS, affine=True)


class ResnetBlock(nn.Module):
    """x + conv2(swish(GN(conv1(swish(GN(x)))))), with a 1x1 ``nin_shortcut`` on x when the width changes."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, 1x1-conv projections, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (p(h).flatten(2).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C), scale C^-0.5
        return x + self.proj_out(out.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero padding one column right and one row below (taming's asymmetric pad)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class VQGANEncoder(nn.Module):
    """Pixels (B, 3, H, W) in [-1, 1] -> latents (B, z_channels, H / 2^(L-1), W / 2^(L-1))."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: Sequence[int],
                 attn_resolutions: Sequence[int], resolution: int, z_channels: int) -> None:
        super().__init__()
        if len(num_res_blocks) != len(ch_mult):
            raise ValueError(f"num_res_blocks {list(num_res_blocks)} needs one entry per level of ch_mult "
                             f"{list(ch_mult)}")
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        widths = [ch] + [ch * m for m in ch_mult]
        self.down = nn.ModuleList()
        res = resolution
        for level, n_blocks in enumerate(num_res_blocks):
            stage = nn.Module()
            stage.block = nn.ModuleList(ResnetBlock(widths[level] if j == 0 else widths[level + 1], widths[level + 1])
                                        for j in range(n_blocks))
            stage.attn = nn.ModuleList(AttnBlock(widths[level + 1]) for _ in range(n_blocks if res in attn_resolutions
                                                                                    else 0))
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(widths[level + 1])
                res //= 2
            self.down.append(stage)
        c = widths[-1]
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for j, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[j](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))  # (B, z, h, w)


def lfq_codes(z: torch.Tensor) -> torch.Tensor:
    """Lookup-free quantisation (MAGVIT-v2 Eq. 5): latents (B, d, h, w) -> codes (B, h*w) in [0, 2^d).

    Bit j of a position is ``z_j > 0`` (zero counts as the -1 side); channel 0 is the most
    significant bit. Integer arithmetic, so the codes are exact whatever the latent dtype.
    """
    d = z.shape[1]
    powers = 2 ** torch.arange(d - 1, -1, -1, device=z.device, dtype=torch.long)  # (d,)
    bits = (z > 0).long()  # (B, d, h, w)
    return (bits * powers.view(1, d, 1, 1)).sum(1).flatten(1)  # (B, h*w)


def resize_center_crop(image: Image.Image, *, size: int) -> np.ndarray:
    """Bicubic resize of the shorter side to ``size`` (the longer one truncated as torchvision's
    ``Resize(int)``), then the centred ``size`` x ``size`` crop (torchvision's rounding) -> (size, size, 3) uint8."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def vq_transform(image: Image.Image, *, size: int) -> torch.Tensor:
    """MMaDA's ``image_transform``: resize the shorter side, centre crop, scale to [-1, 1] -> (3, size, size)."""
    x = torch.from_numpy(resize_center_crop(image, size=size).astype(np.float32) / 255.0)
    mean, std = torch.tensor(VQ_MEAN), torch.tensor(VQ_STD)
    return ((x - mean) / std).permute(2, 0, 1)


@VISION_ENCODERS.register("magvit2")
class Magvit2Tokenizer(VisionEncoder):
    """A MAGVIT-v2 image tokenizer: ``forward`` returns code ids (B, N) long, not features.

    ``cfg.name`` picks a :data:`MAGVIT2_TOKENIZERS` entry; ``cfg.img_size`` is the input side
    (default the entry's ``resolution``; MMaDA reads images at 512). ``out_dim`` is the codebook
    size ``2^z_channels``: the adapter (``vq_ids``) places the codes in the decoder's vocabulary.
    ``weights``: a safetensors file of the released VQ model (``encoder.*`` tensors are read; the
    image decoder's and the quantiser's are ignored).
    """

    emits = "ids"  # forward gives code ids in [0, out_dim), which the model embeds with the decoder's table
    pad = False  # preprocess: the transform resizes the shorter side and centre-crops, no padding

    def __init__(self, cfg: VisionEncoderConfig) -> None:
        super().__init__(cfg)
        if cfg.name not in MAGVIT2_TOKENIZERS:
            raise ValueError(f"unknown MAGVIT-v2 tokenizer {cfg.name!r}; known: {sorted(MAGVIT2_TOKENIZERS)}")
        size = MAGVIT2_TOKENIZERS[cfg.name]
        self.encoder = VQGANEncoder(**size)
        self.img_size = cfg.img_size or size["resolution"]
        factor = 2 ** (len(size["ch_mult"]) - 1)
        if self.img_size % factor:
            raise ValueError(f"image size {self.img_size} is not a multiple of the tokenizer's {factor}x downsampling")
        self.grid = (self.img_size // factor, self.img_size // factor)
        self.out_dim = 2 ** size["z_channels"]
        self.mean = VQ_MEAN
        path = _check_weights(cfg.weights)
        if path is not None:
            self._load_file(path)
        _log_init(cfg, path)

    def transform(self, image: Image.Image) -> torch.Tensor:
        return vq_transform(image, size=self.img_size)

    def _load_file(self, path) -> None:
        from ..io import load_safetensors, load_state_checked

        state = load_safetensors(path)
        load_state_checked(self, {k: v for k, v in state.items() if k.startswith("encoder.")}, source=str(path))

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the continuous latents before quantisation (B, z_channels, h, w)."""
        return self.encoder(pixels.to(self.encoder.conv_in.weight.dtype))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> code ids (B, h*w) long, row-major over the latent grid."""
        return lfq_codes(self.latents(pixels))
