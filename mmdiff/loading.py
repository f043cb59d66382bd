"""``mmdiff.load(path)``: the one loader. Every supported directory becomes a
:class:`~mmdiff.model.MultimodalDiffusionLM`; the formats themselves are data in
:mod:`mmdiff.checkpoints` (the bare decoder of a text checkpoint: :func:`mmdiff.checkpoints.load_checkpoint`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .adapters.ctc import LM_NAME
from .checkpoints import (
    DTYPES,
    SPECIAL_TOKENS_NAME,
    ReleasedTokenizer,
    is_diffa,
    is_lavida,
    is_llada_v,
    load_diffa,
    load_lavida,
    is_mmada,
    is_dimple,
    load_dimple,
    load_llada_v,
    load_mmada,
    load_pretrained,
    open_checkpoint,
    require_tokenizer,
)
from .checkpoints.formats import INDEX_NAME
from .io import CONFIG_NAME, WEIGHTS_NAME, check_device, read_json
from .model import MODEL_TYPE, ModelConfig, MultimodalDiffusionLM
from .tokenizer import load_tokenizer

#: ``--dtype`` choices of every command that loads a model: ``auto`` (:func:`resolve_dtype`) or a dtype name
DTYPE_CHOICES: tuple[str, ...] = ("auto", *DTYPES)


@dataclass(frozen=True)
class Family:
    """A released multimodal family :func:`load` dispatches to, recognised by its ``config.json``."""

    name: str
    detect: Callable[[Mapping[str, Any]], bool]  # config dict -> is this family
    load: Callable[..., MultimodalDiffusionLM]  # (directory, *, dtype, device) -> model
    media: tuple[str, ...] = ("image",)  # what its encoders read: "image", "audio"
    tokenizer_dir: str = ""  # sub-directory that holds the tokenizer files ("" = the directory itself)


#: the released multimodal families, first match wins; text-only LLaDA / Dream / mmdiff-decoder and
#: mmdiff's own directories are handled by :func:`load` itself
FAMILIES: tuple[Family, ...] = (
    Family("lavida", is_lavida, load_lavida),  # before llada-v: both are model_type llava_llada
    Family("llada-v", is_llada_v, load_llada_v),
    Family("dimple", is_dimple, load_dimple),
    Family("diffa", is_diffa, load_diffa, media=("audio",), tokenizer_dir="llm"),
    Family("mmada", is_mmada, load_mmada),
)


def media_of(path: str | Path) -> tuple[str, ...]:
    """What a directory's model can read ("image", "audio"), from its ``config.json`` alone: so a
    command refuses a medium before loading (minutes, for a 7-8B checkpoint), not after. A text-only
    LLaDA / Dream / mmdiff-decoder directory reads neither."""
    directory, config = open_checkpoint(path)
    if config.get("model_type") == MODEL_TYPE:
        return tuple(m for m, key in (("image", "vision"), ("audio", "audio")) if config.get(key))
    family = family_of(config)
    return family.media if family else ()


def family_of(config: Mapping[str, Any]) -> Family | None:
    """The released multimodal family of a ``config.json``, or None."""
    return next((f for f in FAMILIES if f.detect(config)), None)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The device a model is loaded on: ``auto`` is this process's GPU (``LOCAL_RANK`` under torchrun,
    else the first) when CUDA is available, else the CPU; any other name must exist here
    (:func:`mmdiff.io.check_device`: one line naming the devices this machine has)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    return torch.device(check_device(name))


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype | None:
    """The parameter dtype a model is loaded in; the one rule of every command, the demo and the plugin.

    ``auto``: float32 on the CPU (bfloat16 matmuls are slow there and half precision is unsupported;
    a released 8B model in bfloat16 is for accelerators), the checkpoint's own dtype elsewhere.

    Args:
        dtype: ``auto``, a name of :data:`~mmdiff.checkpoints.DTYPES`, a ``torch.dtype``, or None
            (the checkpoint's own).
        device: where the model will live.

    Raises:
        ValueError: an unknown dtype name, naming the choices.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else None
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def text_tokenizer(path: str | Path) -> Any:
    """The tokenizer of any loadable directory, without its weights (e.g. to measure answers in the
    model's tokens): mmdiff's own, or the released checkpoint's tokenizer files."""
    directory, config = open_checkpoint(path)
    if config.get("model_type") == MODEL_TYPE:
        return load_tokenizer(directory)
    family = family_of(config)
    return require_tokenizer(directory / family.tokenizer_dir if family else directory)


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files whose content makes a directory's model (a run's identity hashes them): ``config.json``
    and the weights (``model.safetensors``, or the shard index and every shard it names), and a CTC
    language model (``ctc_lm.json``) when there is one, and the same of each sub-directory that holds a
    ``config.json`` (DIFFA's ``whisper/`` and ``llm/``). Tokenizer files are not included."""
    directory = Path(path)
    files = [directory / CONFIG_NAME]
    index = directory / INDEX_NAME
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        files += [index, *(directory / s for s in shards)]
    else:  # mmdiff's model.safetensors, or a part's own weights file (MMaDA's vq_model/)
        files += sorted(directory.glob("*.safetensors")) or [directory / WEIGHTS_NAME]
    if (directory / LM_NAME).is_file():
        files.append(directory / LM_NAME)
    for sub in sorted(p for p in directory.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file()):
        files += checkpoint_files(sub)
    return files


def load(path: str | Path, *, dtype: str | torch.dtype | None = "auto",
         device: str | torch.device = "cpu") -> "MultimodalDiffusionLM":
    """Any loadable directory as a :class:`~mmdiff.model.MultimodalDiffusionLM`.

    * LLaDA-V: decoder, SigLIP tower and projector (:func:`~mmdiff.checkpoints.load_llada_v`);
    * LaViDa (LLaDA or Dream variant): decoder under the prefix-DLM mask, SigLIP tower, projector and
      ``anyres`` views pooled per view (:func:`~mmdiff.checkpoints.load_lavida`);
    * Dimple: M-RoPE decoder, Qwen2.5-VL tower and projector (:func:`~mmdiff.checkpoints.load_dimple`);
    * DIFFA: LLaDA, Whisper encoder and dual adapter, from the directory and its ``whisper/`` and
      ``llm/`` sub-directories (:func:`~mmdiff.checkpoints.load_diffa`);
    * MMaDA: decoder and MAGVIT-v2 image tokenizer from ``vq_model/`` (:func:`~mmdiff.checkpoints.load_mmada`);
    * LLaDA / Dream / a converted decoder with ``special_tokens.json``: a text-only model (no
      encoders yet; :mod:`mmdiff.training.adapters` attaches and trains them), with the directory's
      tokenizer under mmdiff's names (:class:`~mmdiff.checkpoints.ReleasedTokenizer`);
    * mmdiff's own multimodal directories: :meth:`MultimodalDiffusionLM.from_pretrained`.

    Args:
        path: the directory.
        dtype: parameter dtype: ``auto`` (float32 on the CPU, the checkpoint's own elsewhere:
            :func:`resolve_dtype`), a dtype or its name, or None (the checkpoint's own).
        device: where the parameters live (``auto``: :func:`resolve_device`).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    directory, config = open_checkpoint(path)
    if config.get("model_type") == MODEL_TYPE:
        return MultimodalDiffusionLM.from_pretrained(directory, device=device, dtype=dtype)
    family = family_of(config)
    if family is not None:
        return family.load(directory, dtype=dtype, device=device)
    loaded = load_pretrained(directory, dtype=dtype, device=device, tokenizer=False)
    if loaded.special_ids is None:
        raise ValueError(f"{directory}: no {SPECIAL_TOKENS_NAME}, so the special-token ids are unknown "
                         "(write the directory with mmdiff convert)")
    tokenizer = ReleasedTokenizer(require_tokenizer(directory), loaded.special_ids,
                                  vocab_size=loaded.decoder.cfg.vocab_size)
    with torch.device("meta"):
        model = MultimodalDiffusionLM(ModelConfig(decoder=loaded.decoder.cfg), tokenizer)
    model.decoder = loaded.decoder  # the loaded weights replace the meta placeholder
    return model.eval()
