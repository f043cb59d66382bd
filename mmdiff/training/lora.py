"""LoRA on the decoder (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), through ``peft``.

Each targeted linear layer ``W`` becomes ``W x + (alpha / r) B A x`` with trainable ``A`` (r x in),
``B`` (out x r, zero at the start) and ``W`` frozen. A fine-tune's output folds ``B A`` into ``W``
(:func:`merge_lora`); its resumable state keeps them apart: the un-merged base in the model files
(:func:`without_lora`) and the adapters in :data:`LORA_NAME` (peft's state-dict helpers), which
:func:`load_lora` puts back on a model that :func:`add_lora` gave fresh adapters.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..io import load_safetensors
from ..model import MultimodalDiffusionLM

#: the decoder's linear layers that get adapters (attention and MLP projections)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: the adapters' weights in a resumable training state
LORA_NAME = "lora.safetensors"


def add_lora(model: MultimodalDiffusionLM, rank: int) -> None:
    """Put fresh LoRA adapters (rank ``rank``, alpha = 2 * rank, no dropout) on the decoder's :data:`LORA_TARGETS`."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    model.decoder = inject_adapter_in_model(cfg, model.decoder)


def _lora_layers(model: MultimodalDiffusionLM) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, LoRA layer) of every adapted layer of the decoder."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in model.decoder.named_modules():
        if isinstance(module, LoraLayer):
            parent = model.decoder.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model.decoder
            out.append((parent, name.rsplit(".", 1)[-1], module))
    return out


def merge_lora(model: MultimodalDiffusionLM) -> None:
    """Fold the LoRA updates into ``model``'s decoder weights and drop the adapter layers."""
    for parent, attr, module in _lora_layers(model):
        module.merge()
        setattr(parent, attr, module.get_base_layer())


@contextmanager
def without_lora(model: MultimodalDiffusionLM) -> Iterator[MultimodalDiffusionLM]:
    """``model`` with its base layers in place of the LoRA layers (not merged, the same tensors: no copy),
    e.g. to save the un-merged base; the adapters are back on leaving."""
    layers = _lora_layers(model)
    for parent, attr, module in layers:
        setattr(parent, attr, module.get_base_layer())
    try:
        yield model
    finally:
        for parent, attr, module in layers:
            setattr(parent, attr, module)


def lora_state(model: MultimodalDiffusionLM) -> dict[str, torch.Tensor]:
    """The decoder's LoRA weights (``peft.get_peft_model_state_dict``), contiguous for safetensors."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model.decoder).items()}


def load_lora(model: MultimodalDiffusionLM, path: str | Path) -> None:
    """Put the LoRA weights saved at ``path`` (:func:`lora_state`) on ``model``'s adapters (:func:`add_lora`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the saved adapters do not match the model's (rank, layers); the tensor is named.
    """
    from peft import set_peft_model_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: missing {path.name} (the LoRA adapters of the run)")
    saved = load_safetensors(path, device=model.device)
    want = lora_state(model)
    missing, unexpected = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    wrong = [k for k in want if k in saved and saved[k].shape != want[k].shape]
    if missing or unexpected or wrong:
        name = (missing or unexpected or wrong)[0]
        raise ValueError(f"{path}: LoRA adapters do not match the model's ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(wrong)} of another shape, e.g. {name})")
    set_peft_model_state_dict(model.decoder, saved)
