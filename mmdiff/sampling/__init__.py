"""The one masked-diffusion sampler and its strategies."""
from .denoisers import FullRecompute, PrefixCache
from .rules import REMASKING, TRANSFER
from .sampler import (Denoiser, SampleOutput, SamplerConfig, StepEvent, StepState, Strategy, SuppressTokens,
                      iter_sample, predict, sample)
from .schedules import SCHEDULES, num_transfer

__all__ = ["Denoiser", "FullRecompute", "PrefixCache", "REMASKING", "SCHEDULES", "SampleOutput", "SamplerConfig",
           "StepEvent", "StepState", "Strategy", "SuppressTokens", "TRANSFER", "iter_sample", "num_transfer",
           "predict", "sample"]
