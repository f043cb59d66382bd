"""``mmdiff.load(path)``: the one loader. Every supported directory becomes a
:class:`~mmdiff.model.MultimodalDiffusionLM`; the formats themselves are data in
:mod:`mmdiff.checkpoints` (the bare decoder of a text checkpoint: :func:`mmdiff.checkpoints.load_checkpoint`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoints import (
    SPECIAL_TOKENS_NAME,
    ReleasedTokenizer,
    is_lavida,
    is_llada_v,
    load_lavida,
    load_llada_v,
    load_pretrained,
    open_checkpoint,
    require_tokenizer,
)
from .model import MODEL_TYPE, ModelConfig, MultimodalDiffusionLM


def load(path: str | Path, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> "MultimodalDiffusionLM":
    """Any loadable directory as a :class:`~mmdiff.model.MultimodalDiffusionLM`.

    * LLaDA-V: decoder, SigLIP tower and projector (:func:`~mmdiff.checkpoints.load_llada_v`);
    * LaViDa (LLaDA or Dream variant): decoder under the prefix-DLM mask, SigLIP tower, projector and
      the ``anyres`` image layout (:func:`~mmdiff.checkpoints.load_lavida`);
    * LLaDA / Dream / a converted decoder with ``special_tokens.json``: a text-only model (no
      encoders yet; :mod:`mmdiff.training.adapters` attaches and trains them), with the directory's
      tokenizer under mmdiff's names (:class:`~mmdiff.checkpoints.ReleasedTokenizer`);
    * mmdiff's own multimodal directories: :meth:`MultimodalDiffusionLM.from_pretrained`.

    Args:
        path: the directory.
        dtype: parameter dtype; None keeps the checkpoint's own.
        device: where the parameters live.
    """
    directory, config = open_checkpoint(path)
    if config.get("model_type") == MODEL_TYPE:
        return MultimodalDiffusionLM.from_pretrained(directory, device=device, dtype=dtype)
    if is_lavida(config):
        return load_lavida(directory, dtype=dtype, device=device)
    if is_llada_v(config):
        return load_llada_v(directory, dtype=dtype, device=device)
    loaded = load_pretrained(directory, dtype=dtype, device=device, tokenizer=False)
    if loaded.special_ids is None:
        raise ValueError(f"{directory}: no {SPECIAL_TOKENS_NAME}, so the special-token ids are unknown "
                         "(write the directory with mmdiff convert)")
    tokenizer = ReleasedTokenizer(require_tokenizer(directory), loaded.special_ids,
                                  vocab_size=loaded.decoder.cfg.vocab_size)
    with torch.device("meta"):
        model = MultimodalDiffusionLM(ModelConfig(decoder=loaded.decoder.cfg), tokenizer)
    model.decoder = loaded.decoder  # the loaded weights replace the meta placeholder
    return model.eval()
