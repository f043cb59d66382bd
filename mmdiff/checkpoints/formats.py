"""Released text diffusion LLMs from local Hugging Face directories: LLaDA, Dream and mmdiff's own
decoder format into :class:`~mmdiff.decoder.Decoder`.

A checkpoint format is data: how its ``config.json`` maps to a :class:`DecoderConfig` and a table
from its tensor names to ours. Loading is memory-frugal: the decoder is built on the meta device,
each tensor is read from its safetensors shard, cast to the requested dtype, moved to the device and
assigned, so an 8B model never exists as an fp32 copy (nor twice).

* **LLaDA** (Nie et al. 2025, ``LLaDAModelLM``): ``model.transformer.*`` names; ``ff_proj`` is the
  SwiGLU *gate*, ``up_proj`` the linear branch, ``ff_out`` the down projection (and, outside the
  blocks, the untied output head); RoPE on halves ("rotate_half"); bidirectional attention.
* **Dream** (Ye et al. 2025, ``DreamModel``, Qwen2 weights): ``model.layers.*`` names, grouped-query
  attention with q/k/v biases, untied ``lm_head``. Its logits are shifted by one position at sampling
  time (``logit_shift``); the forward pass returns them raw.
* **mmdiff-decoder**: our own :func:`~mmdiff.checkpoints.convert.save_decoder` directories (what
  ``mmdiff convert`` writes), names unchanged.

Multimodal families live beside this module (:mod:`mmdiff.checkpoints.llada_v`, ...).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import torch

from ..decoder import Decoder, DecoderConfig
from ..io import CONFIG_NAME, WEIGHTS_NAME, config_from_dict, load_state_checked, read_json
from ..registry import Registry
from ..special_tokens import SpecialIds

if TYPE_CHECKING:
    from ..model import ModelConfig, MultimodalDiffusionLM

log = logging.getLogger("mmdiff")

INDEX_NAME = "model.safetensors.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SPECIAL_TOKENS_NAME = "special_tokens.json"  # the ids of a converted checkpoint (SpecialIds as JSON)

#: Files of a Hugging Face tokenizer; ``mmdiff convert`` copies whichever exist.
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                    "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                                    "chat_template.jinja")

#: tokenizer classes that exist only in a checkpoint's own code -> the transformers class that is the
#: same tokenizer (mmdiff never runs checkpoint code). Dream's ``DreamTokenizer`` (``tokenization_dream.py``,
#: files vocab.json + merges.txt) is Qwen2's byte-level BPE with Qwen2's pre-tokenizer regex.
CODE_TOKENIZER_CLASSES: dict[str, str] = {"DreamTokenizer": "Qwen2Tokenizer"}

#: ``--dtype`` choices of ``mmdiff convert``.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ------------------------------------------------------------------------------------------------
# weight-name tables: checkpoint name -> Decoder state-dict name; "{i}" is the block index
# ------------------------------------------------------------------------------------------------
#: Every Decoder state-dict name (q/k/v biases only with ``qkv_bias``; ``lm_head`` only untied).
DECODER_NAMES: tuple[str, ...] = (
    "embed_tokens.weight",
    "layers.{i}.attn_norm.weight",
    "layers.{i}.attn.q_proj.weight", "layers.{i}.attn.q_proj.bias",
    "layers.{i}.attn.k_proj.weight", "layers.{i}.attn.k_proj.bias",
    "layers.{i}.attn.v_proj.weight", "layers.{i}.attn.v_proj.bias",
    "layers.{i}.attn.o_proj.weight",
    "layers.{i}.mlp_norm.weight",
    "layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
)

LLADA_WEIGHTS: dict[str, str] = {
    "model.transformer.wte.weight": "embed_tokens.weight",
    "model.transformer.blocks.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "model.transformer.blocks.{i}.q_proj.weight": "layers.{i}.attn.q_proj.weight",
    "model.transformer.blocks.{i}.q_proj.bias": "layers.{i}.attn.q_proj.bias",  # include_qkv_bias
    "model.transformer.blocks.{i}.k_proj.weight": "layers.{i}.attn.k_proj.weight",
    "model.transformer.blocks.{i}.k_proj.bias": "layers.{i}.attn.k_proj.bias",
    "model.transformer.blocks.{i}.v_proj.weight": "layers.{i}.attn.v_proj.weight",
    "model.transformer.blocks.{i}.v_proj.bias": "layers.{i}.attn.v_proj.bias",
    "model.transformer.blocks.{i}.attn_out.weight": "layers.{i}.attn.o_proj.weight",
    "model.transformer.blocks.{i}.ff_norm.weight": "layers.{i}.mlp_norm.weight",
    "model.transformer.blocks.{i}.ff_proj.weight": "layers.{i}.mlp.gate_proj.weight",  # SiLU applies to this one
    "model.transformer.blocks.{i}.up_proj.weight": "layers.{i}.mlp.up_proj.weight",
    "model.transformer.blocks.{i}.ff_out.weight": "layers.{i}.mlp.down_proj.weight",
    "model.transformer.ln_f.weight": "norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",  # absent when weight_tying
}

#: Dream's names are Llama's (Qwen2 = Llama + q/k/v biases); LLaDA-V's LLM uses them too.
DREAM_WEIGHTS: dict[str, str] = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.q_proj.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attn.q_proj.bias",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.k_proj.weight",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attn.k_proj.bias",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.v_proj.weight",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attn.v_proj.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.o_proj.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.down_proj.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}

MMDIFF_WEIGHTS: dict[str, str] = {name: name for name in DECODER_NAMES}


def expand_names(table: Mapping[str, str], n_layers: int) -> dict[str, str]:
    """Concrete names of a pattern table: each ``{i}`` entry once per block 0..n_layers-1."""
    out: dict[str, str] = {}
    for src, dst in table.items():
        if "{i}" in src:
            out.update({src.format(i=i): dst.format(i=i) for i in range(n_layers)})
        else:
            out[src] = dst
    return out


def decoder_weight_names(table: Mapping[str, str], n_layers: int, expected: Iterable[str]) -> dict[str, str]:
    """Checkpoint name -> ``decoder.<name>`` of a :class:`~mmdiff.model.MultimodalDiffusionLM`, for the
    LLM tensors of ``table`` (:func:`expand_names`) the model has (``expected``: its state-dict names)."""
    return {src: f"decoder.{dst}" for src, dst in expand_names(table, n_layers).items() if f"decoder.{dst}" in expected}


# ------------------------------------------------------------------------------------------------
# config.json -> DecoderConfig
# ------------------------------------------------------------------------------------------------
#: LLaDA's ``ModelConfig`` defaults for the keys read here (``LLaDAConfig`` fills absent keys with them).
LLADA_DEFAULTS: dict[str, Any] = dict(
    n_kv_heads=None, mlp_ratio=4, mlp_hidden_size=None, embedding_size=50304, rope_theta=10000.0,
    rms_norm_eps=1e-5, weight_tying=True, include_qkv_bias=False, max_sequence_length=1024,
    activation_type="swiglu", block_type="sequential", block_group_size=1, alibi=False, rope=False,
    multi_query_attention=None, attention_layer_norm=False, input_emb_norm=False, layer_norm_type="default",
    layer_norm_with_affine=True, include_bias=False, bias_for_layer_norm=None, scale_logits=False,
)
#: LLaDA options the Decoder expresses: key -> accepted values (anything else is refused by name).
LLADA_OPTIONS: dict[str, tuple] = dict(
    alibi=(False,), rope=(True,), layer_norm_type=("rms",), block_type=("llama",), activation_type=("silu",),
    block_group_size=(1,), multi_query_attention=(None, False), attention_layer_norm=(False,),
    input_emb_norm=(False,), layer_norm_with_affine=(True,), include_bias=(False,),
    bias_for_layer_norm=(None, False), scale_logits=(False,),
)
LLADA_REQUIRED: tuple[str, ...] = ("d_model", "n_layers", "n_heads", "vocab_size")

#: ``DreamConfig`` defaults for the keys read here.
DREAM_DEFAULTS: dict[str, Any] = dict(
    num_key_value_heads=None, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    max_position_embeddings=32768, hidden_act="silu", rope_scaling=None, use_sliding_window=False,
    use_mrope=False,
)
DREAM_OPTIONS: dict[str, tuple] = dict(
    hidden_act=("silu",), rope_scaling=(None,), use_sliding_window=(False,), use_mrope=(False,),
)
#: the keys :func:`llama_decoder_config` reads that have no default (Llama / Qwen2 names)
LLAMA_REQUIRED: tuple[str, ...] = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size", "vocab_size")
DREAM_REQUIRED: tuple[str, ...] = LLAMA_REQUIRED


def _read_config(config: Mapping[str, Any], *, defaults: Mapping[str, Any], required: tuple[str, ...],
                 options: Mapping[str, tuple], kind: str, source: str) -> dict[str, Any]:
    """``config`` over ``defaults``, after checking the required keys and the supported options."""
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"{source}: {kind} config lacks {missing}")
    c = {**defaults, **config}
    bad = [f"{k}={c[k]!r} (supported: {', '.join(map(repr, ok))})" for k, ok in options.items() if c[k] not in ok]
    if bad:
        raise ValueError(f"{source}: unsupported {kind} options: {'; '.join(bad)}")
    return c


def llada_decoder_config(config: Mapping[str, Any], *, source: str = CONFIG_NAME) -> DecoderConfig:
    """A LLaDA ``config.json`` as a :class:`DecoderConfig`.

    ``mlp_hidden_size`` wins over ``mlp_ratio * d_model``; the embedding (and head) has
    ``embedding_size or vocab_size`` rows; ``n_kv_heads`` defaults to ``n_heads``.
    """
    c = _read_config(config, defaults=LLADA_DEFAULTS, required=LLADA_REQUIRED, options=LLADA_OPTIONS,
                     kind="LLaDA", source=source)
    return DecoderConfig(
        vocab_size=c["embedding_size"] or c["vocab_size"], d_model=c["d_model"], n_layers=c["n_layers"],
        n_heads=c["n_heads"], n_kv_heads=c["n_kv_heads"] or c["n_heads"],
        mlp_hidden=c["mlp_hidden_size"] or c["mlp_ratio"] * c["d_model"], rope_theta=float(c["rope_theta"]),
        norm_eps=float(c["rms_norm_eps"]), qkv_bias=bool(c["include_qkv_bias"]),
        tie_embeddings=bool(c["weight_tying"]), logit_shift=False, attn_mode="bidirectional",
        max_seq_len=c["max_sequence_length"],
    )


def llama_decoder_config(c: Mapping[str, Any], *, qkv_bias: bool, logit_shift: bool,
                         mrope_section: list[int] | None = None) -> DecoderConfig:
    """A Llama / Qwen2-keyed config as a bidirectional :class:`DecoderConfig`: the one mapping shared by
    Dream, LLaDA-V's LLM and Dimple, each of which states only what differs.

    ``num_key_value_heads`` None (or 0) means ``num_attention_heads``.

    Args:
        c: the config already read over its family's defaults by :func:`_read_config` (every key of
            :data:`LLAMA_REQUIRED` plus ``num_key_value_heads``, ``rope_theta``, ``rms_norm_eps``,
            ``tie_word_embeddings`` and ``max_position_embeddings``).
        qkv_bias: biases on the q/k/v projections (Qwen2 / Dream: True; Llama: False).
        logit_shift: Dream's read-out, the prediction for position i at position i-1.
        mrope_section: Qwen2-VL's M-RoPE bands (t, h, w); None = 1-D RoPE.
    """
    return DecoderConfig(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"], n_kv_heads=c["num_key_value_heads"] or c["num_attention_heads"],
        mlp_hidden=c["intermediate_size"], rope_theta=float(c["rope_theta"]), norm_eps=float(c["rms_norm_eps"]),
        qkv_bias=qkv_bias, tie_embeddings=bool(c["tie_word_embeddings"]), logit_shift=logit_shift,
        attn_mode="bidirectional", max_seq_len=c["max_position_embeddings"], mrope_section=mrope_section,
    )


def dream_decoder_config(config: Mapping[str, Any], *, source: str = CONFIG_NAME) -> DecoderConfig:
    """A Dream (Qwen2-shaped) ``config.json`` as a :class:`DecoderConfig`: q/k/v biases, logits
    shifted by one position at sampling time."""
    c = _read_config(config, defaults=DREAM_DEFAULTS, required=DREAM_REQUIRED, options=DREAM_OPTIONS,
                     kind="Dream", source=source)
    return llama_decoder_config(c, qkv_bias=True, logit_shift=True)


def mmdiff_decoder_config(config: Mapping[str, Any], *, source: str = CONFIG_NAME) -> DecoderConfig:
    """Our own ``config.json`` (written by :func:`save_decoder`)."""
    return DecoderConfig.from_dict({k: v for k, v in config.items() if k != "model_type"}, source=source)


# ------------------------------------------------------------------------------------------------
# special-token ids
# ------------------------------------------------------------------------------------------------
def special_ids_from_configs(config: Mapping[str, Any], generation_config: Mapping[str, Any], *,
                             source: str = CONFIG_NAME, fallback: Mapping[str, int | None] | None = None
                             ) -> SpecialIds:
    """The ids a released checkpoint declares: each from ``config.json``, else ``generation_config.json``,
    else ``fallback`` (ids found in the tokenizer).

    The mask id is the model's own ``mask_token_id`` (LLaDA: 126336; never hard-coded here). PAD
    defaults to EOS; a list of EOS ids yields its first.
    """

    def declared(key: str) -> int | None:
        for c in (config, generation_config, fallback or {}):
            value = c.get(key)
            if value is not None:
                return int(value[0] if isinstance(value, list) else value)
        return None

    mask, eos = declared("mask_token_id"), declared("eos_token_id")
    for name, value in (("mask_token_id", mask), ("eos_token_id", eos)):
        if value is None:
            raise ValueError(f"{source}: no {name} in {CONFIG_NAME} or {GENERATION_CONFIG_NAME}")
    pad = declared("pad_token_id")
    return SpecialIds(mask=mask, pad=eos if pad is None else pad, eos=eos, bos=declared("bos_token_id"))


def _hf_special_ids(directory: Path, config: Mapping[str, Any], *,
                    fallback: Mapping[str, int | None] | None = None) -> SpecialIds:
    gen_path = directory / GENERATION_CONFIG_NAME
    generation_config = read_json(gen_path) if gen_path.is_file() else {}
    return special_ids_from_configs(config, generation_config, source=str(directory), fallback=fallback)


def _mmdiff_special_ids(directory: Path, config: Mapping[str, Any]) -> SpecialIds | None:
    """``special_tokens.json`` of a converted checkpoint; None for a plain ``save_pretrained`` directory."""
    path = directory / SPECIAL_TOKENS_NAME
    return config_from_dict(SpecialIds, read_json(path), source=str(path)) if path.is_file() else None


# ------------------------------------------------------------------------------------------------
# formats and their detection
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointFormat:
    """How one on-disk format becomes a :class:`Decoder`."""

    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values
    architectures: tuple[str, ...]  # config.json "architectures" entries
    decoder_config: Callable[..., DecoderConfig]  # (config dict, *, source) -> DecoderConfig
    weights: Mapping[str, str]  # checkpoint tensor name pattern -> Decoder name pattern
    special_ids: Callable[[Path, Mapping[str, Any]], SpecialIds | None]  # (directory, config) -> ids


FORMATS: Registry[CheckpointFormat] = Registry("checkpoint format")
for _fmt in (
    CheckpointFormat("llada", ("llada",), ("LLaDAModelLM",), llada_decoder_config, LLADA_WEIGHTS, _hf_special_ids),
    CheckpointFormat("dream", ("Dream",), ("DreamModel",), dream_decoder_config, DREAM_WEIGHTS, _hf_special_ids),
    CheckpointFormat("mmdiff-decoder", ("mmdiff-decoder",), (), mmdiff_decoder_config, MMDIFF_WEIGHTS,
                     _mmdiff_special_ids),
):
    FORMATS.register(_fmt.name)(_fmt)

LLADA_V_MODEL_TYPES: tuple[str, ...] = ("llava_llada",)
#: LaViDa's classes (:mod:`mmdiff.checkpoints.lavida`); its LLaDA variant shares LLaDA-V's model_type
LAVIDA_ARCHITECTURES: tuple[str, ...] = ("LlavaLladaForMaskedDiffusion", "LlavaDreamForMaskedDiffusion")
LAVIDA_MODEL_TYPES: tuple[str, ...] = ("llava_dream",)
#: config keys that mark a LLaVA-style multimodal checkpoint
VISION_KEYS: tuple[str, ...] = ("mm_vision_tower", "vision_tower", "mm_projector_type", "vision_config")


def is_lavida(config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` is LaViDa's: its architectures, model_type ``llava_dream``, or
    ``llava_llada`` over LLaDA's own keys (``d_model``; LLaDA-V's LLM has Llama keys)."""
    architectures = list(config.get("architectures") or [])
    return (any(a in LAVIDA_ARCHITECTURES for a in architectures) or config.get("model_type") in LAVIDA_MODEL_TYPES
            or (config.get("model_type") in LLADA_V_MODEL_TYPES and "d_model" in config))


def is_llada_v(config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` is LLaDA-V's (model_type ``llava_llada``, or LLaDA with vision keys),
    and not LaViDa's (:func:`is_lavida`)."""
    architectures = list(config.get("architectures") or [])
    return not is_lavida(config) and (config.get("model_type") in LLADA_V_MODEL_TYPES or (
        any("LLaDA" in a for a in architectures) and any(k in config for k in VISION_KEYS)))


def detect_format(config: Mapping[str, Any], *, source: str = CONFIG_NAME) -> CheckpointFormat:
    """The format of a checkpoint, from its ``config.json`` (``model_type`` / ``architectures``).

    Raises:
        ValueError: for LLaDA-V and LaViDa (multimodal: :func:`mmdiff.load`) and for any unsupported model,
            naming its model_type and architectures and the supported ones.
    """
    model_type = config.get("model_type")
    architectures = list(config.get("architectures") or [])
    for family, detect in (("LaViDa", is_lavida), ("LLaDA-V", is_llada_v)):  # LaViDa first: both are llava_llada
        if detect(config):
            raise ValueError(f"{source}: a {family} checkpoint (model_type {model_type!r}, architectures "
                             f"{architectures}) is multimodal: load it with mmdiff.load(path); "
                             "the Decoder loader and mmdiff convert take text-only LLaDA and Dream checkpoints")
    formats = [FORMATS.get(name) for name in FORMATS.names()]
    for fmt in formats:
        if model_type in fmt.model_types or any(a in fmt.architectures for a in architectures):
            return fmt
    supported = "; ".join(f"{fmt.name}: model_type {list(fmt.model_types)}, architectures {list(fmt.architectures)}"
                          for fmt in formats)
    raise ValueError(f"{source}: unsupported checkpoint with model_type {model_type!r} and architectures "
                     f"{architectures}; supported: {supported}")


# ------------------------------------------------------------------------------------------------
# safetensors shards
# ------------------------------------------------------------------------------------------------
@contextmanager
def _safe_open(path: Path) -> Iterator[Any]:
    """``safetensors.safe_open`` (lazy, CPU), with errors that name the file."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    with handle as f:
        yield f


def shard_index(directory: str | Path) -> dict[str, Path]:
    """Tensor name -> the file holding it, from ``model.safetensors.index.json`` or ``model.safetensors``.

    Raises:
        FileNotFoundError: no weights at all, or the index names a shard file that does not exist.
    """
    directory = Path(directory)
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path} has no 'weight_map' object")
        absent = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if absent:
            raise FileNotFoundError(f"{index_path} refers to missing shard file(s) {absent} in {directory}")
        return {name: directory / f for name, f in weight_map.items()}
    single = directory / WEIGHTS_NAME
    if single.is_file():
        return shard_index_of_file(single)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}")


def shard_index_of_file(path: Path) -> dict[str, Path]:
    """Tensor name -> ``path`` for every tensor of one safetensors file."""
    with _safe_open(path) as f:
        return {name: path for name in f.keys()}


def drop_unused(files: Mapping[str, Path], unused: Callable[[str], bool], *, source: str,
                why: str = "not used") -> dict[str, Path]:
    """``files`` (:func:`shard_index`) without the stored tensors a model never reads (``unused(name)``),
    which are logged as skipped, not refused as unknown by :func:`check_weights`."""
    dropped = {n for n in files if unused(n)}
    if dropped:
        log.info("%s: %s: %s", source, why, sorted(dropped))
    return {n: p for n, p in files.items() if n not in dropped}


def _group_by_file(files: Mapping[str, Path]) -> dict[Path, list[str]]:
    groups: dict[Path, list[str]] = {}
    for name, path in files.items():
        groups.setdefault(path, []).append(name)
    return groups


def check_weights(files: Mapping[str, Path], rename: Mapping[str, str], expected: Mapping[str, tuple[int, ...]], *,
                  dtype: torch.dtype | None, source: str) -> None:
    """Check names, shapes and dtypes from the shard headers, before reading any tensor data.

    Args:
        files: checkpoint tensor name -> file (:func:`shard_index`).
        rename: checkpoint name -> Decoder name, for the tensors the Decoder has.
        expected: Decoder name -> shape.
        dtype: requested dtype; None keeps the checkpoint's, which must then be a single one.
        source: the checkpoint directory, for messages.
    """
    problems = []
    unknown = sorted(set(files) - set(rename))
    missing = sorted(set(rename) - set(files))
    if unknown:
        problems.append(f"unknown tensors {unknown}")
    if missing:
        problems.append(f"missing tensors {missing}")
    shapes, dtypes = [], set()
    for path, names in _group_by_file({n: p for n, p in files.items() if n in rename}).items():
        with _safe_open(path) as f:
            held = set(f.keys())
            for name in names:
                if name not in held:
                    problems.append(f"{INDEX_NAME} places {name} in {path.name}, which does not hold it")
                    continue
                header = f.get_slice(name)
                shape, want = tuple(header.get_shape()), tuple(expected[rename[name]])
                if shape != want:
                    shapes.append(f"{name} ({path.name}): checkpoint {shape} vs model {want}")
                dtypes.add(header.get_dtype())
    if shapes:
        problems.append(f"wrong shapes [{'; '.join(shapes)}]")
    if dtype is None and len(dtypes) > 1:
        problems.append(f"tensors of mixed dtypes {sorted(dtypes)}; pass dtype= to choose one")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def read_weights(files: Mapping[str, Path], rename: Mapping[str, str], *, dtype: torch.dtype | None,
                 device: str | torch.device) -> dict[str, torch.Tensor]:
    """Read each tensor, cast it to ``dtype`` (None: as stored), move it to ``device``; keyed by Decoder name.

    One tensor at a time, so the peak extra memory is one tensor, not a second copy of the model.
    """
    state: dict[str, torch.Tensor] = {}
    for path, names in _group_by_file(files).items():
        with _safe_open(path) as f:
            for name in names:
                state[rename[name]] = f.get_tensor(name).to(device=device, dtype=dtype)
    return state


def assign_weights(model: torch.nn.Module, files: Mapping[str, Path], rename: Mapping[str, str],
                   expected: Mapping[str, tuple[int, ...]], *, dtype: torch.dtype | None,
                   device: str | torch.device, source: str) -> None:
    """Check every header (:func:`check_weights`), then read, cast and assign each tensor onto ``model``
    (built on the meta device) one at a time (:func:`read_weights`)."""
    check_weights(files, rename, expected, dtype=dtype, source=source)
    load_state_checked(model, read_weights(files, rename, dtype=dtype, device=device), source=source, assign=True)


def assign_parts(model: torch.nn.Module,
                 parts: Iterable[tuple[Mapping[str, Path], Mapping[str, str], torch.dtype | None, str]],
                 expected: Mapping[str, tuple[int, ...]], *, device: str | torch.device, source: str) -> None:
    """:func:`assign_weights` over several checkpoints (``(files, rename, dtype, where)`` each: a model
    made of separately released parts, each keeping its own dtype when that is None): each part's
    headers are checked before it is read, then the model is assigned once."""
    state: dict[str, torch.Tensor] = {}
    for files, rename, dtype, where in parts:
        check_weights(files, rename, {d: expected.get(d, ()) for d in rename.values()}, dtype=dtype, source=where)
        state.update(read_weights(files, rename, dtype=dtype, device=device))
    load_state_checked(model, state, source=source, assign=True)


def build_on_meta(cfg: ModelConfig, tokenizer: Any) -> tuple[MultimodalDiffusionLM, dict[str, tuple[int, ...]]]:
    """A :class:`~mmdiff.model.MultimodalDiffusionLM` of shapes only (built on the meta device: no memory,
    no init cost) and its state-dict name -> shape, for :func:`assign_weights` to fill."""
    from ..model import MultimodalDiffusionLM

    with torch.device("meta"):
        model = MultimodalDiffusionLM(cfg, tokenizer)
    return model, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def assert_materialised(module: torch.nn.Module) -> None:
    """Raise if a parameter or buffer is still on the meta device (it would compute garbage)."""
    stray = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if stray:
        raise RuntimeError(f"left on the meta device after loading: {stray}")


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
@dataclass
class LoadedCheckpoint:
    """A loaded checkpoint: the decoder and what is needed to sample from it."""

    decoder: Decoder
    special_ids: SpecialIds | None  # None only for an mmdiff directory without special_tokens.json
    tokenizer: Any | None  # a transformers tokenizer when the directory ships one and it was asked for
    format: str  # name of the CheckpointFormat


def open_checkpoint(path: str | Path) -> tuple[Path, dict]:
    """The checkpoint directory and its parsed ``config.json`` (clear errors when either is missing)."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    return directory, read_json(directory / CONFIG_NAME)


def load_pretrained(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    tokenizer: bool = True) -> LoadedCheckpoint:
    """Load a LLaDA / Dream / mmdiff-decoder directory with its special-token ids (and tokenizer).

    Args:
        path: a local Hugging Face-style directory (``config.json`` + safetensors shards).
        dtype: parameter dtype; None keeps the checkpoint's own.
        device: where the parameters live.
        tokenizer: also load the tokenizer when the directory has tokenizer files.
    """
    directory, config = open_checkpoint(path)
    config_path = directory / CONFIG_NAME
    fmt = detect_format(config, source=str(config_path))
    cfg = fmt.decoder_config(config, source=str(config_path))
    with torch.device("meta"):
        decoder = Decoder(cfg)  # shapes only: no memory, no init cost
    expected = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    rename = {src: dst for src, dst in expand_names(fmt.weights, cfg.n_layers).items() if dst in expected}
    files = shard_index(directory)
    assign_weights(decoder, files, rename, expected, dtype=dtype, device=device, source=str(directory))
    assert_materialised(decoder)
    decoder.eval()
    return LoadedCheckpoint(decoder, fmt.special_ids(directory, config),
                            load_tokenizer_if_present(directory) if tokenizer else None, fmt.name)


def load_checkpoint(path: str | Path, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> Decoder:
    """The :class:`Decoder` of a LLaDA / Dream / mmdiff-decoder directory (see :func:`load_pretrained`).

    ``model(ids).logits`` are raw per-position logits; Dream's one-position shift is applied by
    :meth:`Decoder.shifted` in the sampler.
    """
    return load_pretrained(path, dtype=dtype, device=device, tokenizer=False).decoder


def tokenizer_files(directory: str | Path) -> list[Path]:
    """The :data:`TOKENIZER_FILES` present in ``directory``."""
    return [p for p in (Path(directory) / name for name in TOKENIZER_FILES) if p.is_file()]


def load_tokenizer_if_present(path: str | Path):
    """The tokenizer of ``path`` when it has tokenizer files, else None. Never runs checkpoint code.

    ``AutoTokenizer`` with ``trust_remote_code=False`` (otherwise a checkpoint with an ``auto_map``,
    as LLaDA's, makes transformers ask on stdin whether to run its code); when the class exists only
    in the checkpoint's own code (Dream's ``DreamTokenizer``), a ``tokenizer.json`` is loaded as a
    ``PreTrainedTokenizerFast``, else the class's transformers twin (:data:`CODE_TOKENIZER_CLASSES`)
    reads the released files (Dream: vocab.json + merges.txt).
    """
    if not tokenizer_files(path):
        return None
    import warnings

    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer reads config.json of a model class it does not know and says so
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # and warns about its legacy keys (rope_scaling)
            try:
                return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
            except ValueError:
                if (Path(path) / "tokenizer.json").is_file():
                    return PreTrainedTokenizerFast.from_pretrained(str(path))
                config_path = Path(path) / "tokenizer_config.json"
                name = read_json(config_path).get("tokenizer_class") if config_path.is_file() else None
                if name not in CODE_TOKENIZER_CLASSES:
                    raise
                import transformers

                return getattr(transformers, CODE_TOKENIZER_CLASSES[name]).from_pretrained(str(path))
    finally:
        hf_logging.set_verbosity(verbosity)
