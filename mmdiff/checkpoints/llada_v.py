"""LLaDA-V (You et al. 2025, ``LlavaLLaDAModelLM``, LLaVA-OneVision layout) into
:class:`~mmdiff.model.MultimodalDiffusionLM`.

A LLaDA under Llama names (``model.layers.*``, ``lm_head``), a SigLIP tower under
``model.vision_tower.vision_tower.vision_model.*`` (last block removed, as LLaVA does) and an
``mlp2x_gelu`` projector ``model.mm_projector.{0,2}``. :func:`load_llada_v` loads it the same
frugal way as the text formats (:mod:`mmdiff.checkpoints.formats`). Images are seen as the config
says: ``image_aspect_ratio: anyres_max_N`` (or ``anyres``) with ``mm_patch_merge_type:
spatial_unpad`` is LLaVA-OneVision's tiling (``image_grid_pinpoints``, a base view, ``model.image_newline``
ending each row: :mod:`mmdiff.encoders.views`), ``square`` + ``flat`` the base view alone.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..adapters import ProjectorConfig
from ..encoders.vision import SIGLIP_TOWERS, VisionEncoderConfig
from ..io import CONFIG_NAME
from ..model import ModelConfig, MultimodalDiffusionLM
from .formats import (
    DREAM_WEIGHTS,
    LLAMA_REQUIRED,
    _read_config,
    assert_materialised,
    build_on_meta,
    drop_unused,
    assign_weights,
    decoder_weight_names,
    llama_decoder_config,
    open_checkpoint,
    shard_index,
)
from .tokenizers import LLADA_MASK_TOKEN, ReleasedTokenizer, released_special_ids, require_tokenizer

log = logging.getLogger("mmdiff")

# ------------------------------------------------------------------------------------------------
# LLaDA-V: LLaDA (Llama names) + SigLIP tower + mlp2x_gelu projector
# ------------------------------------------------------------------------------------------------
#: LlamaConfig defaults of the LLM keys and LLaVA's defaults of the multimodal keys read here.
LLADA_V_DEFAULTS: dict[str, Any] = dict(
    num_key_value_heads=None, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    max_position_embeddings=2048, hidden_act="silu", rope_scaling=None, attention_bias=False, mlp_bias=False,
    mm_projector_type="linear", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
    mm_use_im_start_end=False, image_aspect_ratio="square", mm_patch_merge_type="flat", image_grid_pinpoints=None,
)
#: image_aspect_ratio values that tile the image (LLaVA-NeXT's anyres; anyres_max_N: about N tiles of tokens at most)
ANYRES = re.compile(r"anyres(?:_max_(\d+))?")
LLADA_V_OPTIONS: dict[str, tuple] = dict(
    hidden_act=("silu",), rope_scaling=(None,), attention_bias=(False,), mlp_bias=(False,),
    mm_projector_type=("mlp2x_gelu",), mm_vision_select_layer=(-2,), mm_vision_select_feature=("patch",),
    mm_use_im_start_end=(False,),
)
LLADA_V_REQUIRED: tuple[str, ...] = LLAMA_REQUIRED + ("mm_vision_tower", "mm_hidden_size")

#: the system prompt of LLaDA-V's ``llava_llada`` conversation template (LLaVA's, for LLaDA)
LLADA_V_SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual "
                         "content that the user provides, and assist the user with a variety of tasks using natural "
                         "language.")
LLADA_V_VISION = "model.vision_tower.vision_tower.vision_model."
#: checkpoint prefix -> MultimodalDiffusionLM prefix, for the parts outside the LLM
LLADA_V_PREFIXES: dict[str, str] = {LLADA_V_VISION: "vision.", "model.mm_projector.": "vision_adapter.proj."}
LLADA_V_NEWLINE = "model.image_newline"  # the anyres row separator, in the LLM's width
NEWLINE = "vision_adapter.image_newline"  # where it goes
#: stored tensors the model never uses: the tower's final norm and pooling head (LLaVA reads the
#: features before them); the row separator is unused too when the config does not tile images
LLADA_V_UNUSED: tuple[str, ...] = (LLADA_V_VISION + "post_layernorm.", LLADA_V_VISION + "head.")


def llada_v_model_config(config: Mapping[str, Any], *, source: str = CONFIG_NAME) -> "ModelConfig":
    """A LLaDA-V ``config.json`` as a :class:`~mmdiff.model.ModelConfig`: decoder, SigLIP tower, projector.

    The LLM is a bidirectional LLaDA with Llama keys (no logit shift). The tower is looked up by the
    last path component of ``mm_vision_tower`` in :data:`~mmdiff.encoders.vision.SIGLIP_TOWERS` and
    read at block -2 (LLaVA's ``SigLipVisionTower`` drops the last block and reads the new last one).
    """

    c = _read_config(config, defaults=LLADA_V_DEFAULTS, required=LLADA_V_REQUIRED, options=LLADA_V_OPTIONS,
                     kind="LLaDA-V", source=source)
    decoder = llama_decoder_config(c, qkv_bias=False, logit_shift=False)
    tower = siglip_tower(c, source=source)
    width = SIGLIP_TOWERS[tower]["embed_dim"]
    views = llava_views(c, tile=SIGLIP_TOWERS[tower]["img_size"], source=source)
    return ModelConfig(decoder=decoder, vision=VisionEncoderConfig(kind="siglip", name=tower, layer=-2, **views),
                       vision_adapter=ProjectorConfig(kind="mlp2x_gelu", in_dim=width, out_dim=decoder.d_model,
                                                      newline=views["views"] == "anyres"))


def llava_views(c: Mapping[str, Any], *, tile: int, source: str) -> dict[str, Any]:
    """The :class:`VisionEncoderConfig` views fields of LLaVA's ``image_aspect_ratio``,
    ``mm_patch_merge_type`` and ``image_grid_pinpoints`` (a list of [width, height], or LLaVA's
    ``"(1x1),...,(6x6)"``: every tile grid from the first to the last, in tiles of ``tile`` pixels)."""
    aspect, merge = c["image_aspect_ratio"], c["mm_patch_merge_type"]
    if aspect == "square" and merge == "flat":
        return dict(views="single")
    anyres = ANYRES.fullmatch(str(aspect))
    if anyres is None or merge != "spatial_unpad":
        raise ValueError(f"{source}: image_aspect_ratio {aspect!r} with mm_patch_merge_type {merge!r} is not "
                         "supported (supported: 'square' + 'flat', or 'anyres' / 'anyres_max_N' + 'spatial_unpad')")
    pinpoints = c["image_grid_pinpoints"]
    if isinstance(pinpoints, str) and "x" in pinpoints:
        grids = [tuple(map(int, m)) for m in re.findall(r"\((\d+)x(\d+)\)", pinpoints)]
        (c0, r0), (c1, r1) = grids[0], grids[-1]
        pinpoints = [(i * tile, j * tile) for i in range(c0, c1 + 1) for j in range(r0, r1 + 1)]
    if not pinpoints or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pinpoints):
        raise ValueError(f"{source}: image_aspect_ratio {aspect!r} needs image_grid_pinpoints, a list of "
                         f"[width, height]; got {c['image_grid_pinpoints']!r}")
    return dict(views="anyres", grid_pinpoints=tuple((int(w), int(h)) for w, h in pinpoints),
                max_tiles=int(anyres.group(1)) if anyres.group(1) else None)


def siglip_tower(config: Mapping[str, Any], *, source: str = CONFIG_NAME) -> str:
    """The :data:`~mmdiff.encoders.vision.SIGLIP_TOWERS` name of a LLaVA config's ``mm_vision_tower``
    (its last path component), after checking ``mm_hidden_size`` against the tower's width."""
    tower = Path(str(config["mm_vision_tower"])).name
    if tower not in SIGLIP_TOWERS:
        raise ValueError(f"{source}: mm_vision_tower {config['mm_vision_tower']!r} is not a known SigLIP tower; "
                         f"known: {sorted(SIGLIP_TOWERS)}")
    width = SIGLIP_TOWERS[tower]["embed_dim"]
    if config["mm_hidden_size"] != width:
        raise ValueError(f"{source}: mm_hidden_size {config['mm_hidden_size']} differs from the {width}-wide "
                         f"{tower} tower")
    return tower


def llada_v_weight_names(expected: Iterable[str], n_layers: int, *, llm: Mapping[str, str] = DREAM_WEIGHTS,
                         prefixes: Mapping[str, str] = LLADA_V_PREFIXES) -> dict[str, str]:
    """LLaVA-layout tensor name -> MultimodalDiffusionLM name, for every name in ``expected``.

    Args:
        expected: the model's state-dict names.
        n_layers: decoder blocks.
        llm: the LLM's name table (LLaDA-V: Llama names; LaViDa: LLaDA's or Dream's own; Dimple: Dream's).
        prefixes: checkpoint prefix -> model prefix of the parts outside the LLM.
    """
    expected = set(expected)
    rename = decoder_weight_names(llm, n_layers, expected)
    for name in expected:
        for src, dst in prefixes.items():
            if name.startswith(dst) and name != NEWLINE:
                rename[src + name[len(dst):]] = name
    if NEWLINE in expected:
        rename[LLADA_V_NEWLINE] = NEWLINE
    return rename



def load_llada_v(path: str | Path, *, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> "MultimodalDiffusionLM":
    """Load a LLaDA-V directory into a :class:`~mmdiff.model.MultimodalDiffusionLM`, memory-frugally.

    The model is built on the meta device and every tensor is read, cast and assigned one at a
    time (as :func:`load_pretrained`). Tensors in :data:`LLADA_V_UNUSED` are skipped (logged), and
    ``model.image_newline`` when the config does not tile images. The
    mask id is the config's ``mask_token_id``, else the tokenizer's :data:`LLADA_MASK_TOKEN`; prompts
    get LLaDA-V's system prompt (:data:`LLADA_V_SYSTEM_PROMPT`) and ``<image>\\n`` before the question.

    Args:
        path: the LLaDA-V directory (``config.json``, safetensors shards, tokenizer files).
        dtype: parameter dtype; None keeps the checkpoint's own.
        device: where the parameters live.
    """

    directory, config = open_checkpoint(path)
    cfg = llada_v_model_config(config, source=str(directory / CONFIG_NAME))
    hf_tokenizer = require_tokenizer(directory)
    special = released_special_ids(directory, config, hf_tokenizer, mask_token=LLADA_MASK_TOKEN)
    tokenizer = ReleasedTokenizer(hf_tokenizer, special, vocab_size=cfg.decoder.vocab_size,
                                  system=LLADA_V_SYSTEM_PROMPT)
    model, expected = build_on_meta(cfg, tokenizer)
    files = drop_unused(shard_index(directory), lambda n: n.startswith(LLADA_V_UNUSED) or (
        n == LLADA_V_NEWLINE and NEWLINE not in expected), source=str(directory))
    rename = llada_v_weight_names(expected, cfg.decoder.n_layers)
    assign_weights(model, files, rename, expected, dtype=dtype, device=device, source=str(directory))
    assert_materialised(model)
    log.info("loaded LLaDA-V %s (vision tower %s, %s)", directory, cfg.vision.name, next(model.parameters()).dtype)
    return model.eval()
