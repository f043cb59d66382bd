"""Sampler flags shared by ``ask``, ``eval``, ``caption`` and the demo: one definition, derived from
:class:`~mmdiff.sampling.SamplerConfig` so a new sampler field is a new flag everywhere."""
from __future__ import annotations

import argparse
from dataclasses import fields

from ..sampling import REMASKING, SCHEDULES, TRANSFER, SamplerConfig

HELP = {
    "gen_length": "response canvas length in tokens",
    "steps": "denoising steps (default: gen_length, one token per step)",
    "block_length": "semi-autoregressive block length (default: gen_length)",
    "schedule": f"noise schedule: {', '.join(SCHEDULES.names())}",
    "shift": "s of the shifted schedule",
    "remasking": f"confidence score deciding what stays masked: {', '.join(REMASKING.names())}",
    "transfer": f"how many tokens to fix per step: {', '.join(TRANSFER.names())} "
                "(threshold = Dimple's confident decoding, factor = Fast-dLLM)",
    "threshold": "confidence threshold of --transfer threshold",
    "factor": "f of --transfer factor",
    "temperature": "0 = greedy; > 0 = Gumbel-max sampling",
    "suppress_eos": "forbid EOS so the answer fills the canvas (exact length)",
    "seed": "random seed for sampling",
}
CHOICES = {"schedule": SCHEDULES.names, "remasking": REMASKING.names, "transfer": TRANSFER.names}


def add_sampler_arguments(p: argparse.ArgumentParser, *, gen_length: int | None = None) -> None:
    """Add one flag per :class:`SamplerConfig` field (``--gen-length``, ``--transfer``, ...)."""
    g = p.add_argument_group("sampler")
    defaults = SamplerConfig()
    for f in fields(SamplerConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "gen_length" and gen_length is not None:
            default = gen_length
        if f.type in ("bool", bool):
            g.add_argument(flag, action="store_true", help=HELP.get(f.name))
            continue
        kind = {"int": int, "float": float, "str": str, "int | None": int}.get(str(f.type), str)
        g.add_argument(flag, type=kind, default=default, choices=CHOICES[f.name]() if f.name in CHOICES else None,
                       help=f"{HELP.get(f.name, '')} (default: {default})")
    g.add_argument("--cache", default="none", choices=["none", "prefix"],
                   help="prompt KV cache: prefix = exact cache for prefix-LM models (default: none)")


def sampler_config_from_args(args: argparse.Namespace) -> SamplerConfig:
    return SamplerConfig(**{f.name: getattr(args, f.name) for f in fields(SamplerConfig)})
