"""``mmdiff convert-whisper``: a CTranslate2 Whisper file written here in CT2's own layout (from a tiny random
transformers Whisper, with q,k,v fused as CTranslate2's converter fuses them) converts back to a
transformers Whisper giving the same logits, and is read by mmdiff's audio encoder."""
from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
import torch

from mmdiff.checkpoints.whisper_ct2 import CT2_LAYER_NAMES, CT2_STACK_NAMES, convert_whisper, read_ct2_model
from mmdiff.cli import main as cli_main

TINY = dict(vocab_size=96, d_model=16, num_mel_bins=8, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=20,
            max_target_positions=12, bos_token_id=94, eos_token_id=94, pad_token_id=94, decoder_start_token_id=95)
SPECIAL = {"<|endoftext|>": 94, "<|startoftranscript|>": 95}


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _variable(name: str, array: np.ndarray) -> bytes:
    dtype = {np.dtype("<f4"): 0, np.dtype("i1"): 1, np.dtype("<i2"): 2, np.dtype("<f2"): 4}[array.dtype]
    data = np.ascontiguousarray(array).tobytes()
    return (_string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
            + struct.pack("<BI", dtype, len(data)) + data)


def ct2_variables(model, dtype=np.float32) -> dict[str, np.ndarray]:
    """The CT2 WhisperSpec variables of a transformers Whisper (what ct2-transformers-converter writes)."""
    sd = {k: v.detach().numpy().astype(dtype) for k, v in model.state_dict().items()}
    cfg = model.config
    out = {"encoder/num_heads": np.array(cfg.encoder_attention_heads, np.int16),
           "decoder/num_heads": np.array(cfg.decoder_attention_heads, np.int16),
           "decoder/pre_norm": np.array(1, np.int8), "decoder/activation": np.array(1, np.int8)}
    inverse_stack = {v: k for k, v in CT2_STACK_NAMES.items()}
    inverse_layer = {v: k for k, v in CT2_LAYER_NAMES.items()}
    for key, value in sd.items():
        if key == "proj_out.weight":
            continue
        _, stack, rest = key.split(".", 2)
        if rest.startswith("layers."):
            _, i, sub = rest.split(".", 2)
            p = f"{stack}/layer_{i}/"
            if sub.startswith("self_attn.q_proj."):
                kind = sub.rpartition(".")[2]
                q, v = value, sd[key.replace("q_proj", "v_proj")]
                k = sd[key.replace("q_proj", "k_proj")] if kind == "weight" else np.zeros_like(q)
                out[f"{p}self_attention/linear_0/{kind}"] = np.concatenate([q, k, v])
            elif sub.startswith("encoder_attn.k_proj.weight"):
                v = sd[key.replace("k_proj", "v_proj")]
                out[f"{p}attention/linear_1/weight"] = np.concatenate([value, v])
                out[f"{p}attention/linear_1/bias"] = np.concatenate(
                    [np.zeros_like(sd[key.replace("k_proj.weight", "v_proj.bias")]),
                     sd[key.replace("k_proj.weight", "v_proj.bias")]])
            elif ".k_proj." in sub or ".v_proj." in sub:
                continue  # fused above
            else:
                out[p + inverse_layer[sub]] = value
        else:
            out[f"{stack}/{inverse_stack[rest]}"] = value
    return out


def write_ct2_whisper(model, directory, *, dtype=np.float32) -> None:
    """A CT2 Whisper directory: model.bin in CT2's layout, config.json, tokenizer.json with the special tokens."""
    directory.mkdir(parents=True)
    variables = ct2_variables(model, dtype)
    blob = struct.pack("<I", 6) + _string("WhisperSpec") + struct.pack("<II", 3, len(variables))
    blob += b"".join(_variable(k, v) for k, v in sorted(variables.items()))
    blob += struct.pack("<I", 1) + _string("decoder/projection/weight") + _string("decoder/embeddings/weight")
    (directory / "model.bin").write_bytes(blob)
    (directory / "config.json").write_text(json.dumps({"suppress_ids": [3, 5], "suppress_ids_begin": [94],
                                                       "lang_ids": [], "alignment_heads": [[1, 0]]}))
    (directory / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": i, "content": t, "special": True}
                                                                            for t, i in SPECIAL.items()]}))


@pytest.fixture(scope="module")
def reference():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(**TINY)).eval()
    with torch.no_grad():  # Whisper's k projection has no bias; give every other bias a value
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def _logits(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, TINY["num_mel_bins"], 2 * TINY["max_source_positions"], generator=g)
    ids = torch.randint(0, TINY["vocab_size"], (2, 5), generator=g)
    with torch.no_grad():
        return model(input_features=feats, decoder_input_ids=ids).logits


def test_ct2_file_round_trips_to_identical_logits(reference, tmp_path):
    from transformers import WhisperForConditionalGeneration

    write_ct2_whisper(reference, tmp_path / "ct2")
    parsed = read_ct2_model(tmp_path / "ct2" / "model.bin")
    assert parsed.spec == "WhisperSpec" and parsed.revision == 3
    assert parsed.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert cli_main(["convert-whisper", str(tmp_path / "ct2"), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {k: config[k] for k in TINY} == TINY
    assert config["suppress_tokens"] == [3, 5] and config["begin_suppress_tokens"] == [94]
    converted = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    want, got = _logits(reference), _logits(converted)
    assert (got - want).abs().max() / want.abs().max() < 1e-6
    for name in ("preprocessor_config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).is_file(), name


def test_float16_ct2_file_keeps_float16_and_feeds_the_audio_encoder(reference, tmp_path):
    from mmdiff.encoders.audio import AudioEncoder, AudioEncoderConfig
    from mmdiff.io import load_safetensors

    write_ct2_whisper(reference, tmp_path / "ct2", dtype=np.float16)
    convert_whisper(tmp_path / "ct2", tmp_path / "hf")
    state = load_safetensors(tmp_path / "hf" / "model.safetensors")
    assert {v.dtype for v in state.values()} == {torch.float16}
    assert torch.equal(state["model.encoder.conv1.weight"], reference.model.encoder.conv1.weight.half())
    enc = AudioEncoder(AudioEncoderConfig.from_whisper_checkpoint(tmp_path / "hf", max_seconds=0.4))
    assert torch.equal(enc.encoder.layers[1].fc2.bias, reference.model.encoder.layers[1].fc2.bias.half().float())


def test_convert_whisper_refuses_bad_sources(reference, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["convert-whisper", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no model.bin" in capsys.readouterr().err
    write_ct2_whisper(reference, tmp_path / "ct2")
    blob = (tmp_path / "ct2" / "model.bin").read_bytes()
    (tmp_path / "ct2" / "model.bin").write_bytes(blob[:-40])
    assert cli_main(["convert-whisper", str(tmp_path / "ct2"), str(tmp_path / "out")]) == 2
    assert "truncated CTranslate2 model" in capsys.readouterr().err
    (tmp_path / "ct2" / "model.bin").write_bytes(blob.replace(b"WhisperSpec", b"WhisperSpek"))
    assert cli_main(["convert-whisper", str(tmp_path / "ct2"), str(tmp_path / "out")]) == 2
    assert "not a CTranslate2 Whisper model" in capsys.readouterr().err
    write_ct2_whisper(reference, tmp_path / "ct2b")
    assert cli_main(["convert-whisper", str(tmp_path / "ct2b"), str(tmp_path / "out"), "--sha256", "ab" * 32]) == 2
    assert f"is not the pinned {'ab' * 32}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "x").write_text("x")
    assert cli_main(["convert-whisper", str(tmp_path / "ct2"), str(tmp_path / "out2")]) == 2
    assert "not empty" in capsys.readouterr().err


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_convert_whisper_refuses_a_missing_source_and_a_malformed_sha256(reference, tmp_path, capsys):
    assert cli_main(["convert-whisper", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'nope'}: no model.bin" in one_line_error(capsys)
    write_ct2_whisper(reference, tmp_path / "ct2")
    assert cli_main(["convert-whisper", str(tmp_path / "ct2"), str(tmp_path / "out"), "--sha256", "xyz"]) == 2
    assert "--sha256 'xyz': not a SHA-256 (64 hex digits)" in one_line_error(capsys)
    assert cli_main(["convert-whisper", str(tmp_path / "ct2"), str(tmp_path / "out"), "--sha256", "ab" * 32]) == 2
    assert f"is not the pinned {'ab' * 32}" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_make_whisper_pins_the_sha256_it_converts_with():
    """``make whisper`` passes its pinned SHA-256 to convert-whisper, so a different model.bin is refused
    (the refusal itself: test_convert_whisper_refuses_a_missing_source_and_a_malformed_sha256)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    pin = re.search(r"^WHISPER_SHA256 := (\S+)$", text, re.M)
    assert pin and re.fullmatch(r"[0-9a-f]{64}", pin.group(1))
    assert "convert-whisper --sha256 $(WHISPER_SHA256)" in text
