"""DIFFA (LLaDA + Whisper + dual adapter) against logits recorded from the released code.

``tests/fixtures/diffa-tiny`` is a tiny random DIFFA in the released on-disk layout (DIFFA's config and
adapters, ``whisper/``, ``llm/``) with ``expected.npz`` written by NKU-HLT/DIFFA's own ``DIFFAModel``
(see its README.txt): a text-only forward of the LLaDA LLM, and the first denoising step and final
tokens of ``DIFFAModel.generate`` on a 1.3-s clip.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mmdiff.adapters import DiffaAdapterConfig
from mmdiff.checkpoints import DIFFA_SYSTEM_PROMPT, DIFFA_TAPS, is_diffa, load_diffa
from mmdiff.io import read_json
from mmdiff.loading import load
from mmdiff.sampling import DecodeConfig, SamplerConfig

FIXTURE = Path(__file__).parent / "fixtures" / "diffa-tiny"
QUESTION = "What is the speaker's emotion?"  # the question the reference was run with
GEN = 8  # masked response positions of the reference


@pytest.fixture(scope="module")
def model():
    return load(FIXTURE, dtype=torch.float32)


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(FIXTURE / "expected.npz"))


def clip(expected) -> tuple[np.ndarray, int]:
    return expected["waveform"], int(expected["sample_rate"])


def rel_err(got: torch.Tensor, want: np.ndarray) -> float:
    want = torch.from_numpy(want)
    return float((got - want).abs().max() / want.abs().max())


def test_diffa_is_detected_and_built_from_the_registries(model):
    assert is_diffa(read_json(FIXTURE / "config.json"))
    assert type(model.audio_adapter).__name__ == "DiffaAdapter" and model.vision is None
    assert model.cfg.audio.pad_to_window and model.cfg.audio.output_layers == DIFFA_TAPS
    assert isinstance(model.cfg.audio_adapter, DiffaAdapterConfig) and model.cfg.audio_adapter.num_queries == 64


def test_diffa_text_only_matches_reference(model, expected):
    ids = model.format_prompt(QUESTION)
    assert ids == expected["text_ids"][0, :-GEN].tolist()  # LLaDA's template with DIFFA's system prompt
    assert DIFFA_SYSTEM_PROMPT in model.tokenizer.decode(ids)
    with torch.no_grad():
        logits = model.decoder(torch.from_numpy(expected["text_ids"])).logits
    assert rel_err(logits, expected["text_logits"]) < 1e-4


def test_diffa_audio_prompt_tokens_and_logits_match_reference(model, expected):
    ids = model.format_prompt(QUESTION, n_audio=1)
    released, at = expected["audio_prompt_ids"][0].tolist(), int(expected["audio_insert_at"])
    assert ids == released[:at] + [model.special.audio] + released[at:]  # the released insertion point
    with torch.no_grad():
        tokens = model.encode_audio([clip(expected)])[0]
        assert tokens.shape == expected["speech_embeds"].shape[1:]  # 64 acoustic + 16 semantic
        assert rel_err(tokens, expected["speech_embeds"][0]) < 1e-4
        embeds, _ = model.embed_prompt([ids], audios=[[tokens]])
        response = torch.full((1, GEN), model.special.mask)
        logits = model.decoder(inputs_embeds=torch.cat([embeds, model.decoder.embed(response)], 1)).logits
    assert logits.shape == expected["audio_logits"].shape
    assert rel_err(logits, expected["audio_logits"]) < 1e-4


def test_diffa_generate_with_a_clip_is_token_identical_to_released_generate(model, expected):
    decode = DecodeConfig(sampler=SamplerConfig(gen_length=GEN, steps=GEN, block_length=GEN))
    out = model.generate([QUESTION], audios=[clip(expected)], decode=decode)
    assert out[0].tokens == expected["audio_generated_ids"][0].tolist()


def test_diffa_clip_gives_the_same_tokens_alone_or_in_a_batch(model, expected):
    wave = clip(expected)[0]
    with torch.no_grad():
        alone = model.encode_audio([(wave[:12000], 16000)])[0]
        batch = model.encode_audio([(wave[:12000], 16000), (wave, 16000)])
    assert alone.shape == (64 + 9, 32) and batch[1].shape == (80, 32)  # 0.75 s: 38 frames -> 9 semantic tokens
    torch.testing.assert_close(batch[0], alone, atol=1e-5, rtol=0)


def test_diffa_refuses_two_clips_and_images(model, expected):
    with pytest.raises(ValueError, match="DIFFA takes one clip per prompt, got 2"):
        model.format_prompt(QUESTION, n_audio=2)
    with pytest.raises(ValueError, match="no vision encoder, but an image was given"):
        model.generate([QUESTION], images=[FIXTURE / "nothing.png"])


def copy_fixture(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "diffa"))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        (data[section] if field else data)[field or section] = value
    path.write_text(json.dumps(data))


def test_diffa_bad_checkpoints_say_what_is_wrong(tmp_path):
    d = copy_fixture(tmp_path)
    shutil.rmtree(d / "whisper")
    with pytest.raises(FileNotFoundError, match=r"DIFFA needs its whisper directory: no config.json in .*whisper"):
        load(d)

    d = copy_fixture(tmp_path / "b")
    edit_json(d / "whisper" / "config.json", encoder_layers=6)
    with pytest.raises(ValueError, match=r"taps Whisper hidden states \[2, 5, 8, 11\].* has 6 layers"):
        load(d)

    d = copy_fixture(tmp_path / "c")
    edit_json(d / "config.json", whisper_config__d_model=16)
    with pytest.raises(ValueError, match=r"whisper_config differs from the whisper directory's config.json "
                                         r"\(d_model 16 vs 8\)"):
        load(d)

    d = copy_fixture(tmp_path / "d")
    edit_json(d / "config.json", prompt_size=32)
    with pytest.raises(ValueError, match=r"acoustic_connector.layer_prompts.0 \(model.safetensors\): checkpoint "
                                         r"\(1, 64, 8\) vs model \(1, 32, 8\)"):
        load(d)

    d = copy_fixture(tmp_path / "e")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin, a pickle mmdiff does not open"):
        load_diffa(d)

    d = copy_fixture(tmp_path / "f")
    edit_json(d / "config.json", llm_config__d_model=64)
    with pytest.raises(ValueError, match=r"llm_config differs from the llm directory's config.json"):
        load(d)


def test_diffa_keeps_each_directorys_dtype_and_runs_in_bf16(tmp_path, expected):
    """As released: LLaDA in bf16, Whisper and the adapters in fp32 (dtype=None keeps each directory's own)."""
    from safetensors.torch import load_file, save_file

    d = copy_fixture(tmp_path)
    for shard in (d / "llm").glob("*.safetensors"):
        save_file({k: v.bfloat16() for k, v in load_file(shard).items()}, str(shard), metadata={"format": "pt"})
    mixed = load(d, dtype=None)
    assert mixed.decoder.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for p in (*mixed.audio.parameters(), *mixed.audio_adapter.parameters())} == {torch.float32}
    decode = DecodeConfig(sampler=SamplerConfig(gen_length=4, steps=4))
    for m in (mixed, load(FIXTURE, dtype=torch.bfloat16)):
        assert len(m.generate([QUESTION], audios=[clip(expected)], decode=decode)[0].tokens) == 4
