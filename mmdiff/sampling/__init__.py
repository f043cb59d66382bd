"""The one masked-diffusion sampler and its strategies."""
from .decode import DecodeConfig, SearchConfig
from .denoisers import FullRecompute, PrefixCache
from .pruning import PruningConfig
from .rules import REMASKING, TRANSFER
from .sampler import (Denoiser, SampleOutput, SamplerConfig, SamplerRun, StepEvent, StepState, Strategy, SuppressTokens,
                      iter_sample, predict, sample)
from .schedules import SCHEDULES, num_transfer

__all__ = ["DecodeConfig", "Denoiser", "FullRecompute", "PrefixCache", "PruningConfig", "REMASKING", "SCHEDULES",
           "SampleOutput", "SamplerConfig", "SamplerRun", "SearchConfig", "StepEvent", "StepState", "Strategy",
           "SuppressTokens", "TRANSFER", "iter_sample", "num_transfer", "predict", "sample"]
