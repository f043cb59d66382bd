"""The adapter registry and the config fields every adapter shares (see :mod:`mmdiff.adapters`)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Mapping

import torch.nn as nn

from ..io import JsonConfig, config_from_dict, drop_retired_keys
from ..registry import Registry

if TYPE_CHECKING:
    from ..decoder import DecoderConfig

#: name -> adapter class; each class declares ``modality``, ``emits`` and ``config_class``.
ADAPTERS: Registry[type[nn.Module]] = Registry("adapter")

#: Until issue #18 one AdapterConfig held every kind's fields: a section saved then also holds the
#: fields its kind does not read, at these defaults, and they are dropped on reading.
FLAT_DEFAULTS: dict[str, Any] = {
    "pool": 1, "grid": None, "norm": False, "pos_embed": False, "subsample": 4, "num_queries": 16,
    "qformer_layers": 2, "qformer_heads": 4, "n_encoder_layers": 1, "vocab_size": 0, "words": None,
    "word_ids": None, "position_weight": 1.0, "empty_weight": 1.0, "beam_width": 8, "lm_weight": 0.3,
    "length_bonus": 1.5}
#: kinds that were experiments and left mmdiff -> why, for the error a config naming one gets
RETIRED_KINDS: dict[str, str] = {
    "cell_words": "the lexical vision adapter was an experiment and was removed: the decoder learned slower "
                  "from it than from mlp2x_gelu (bench/sweeps/vision-adapter)"}


@dataclass
class AdapterConfig(JsonConfig):
    """The fields every adapter has; each kind's config (its adapter's ``config_class``) adds its own.

    Saved as JSON with the model; read back with :func:`adapter_config_from_dict`.
    """

    kind: str  # registry name (ADAPTERS)
    in_dim: int  # encoder token width
    out_dim: int  # decoder width

    def __post_init__(self) -> None:
        if type(self) is AdapterConfig:
            raise TypeError(f"AdapterConfig is the base of the per-kind configs: build the kind's own "
                            f"(ADAPTERS.get({self.kind!r}).config_class, e.g. ProjectorConfig) or read one with "
                            "adapter_config_from_dict")

    def resolve(self, decoder: DecoderConfig) -> "AdapterConfig":
        """This config with the fields that depend on the decoder it feeds filled in (none by default)."""
        return self



def adapter_config_from_dict(data: Mapping[str, Any], *, source: str = "adapter config") -> AdapterConfig:
    """The config of the adapter ``data["kind"]`` (its ``config_class``), from a JSON section.

    Also reads the flat format that every kind shared until issue #18: a field the kind does not have
    is dropped when it holds that format's default (:data:`FLAT_DEFAULTS`) and refused by name otherwise.

    Raises:
        ValueError: an unknown kind (listing the known ones), a retired experiment, or a field the
            kind does not have.
    """
    kind = data.get("kind")
    if kind in RETIRED_KINDS:
        raise ValueError(f"{source}: adapter kind {kind!r} is not supported: {RETIRED_KINDS[kind]}; "
                         f"known: {', '.join(ADAPTERS.names())}")
    try:
        cls = ADAPTERS.get(kind).config_class
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    own = {f.name for f in fields(cls)}
    data = drop_retired_keys(data, {k: v for k, v in FLAT_DEFAULTS.items() if k not in own}, source=source,
                             why=f"the {kind} adapter has no such field (its fields: {sorted(own)})")
    return config_from_dict(cls, data, source=source)


def build_adapter(cfg: AdapterConfig) -> nn.Module:
    """Build the adapter registered under ``cfg.kind`` from its own config class."""
    cls = ADAPTERS.get(cfg.kind)
    if type(cfg) is not cls.config_class:  # exactly: audio_dual's config is also a semantic and an acoustic one
        raise TypeError(f"adapter {cfg.kind!r} takes a {cls.config_class.__name__}, got a {type(cfg).__name__}")
    return cls(cfg)
