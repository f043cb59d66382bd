"""MMaDA (Yang et al. 2025, "MMaDA: Multimodal Large Diffusion Language Models", ``MMadaModelLM``)
into :class:`~mmdiff.model.MultimodalDiffusionLM`, for image understanding (image + question -> text).

The LLM is a LLaDA (``model.transformer.*`` names, LLaDA's ``config.json`` keys, bidirectional
attention) whose embedding was grown from ``llm_vocab_size`` to ``new_vocab_size`` rows to hold the
``codebook_size`` image codes. Images enter as *discrete* tokens: the MAGVIT-v2 tokenizer
(``showlab/magvitv2``; :mod:`mmdiff.encoders.vq`) turns an image into codes, code ``c`` is read as
vocabulary id ``len(text tokenizer) + num_new_special_tokens + c``, and the prompt is

    <|mmu|> <|soi|> image ids <|eoi|> chat template of the question (from its BOS on)

(the released ``inference_mmu.py`` / ``app.py``), attended fully bidirectionally. Here the codes
become ids through the ``vq_ids`` adapter and are embedded by the decoder's own table.

On disk the VQ model is a separate directory (the released code loads it with
``MAGVITv2.from_pretrained("showlab/magvitv2")``): mmdiff reads it from the subdirectory
:data:`VQ_SUBDIR` of the MMaDA directory (put or symlink it there), or from ``vq_model=``. It must
hold ``config.json`` and ``pytorch_model.safetensors`` (the name the released loader tries first;
a pickled ``pytorch_model.bin`` is not read). Without it the model is text-only and refuses images.
Image generation (t2i, the VQ decoder) is not supported: those tensors are not read.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from ..adapters import VQTokensConfig
from ..encoders.vision import VisionEncoderConfig
from ..encoders.vq import MAGVIT2_TOKENIZERS
from ..io import CONFIG_NAME, read_json
from ..model import ModelConfig, MultimodalDiffusionLM
from .formats import (
    LLADA_WEIGHTS,
    assert_materialised,
    assign_parts,
    build_on_meta,
    decoder_weight_names,
    llada_decoder_config,
    open_checkpoint,
    shard_index,
    shard_index_of_file,
)
from .tokenizers import LLADA_MASK_TOKEN, ReleasedTokenizer, released_special_ids, require_tokenizer

log = logging.getLogger("mmdiff")

MMADA_MODEL_TYPES: tuple[str, ...] = ("mmada",)
MMADA_ARCHITECTURES: tuple[str, ...] = ("MMadaModelLM",)
#: MMaDA's keys beyond LLaDA's that the loader needs
MMADA_REQUIRED: tuple[str, ...] = ("codebook_size",)
#: the released task / image marker tokens and their ids in LLaDA's tokenizer (``reserved_token_mapping``
#: of MMaDA's ``training/prompting_utils.py``); a tokenizer that names them gives its own ids instead
MMADA_RESERVED_IDS: dict[str, int] = {"<|mmu|>": 126089, "<|soi|>": 126084, "<|eoi|>": 126085}
MMU_PREFIX: tuple[str, ...] = ("<|mmu|>", "<|soi|>")  # before an image's codes
MMU_SUFFIX: tuple[str, ...] = ("<|eoi|>",)  # after them
#: where mmdiff looks for the VQ model inside an MMaDA directory
VQ_SUBDIR = "vq_model"
VQ_CLASS = "MAGVITv2"
VQ_WEIGHTS = "pytorch_model.safetensors"
#: the released understanding path reads images at 512 x 512 (``inference_mmu.py``'s config, ``app.py``)
MMADA_IMAGE_SIZE = 512
#: the tokenizer always runs in float32, as the released code runs it (outside the LLM's bf16 autocast): its
#: codes are sign decisions, which a lower precision can flip, and it is about 1% of the parameters
VQ_DTYPE = torch.float32
#: VQ tensors not read: the image decoder (generation) and the quantiser's constant tables (LFQ needs none)
VQ_UNUSED: tuple[str, ...] = ("decoder.", "quantize.")


def is_mmada(config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` is MMaDA's (model_type ``mmada`` or architecture ``MMadaModelLM``)."""
    return config.get("model_type") in MMADA_MODEL_TYPES or any(
        a in MMADA_ARCHITECTURES for a in config.get("architectures") or [])


def magvit2_name(vq_config: Mapping[str, Any], *, source: str) -> str:
    """The :data:`~mmdiff.encoders.vq.MAGVIT2_TOKENIZERS` entry of a VQ ``config.json``.

    The released class hard-codes its sizes (``config.json`` holds only ``_class_name``): such a
    file is ``magvitv2``. A test model writes its sizes under ``encoder_config`` (the encoder's
    arguments) and ``quantizer_config`` (``codebook_dim``); they must match an entry.
    """
    if vq_config.get("_class_name") != VQ_CLASS:
        raise ValueError(f"{source}: _class_name {vq_config.get('_class_name')!r} is not {VQ_CLASS!r} "
                         "(MMaDA's image tokenizer, showlab/magvitv2)")
    if "encoder_config" not in vq_config:
        return "magvitv2"
    enc = dict(vq_config["encoder_config"])
    dim = (vq_config.get("quantizer_config") or {}).get("codebook_dim", enc.get("z_channels"))
    if dim != enc.get("z_channels"):
        raise ValueError(f"{source}: codebook_dim {dim} differs from the encoder's z_channels {enc.get('z_channels')}")
    for name, size in MAGVIT2_TOKENIZERS.items():
        if all(_same(enc.get(k), v) for k, v in size.items()):
            return name
    raise ValueError(f"{source}: encoder_config {enc} matches no known MAGVIT-v2 tokenizer; known "
                     f"(mmdiff.encoders.vq.MAGVIT2_TOKENIZERS): {MAGVIT2_TOKENIZERS}")


def _same(a: Any, b: Any) -> bool:
    return list(a) == list(b) if isinstance(b, tuple) and isinstance(a, (list, tuple)) else a == b


def mmada_model_config(config: Mapping[str, Any], *, offset: int, markers: tuple[tuple[int, ...], tuple[int, ...]],
                       vq_name: str | None, image_size: int | None = None, source: str = CONFIG_NAME
                       ) -> ModelConfig:
    """An MMaDA ``config.json`` as a :class:`~mmdiff.model.ModelConfig`.

    Args:
        config: the parsed ``config.json``.
        offset: vocabulary id of image code 0.
        markers: (prefix, suffix) ids around an image's codes.
        vq_name: the MAGVIT-v2 tokenizer entry; None for a text-only model (no VQ model found).
        image_size: input side of the tokenizer (default :data:`MMADA_IMAGE_SIZE`).
        source: for messages.
    """
    missing = [k for k in MMADA_REQUIRED if k not in config]
    if missing:
        raise ValueError(f"{source}: MMaDA config lacks {missing}")
    decoder = llada_decoder_config(config, source=source)
    if vq_name is None:
        return ModelConfig(decoder=decoder)
    codebook = int(config["codebook_size"])
    own = 2 ** MAGVIT2_TOKENIZERS[vq_name]["z_channels"]
    if own != codebook:
        raise ValueError(f"{source}: codebook_size {codebook} differs from the {own} codes of the {vq_name} tokenizer")
    vision = VisionEncoderConfig(kind="magvit2", name=vq_name, img_size=image_size or MMADA_IMAGE_SIZE)
    adapter = VQTokensConfig(kind="vq_ids", in_dim=codebook, out_dim=decoder.d_model, offset=offset,
                             prefix_ids=markers[0], suffix_ids=markers[1])
    return ModelConfig(decoder=decoder, vision=vision, vision_adapter=adapter)


def reserved_ids(tokenizer: Any, names: tuple[str, ...]) -> tuple[int, ...]:
    """Ids of MMaDA's marker tokens: the tokenizer's own when it names them, else the released ids
    (:data:`MMADA_RESERVED_IDS`: LLaDA's tokenizer keeps them as reserved, unnamed entries)."""
    out = []
    for name in names:
        i = tokenizer.convert_tokens_to_ids(name)
        out.append(MMADA_RESERVED_IDS[name] if i is None or i == tokenizer.unk_token_id else int(i))
    return tuple(out)


def find_vq_model(directory: Path, vq_model: str | Path | None) -> Path | None:
    """The VQ model directory: ``vq_model`` when given (it must exist), else ``directory/vq_model`` if present."""
    if vq_model is not None:
        path = Path(vq_model)
        if not path.is_dir():
            raise FileNotFoundError(f"VQ model directory {path} does not exist")
        return path
    path = directory / VQ_SUBDIR
    return path if path.is_dir() else None


def vq_weight_file(vq_dir: Path) -> Path:
    path = vq_dir / VQ_WEIGHTS
    if not path.is_file():
        pickled = " (only a pickled pytorch_model.bin, which mmdiff does not read: save it as safetensors)" \
            if (vq_dir / "pytorch_model.bin").is_file() else ""
        raise FileNotFoundError(f"{vq_dir}: no {VQ_WEIGHTS}{pickled}")
    return path


def load_mmada(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               vq_model: str | Path | None = None) -> "MultimodalDiffusionLM":
    """Load an MMaDA directory (and its MAGVIT-v2 tokenizer) into a :class:`~mmdiff.model.MultimodalDiffusionLM`.

    Built on the meta device; each tensor is read, cast and assigned (as :func:`load_pretrained`).
    ``dtype`` applies to the LLM; the VQ encoder is read in :data:`VQ_DTYPE` (float32) whatever it is:
    the codes are integers, so a float32 tokenizer feeds a bfloat16 LLM exactly.
    Special ids: ``mask_token_id`` / ``eos_token_id`` of ``config.json``, BOS from
    ``generation_config.json``; prompts use the tokenizer's chat template with the image block in
    front (``media_layout="before_chat"``).

    Args:
        path: the MMaDA directory (``config.json``, safetensors shards, tokenizer files, ``vq_model/``).
        dtype: parameter dtype; None keeps the checkpoint's own.
        device: where the parameters live.
        vq_model: the VQ model directory, when not at ``path/vq_model``.
    """
    directory, config = open_checkpoint(path)
    source = str(directory / CONFIG_NAME)
    if not is_mmada(config):
        raise ValueError(f"{source}: not an MMaDA config (model_type {config.get('model_type')!r}, architectures "
                         f"{config.get('architectures')}; expected {list(MMADA_MODEL_TYPES)} / {list(MMADA_ARCHITECTURES)})")
    hf_tokenizer = require_tokenizer(directory)
    offset = len(hf_tokenizer) + int(config.get("num_new_special_tokens") or 0)  # before placeholders are added
    markers = (reserved_ids(hf_tokenizer, MMU_PREFIX), reserved_ids(hf_tokenizer, MMU_SUFFIX))
    vq_dir = find_vq_model(directory, vq_model)
    vq_name = image_size = None
    if vq_dir is None:
        log.warning("%s: no %s/ (MMaDA's MAGVIT-v2 image tokenizer, showlab/magvitv2): loaded text-only, images "
                    "are refused", directory, VQ_SUBDIR)
    else:
        vq_config = read_json(vq_dir / CONFIG_NAME)
        vq_name = magvit2_name(vq_config, source=str(vq_dir / CONFIG_NAME))
        image_size = (vq_config.get("encoder_config") or {}).get("resolution")  # a test model's input side
    cfg = mmada_model_config(config, offset=offset, markers=markers, vq_name=vq_name, image_size=image_size,
                             source=source)
    special = released_special_ids(directory, config, hf_tokenizer, mask_token=LLADA_MASK_TOKEN)
    tokenizer = ReleasedTokenizer(hf_tokenizer, special, vocab_size=cfg.decoder.vocab_size, media_layout="before_chat")
    model, expected = build_on_meta(cfg, tokenizer)
    llm_rename = decoder_weight_names(LLADA_WEIGHTS, cfg.decoder.n_layers, expected)
    parts = [(shard_index(directory), llm_rename, dtype, str(directory))]
    if vq_dir is not None:
        weights = vq_weight_file(vq_dir)
        vq_files = {n: p for n, p in shard_index_of_file(weights).items() if not n.startswith(VQ_UNUSED)}
        parts.append((vq_files, {n: f"vision.{n}" for n in vq_files if f"vision.{n}" in expected}, VQ_DTYPE,
                      str(weights)))
    assign_parts(model, parts, expected, device=device, source=str(directory))
    assert_materialised(model)
    log.info("loaded MMaDA %s (%s)", directory, f"image tokenizer {vq_name}" if vq_name else "text only")
    return model.eval()
