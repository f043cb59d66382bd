"""Adapters (LLaVA's ``multimodal_projector``): encoder tokens -> decoder-width tokens.

One registry for both modalities. Each entry is a class that declares

* ``modality``: ``"image"`` (:mod:`.vision`): ``forward(tokens (B, N, in_dim)) -> (B, N', out_dim)``,
  ``num_tokens(n_in) -> N'``; or ``"audio"`` (:mod:`.audio`): ``forward(AudioFeatures) ->
  (tokens (B, N', out_dim), mask (B, N') bool)``, ``num_tokens(n_frames) -> N'`` for a clip of
  ``n_frames`` encoder frames;
* ``emits``: ``"embeddings"`` (decoder-width tokens), ``"vocab"`` (distributions over the decoder's
  vocabulary, which the model embeds with its own token table) or ``"ids"`` (vocabulary ids, embedded
  with that table: a discrete image tokenizer's codes, ``vq_ids``);
* ``config_class``: its config, an :class:`AdapterConfig` subclass holding only the fields it reads
  (one class may serve several kinds, e.g. :class:`ProjectorConfig` for ``mlp2x_gelu`` and ``linear``).

:func:`adapter_config_from_dict` reads a saved config back by its ``kind``; :func:`build_adapter` builds it.
"""
from __future__ import annotations

from . import audio, vision  # registers the entries
from .audio import (
    AcousticAdapterConfig,
    CTCAdapterConfig,
    DiffaAdapterConfig,
    DualAdapterConfig,
    SemanticAdapterConfig,
)
from .base import ADAPTERS, FLAT_DEFAULTS, RETIRED_KINDS, AdapterConfig, adapter_config_from_dict, build_adapter
from .vision import ProjectorConfig, VQTokensConfig

__all__ = ["ADAPTERS", "AcousticAdapterConfig", "AdapterConfig", "CTCAdapterConfig", "DiffaAdapterConfig", "DualAdapterConfig",
           "FLAT_DEFAULTS", "ProjectorConfig", "RETIRED_KINDS", "SemanticAdapterConfig", "VQTokensConfig", "adapter_config_from_dict",
           "build_adapter", "audio", "vision"]
