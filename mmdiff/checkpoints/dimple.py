"""Dimple (Yu et al. 2025, "Dimple: Discrete Diffusion Multimodal Large Language Model with Parallel
Decoding", ``DimpleModel``, github.com/yu-rp/Dimple) into :class:`~mmdiff.model.MultimodalDiffusionLM`.

Dimple-7B is a Qwen2.5-VL vision tower (native resolution, window attention, 2x2 patch merger) under
``visual.*``, a projector ``img_projector.linear_{1,2}`` (Linear -> SiLU -> Linear) and a Dream-7B
LLM (``model.layers.*``, ``lm_head``) trained autoregressively, then by masked diffusion. What
carries over to mmdiff's one decoder and sampler:

* **logit shift**: as Dream, the prediction for position i is read at position i-1 (the released
  ``_sample`` does ``cat([logits[:, :1], logits[:, :-1]])``): ``DecoderConfig.logit_shift``;
* **M-RoPE**: the LLM rotates by Qwen2-VL's 3-D positions (``mrope_section``); an image's tokens get
  their (t, h, w) grid coordinates and the text after it continues one past the largest
  (``DecoderConfig.mrope_section``, :func:`~mmdiff.decoder.multimodal_positions`); text alone gets
  1-D RoPE. ``model.generate`` passes the positions; the engine and the search, which call
  ``model.denoiser`` themselves, are refused an image prompt for Dimple with a clear error.
* **caches**: Dimple is bidirectional (``full_attn_mask``), so no cache is exact
  (``model.exact_cache`` = ``none``). The released ``use_cache=True`` ("prefilling") keeps the
  prompt's keys/values after the first step while the response changes: that is the approximate
  ``block`` cache with one block over the whole canvas; ``dual`` and ``prefix`` are the other
  approximations available.
* **confident decoding** (Dimple §4.2): the released ``alg_p_threshold`` p (``decoding_pipeline="dim"``)
  fixes at each step every masked position whose confidence (probability of its predicted token)
  is > p; when none is, it falls back to the schedule's count for the remaining mask ratio (at
  least one), picked at random (``alg="origin"``) or by confidence (``maskgit_plus``), and it fixes
  everything left at the last step. mmdiff's ``--transfer threshold --threshold p`` is the same rule
  with >= p and a fallback of the single most confident position; the two samplers are not
  token-identical (not tested against the released loop).
* **structure priors** (Dimple §4.3, fixing tokens such as the answer format at chosen positions
  before decoding) are mmdiff's structure strategies.

The prompt is Qwen2-VL's: the checkpoint's own chat template with each image written as
``<|vision_start|><image><|vision_end|>`` before the text, the single mmdiff ``<image>``
placeholder replaced by the image's merged tokens (the released processor repeats
``<|image_pad|>`` once per token; those embeddings are all replaced, so the sequences are equal).
:func:`load_dimple` loads it the same frugal way as the other formats (meta-device build, headers
checked, one tensor at a time).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..adapters import ProjectorConfig
from ..encoders.vision import QWEN_VL_TOWERS, VisionEncoderConfig
from ..io import CONFIG_NAME, read_json
from ..model import ModelConfig, MultimodalDiffusionLM
from .formats import (
    DREAM_WEIGHTS,
    LLAMA_REQUIRED,
    _hf_special_ids,
    _read_config,
    assert_materialised,
    build_on_meta,
    assign_weights,
    llama_decoder_config,
    open_checkpoint,
    shard_index,
)
from .llada_v import llada_v_weight_names
from .tokenizers import ReleasedTokenizer, require_tokenizer

log = logging.getLogger("mmdiff")

DIMPLE_MODEL_TYPES: tuple[str, ...] = ("dimple",)
DIMPLE_ARCHITECTURES: tuple[str, ...] = ("DimpleModel",)
#: ``DimpleConfig``'s defaults of the keys read here (a key missing from config.json takes these).
DIMPLE_DEFAULTS: dict[str, Any] = dict(
    num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
    tie_word_embeddings=False, rope_theta=10000.0, use_sliding_window=False, rope_scaling=None,
    mrope_section=[16, 24, 24], full_attn_mask=True, vision_start_token_id=151652, vision_end_token_id=151653,
    mask_token_id=151666, pad_token_id=151643, vision_config=None,
)
DIMPLE_OPTIONS: dict[str, tuple] = dict(hidden_act=("silu",), rope_scaling=(None,), use_sliding_window=(False,),
                                        full_attn_mask=(True,))
DIMPLE_REQUIRED: tuple[str, ...] = LLAMA_REQUIRED
#: ``DimpleVisionConfig``'s defaults (Dimple-7B's tower) under a config.json ``vision_config``.
DIMPLE_VISION_DEFAULTS: dict[str, Any] = dict(QWEN_VL_TOWERS["qwen2.5-vl-7b"])
#: preprocessor_config.json keys read (Dimple's image processor; its defaults otherwise)
PREPROCESSOR_NAME = "preprocessor_config.json"
#: how the prompt writes one image: Qwen2-VL's vision start/end tokens around the placeholder
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
DIMPLE_MEDIA_FORMAT = VISION_START + "{}" + VISION_END
#: checkpoint prefix -> MultimodalDiffusionLM prefix, for the parts outside the LLM
DIMPLE_PREFIXES: dict[str, str] = {"visual.": "vision.visual.", "img_projector.linear_1.": "vision_adapter.proj.0.",
                                   "img_projector.linear_2.": "vision_adapter.proj.2."}


def is_dimple(config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` is Dimple's (model_type ``dimple`` or architecture ``DimpleModel``)."""
    return config.get("model_type") in DIMPLE_MODEL_TYPES or any(
        a in DIMPLE_ARCHITECTURES for a in config.get("architectures") or [])


def dimple_tower(vision_config: Mapping[str, Any] | None, *, source: str) -> str:
    """The :data:`~mmdiff.encoders.vision.QWEN_VL_TOWERS` entry a ``vision_config`` describes."""
    keys = {k: v for k, v in (vision_config or {}).items() if k in DIMPLE_VISION_DEFAULTS}
    c = {**DIMPLE_VISION_DEFAULTS, **keys}
    c["fullatt_block_indexes"] = list(c["fullatt_block_indexes"])
    for name, sizes in QWEN_VL_TOWERS.items():
        if c == sizes:
            return name
    raise ValueError(f"{source}: vision_config {c} is not a known Qwen2.5-VL tower; known: {sorted(QWEN_VL_TOWERS)}")


def dimple_model_config(config: Mapping[str, Any], *, source: str = CONFIG_NAME,
                        preprocessor: Mapping[str, Any] | None = None) -> ModelConfig:
    """A Dimple ``config.json`` as a :class:`~mmdiff.model.ModelConfig`: decoder, tower, projector.

    Args:
        config: the parsed ``config.json``.
        source: named in errors.
        preprocessor: the parsed ``preprocessor_config.json`` (its ``min_pixels`` / ``max_pixels``), if any.
    """
    c = _read_config(config, defaults=DIMPLE_DEFAULTS, required=DIMPLE_REQUIRED, options=DIMPLE_OPTIONS,
                     kind="Dimple", source=source)
    try:
        decoder = llama_decoder_config(c, qkv_bias=True, logit_shift=True, mrope_section=list(c["mrope_section"]))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    tower = dimple_tower(c["vision_config"], source=source)
    preprocessor = preprocessor or {}
    vision = VisionEncoderConfig(kind="qwen2_5_vl", name=tower, min_pixels=preprocessor.get("min_pixels"),
                                 max_pixels=preprocessor.get("max_pixels"))
    width = QWEN_VL_TOWERS[tower]["out_hidden_size"]
    return ModelConfig(decoder=decoder, vision=vision,
                       vision_adapter=ProjectorConfig(kind="mlp2x_silu", in_dim=width, out_dim=decoder.d_model))


def dimple_weight_names(expected: Iterable[str], n_layers: int) -> dict[str, str]:
    """Dimple tensor name -> MultimodalDiffusionLM name, for every name in ``expected``."""
    return llada_v_weight_names(expected, n_layers, llm=DREAM_WEIGHTS, prefixes=DIMPLE_PREFIXES)


def load_dimple(path: str | Path, *, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu") -> MultimodalDiffusionLM:
    """Load a Dimple directory into a :class:`~mmdiff.model.MultimodalDiffusionLM`, memory-frugally.

    The model is built on the meta device and every tensor is read, cast and assigned one at a time;
    the tower's rotary table (not stored) is then recomputed. Special ids come from ``config.json`` /
    ``generation_config.json`` (mask ``mask_token_id``, Dream's ``<|mask|>``); prompts use the
    checkpoint's chat template with images as ``<|vision_start|><image><|vision_end|>``.

    Args:
        path: the Dimple directory (``config.json``, safetensors shards, tokenizer files,
            ``preprocessor_config.json``).
        dtype: parameter dtype; None keeps the checkpoint's own.
        device: where the parameters live.
    """
    directory, config = open_checkpoint(path)
    pre_path = directory / PREPROCESSOR_NAME
    cfg = dimple_model_config(config, source=str(directory / CONFIG_NAME),
                              preprocessor=read_json(pre_path) if pre_path.is_file() else None)
    hf_tokenizer = require_tokenizer(directory)
    c = {**DIMPLE_DEFAULTS, **config}
    for token, key in ((VISION_START, "vision_start_token_id"), (VISION_END, "vision_end_token_id")):
        if hf_tokenizer.convert_tokens_to_ids(token) != c[key]:
            raise ValueError(f"{directory}: the tokenizer's {token} is id {hf_tokenizer.convert_tokens_to_ids(token)}, "
                             f"but config.json's {key} is {c[key]}")
    special = _hf_special_ids(directory, c)
    tokenizer = ReleasedTokenizer(hf_tokenizer, special, vocab_size=cfg.decoder.vocab_size,
                                  media_format=DIMPLE_MEDIA_FORMAT)
    model, expected = build_on_meta(cfg, tokenizer)
    files = shard_index(directory)
    rename = dimple_weight_names(expected, cfg.decoder.n_layers)
    assign_weights(model, files, rename, expected, dtype=dtype, device=device, source=str(directory))
    model.vision.reset_buffers()
    assert_materialised(model)
    log.info("loaded Dimple %s (vision tower %s, %s)", directory, cfg.vision.name, next(model.parameters()).dtype)
    return model.eval()
