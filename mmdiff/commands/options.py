"""Flags shared by the commands: the model (``--model``, ``--device``, ``--dtype``: any directory
:func:`mmdiff.load` reads) and the decode flags of ``ask``, ``eval``, ``caption`` and ``serve``: one
flag per option of :class:`~mmdiff.sampling.DecodeConfig` (sampler, cache, pruning, search), derived
from the fields' own help, choices and ranges, so a new field is a new flag everywhere."""
from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from pathlib import Path

from .. import DEFAULT_MODEL_DIR
from ..options import Option
from ..sampling import DecodeConfig

#: what ``--model`` accepts, for the help of every command
MODEL_HELP = ("model directory: mmdiff's own, or a released LLaDA / Dream / LLaDA-V checkpoint as downloaded "
              "(config.json, safetensors, tokenizer files), or any other family mmdiff.load reads")


def add_model_arguments(p: argparse.ArgumentParser, *, device_default: str = "auto") -> None:
    """``--model DIR``, ``--device`` and ``--dtype``: the model every command loads with :func:`mmdiff.load`.

    Args:
        p: the parser.
        device_default: ``auto`` (a GPU when there is one) or ``cpu``.
    """
    from ..loading import DTYPE_CHOICES

    p.add_argument("--model", default=DEFAULT_MODEL_DIR, help=f"{MODEL_HELP} (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--device", default=device_default,
                   help=f"cpu, cuda, cuda:1, mps or auto (this process's GPU if any, else cpu); "
                        f"default: {device_default}")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="parameter dtype; auto: float32 on the CPU, the checkpoint's own dtype (e.g. bfloat16) on a "
                        "GPU (default: auto)")


def check_model_arguments(args: argparse.Namespace) -> None:
    """Refuse, before any work, a ``--model`` that is not a directory with a config.json, a
    ``--device`` this machine lacks, and an ``--image`` / ``--audio`` the model cannot read (one line
    each; from its config.json, so a 7-8B checkpoint is not loaded first)."""
    from ..io import CONFIG_NAME
    from ..loading import media_of, resolve_device
    from ..model import NO_HEARING, NO_VISION

    model = Path(args.model)
    if not model.is_dir():
        raise FileNotFoundError(f"--model {model}: no such directory")
    if not (model / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"--model {model}: no {CONFIG_NAME}, so it is not a model directory")
    resolve_device(args.device)
    media = media_of(model)
    for flag, medium, refusal in (("image", "image", NO_VISION), ("audio", "audio", NO_HEARING)):
        if getattr(args, flag, None) and medium not in media:
            raise ValueError(refusal)


def load_model(args: argparse.Namespace):
    """The model of :func:`add_model_arguments`' flags (:func:`mmdiff.load`)."""
    from ..loading import load

    check_model_arguments(args)
    return load(args.model, dtype=args.dtype, device=args.device)

GROUPS = {"sampler": "sampler", "": "cache", "pruning": "token pruning and layer skipping",
          "search": "test-time search"}


def _flag_type(opt: Option):
    def convert(text: str):
        try:
            return opt.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = opt.kind.__name__  # argparse names the type in its error
    return convert


def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def add_decode_arguments(p: argparse.ArgumentParser, defaults: DecodeConfig | None = None, *,
                         search: bool = True, chosen_later: Mapping[str, str] | None = None) -> None:
    """Add one flag per :meth:`DecodeConfig.options` entry (``--gen-length``, ``--cache``, ``--prune``,
    ``--search``, ...), grouped by section, defaults from ``defaults``.

    Args:
        p: the parser.
        defaults: the command's defaults (e.g. an 8-token canvas for ``ask``).
        search: include the test-time search flags.
        chosen_later: options whose value the command picks when the flag is not given (key -> how,
            shown as the default in ``--help``); such a flag reads None when not given.
    """
    defaults = defaults or DecodeConfig()
    chosen_later = chosen_later or {}
    values = {**defaults.values(), **dict.fromkeys(chosen_later)}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in DecodeConfig.options():
        if opt.section == "search" and not search:
            continue
        g = groups.get(opt.section) or groups.setdefault(opt.section, p.add_argument_group(GROUPS[opt.section]))
        default = values[opt.key]
        shown = [f"default: {chosen_later[opt.key]}"] if opt.key in chosen_later else \
            [] if default is None else [f"default: {_shown(default)}"]
        shown += [opt.describe_range()] if opt.describe_range() else []
        if opt.kind is bool:
            if default:  # on by default: the flag turns it off
                g.add_argument(f"--no-{opt.key.replace('_', '-')}", dest=opt.key, action="store_false",
                               help=f"turn off: {opt.help}")
            else:
                g.add_argument(opt.flag, dest=opt.key, action="store_true", help=opt.help)
            continue
        g.add_argument(opt.flag, dest=opt.key, type=_flag_type(opt), default=default, nargs="+" if opt.many else None,
                       metavar=("{" + ",".join(opt.choices) + "}") if opt.choices else None,
                       help=f"{opt.help}" + (f" ({'; '.join(shown)})" if shown else ""))


def decode_config_from_args(args: argparse.Namespace, defaults: DecodeConfig | None = None) -> DecodeConfig:
    """The :class:`DecodeConfig` of the flags added by :func:`add_decode_arguments` (values checked:
    a bad combination raises ValueError naming it); a ``chosen_later`` flag not given keeps ``defaults``'
    value."""
    defaults = defaults or DecodeConfig()
    given = {}
    for o in DecodeConfig.options():
        if hasattr(args, o.key) and (getattr(args, o.key) is not None or o.optional):
            value = getattr(args, o.key)
            if o.many and isinstance(value, list):  # nargs="+": each word parsed to a tuple ("3,4" or 3 4)
                value = tuple(x for part in value for x in part)
            given[o.key] = value
    return defaults.with_values(given)


def _number(kind: type, *, low: float | None = None):
    """An argparse type: a finite ``kind`` (int or float), at least ``low`` when given."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or (low is not None and value < low):
            bound = "" if low is None else f" >= {low:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text}")
        return value

    convert.__name__ = kind.__name__
    return convert


def add_speech_arguments(p: argparse.ArgumentParser) -> None:
    """``--asr-beam`` / ``--asr-lm-weight`` / ``--asr-length-bonus``: how the ``audio_ctc`` adapter turns
    a spoken question into tokens (defaults: the model's ``config.json``). Values are checked as the
    flags are read: a beam width >= 0, an LM weight >= 0, a finite length bonus."""
    g = p.add_argument_group("spoken questions (audio_ctc models with a ctc_lm.json)")
    g.add_argument("--asr-beam", type=_number(int, low=0), default=None,
                   help="prefix beam width of the CTC + n-gram LM decoder, >= 0; 0 = soft best-path runs, no LM")
    g.add_argument("--asr-lm-weight", type=_number(float, low=0), default=None,
                   help="alpha, weight of the LM in the beam, >= 0")
    g.add_argument("--asr-length-bonus", type=_number(float), default=None,
                   help="beta, score bonus per emitted token (negative: a penalty)")


def apply_speech_arguments(model, args: argparse.Namespace) -> None:
    """Set the flags of :func:`add_speech_arguments` that were given on ``model``'s audio adapter."""
    given = {k: getattr(args, a) for k, a in (("beam_width", "asr_beam"), ("lm_weight", "asr_lm_weight"),
                                             ("length_bonus", "asr_length_bonus")) if getattr(args, a) is not None}
    if not given:
        return
    if not model.transcribes:  # only the audio_ctc adapter decodes with a beam
        raise ValueError("--asr-* flags need a model with an audio adapter of kind audio_ctc")
    for k, v in given.items():
        setattr(model.audio_adapter.cfg, k, v)
