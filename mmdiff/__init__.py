"""mmdiff: multimodal discrete-diffusion language models.

Heavy optional dependencies (gradio, open_clip, transformers' Whisper) are imported lazily by the
modules that need them; ``import mmdiff`` stays light.
"""
from __future__ import annotations

__version__ = "0.1.0"

DEFAULT_MODEL_DIR = "checkpoints/mmdiff-tiny"


def from_pretrained(path: str, **kwargs):
    """Load a model directory: mmdiff's own multimodal model, or a LLaDA / Dream / LLaDA-V checkpoint."""
    from .checkpoints import load_checkpoint

    return load_checkpoint(path, **kwargs)
