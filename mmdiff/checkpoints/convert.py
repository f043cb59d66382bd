"""``mmdiff convert SRC DST``: a text-only checkpoint in the mmdiff-decoder format."""
from __future__ import annotations

import argparse
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ..decoder import Decoder
from ..io import CONFIG_NAME, WEIGHTS_NAME, check_device, check_output_dir, save_weights, write_json
from ..model import MODEL_TYPE
from .formats import DTYPES, SPECIAL_TOKENS_NAME, LoadedCheckpoint, load_pretrained, open_checkpoint, tokenizer_files

# ------------------------------------------------------------------------------------------------
# mmdiff convert SRC DST
# ------------------------------------------------------------------------------------------------
def save_decoder(decoder: Decoder, directory: str | Path) -> None:
    """Write ``decoder`` in the ``mmdiff-decoder`` format: ``config.json`` (model_type
    ``mmdiff-decoder`` + :class:`DecoderConfig`) and ``model.safetensors`` with the decoder's own
    tensor names; :func:`load_pretrained` reads it back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / CONFIG_NAME, {"model_type": "mmdiff-decoder", **decoder.cfg.to_dict()})
    save_weights(decoder, directory / WEIGHTS_NAME)


def convert(src: str | Path, dst: str | Path, *, dtype: torch.dtype | None = None,
            device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Write a text-only LLaDA / Dream checkpoint (or an mmdiff-decoder directory, e.g. to change its
    dtype) in the mmdiff-decoder format: ``config.json`` + ``model.safetensors`` (via
    :func:`save_decoder`), ``special_tokens.json``, and copies of the tokenizer files. ``dst`` is
    checked before anything is read.

    Raises:
        ValueError: ``src`` is an mmdiff model directory (nothing to convert) or an unsupported
            checkpoint; ``dst`` is not empty.
        FileExistsError, NotADirectoryError, PermissionError: ``dst`` cannot be written.
    """
    dst = check_output_dir(dst, flag="DST")
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"destination {dst} exists and is not empty")
    directory, config = open_checkpoint(src)
    if config.get("model_type") == MODEL_TYPE:
        raise ValueError(f"{directory} is an mmdiff model directory: it needs no conversion (give it as --model, or "
                         "mmdiff.load it); convert takes text-only LLaDA / Dream checkpoints and mmdiff-decoder "
                         "directories")
    loaded = load_pretrained(src, dtype=dtype, device=device, tokenizer=False)
    save_decoder(loaded.decoder, dst)
    if loaded.special_ids is not None:
        write_json(dst / SPECIAL_TOKENS_NAME, asdict(loaded.special_ids))
    for path in tokenizer_files(src):
        shutil.copyfile(path, dst / path.name)
    return loaded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mmdiff convert SRC DST [--dtype ...] [--device ...]``."""
    parser.add_argument("src", help="a text-only LLaDA or Dream checkpoint directory, or an mmdiff-decoder "
                                    "directory written by convert (an mmdiff model directory needs no conversion; "
                                    "LLaDA-V loads with mmdiff.load)")
    parser.add_argument("dst", help="output directory, in the mmdiff-decoder format (created; must be empty if "
                                    "it exists)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="parameter dtype of the output (default: the checkpoint's own)")
    parser.add_argument("--device", default="cpu", help="device to load on while converting (default: cpu)")


def run(args: argparse.Namespace) -> int:
    """``mmdiff convert``: :func:`convert`, then one summary line."""
    loaded = convert(args.src, args.dst, dtype=None if args.dtype is None else DTYPES[args.dtype],
                     device=check_device(args.device))
    n_params = sum(p.numel() for p in loaded.decoder.parameters())
    print(f"converted {loaded.format} checkpoint {args.src} -> {args.dst} "
          f"({n_params:,} parameters, {next(loaded.decoder.parameters()).dtype}); special ids {loaded.special_ids}")
    return 0
