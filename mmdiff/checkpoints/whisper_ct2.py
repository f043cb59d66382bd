"""``mmdiff convert-whisper SRC DST``: a CTranslate2 Whisper directory -> a transformers Whisper directory.

CTranslate2 (``ct2-transformers-converter``) stores a Whisper model as one ``model.bin`` (its
``WhisperSpec``) beside ``config.json`` (suppressed ids, language ids, alignment heads) and the
tokenizer (``tokenizer.json``, ``vocabulary.txt``). ``model.bin`` is, little-endian:

    uint32 format version, string spec name, uint32 spec revision, uint32 variable count,
    per variable: string name, uint8 rank, rank x uint32 dims, uint8 dtype, uint32 byte count, the bytes;
    uint32 alias count, per alias: string alias, string target

where a string is a uint16 length followed by that many bytes ending in NUL. Variables are named
after the spec's modules (``encoder/layer_0/self_attention/linear_0/weight``): self-attention fuses
q, k, v into ``linear_0`` (with a fused bias; Whisper's k projection has none, so its third is zero),
cross-attention keeps q in ``linear_0`` and fuses k, v in ``linear_1``. :data:`CT2_LAYER_NAMES` maps
them one to one onto ``WhisperForConditionalGeneration``; the converted directory loads with no
missing or unexpected keys (:func:`convert_whisper` checks it) and is read by
:class:`mmdiff.encoders.audio.AudioEncoder` (``checkpoint=DST``) and by transformers itself.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io import CONFIG_NAME, WEIGHTS_NAME, atomic_write_bytes, check_output_dir, write_json

#: CTranslate2's DataType enum (include/ctranslate2/types.h) -> numpy dtype
CT2_DTYPES: dict[int, np.dtype] = {0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"),
                                   4: np.dtype("<f2")}
CT2_BFLOAT16 = 5  # no numpy dtype: read as uint16 and widened through torch
CT2_SPEC = "WhisperSpec"
MODEL_BIN = "model.bin"
#: tokenizer files copied as they are when SRC has them
TOKENIZER_COPIES = ("tokenizer.json", "vocabulary.txt")
#: vocabularies this large or larger are multilingual (openai-whisper's ModelDimensions rule)
MULTILINGUAL_VOCAB = 51865

#: per-layer CT2 name -> transformers name (both relative to the layer); ``{qkv}`` marks fused weights
CT2_LAYER_NAMES: dict[str, str] = {
    "self_attention/layer_norm/gamma": "self_attn_layer_norm.weight",
    "self_attention/layer_norm/beta": "self_attn_layer_norm.bias",
    "self_attention/linear_1/weight": "self_attn.out_proj.weight",
    "self_attention/linear_1/bias": "self_attn.out_proj.bias",
    "attention/layer_norm/gamma": "encoder_attn_layer_norm.weight",
    "attention/layer_norm/beta": "encoder_attn_layer_norm.bias",
    "attention/linear_0/weight": "encoder_attn.q_proj.weight",
    "attention/linear_0/bias": "encoder_attn.q_proj.bias",
    "attention/linear_2/weight": "encoder_attn.out_proj.weight",
    "attention/linear_2/bias": "encoder_attn.out_proj.bias",
    "ffn/layer_norm/gamma": "final_layer_norm.weight",
    "ffn/layer_norm/beta": "final_layer_norm.bias",
    "ffn/linear_0/weight": "fc1.weight",
    "ffn/linear_0/bias": "fc1.bias",
    "ffn/linear_1/weight": "fc2.weight",
    "ffn/linear_1/bias": "fc2.bias",
}
#: per-stack CT2 name -> transformers name (relative to ``model.encoder.`` / ``model.decoder.``)
CT2_STACK_NAMES: dict[str, str] = {
    "conv1/weight": "conv1.weight", "conv1/bias": "conv1.bias",
    "conv2/weight": "conv2.weight", "conv2/bias": "conv2.bias",
    "layer_norm/gamma": "layer_norm.weight", "layer_norm/beta": "layer_norm.bias",
    "position_encodings/encodings": "embed_positions.weight",
    "embeddings/weight": "embed_tokens.weight",
}


@dataclass
class CT2Model:
    """The contents of a CTranslate2 ``model.bin``."""

    spec: str  # spec name, e.g. "WhisperSpec"
    revision: int  # spec revision
    variables: dict[str, np.ndarray]  # name -> array (scalars are 0-d)
    aliases: dict[str, str]  # alias -> target variable


def read_ct2_model(path: str | Path) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` (layout in the module docstring).

    Raises:
        ValueError: the file is truncated, has trailing bytes or an unknown dtype.
    """
    path = Path(path)
    data = memoryview(path.read_bytes())
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ValueError(f"{path}: truncated CTranslate2 model (needs {size} bytes at offset {pos})")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out if len(out) > 1 else out[0]

    def string() -> str:
        nonlocal pos
        n = take("<H")
        raw = bytes(data[pos:pos + n])
        pos += n
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a CTranslate2 model (a name at offset {pos - n} is not UTF-8)") from None

    take("<I")  # binary format version
    spec, revision, count = string(), take("<I"), take("<I")
    variables = {}
    for _ in range(count):
        name = string()
        dims = [take("<I") for _ in range(take("<B"))]
        dtype, nbytes = take("<B"), take("<I")
        raw = data[pos:pos + nbytes]
        if len(raw) != nbytes:
            raise ValueError(f"{path}: truncated CTranslate2 model (variable {name!r})")
        pos += nbytes
        if dtype == CT2_BFLOAT16:
            bits = torch.frombuffer(bytearray(raw), dtype=torch.int16).view(torch.bfloat16)
            array = bits.float().numpy()
        elif dtype in CT2_DTYPES:
            array = np.frombuffer(raw, dtype=CT2_DTYPES[dtype]).copy()
        else:
            raise ValueError(f"{path}: variable {name!r} has unknown CTranslate2 dtype {dtype}")
        variables[name] = array.reshape(dims)
    aliases = {string(): string() for _ in range(take("<I"))}
    if pos != len(data):
        raise ValueError(f"{path}: {len(data) - pos} unexpected bytes after the aliases")
    return CT2Model(spec, revision, variables, aliases)


def ct2_whisper_state(model: CT2Model) -> dict[str, torch.Tensor]:
    """The ``WhisperForConditionalGeneration`` state dict of a CT2 ``WhisperSpec`` (dtype kept).

    Raises:
        ValueError: not a WhisperSpec, or a weight variable that no rule maps (named).
    """
    if model.spec != CT2_SPEC:
        raise ValueError(f"not a CTranslate2 Whisper model: spec {model.spec!r}, expected {CT2_SPEC!r}")
    state: dict[str, torch.Tensor] = {}
    for name, array in model.variables.items():
        if array.ndim == 0:  # num_heads, pre_norm, activation ...: configuration, not weights
            continue
        stack, _, rest = name.partition("/")
        tensor = torch.from_numpy(array)
        prefix = f"model.{stack}."
        layer, _, sub = rest.partition("/")
        if layer.startswith("layer_") and layer[len("layer_"):].isdigit():
            prefix += f"layers.{layer[len('layer_'):]}."
            state.update(_layer_tensors(prefix, sub, tensor, name))
        elif rest in CT2_STACK_NAMES:
            state[prefix + CT2_STACK_NAMES[rest]] = tensor
        else:
            raise ValueError(f"CTranslate2 variable {name!r}: no transformers name for it")
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]  # the projection alias
    return state


def _layer_tensors(prefix: str, sub: str, tensor: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """One layer variable -> its transformers tensor(s): fused q,k,v / k,v split, the rest renamed."""
    if sub.startswith("self_attention/linear_0/"):
        q, k, v = tensor.chunk(3, dim=0)
        kind = sub.rpartition("/")[2]
        out = {f"{prefix}self_attn.q_proj.{kind}": q, f"{prefix}self_attn.v_proj.{kind}": v}
        if kind == "weight":
            out[f"{prefix}self_attn.k_proj.weight"] = k
        elif k.abs().max() > 0:
            raise ValueError(f"CTranslate2 variable {name!r}: Whisper's k projection has no bias, but its third "
                             "is non-zero")
        return out
    if sub.startswith("attention/linear_1/"):
        k, v = tensor.chunk(2, dim=0)
        kind = sub.rpartition("/")[2]
        out = {f"{prefix}encoder_attn.v_proj.{kind}": v}
        if kind == "weight":
            out[f"{prefix}encoder_attn.k_proj.weight"] = k
        return out
    if sub not in CT2_LAYER_NAMES:
        raise ValueError(f"CTranslate2 variable {name!r}: no transformers name for it")
    return {prefix + CT2_LAYER_NAMES[sub]: tensor}


def whisper_config(model: CT2Model, ct2_config: dict, tokens: dict[str, int]) -> dict:
    """transformers ``WhisperConfig`` fields of a CT2 Whisper model (sizes read off its weights).

    Args:
        model: the parsed ``model.bin``.
        ct2_config: its ``config.json`` (``suppress_ids``, ``suppress_ids_begin``; may be empty).
        tokens: special token -> id (``<|endoftext|>``, ``<|startoftranscript|>``; from the tokenizer).
    """
    v = model.variables
    n_layers = {s: sum(1 for k in v if k.startswith(f"{s}/layer_") and k.endswith("ffn/linear_0/weight"))
                for s in ("encoder", "decoder")}
    vocab, d_model = v["decoder/embeddings/weight"].shape
    eot = tokens.get("<|endoftext|>", 50256 if vocab < MULTILINGUAL_VOCAB else 50257)
    sot = tokens.get("<|startoftranscript|>", eot + 1)
    return {
        "model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"],
        "vocab_size": int(vocab), "d_model": int(d_model),
        "num_mel_bins": int(v["encoder/conv1/weight"].shape[1]),
        "encoder_layers": n_layers["encoder"], "decoder_layers": n_layers["decoder"],
        "encoder_attention_heads": int(v["encoder/num_heads"]), "decoder_attention_heads": int(v["decoder/num_heads"]),
        "encoder_ffn_dim": int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "decoder_ffn_dim": int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(v["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(v["decoder/position_encodings/encodings"].shape[0]),
        "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": True,
        "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot, "decoder_start_token_id": sot,
        "suppress_tokens": [int(i) for i in ct2_config.get("suppress_ids", [])],
        "begin_suppress_tokens": [int(i) for i in ct2_config.get("suppress_ids_begin", [])],
        "dtype": _dtype_name(v["decoder/embeddings/weight"]),
    }


def _dtype_name(array: np.ndarray) -> str:
    return {np.dtype("<f2"): "float16", np.dtype("<f4"): "float32"}.get(array.dtype, "float32")


def _special_tokens(src: Path) -> dict[str, int]:
    """``<|...|>`` token -> id from SRC's ``tokenizer.json`` (empty when it has none)."""
    path = src / "tokenizer.json"
    if not path.is_file():
        return {}
    added = json.loads(path.read_text()).get("added_tokens", [])
    return {t["content"]: int(t["id"]) for t in added}


def generation_config(config: dict, tokens: dict[str, int]) -> dict:
    """A ``generation_config.json`` for transformers' Whisper ``generate`` (greedy, no timestamps)."""
    out = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                                  "suppress_tokens", "begin_suppress_tokens")}
    out.update(max_length=config["max_target_positions"], is_multilingual=config["vocab_size"] >= MULTILINGUAL_VOCAB)
    if "<|notimestamps|>" in tokens:
        out["no_timestamps_token_id"] = tokens["<|notimestamps|>"]
    langs = {k: i for k, i in tokens.items() if len(k) <= 9 and k[2:-2].isalpha() and k[2:-2].islower()
             and k not in ("<|endoftext|>", "<|transcribe|>", "<|translate|>")}
    if out["is_multilingual"]:
        out["lang_to_id"] = langs
        out["task_to_id"] = {t: tokens[f"<|{t}|>"] for t in ("transcribe", "translate") if f"<|{t}|>" in tokens}
    return out


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pinned_sha256(path: str | Path, expected: str | None) -> str:
    """The file's SHA-256; when ``expected`` is given (a pinned build step's ``--sha256``), it must be that.

    Raises:
        ValueError: ``expected`` is not 64 hex digits, or the file's SHA-256 differs.
    """
    if expected is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", expected):
        raise ValueError(f"--sha256 {expected!r}: not a SHA-256 (64 hex digits)")
    got = sha256_of(path)
    if expected is not None and got != expected.lower():
        raise ValueError(f"{path}: SHA-256 {got} is not the pinned {expected.lower()}")
    return got


def convert_whisper(src: str | Path, dst: str | Path, *, sha256: str | None = None) -> dict:
    """Write the CTranslate2 Whisper directory ``src`` as a transformers Whisper directory ``dst``.

    ``dst`` gets ``config.json``, ``generation_config.json``, ``model.safetensors`` (the CT2 dtype kept;
    the tied projection stored once), ``preprocessor_config.json`` (WhisperFeatureExtractor) and, when
    ``src`` has ``tokenizer.json``, the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``).
    The weights are checked to fill ``WhisperForConditionalGeneration`` exactly before anything is written.

    Args:
        src: the CTranslate2 directory.
        dst: the output directory (created; must be empty).
        sha256: when given, ``src/model.bin`` must have this SHA-256 (a pinned build step).

    Returns:
        the written transformers config.

    Raises:
        ValueError: ``src`` has no ``model.bin`` or not the pinned one, is not a Whisper model, or its weights do not fill the
            transformers model exactly; ``dst`` is not empty.
    """
    from safetensors.torch import save
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    src = Path(src)
    dst = check_output_dir(dst, flag="DST")
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"destination {dst} exists and is not empty")
    if not (src / MODEL_BIN).is_file():
        raise ValueError(f"{src}: no {MODEL_BIN}; expected a CTranslate2 Whisper directory")
    if sha256 is not None:
        pinned_sha256(src / MODEL_BIN, sha256)
    model = read_ct2_model(src / MODEL_BIN)
    state = ct2_whisper_state(model)
    ct2_config = json.loads((src / CONFIG_NAME).read_text()) if (src / CONFIG_NAME).is_file() else {}
    tokens = _special_tokens(src)
    config = whisper_config(model, ct2_config, tokens)
    with torch.device("meta"):
        reference = WhisperForConditionalGeneration(WhisperConfig(**config))
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {expected[k]}" for k in set(state) & set(expected)
             if tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"{src / MODEL_BIN}: weights do not fill WhisperForConditionalGeneration: missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}, wrong shapes {wrong[:4]}")
    dst.mkdir(parents=True, exist_ok=True)
    state.pop("proj_out.weight")  # tied to model.decoder.embed_tokens.weight (tie_word_embeddings)
    atomic_write_bytes(dst / WEIGHTS_NAME, save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"}))
    write_json(dst / CONFIG_NAME, config)
    write_json(dst / "generation_config.json", generation_config(config, tokens))
    WhisperFeatureExtractor(feature_size=config["num_mel_bins"]).save_pretrained(str(dst))
    if tokens:
        for name in TOKENIZER_COPIES:
            if (src / name).is_file():
                shutil.copyfile(src / name, dst / name)
        eot = "<|endoftext|>"
        write_json(dst / "tokenizer_config.json", {
            "tokenizer_class": "WhisperTokenizer", "model_max_length": config["max_target_positions"],
            "bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": eot,
            "add_prefix_space": False, "errors": "replace"})
    return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mmdiff convert-whisper SRC DST``."""
    parser.add_argument("src", help="a CTranslate2 Whisper directory (model.bin, config.json, tokenizer.json)")
    parser.add_argument("dst", help="output transformers Whisper directory (created; must be empty if it exists)")
    parser.add_argument("--sha256", help="refuse a model.bin whose SHA-256 is not this (a pinned build step)")


def run(args: argparse.Namespace) -> int:
    """``mmdiff convert-whisper``: :func:`convert_whisper`, then one summary line."""
    config = convert_whisper(args.src, args.dst, sha256=args.sha256)
    print(f"converted CTranslate2 Whisper {args.src} -> {args.dst} (d_model {config['d_model']}, "
          f"{config['encoder_layers']}+{config['decoder_layers']} layers, vocab {config['vocab_size']}, "
          f"{config['dtype']})")
    return 0
