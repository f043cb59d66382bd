"""LaViDa (Li et al. 2025, "LaViDa: A Large Diffusion Language Model for Multimodal Understanding";
``LlavaLladaForMaskedDiffusion`` / ``LlavaDreamForMaskedDiffusion``) into
:class:`~mmdiff.model.MultimodalDiffusionLM`.

LaViDa is LLaVA-NeXT over a diffusion LLM, in two variants that differ only as data
(:data:`LAVIDA_VARIANTS`):

* **LLaDA**: LLaDA-8B-Instruct under its *own* names (``model.transformer.blocks.*``, config keys
  ``d_model``/``n_layers``/...; model_type ``llava_llada``, the same as LLaDA-V's, told apart by
  :func:`~mmdiff.checkpoints.formats.is_lavida`), mask token ``<|mdm_mask|>``;
* **Dream**: Dream-v0-Instruct-7B under Qwen2 names (``model.layers.*``, ``lm_head``; model_type
  ``llava_dream``), logits shifted by one position, mask token ``<|mask|>``.

Both share the multimodal part: a SigLIP tower under ``model.vision_tower.vision_tower.vision_model.*``
(LLaVA drops its last block and reads the new last one), an ``mlp2x_gelu`` projector
``model.mm_projector.{0,2}`` and ``model.image_newline`` (loaded as the projector's
``image_newline``, :class:`~mmdiff.adapters.ProjectorConfig` ``newline``). Images go through
LLaVA-NeXT's ``anyres`` views (:mod:`mmdiff.encoders.views`, the same code as LLaDA-V's tiling:
``image_grid_pinpoints`` 384 x 768 ... 768 x 768 at full size, so at most 4 tiles + the base view),
with every view's projected 27 x 27 grid pooled to 14 x 14 first (``VisionEncoderConfig.view_pool``
= ``mm_spatial_pool_mode``, stride 2: LLaVA-OneVision's ``get_2dPool``, bilinear rounding up; always on
for images in the released code, ``ALWASY_DO_2DPOOL``), then the ``spatial_unpad`` merge with a newline
token per row. Prompts: LaViDa's ``llada`` / ``dream`` conversation templates are the checkpoint
tokenizer's chat template after LLaVA's system prompt (the LLaDA-V one), with ``<image>\\n`` before the
question.

**Prefix-DLM cache.** LaViDa decodes with ``prefix_lm=True`` (every released eval script): the prompt,
image tokens included, is run once alone and its keys/values are reused at every step while only the
response canvas runs; the prompt never sees the response. That is mmdiff's ``prefix`` attention mode,
so the decoder is configured with ``attn_mode="prefix"`` and :class:`~mmdiff.sampling.denoisers.PrefixCache`
(``cache="prefix"``, :attr:`MultimodalDiffusionLM.exact_cache`) is *exact*: it gives the same logits
as a full recomputation under that mask, and the same logits as LaViDa's cached forward. The released
uncached path (``prefix_lm=False``) is a plain bidirectional forward (``attn_mode="bidirectional"``).
One sampler-level difference: with the prefix cache, LaViDa's Dream sampler fixes the first response
token to the prefill's argmax before the first step; mmdiff decodes that position like the others,
from the same logits.

**What is verified** (``tests/test_lavida.py``, on the tiny random fixtures
``tests/fixtures/lavida-{llada,dream}-tiny`` whose reference values the released LaViDa code computed;
each README names the commit, seeds and shims), for both variants, at relative error < 1e-4: the
``anyres`` views' pixels (the released preprocessing), the prompt embeddings after the image merge
(pooling, unpad, newlines: text and image prompts), the uncached logits, and the prefix-DLM cached
logits through :class:`~mmdiff.sampling.denoisers.PrefixCache`; also the prompt ids against the released
conversation, generation with and without the cache giving the same tokens, the bfloat16 load,
detection apart from LLaDA-V and the refusals of unsupported configs. ``tests/test_doors.py`` runs the
commands (ask, eval, caption, demo, serve, plugin, search) on both fixtures. Not verified: the real
released checkpoints (not loaded here), answer quality, speed, GPU runs; the fixtures' tokenizers are
stand-ins written from the released chat templates (their READMEs say so).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..adapters import ProjectorConfig
from ..decoder import DecoderConfig
from ..encoders.vision import SIGLIP_TOWERS, VisionEncoderConfig
from ..io import CONFIG_NAME
from ..model import ModelConfig, MultimodalDiffusionLM
from .formats import (
    DREAM_WEIGHTS,
    LLADA_WEIGHTS,
    _read_config,
    assert_materialised,
    build_on_meta,
    drop_unused,
    assign_weights,
    dream_decoder_config,
    llada_decoder_config,
    open_checkpoint,
    shard_index,
)
from .llada_v import (
    LLADA_V_PREFIXES,
    LLADA_V_SYSTEM_PROMPT,
    LLADA_V_VISION,
    llada_v_weight_names,
    llava_views,
    siglip_tower,
)
from .tokenizers import LLADA_MASK_TOKEN, ReleasedTokenizer, released_special_ids, require_tokenizer

log = logging.getLogger("mmdiff")

#: Dream's mask token in its tokenizer (the config's ``mask_token_id`` wins when present)
DREAM_MASK_TOKEN = "<|mask|>"
#: LaViDa's conversation templates ``llada`` / ``dream`` use LLaVA's system prompt (as LLaDA-V's)
LAVIDA_SYSTEM_PROMPT = LLADA_V_SYSTEM_PROMPT
#: ``get_2dPool``'s default stride, the one the released image path uses (``mm_spatial_pool_stride``
#: of the config is read only for video)
LAVIDA_POOL_STRIDE = 2


@dataclass(frozen=True)
class LavidaVariant:
    """What differs between LaViDa's LLM variants."""

    name: str
    architecture: str  # config.json "architectures" entry
    model_type: str  # config.json "model_type"
    decoder_config: Callable[..., DecoderConfig]  # (config, *, source) -> DecoderConfig, the LLM's own keys
    weights: Mapping[str, str]  # LLM tensor name table
    mask_token: str  # the tokenizer's mask token (fallback for the mask id)


LAVIDA_VARIANTS: dict[str, LavidaVariant] = {
    "llada": LavidaVariant("llada", "LlavaLladaForMaskedDiffusion", "llava_llada", llada_decoder_config,
                           LLADA_WEIGHTS, LLADA_MASK_TOKEN),
    "dream": LavidaVariant("dream", "LlavaDreamForMaskedDiffusion", "llava_dream", dream_decoder_config,
                           DREAM_WEIGHTS, DREAM_MASK_TOKEN),
}
#: stored tensors LaViDa never reads: the tower's final norm and pooling head (LLaVA reads before them)
LAVIDA_UNUSED: tuple[str, ...] = (LLADA_V_VISION + "post_layernorm.", LLADA_V_VISION + "head.")

#: LLaVA's defaults of the multimodal keys read here (``LlavaMetaModel`` / ``llava_arch``)
LAVIDA_DEFAULTS: dict[str, Any] = dict(
    mm_projector_type="linear", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
    mm_use_im_start_end=False, image_aspect_ratio="square", mm_patch_merge_type="flat",
    mm_spatial_pool_mode="bilinear", image_grid_pinpoints=None,
)
LAVIDA_OPTIONS: dict[str, tuple] = dict(
    mm_projector_type=("mlp2x_gelu",), mm_vision_select_layer=(-2,), mm_vision_select_feature=("patch",),
    mm_use_im_start_end=(False,), image_aspect_ratio=("anyres",), mm_patch_merge_type=("spatial_unpad",),
    mm_spatial_pool_mode=("bilinear", "average", "max"),
)
LAVIDA_REQUIRED: tuple[str, ...] = ("mm_vision_tower", "mm_hidden_size", "image_grid_pinpoints")


def lavida_variant(config: Mapping[str, Any], *, source: str = CONFIG_NAME) -> LavidaVariant:
    """The variant of a LaViDa ``config.json``: by its architectures, else its model_type (a
    ``llava_llada`` LaViDa config carries LLaDA's ``d_model``)."""
    architectures = list(config.get("architectures") or [])
    for v in LAVIDA_VARIANTS.values():
        if v.architecture in architectures:
            return v
    if config.get("model_type") == LAVIDA_VARIANTS["dream"].model_type:
        return LAVIDA_VARIANTS["dream"]
    if config.get("model_type") == LAVIDA_VARIANTS["llada"].model_type and "d_model" in config:
        return LAVIDA_VARIANTS["llada"]
    raise ValueError(f"{source}: not a LaViDa config (architectures {architectures}, model_type "
                     f"{config.get('model_type')!r}); known: "
                     + "; ".join(f"{v.architecture} ({v.model_type})" for v in LAVIDA_VARIANTS.values()))


def lavida_model_config(config: Mapping[str, Any], *, source: str = CONFIG_NAME) -> ModelConfig:
    """A LaViDa ``config.json`` as a :class:`~mmdiff.model.ModelConfig`: the variant's decoder under the
    prefix-DLM mask, the SigLIP tower read at block -2, the projector and the ``anyres`` layout."""
    variant = lavida_variant(config, source=source)
    c = _read_config(config, defaults=LAVIDA_DEFAULTS, required=LAVIDA_REQUIRED, options=LAVIDA_OPTIONS,
                     kind=f"LaViDa-{variant.name}", source=source)
    decoder = replace(variant.decoder_config(config, source=source), attn_mode="prefix")
    tower = siglip_tower(c, source=source)
    width = SIGLIP_TOWERS[tower]["embed_dim"]
    views = llava_views(c, tile=SIGLIP_TOWERS[tower]["img_size"], source=source)
    vision = VisionEncoderConfig(kind="siglip", name=tower, layer=-2, **views, view_pool=c["mm_spatial_pool_mode"],
                                 view_pool_stride=LAVIDA_POOL_STRIDE)
    return ModelConfig(decoder=decoder, vision=vision,
                       vision_adapter=ProjectorConfig(kind="mlp2x_gelu", in_dim=width, out_dim=decoder.d_model,
                                                      newline=True))


def load_lavida(path: str | Path, *, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu") -> MultimodalDiffusionLM:
    """Load a LaViDa directory (either variant) into a :class:`~mmdiff.model.MultimodalDiffusionLM`,
    memory-frugally (meta-device build, one tensor at a time, as :func:`load_llada_v`).

    The mask id is the config's ``mask_token_id``, else the tokenizer's mask token of the variant;
    tensors in :data:`LAVIDA_UNUSED` are skipped (logged).

    Args:
        path: the LaViDa directory (``config.json``, safetensors shards, tokenizer files).
        dtype: parameter dtype; None keeps the checkpoint's own.
        device: where the parameters live.
    """
    directory, config = open_checkpoint(path)
    source = str(directory / CONFIG_NAME)
    variant = lavida_variant(config, source=source)
    cfg = lavida_model_config(config, source=source)
    hf_tokenizer = require_tokenizer(directory)
    special = released_special_ids(directory, config, hf_tokenizer, mask_token=variant.mask_token)
    tokenizer = ReleasedTokenizer(hf_tokenizer, special, vocab_size=cfg.decoder.vocab_size,
                                  system=LAVIDA_SYSTEM_PROMPT)
    model, expected = build_on_meta(cfg, tokenizer)
    files = drop_unused(shard_index(directory), lambda n: n.startswith(LAVIDA_UNUSED), source=str(directory),
                        why="not used by LaViDa")
    rename = llada_v_weight_names(expected, cfg.decoder.n_layers, llm=variant.weights, prefixes=LLADA_V_PREFIXES)
    assign_weights(model, files, rename, expected, dtype=dtype, device=device, source=str(directory))
    assert_materialised(model)
    log.info("loaded LaViDa-%s %s (vision tower %s, %s)", variant.name, directory, cfg.vision.name,
             next(model.parameters()).dtype)
    return model.eval()
