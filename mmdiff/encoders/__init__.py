"""Modality encoders (LLaVA's ``multimodal_encoder``): images -> patch tokens, audio -> Whisper states.

The heavy backbones (timm, open_clip, transformers' Whisper) are imported when an encoder is built.
"""
from __future__ import annotations

from .audio import AUDIO_ENCODERS, AudioEncoder, AudioEncoderConfig, AudioFeatures, build_audio_encoder
from .layouts import IMAGE_LAYOUTS, AnyresLayout, ImageLayoutConfig, build_image_layout
from .vision import VISION_ENCODERS, VisionEncoder, VisionEncoderConfig, build_vision_encoder

__all__ = [
    "AUDIO_ENCODERS", "AudioEncoder", "AudioEncoderConfig", "AudioFeatures", "build_audio_encoder",
    "IMAGE_LAYOUTS", "AnyresLayout", "ImageLayoutConfig", "build_image_layout",
    "VISION_ENCODERS", "VisionEncoder", "VisionEncoderConfig", "build_vision_encoder",
]
