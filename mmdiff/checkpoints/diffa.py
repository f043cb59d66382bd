"""DIFFA (Zhou et al. 2025, "DIFFA: Large Language Diffusion Models Can Listen and Understand";
NKU-HLT/DIFFA) into :class:`~mmdiff.model.MultimodalDiffusionLM`: a frozen LLaDA-8B-Instruct, a frozen
Whisper encoder run on 30-s windows, and DIFFA's dual adapter (``diffa``, :mod:`mmdiff.adapters.audio`).

The release is three directories, as its inference scripts take them (``model_path``,
``whisper_path``, ``llm_path``); :func:`load_diffa` reads the first and finds the others as its
``whisper/`` and ``llm/`` sub-directories unless given:

* DIFFA's own: ``config.json`` (``DIFFAConfig``: ``whisper_config``, ``llm_config``, ``prompt_size``, ...)
  and the adapter tensors (``acoustic_connector.*``, ``semantic_connector.*``; ``trainable_prompts``
  is stage 1's and unused), as ``model.safetensors`` (the release's loader reads a
  ``pytorch_model.bin`` pickle, which mmdiff never opens);
* a transformers Whisper directory (whisper-small): its encoder, ``model.encoder.*``;
* a LLaDA directory (LLaDA-8B-Instruct): the decoder and the tokenizer.

Prompts are the release's (``DIFFAModel.generate``): system "You are a helpful voice assistant.", user
"This is the audio: <audio>. {question}" in LLaDA's chat template, the literal text ``<audio>`` kept,
and the audio tokens inserted after "This is the audio:", where the release puts them
(``len(tokens("...This is the audio: ")) - 1``: before the space token).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import special_tokens as st
from ..adapters import DiffaAdapterConfig
from ..encoders.audio import AudioEncoderConfig
from ..io import CONFIG_NAME, WEIGHTS_NAME, read_json
from ..model import ModelConfig, MultimodalDiffusionLM
from .formats import (
    LLADA_WEIGHTS,
    assert_materialised,
    assign_parts,
    build_on_meta,
    drop_unused,
    decoder_weight_names,
    llada_decoder_config,
    open_checkpoint,
    shard_index,
)
from .tokenizers import LLADA_MASK_TOKEN, ReleasedTokenizer, released_special_ids, require_tokenizer

log = logging.getLogger("mmdiff")

#: keys of a ``DIFFAConfig`` config.json that together mark a DIFFA checkpoint
DIFFA_KEYS: tuple[str, ...] = ("whisper_config", "llm_config", "prompt_size")
#: Whisper hidden states the acoustic branch taps (0 = embeddings). ``DIFFAConfig.__init__`` sets
#: ``whisper_model_id = "openai/whisper-small"`` whatever config.json says, so the released
#: ``QformerConnector`` always takes whisper-small's taps.
DIFFA_TAPS: tuple[int, ...] = (2, 5, 8, 11)
DIFFA_SYSTEM_PROMPT = "You are a helpful voice assistant."  # the system prompt of every released script
DIFFA_AUDIO_INTRO = "This is the audio:"  # the audio tokens follow it
DIFFA_AUDIO_TEXT = " <audio>. "  # then this text (kept as text), then the question
#: adapter tensors not used at inference: stage 1's prompt embeddings; the Whisper encoder and the LLM
#: when saved with the adapters (the release replaces both from whisper_path and llm_path)
DIFFA_UNUSED: tuple[str, ...] = ("trainable_prompts.", "whisper_model.", "llm_model.")
#: BERT names of one Q-Former layer -> mmdiff's (:class:`~mmdiff.adapters.audio.BertQFormerLayer`)
QFORMER_NAMES: dict[str, str] = {
    "attention.self.query": "self_attn.query", "attention.self.key": "self_attn.key",
    "attention.self.value": "self_attn.value", "attention.output.dense": "self_attn.dense",
    "attention.output.LayerNorm": "self_attn.norm",
    "crossattention.self.query": "cross_attn.query", "crossattention.self.key": "cross_attn.key",
    "crossattention.self.value": "cross_attn.value", "crossattention.output.dense": "cross_attn.dense",
    "crossattention.output.LayerNorm": "cross_attn.norm",
    "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "ffn_norm",
}
#: the other adapter modules: DIFFA name -> mmdiff name under ``audio_adapter.``
ADAPTER_NAMES: dict[str, str] = {
    "acoustic_connector.proj.0": "acoustic.proj.0", "acoustic_connector.proj.1": "acoustic.proj.1",
    "semantic_connector.conv.0": "semantic.conv.0", "semantic_connector.conv.2": "semantic.conv.2",
    "semantic_connector.linear_connector.0": "semantic.mlp.0",
    "semantic_connector.linear_connector.2": "semantic.mlp.2", "semantic_connector.layernorm": "semantic.norm",
}
WHISPER_PREFIXES: tuple[str, ...] = ("model.encoder.", "encoder.")  # WhisperForConditionalGeneration, WhisperModel


def is_diffa(config: Mapping[str, Any]) -> bool:
    """Whether a config.json is a ``DIFFAConfig`` (it has no model_type)."""
    return all(k in config for k in DIFFA_KEYS)


class DiffaTokenizer(ReleasedTokenizer):
    """LLaDA's tokenizer with DIFFA's prompt: its system prompt, and the user turn "This is the audio:"
    + audio + " <audio>. " + question. The placeholder is another string, so the text ``<audio>``,
    which DIFFA's prompts hold, stays text."""

    PLACEHOLDERS = {st.IMAGE: "<|mmdiff_image|>", st.AUDIO: "<|mmdiff_audio|>"}

    def layout(self, content: str) -> str:
        n = content.count(st.AUDIO)
        if n > 1:
            raise ValueError(f"DIFFA takes one clip per prompt, got {n}")
        if n == 0:
            return content
        return DIFFA_AUDIO_INTRO + self.PLACEHOLDERS[st.AUDIO] + DIFFA_AUDIO_TEXT + content.replace(st.AUDIO, "")


def diffa_model_config(config: Mapping[str, Any], whisper: Mapping[str, Any], llm: Mapping[str, Any], *,
                       source: str = CONFIG_NAME) -> ModelConfig:
    """DIFFA's three config.json files as a :class:`~mmdiff.model.ModelConfig`.

    Args:
        config: DIFFA's ``DIFFAConfig`` (its ``whisper_config`` / ``llm_config`` size the adapter).
        whisper: the Whisper directory's config (sizes the encoder, as the release loads it from there).
        llm: the LLaDA directory's config.
        source: DIFFA's config path, for messages.
    """
    missing = [k for k in DIFFA_KEYS if k not in config]
    if missing:
        raise ValueError(f"{source}: not a DIFFA config (no {missing})")
    decoder = llada_decoder_config(llm, source=f"{source} (llm)")
    wc, lc = config["whisper_config"], config["llm_config"]
    for name, mine, theirs, keys in (("whisper", wc, whisper, ("d_model", "encoder_attention_heads")),
                                     ("llm", lc, llm, ("d_model",))):
        diff = [f"{k} {mine.get(k)} vs {theirs.get(k)}" for k in keys if mine.get(k) != theirs.get(k)]
        if diff:
            raise ValueError(f"{source}: {name}_config differs from the {name} directory's config.json "
                             f"({'; '.join(diff)})")
    layers = whisper.get("encoder_layers", 0)
    if layers < max(DIFFA_TAPS):
        raise ValueError(f"{source}: DIFFA taps Whisper hidden states {list(DIFFA_TAPS)} (whisper-small's; "
                         f"DIFFAConfig fixes whisper_model_id), but this Whisper encoder has {layers} layers")
    prompt_size = config["prompt_size"]
    if not isinstance(prompt_size, int) or prompt_size < 1:
        raise ValueError(f"{source}: prompt_size must be a positive int, got {prompt_size!r}")
    audio = AudioEncoderConfig.from_dict(
        {k: whisper[k] for k in ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                                 "num_mel_bins", "max_source_positions")}
        | {"pad_to_window": True, "output_layers": DIFFA_TAPS, "narrowband_fill_db": None}, source=source)
    adapter = DiffaAdapterConfig(kind="diffa", in_dim=wc["d_model"], out_dim=lc["d_model"], num_queries=prompt_size,
                                 n_encoder_layers=len(DIFFA_TAPS), qformer_heads=wc["encoder_attention_heads"])
    return ModelConfig(decoder=decoder, audio=audio, audio_adapter=adapter)


def diffa_adapter_names(cfg: DiffaAdapterConfig) -> dict[str, str]:
    """DIFFA adapter tensor name -> MultimodalDiffusionLM name, for every adapter tensor."""
    out = {"acoustic_connector.layer_weights": "audio_adapter.acoustic.layer_weights"}
    out |= {f"acoustic_connector.layer_prompts.{j}": f"audio_adapter.acoustic.layer_prompts.{j}"
            for j in range(cfg.n_encoder_layers)}
    modules = dict(ADAPTER_NAMES)
    for i in range(cfg.qformer_layers):
        modules |= {f"acoustic_connector.qformer.layer.{i}.{src}": f"acoustic.qformer.{i}.{dst}"
                    for src, dst in QFORMER_NAMES.items()}
    for src, dst in modules.items():
        out |= {f"{src}.{p}": f"audio_adapter.{dst}.{p}" for p in ("weight", "bias")}
    return out


def _adapter_files(directory: Path) -> dict[str, Path]:
    """DIFFA's adapter tensors -> file; refuses the release's pickle with the conversion to make."""
    if not (directory / WEIGHTS_NAME).is_file() and (directory / "pytorch_model.bin").is_file():
        raise ValueError(f"{directory}: DIFFA's adapters are in pytorch_model.bin, a pickle mmdiff does not open; "
                         f"convert it once to {WEIGHTS_NAME}: safetensors.torch.save_file(torch.load(path, "
                         f"weights_only=True), '{directory / WEIGHTS_NAME}')")
    return shard_index(directory)


def load_diffa(path: str | Path, *, whisper: str | Path | None = None, llm: str | Path | None = None,
               dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> MultimodalDiffusionLM:
    """Load DIFFA into a :class:`~mmdiff.model.MultimodalDiffusionLM`, memory-frugally.

    Built on the meta device; every tensor of the three directories is checked from the headers,
    then read, cast and assigned one at a time (as :func:`~mmdiff.checkpoints.load_pretrained`).

    Args:
        path: DIFFA's directory (config.json + model.safetensors of the adapters).
        whisper: the Whisper directory (default ``path/whisper``).
        llm: the LLaDA directory with its tokenizer (default ``path/llm``).
        dtype: parameter dtype; None keeps the checkpoints' own.
        device: where the parameters live.
    """
    directory, config = open_checkpoint(path)
    dirs = {"whisper": Path(whisper) if whisper else directory / "whisper", "llm": Path(llm) if llm else directory / "llm"}
    for name, d in dirs.items():
        if not (d / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{directory}: DIFFA needs its {name} directory: no {CONFIG_NAME} in {d} "
                                    f"(pass {name}= or put it at {directory / name})")
    whisper_config, llm_config = read_json(dirs["whisper"] / CONFIG_NAME), read_json(dirs["llm"] / CONFIG_NAME)
    cfg = diffa_model_config(config, whisper_config, llm_config, source=str(directory / CONFIG_NAME))
    hf_tokenizer = require_tokenizer(dirs["llm"])
    special = released_special_ids(dirs["llm"], llm_config, hf_tokenizer, mask_token=LLADA_MASK_TOKEN)
    tokenizer = DiffaTokenizer(hf_tokenizer, special, vocab_size=cfg.decoder.vocab_size, system=DIFFA_SYSTEM_PROMPT)
    model, expected = build_on_meta(cfg, tokenizer)

    llm_files = shard_index(dirs["llm"])
    llm_names = decoder_weight_names(LLADA_WEIGHTS, cfg.decoder.n_layers, expected)
    whisper_files = shard_index(dirs["whisper"])
    prefix = next((p for p in WHISPER_PREFIXES if any(n.startswith(p) for n in whisper_files)), "")
    encoder = {n: p for n, p in whisper_files.items() if n.startswith(prefix)}
    adapters = drop_unused(_adapter_files(directory), lambda n: n.startswith(DIFFA_UNUSED), source=str(directory),
                           why="not used at inference")
    # each directory keeps its own dtype when dtype is None (the release runs LLaDA in bf16, Whisper and the
    # adapters in fp32; the adapters' tokens are cast to the decoder's dtype when placed in the prompt)
    parts = ((llm_files, llm_names, dtype, str(dirs["llm"])),
             (encoder, {n: "audio.encoder." + n[len(prefix):] for n in encoder}, dtype, str(dirs["whisper"])),
             (adapters, diffa_adapter_names(cfg.audio_adapter), dtype, str(directory)))
    assign_parts(model, parts, expected, device=device, source=str(directory))
    assert_materialised(model)
    log.info("loaded DIFFA %s (Whisper %s, LLaDA %s, %s)", directory, dirs["whisper"], dirs["llm"],
             next(model.parameters()).dtype)
    return model.eval()
