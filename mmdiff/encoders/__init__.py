"""Modality encoders (LLaVA's ``multimodal_encoder``): images -> patch tokens or discrete codes (:mod:`.vq`),
audio -> Whisper states.

The heavy backbones (timm, open_clip, transformers' Whisper) are imported when an encoder is built.
"""
from __future__ import annotations

from .audio import AUDIO_ENCODERS, AudioEncoder, AudioEncoderConfig, AudioFeatures, build_audio_encoder
from .vision import VISION_ENCODERS, VisionEncoder, VisionEncoderConfig, build_vision_encoder
from .vq import MAGVIT2_TOKENIZERS, Magvit2Tokenizer  # registers "magvit2"

__all__ = [
    "AUDIO_ENCODERS", "AudioEncoder", "AudioEncoderConfig", "AudioFeatures", "build_audio_encoder",
    "MAGVIT2_TOKENIZERS", "Magvit2Tokenizer", "VISION_ENCODERS", "VisionEncoder", "VisionEncoderConfig",
    "build_vision_encoder",
]
