"""Resumable training state: the model, AdamW's moments and ``train_state.json`` (stage, step),
written to a temporary directory and then renamed, so a crash never leaves a torn checkpoint."""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..io import load_safetensors, write_json
from ..model import MultimodalDiffusionLM

OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "train_state.json"


def check_same_run(path: Path, state: dict, settings: dict, *, other: str, legacy_ok: bool = False) -> None:
    """Refuse to resume a state that another run wrote: its ``config`` (the settings :func:`save_state` was
    given) must equal ``settings`` as JSON reads them back. ``legacy_ok``: a state without one (written before
    states carried it) resumes. ``other`` names the other run in the one-line error."""
    if state.get("config", settings if legacy_ok else None) != json.loads(json.dumps(settings)):
        raise ValueError(f"{path} belongs to a run {other}; use --fresh to start over")


def warmup_cosine(step: int, peak: float, *, warmup: int, total: int, floor: float) -> float:
    """Learning rate at ``step`` (0-based): linear warmup to ``peak`` over ``warmup`` steps, then cosine
    decay (Loshchilov & Hutter 2017, SGDR without restarts) to ``floor * peak`` at ``total`` steps,
    held there after:  lr = peak * (floor + (1 - floor) * (1 + cos(pi * min(1, p))) / 2),
    p = (step - warmup) / (total - warmup)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))


def append_log(path: Path, record: dict) -> None:
    """Append one JSON record as a line of the training log ``path`` (its folder is made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def save_state(path: Path, model: MultimodalDiffusionLM, opt: torch.optim.Optimizer | None, state: dict, *,
               write_model: Callable[[Path], None] | None = None) -> None:
    """Write ``model``, the AdamW moments of its parameters in ``opt`` (training-only heads are not
    checkpointed) and ``state`` to ``path`` atomically.

    Args:
        path: the checkpoint directory (replaced).
        model: the model being trained (its parameter names key the moments).
        opt: its AdamW optimizer (None: the model and the state only, as at a stage's end).
        state: ``{"stage": index, "step": steps done}``; the moments' step counts are added.
        write_model: writes the model's files into the directory it is given (default:
            ``model.save_pretrained``; a LoRA run writes the un-merged base and its adapters).
    """
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (write_model or model.save_pretrained)(tmp)
    if opt is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        tensors, steps = {}, {}
        for group in opt.param_groups:
            for p in group["params"]:
                s = opt.state.get(p)
                if s and id(p) in names:  # training-only heads are not checkpointed
                    n = names[id(p)]
                    tensors[f"{n}::exp_avg"] = s["exp_avg"].contiguous()
                    tensors[f"{n}::exp_avg_sq"] = s["exp_avg_sq"].contiguous()
                    steps[n] = float(s["step"])
        save_file(tensors, str(tmp / OPTIMIZER_NAME))
        state = {**state, "adam_steps": steps}
    write_json(tmp / STATE_NAME, state)
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_optimizer(path: Path, model: MultimodalDiffusionLM, opt: torch.optim.Optimizer, steps: dict) -> None:
    """Restore the AdamW moments :func:`save_state` wrote to ``path`` into ``opt`` (none when absent).

    Args:
        path: the checkpoint directory.
        model: the model, whose parameter names key the moments.
        opt: the optimizer over its parameters.
        steps: parameter name -> AdamW step count (``train_state.json``'s ``adam_steps``).
    """
    f = path / OPTIMIZER_NAME
    if not f.exists():
        return
    tensors = load_safetensors(f)
    for n, p in model.named_parameters():
        if n in steps:
            opt.state[p] = {"step": torch.tensor(steps[n]), "exp_avg": tensors[f"{n}::exp_avg"],
                            "exp_avg_sq": tensors[f"{n}::exp_avg_sq"]}
