"""Decode presets of the shipped model's tasks: the canvas each kind of answer needs."""
from __future__ import annotations

from ..sampling import DecodeConfig, SamplerConfig

#: short answers: the 8-token canvas mmdiff-tiny is trained on
SHORT_ANSWER = DecodeConfig(sampler=SamplerConfig(gen_length=8))
#: JSON captions: a 6-object caption is about 49 tokens
JSON_CAPTION = DecodeConfig(sampler=SamplerConfig(gen_length=64))
