"""mmdiff: multimodal discrete-diffusion language models.

Heavy optional dependencies (gradio, open_clip, transformers' Whisper) are imported lazily by the
modules that need them; ``import mmdiff`` stays light.
"""
from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

#: the shipped model, ``checkpoints/mmdiff-tiny`` of the source checkout this package runs from, so that
#: every command finds it from any directory (relative to the working directory when the package was
#: installed without the checkout)
_SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "mmdiff-tiny"
DEFAULT_MODEL_DIR = str(_SHIPPED) if _SHIPPED.is_dir() else "checkpoints/mmdiff-tiny"


def load(path: str, **kwargs):
    """Load any supported directory as a ``MultimodalDiffusionLM``: mmdiff's own models, LLaDA-V, and
    LLaDA / Dream (text-only, with the directory's tokenizer); see :func:`mmdiff.loading.load`.
    ``dtype=`` (default ``"auto"``: float32 on the CPU, the checkpoint's own dtype on a GPU) and
    ``device=`` pass through. For the bare decoder of a LLaDA / Dream checkpoint use
    ``mmdiff.checkpoints.load_checkpoint``."""
    from .loading import load as _load

    return _load(path, **kwargs)


def __getattr__(name: str):
    # the decode configuration, without importing torch at ``import mmdiff``
    if name in ("DecodeConfig", "SamplerConfig", "PruningConfig", "SearchConfig"):
        from . import sampling

        return getattr(sampling, name)
    raise AttributeError(f"module 'mmdiff' has no attribute {name!r}")
