"""Training: the hybrid AR-then-diffusion recipe (Dimple) with encoder grounding."""
from .recipe import StageConfig, TrainConfig

__all__ = ["StageConfig", "TrainConfig"]
