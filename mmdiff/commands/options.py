"""Sampler flags shared by ``ask``, ``eval``, ``caption`` and the demo: one definition, derived from
:class:`~mmdiff.sampling.SamplerConfig` and :class:`~mmdiff.sampling.pruning.PruningConfig` so a new
field is a new flag everywhere. ``--cache`` picks the cache strategy (``CACHES``)."""
from __future__ import annotations

import argparse
from dataclasses import fields

from ..sampling import REMASKING, SCHEDULES, TRANSFER, SamplerConfig
from ..sampling.denoisers import CACHES
from ..sampling.pruning import PRUNE_SCHEDULES, PRUNERS, PruningConfig

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

PRUNING_HELP = {
    "prune": "visual-token pruning: fastv (attention from the response at layer K-1), divprune (diverse "
             "subset of image embeddings), vtw (withdraw all image tokens)",
    "keep_ratio": "fraction of image tokens kept by --prune fastv/divprune (1 = keep all)",
    "prune_layer": "K: image tokens are dropped before decoder layer K (0-based)",
    "prune_from_step": "first denoising step that prunes (late-step pruning)",
    "prune_schedule": "constant, or progressive (kept ratio decays from 1 to --keep-ratio over the steps)",
    "skip_layers": "comma-separated decoder layers to skip, e.g. 3,4",
    "skip_from_step": "first denoising step that skips --skip-layers",
}
PRUNING_CHOICES = {"prune": lambda: ["none", *PRUNERS.names()], "prune_schedule": lambda: list(PRUNE_SCHEDULES)}
CACHE_HELP = ("KV cache: none; prefix = exact prompt cache for prefix-LM models; block / dual = Fast-dLLM's "
              "approximate block-wise prefix / dual cache, refreshed at each block start")


def layer_list(text: str) -> tuple[int, ...]:
    """``"3,4"`` -> ``(3, 4)``; ``""`` -> ``()``."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 3,4, got {text!r}") from None


def add_sampler_arguments(p: argparse.ArgumentParser, *, gen_length: int | None = None) -> None:
    """Add one flag per :class:`SamplerConfig` field (``--gen-length``, ``--transfer``, ...), ``--cache``,
    and one per :class:`PruningConfig` field (``--prune``, ``--keep-ratio``, ``--skip-layers``, ...)."""
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
    g.add_argument("--cache", default="none", choices=CACHES.names(), help=f"{CACHE_HELP} (default: none)")
    g = p.add_argument_group("token pruning and layer skipping")
    pruning = PruningConfig()
    for f in fields(PruningConfig):
        default = getattr(pruning, f.name)
        kind = {"int": int, "float": float, "str": str}.get(str(f.type), layer_list)  # tuple -> "3,4"
        shown = (",".join(map(str, default)) or "none") if isinstance(default, tuple) else default
        g.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default,
                       choices=PRUNING_CHOICES[f.name]() if f.name in PRUNING_CHOICES else None,
                       help=f"{PRUNING_HELP[f.name]} (default: {shown})")


def sampler_config_from_args(args: argparse.Namespace) -> SamplerConfig:
    return SamplerConfig(**{f.name: getattr(args, f.name) for f in fields(SamplerConfig)})


def pruning_config_from_args(args: argparse.Namespace) -> PruningConfig:
    return PruningConfig(**{f.name: getattr(args, f.name) for f in fields(PruningConfig)})


def add_speech_arguments(p: argparse.ArgumentParser) -> None:
    """``--asr-beam`` / ``--asr-lm-weight`` / ``--asr-length-bonus``: how the ``audio_ctc`` adapter turns
    a spoken question into tokens (defaults: the model's ``config.json``)."""
    g = p.add_argument_group("spoken questions (audio_ctc models with a ctc_lm.json)")
    g.add_argument("--asr-beam", type=int, default=None,
                   help="prefix beam width of the CTC + n-gram LM decoder; 0 = soft best-path runs, no LM")
    g.add_argument("--asr-lm-weight", type=float, default=None, help="alpha, weight of the LM in the beam")
    g.add_argument("--asr-length-bonus", type=float, default=None, help="beta, score bonus per emitted token")


def apply_speech_arguments(model, args: argparse.Namespace) -> None:
    """Set the flags of :func:`add_speech_arguments` that were given on ``model``'s audio adapter."""
    given = {k: getattr(args, a) for k, a in (("beam_width", "asr_beam"), ("lm_weight", "asr_lm_weight"),
                                             ("length_bonus", "asr_length_bonus")) if getattr(args, a) is not None}
    if not given:
        return
    adapter = getattr(model, "audio_adapter", None)
    if not hasattr(adapter, "transcribe_ids"):  # every AdapterConfig has the fields; only audio_ctc reads them
        raise ValueError("--asr-* flags need a model with an audio adapter of kind audio_ctc")
    for k, v in given.items():
        setattr(adapter.cfg, k, v)
