"""The one masked-diffusion sampler and its strategies."""
from .decode import DecodeConfig, SearchConfig
from .denoisers import FullRecompute, PrefixCache
from .pruning import PruningConfig
from .rules import REMASKING, TRANSFER
from .sampler import (
                      Denoiser,
                      SampleOutput,
                      SamplerConfig,
                      StepEvent,
                      StepState,
                      Strategy,
                      SuppressTokens,
                      iter_sample,
                      predict,
                      sample,
)
from .schedules import SCHEDULES, num_transfer

__all__ = ["DecodeConfig", "Denoiser", "PruningConfig", "SearchConfig", "FullRecompute", "PrefixCache", "REMASKING", "SCHEDULES", "SampleOutput", "SamplerConfig",
           "StepEvent", "StepState", "Strategy", "SuppressTokens", "TRANSFER", "iter_sample", "num_transfer",
           "predict", "sample"]
