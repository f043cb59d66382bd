"""mmdiff: multimodal discrete-diffusion language models.

Heavy optional dependencies (gradio, open_clip, transformers' Whisper) are imported lazily by the
modules that need them; ``import mmdiff`` stays light.
"""
from __future__ import annotations

__version__ = "0.1.0"

DEFAULT_MODEL_DIR = "checkpoints/mmdiff-tiny"


def from_pretrained(path: str, **kwargs):
    """Load any supported directory as a ``MultimodalDiffusionLM``: mmdiff's own models, LLaDA-V, and
    LLaDA / Dream (text-only, with the directory's tokenizer). ``dtype=`` and ``device=`` pass through.
    For the bare decoder of a LLaDA / Dream checkpoint use ``mmdiff.checkpoints.load_checkpoint``."""
    from .checkpoints import load_multimodal

    return load_multimodal(path, **kwargs)
