"""Adapter-only training against a frozen decoder (DIFFA's recipe), and ``mmdiff train-adapter``.

DIFFA (Zhou et al. 2025, "DIFFA: Large Language Diffusion Models Can Listen") teaches a frozen
diffusion LLM (LLaDA) a new modality by training only the adapter between a frozen encoder and the
frozen LLM; LLaVA's stage-1 projector pretraining is the same for images. Here every parameter but
the chosen adapter is frozen and the loss is the masked-diffusion ELBO on the response (LLaDA SFT,
Nie et al. 2025, Eq. 5; :mod:`mmdiff.losses`):

    L = E_t [ (1/t) * sum_{i masked} -log p(x_i | prompt, x_t) ] / L_response,

where the response is the first answer + EOS, EOS-filled to the batch's longest (LLaDA's SFT padding).

Rows come from any format ``mmdiff train --data`` reads (:func:`mmdiff.data.readers.read_usable`:
mmdiff JSONL, LLaVA JSON / JSONL, HF ``datasets`` folders / Parquet / Arrow / CSV), each question
of a conversation on its own (:func:`~mmdiff.data.readers.as_rows`); bad records are skipped,
counted and their first reasons printed, and a file with no usable row stops before the model loads:

* ``image``: prompt = ``<image>`` + question; rows without an image or a question text and ASR rows
  are skipped.
* ``audio``: prompt = ``<audio>`` (+ ``<image>`` when the row has an image and the model a vision
  encoder, which stays frozen) + text, the text being the instruction on ASR rows and empty on spoken-question rows.

Data parallel under ``torchrun`` (gloo on CPU, nccl on GPU, :func:`~mmdiff.training.distributed.dist_info`):
each rank draws its own batches, rank 0's adapter is broadcast first and gradients are averaged with
one all-reduce per step, so every rank holds the same adapter.

The output directory holds ``adapter.safetensors`` (the adapter's state) and ``adapter.json`` (the
modality, the base, the encoder and adapter configs); :func:`attach_trained_adapter` reads it back.
With an mmdiff base (its own tokenizer) the output is also a whole model directory (``config.json``,
``model.safetensors``, ``tokenizer.json``): ``mmdiff ask / eval / demo --model OUT`` load it unchanged,
and the base directory is never written.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..adapters import ADAPTERS, AdapterConfig, adapter_config_from_dict, build_adapter
from ..checkpoints import DTYPES
from ..data.dataset import Row
from ..data.readers import as_rows, read_usable
from ..encoders.audio import AudioEncoderConfig, AudioFeatures, build_audio_encoder
from ..encoders.vision import PRESETS, VisionEncoderConfig, build_vision_encoder, preset
from ..io import (CONFIG_NAME, check_device, check_output_dir, load_safetensors, load_state_checked, read_json, save_weights,
                  write_json)
from ..loading import load
from ..losses import diffusion_loss, forward_mask
from ..model import MODEL_TYPE, PARTS, MultimodalDiffusionLM
from .distributed import allreduce_grads, dist_info, sync_params

log = logging.getLogger("mmdiff")

MODALITIES: tuple[str, ...] = ("image", "audio")
#: modality -> (encoder attribute, adapter attribute) of MultimodalDiffusionLM (and of ModelConfig)
SLOTS: dict[str, tuple[str, str]] = {"image": ("vision", "vision_adapter"), "audio": ("audio", "audio_adapter")}
DEFAULT_ADAPTER: dict[str, str] = {"image": "mlp2x_gelu", "audio": "audio_semantic"}
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; known: {MODALITIES}")


# ------------------------------------------------------------------------------------------------
# putting an encoder + adapter on a model
# ------------------------------------------------------------------------------------------------
def attach_encoder(model: MultimodalDiffusionLM, modality: str, encoder: VisionEncoderConfig | AudioEncoderConfig,
                   adapter: AdapterConfig | str | None = None, **adapter_fields: Any) -> AdapterConfig:
    """Build an encoder and its adapter and put them on ``model`` (config and modules).

    Args:
        model: a model without an encoder for ``modality`` (e.g. a text-only LLaDA from
            :func:`mmdiff.load`).
        modality: ``image`` or ``audio``.
        encoder: the encoder's config (its weights come from its own ``weights`` / ``checkpoint``).
        adapter: an adapter config, or a kind whose sizes are taken from the encoder and the decoder
            (None: :data:`DEFAULT_ADAPTER`).
        adapter_fields: further fields of the kind's config (``pool``, ...).

    Returns:
        The adapter's config, completed from the decoder (:meth:`~mmdiff.adapters.AdapterConfig.resolve`).
    """
    _check_modality(modality)
    enc_slot, adapter_slot = SLOTS[modality]
    if getattr(model, enc_slot) is not None:
        raise ValueError(f"the model already has a {modality} encoder ({enc_slot})")
    kind = adapter.kind if isinstance(adapter, AdapterConfig) else adapter or DEFAULT_ADAPTER[modality]
    entry = ADAPTERS.get(kind)
    if entry.modality != modality:
        raise ValueError(f"adapter {kind!r} is an {entry.modality} adapter, not an {modality} one")
    enc = build_vision_encoder(encoder) if modality == "image" else build_audio_encoder(encoder)
    if not isinstance(adapter, AdapterConfig):
        grid = {"grid": enc.grid} if modality == "image" else {}
        adapter = entry.config_class(kind=kind, in_dim=enc.out_dim, out_dim=model.cfg.decoder.d_model,
                                     **{**grid, **adapter_fields})
    if (adapter.in_dim, adapter.out_dim) != (enc.out_dim, model.cfg.decoder.d_model):
        raise ValueError(f"adapter {adapter.kind} maps {adapter.in_dim} -> {adapter.out_dim}, but the encoder gives "
                         f"{enc.out_dim} and the decoder takes {model.cfg.decoder.d_model}")
    adapter = adapter.resolve(model.cfg.decoder)
    module = build_adapter(adapter)
    model.cfg = replace(model.cfg, **{enc_slot: encoder, adapter_slot: adapter})
    setattr(model, enc_slot, enc.to(model.device).eval())
    setattr(model, adapter_slot, module.to(model.device))
    return adapter


def save_trained_adapter(model: MultimodalDiffusionLM, modality: str, directory: str | Path, *,
                         base: str, training: dict[str, Any] | None = None) -> None:
    """Write ``adapter.safetensors`` and ``adapter.json`` (modality, base, encoder and adapter configs)."""
    _check_modality(modality)
    enc_slot, adapter_slot = SLOTS[modality]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(getattr(model, adapter_slot), directory / ADAPTER_WEIGHTS)
    write_json(directory / ADAPTER_CONFIG, {
        "modality": modality, "base": base, "encoder": getattr(model.cfg, enc_slot).to_dict(),
        "adapter": getattr(model.cfg, adapter_slot).to_dict(), "training": training or {}})


def attach_trained_adapter(model: MultimodalDiffusionLM, directory: str | Path) -> None:
    """Put a trained adapter (and its encoder, when the model has none) on ``model``.

    Raises:
        ValueError: the model already has an encoder or adapter for the modality with another config.
    """
    directory = Path(directory)
    meta = read_json(directory / ADAPTER_CONFIG)
    modality = meta["modality"]
    _check_modality(modality)
    enc_slot, adapter_slot = SLOTS[modality]
    enc_cls = VisionEncoderConfig if modality == "image" else AudioEncoderConfig
    encoder = enc_cls.from_dict(meta["encoder"], source=str(directory / ADAPTER_CONFIG))
    adapter = adapter_config_from_dict(meta["adapter"], source=f"{directory / ADAPTER_CONFIG} adapter")
    if getattr(model, enc_slot) is None:
        attach_encoder(model, modality, encoder, adapter)
    elif (getattr(model.cfg, enc_slot), getattr(model.cfg, adapter_slot)) != (encoder, adapter):
        raise ValueError(f"{directory}: the model's {modality} encoder/adapter configs differ from the trained ones")
    module = getattr(model, adapter_slot)
    load_state_checked(module, load_safetensors(directory / ADAPTER_WEIGHTS, device=model.device),
                       source=str(directory / ADAPTER_WEIGHTS))


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------
def usable_rows(rows: Sequence[Row], modality: str) -> list[Row]:
    """The rows a modality trains on (see the module docstring)."""
    _check_modality(modality)
    if modality == "image":
        return [r for r in rows if r.image is not None and r.question is not None and r.type != "asr"]
    return [r for r in rows if r.audio is not None]


def _frozen_image_tokens(model: MultimodalDiffusionLM, images: Sequence[Any]) -> torch.Tensor:
    """(B, N, C) encoder features of image paths or decoded images, no gradient (the encoder is frozen)."""
    dtype = next(model.vision.parameters()).dtype
    with torch.no_grad():
        return model.vision(model.vision.preprocess(list(images)).to(model.device, dtype))


def _media(model: MultimodalDiffusionLM, batch: Sequence[Row], modality: str
           ) -> tuple[list[list[int]], list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Prompt ids and per-sample image / audio tokens; only the trained adapter keeps its graph."""
    images: list[list[torch.Tensor]] = [[] for _ in batch]
    audios: list[list[torch.Tensor]] = [[] for _ in batch]
    with_image = [b for b, r in enumerate(batch) if r.image is not None and model.vision is not None]
    if with_image:
        feats = _frozen_image_tokens(model, [batch[b].image for b in with_image])  # (B', N, C)
        feats = feats.to(next(model.vision_adapter.parameters()).dtype)
        for b, t in zip(with_image, model.adapt_image(feats)):  # each (N, D); a graph only when it trains
            images[b] = [t]
    if modality == "audio":
        features, mask = model.audio.preprocess([r.audio for r in batch])
        with torch.no_grad():
            out = model.audio(features.to(model.device, next(model.audio.parameters()).dtype), mask.to(model.device))
        dtype = next(model.audio_adapter.parameters()).dtype
        out = AudioFeatures(out.last.to(dtype), [h.to(dtype) for h in out.layers], out.mask)
        tokens, tmask = model.adapt_audio(out)  # (B, N', D), (B, N')
        audios = [[t[m]] for t, m in zip(tokens, tmask)]
    prompts = []
    for r, imgs in zip(batch, images):
        text = r.question if modality == "image" or r.type == "asr" else ""
        prompts.append(model.format_prompt(text, n_images=len(imgs), n_audio=int(modality == "audio")))
    return prompts, images, audios


def _responses(model: MultimodalDiffusionLM, batch: Sequence[Row]) -> torch.Tensor:
    """(B, L) first answer + EOS, EOS-filled to the longest (LLaDA SFT)."""
    eos = model.special.eos
    answers = [list(model.tokenizer(r.answers[0], add_special_tokens=False)["input_ids"]) + [eos] for r in batch]
    L = max(len(a) for a in answers)
    return torch.tensor([a + [eos] * (L - len(a)) for a in answers], device=model.device)


def adapter_loss(model: MultimodalDiffusionLM, batch: Sequence[Row], modality: str, *,
                 generator: torch.Generator, attn_mode: str | None = None) -> torch.Tensor:
    """Masked-diffusion loss of one batch; gradients reach only the ``modality`` adapter.

    Args:
        model: the model (encoder and decoder frozen by the caller).
        batch: rows usable for ``modality``.
        modality: ``image`` or ``audio``.
        generator: draws t and the mask.
        attn_mode: decoder mask; None = the decoder's own (bidirectional for LLaDA / Dream).
    """
    prompts, images, audios = _media(model, batch, modality)
    embeds, valid = model.embed_prompt(prompts, images=images, audios=audios)  # (B, P, D), (B, P)
    targets, masked, t = forward_mask(_responses(model, batch).cpu(), generator=generator)
    targets, masked, t = targets.to(model.device), masked.to(model.device), t.to(model.device)
    noisy = targets.masked_fill(masked, model.special.mask)  # (B, L)
    logits = model(embeds, valid, noisy, attn_mode=attn_mode)  # (B, L, V)
    return diffusion_loss(logits, targets, masked, t)


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def train_adapter(model: MultimodalDiffusionLM, rows: Sequence[Row], *, modality: str, steps: int, lr: float,
                  batch_size: int, seed: int = 0, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                  attn_mode: str | None = None, log_every: int = 10) -> list[float]:
    """Train only the ``modality`` adapter of ``model`` with the masked-diffusion loss (AdamW).

    Single process, or one process per rank under ``torchrun`` (the process group is initialised
    from the environment when it is not already): each rank draws its own batches and the adapter
    gradients are averaged across ranks every step.

    Args:
        model: a model with an encoder and adapter for ``modality``. Every other parameter is frozen
            (``requires_grad = False``); the adapter is trained in float32.
        rows: dataset rows; those ``modality`` cannot use are skipped (:func:`usable_rows`).
        modality: ``image`` or ``audio``.
        steps: optimiser steps.
        lr: AdamW learning rate (constant).
        batch_size: rows per step and rank.
        seed: batch and mask sampling seed (combined with the rank).
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping norm.
        attn_mode: decoder mask during training; None = the decoder's own.
        log_every: log the loss every this many steps (rank 0).

    Returns:
        This rank's loss at every step.
    """
    _check_modality(modality)
    enc_slot, adapter_slot = SLOTS[modality]
    if getattr(model, enc_slot) is None:
        raise ValueError(f"the model has no {modality} encoder: attach one first (attach_encoder)")
    data = usable_rows(rows, modality)
    if not data:
        raise ValueError(f"none of the {len(rows)} rows can train the {modality} adapter")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    rank, world = dist_info()
    adapter: nn.Module = getattr(model, adapter_slot).float()
    model.eval()  # frozen parts run as at inference (no dropout); the adapters have none either
    model.freeze(PARTS)
    model.freeze([adapter_slot], frozen=False)
    params = list(adapter.parameters())
    sync_params(params, world)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses = []
    for step in range(steps):
        rng = random.Random(f"{seed}-{rank}-{step}")
        batch = [data[rng.randrange(len(data))] for _ in range(batch_size)]
        loss = adapter_loss(model, batch, modality, generator=torch.Generator().manual_seed(rng.randrange(2**31)),
                            attn_mode=attn_mode)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"non-finite loss ({loss.item()}) at step {step}; lower the learning rate (now {lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        allreduce_grads(params, world)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        losses.append(loss.item())
        if rank == 0 and (step % log_every == 0 or step == steps - 1):
            log.info("train-adapter %s step %d/%d loss %.4f", modality, step + 1, steps, losses[-1])
    return losses


# ------------------------------------------------------------------------------------------------
# mmdiff train-adapter
# ------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``mmdiff train-adapter``."""
    p.add_argument("--base", required=True, help="LLaDA / Dream / LLaDA-V directory (with its tokenizer), "
                                                 "or an mmdiff model directory")
    p.add_argument("--data", required=True, help="training data: mmdiff JSONL, LLaVA JSON/JSONL, or a folder / "
                   ".parquet / .arrow / .csv read by HF datasets (as mmdiff train --data)")
    p.add_argument("--modality", required=True, choices=MODALITIES, help="which adapter to train")
    p.add_argument("--out", required=True, help=f"output directory ({ADAPTER_WEIGHTS} + {ADAPTER_CONFIG})")
    g = p.add_argument_group("encoder and adapter (when the base has no encoder for --modality)")
    g.add_argument("--vision", help="vision encoder: a preset (tiny-test, mmdiff-scenes) or a JSON file of "
                                    "VisionEncoderConfig fields")
    g.add_argument("--vision-weights", help="local weight file of the vision encoder")
    g.add_argument("--audio-encoder", help="a local Whisper checkpoint directory, or a JSON file of "
                                           "AudioEncoderConfig fields")
    g.add_argument("--adapter", help="adapter kind (default: mlp2x_gelu for image, audio_semantic for audio)")
    g.add_argument("--pool", type=int, default=1, help="image adapters: k x k pooling of the patch grid")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=1000, help="optimiser steps (default: 1000)")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    t.add_argument("--batch-size", type=int, default=8, help="rows per step and process (default: 8)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    t.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    t.add_argument("--attn-mode", choices=("bidirectional", "prefix"), default=None,
                   help="decoder mask while training (default: the decoder's own)")
    t.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the frozen base (default: the checkpoint's own); the adapter trains in float32")
    t.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: one GPU per local rank)")


def _encoder_from_args(args: argparse.Namespace) -> VisionEncoderConfig | AudioEncoderConfig | None:
    """The encoder config the flags describe, or None when they describe none."""
    wrong = "--audio-encoder" if args.modality == "image" and args.audio_encoder else \
        "--vision/--vision-weights" if args.modality == "audio" and (args.vision or args.vision_weights) else None
    if wrong:
        raise ValueError(f"{wrong} does not apply to --modality {args.modality}")
    if args.modality == "image":
        if args.vision is None:
            if args.vision_weights:
                raise ValueError("--vision-weights needs --vision")
            return None
        cfg = preset(args.vision) if args.vision in PRESETS else VisionEncoderConfig.from_dict(
            read_json(args.vision), source=args.vision)
        return replace(cfg, weights=args.vision_weights) if args.vision_weights else cfg
    if args.audio_encoder is None:
        return None
    if Path(args.audio_encoder).is_dir():
        return AudioEncoderConfig.from_whisper_checkpoint(args.audio_encoder)
    return AudioEncoderConfig.from_dict(read_json(args.audio_encoder), source=args.audio_encoder)


def read_training_rows(path: str | Path, *, say: Callable[[str], None] = print) -> list[Row]:
    """Every usable question of ``path`` (any format of :mod:`mmdiff.data.readers`) as a :class:`Row`,
    after the report of its bad records (given to ``say``).

    Raises:
        ValueError: the file is missing, unreadable, or has no usable record (one line naming ``--data``).
    """
    return [r for r in as_rows(read_usable(path, name="--data", say=say)) if isinstance(r, Row)]


def run(args: argparse.Namespace) -> int:
    """``mmdiff train-adapter``: load the base, attach the encoder, train the adapter, save it (rank 0)."""
    check_device(args.device)
    check_output_dir(args.out)  # before training, not at save time
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rank, world = dist_info()
    device = args.device
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    encoder = _encoder_from_args(args)
    rows = read_training_rows(args.data, say=print if rank == 0 else lambda _: None)  # before the model loads
    model = load(args.base, dtype=DTYPES[args.dtype] if args.dtype else None, device=device)
    if encoder is not None:
        pool = {"pool": args.pool} if args.modality == "image" else {}  # --pool: image adapters only
        attach_encoder(model, args.modality, encoder, args.adapter, **pool)
    elif getattr(model, SLOTS[args.modality][0]) is None:
        flag = "--vision" if args.modality == "image" else "--audio-encoder"
        raise ValueError(f"{args.base} has no {args.modality} encoder: give {flag}")
    losses = train_adapter(model, rows, modality=args.modality, steps=args.steps, lr=args.lr,
                           batch_size=args.batch_size, seed=args.seed, weight_decay=args.weight_decay,
                           attn_mode=args.attn_mode)
    if rank == 0:
        save_trained_adapter(model, args.modality, args.out, base=str(args.base), training={
            "data": str(args.data), "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
            "world_size": world, "seed": args.seed, "final_loss": losses[-1]})
        if read_json(Path(args.base) / CONFIG_NAME).get("model_type") == MODEL_TYPE:
            model.save_pretrained(args.out)  # a whole model directory: ask / eval / demo load it unchanged
        print(f"trained the {args.modality} adapter for {args.steps} steps on {world} process(es) "
              f"(loss {losses[0]:.4f} -> {losses[-1]:.4f}); wrote {args.out}")
    return 0
