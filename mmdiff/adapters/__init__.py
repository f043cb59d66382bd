"""Adapters (LLaVA's ``multimodal_projector``): encoder tokens -> decoder-width tokens.

One config and one registry for both modalities; each entry is a class with a ``modality`` attribute:

* ``image`` (:mod:`.vision`): ``forward(tokens (B, N, in_dim)) -> (B, N', out_dim)``,
  ``num_tokens(n_in) -> N'``.
* ``audio`` (:mod:`.audio`): ``forward(AudioFeatures) -> (tokens (B, N', out_dim), mask (B, N') bool)``,
  ``num_tokens(n_frames) -> N'`` for a clip of ``n_frames`` encoder frames.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn as nn

from ..io import config_from_dict
from ..registry import Registry

#: name -> adapter class; each class has ``modality`` ("image" | "audio") and takes an AdapterConfig.
ADAPTERS: Registry[type[nn.Module]] = Registry("adapter")


@dataclass
class AdapterConfig:
    """An adapter's kind and sizes. Saved as JSON with the model."""

    kind: str  # mlp2x_gelu | linear | cell_words | audio_semantic | audio_acoustic | audio_dual | audio_ctc
    in_dim: int  # encoder token width
    out_dim: int  # decoder width
    pool: int = 1  # vision: k x k average pooling of the patch grid before projection (LaViDa: 2)
    grid: tuple[int, int] | None = None  # vision: patch grid (h, w); needed when pool > 1 or pos_embed
    norm: bool = False  # vision: RMS-normalise the projected tokens (before the position embedding)
    pos_embed: bool = False  # vision: learned embedding per output token, N(0, 1) * 0.5 at init (cell_words: added after embedding)
    subsample: int = 4  # audio semantic: frame subsampling, a power of 2 (one stride-2 conv per factor 2)
    num_queries: int = 16  # audio acoustic: Q-Former queries = output tokens
    qformer_layers: int = 2  # audio acoustic: Q-Former blocks
    qformer_heads: int = 4  # audio acoustic: attention heads (must divide out_dim)
    n_encoder_layers: int = 1  # audio acoustic: encoder layers fused with softmax weights
    vocab_size: int = 0  # audio ctc, cell_words: the decoder's vocabulary size (set from the tokenizer when 0)
    words: dict | None = None  # cell_words: attribute -> class names (index 0 = empty cell), "position" -> cell names
    word_ids: dict | None = None  # cell_words: the same as token ids (set from the tokenizer when None)
    position_weight: float = 1.0  # cell_words: weight of the cell-name words in each cell's bag
    empty_weight: float = 1.0  # cell_words: weight of each attribute's "empty" word
    beam_width: int = 8  # audio ctc, inference with a ctc_lm.json: prefix beam width (0 = soft best-path runs)
    lm_weight: float = 0.3  # audio ctc: alpha, weight of the token n-gram LM in the beam (bench/ctc_lm_sweep.py)
    length_bonus: float = 1.5  # audio ctc: beta, score bonus per emitted token in the beam

    def __post_init__(self) -> None:
        if self.grid is not None:
            self.grid = (int(self.grid[0]), int(self.grid[1]))  # JSON gives a list
        # each adapter class checks the fields it uses when it is built

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "adapter config") -> "AdapterConfig":
        return config_from_dict(cls, data, source=source)


def build_adapter(cfg: AdapterConfig) -> nn.Module:
    """Build the adapter registered under ``cfg.kind``."""
    return ADAPTERS.get(cfg.kind)(cfg)


from . import audio, vision  # noqa: E402  (registers the entries; they import ADAPTERS from here)

__all__ = ["ADAPTERS", "AdapterConfig", "build_adapter", "audio", "vision"]
