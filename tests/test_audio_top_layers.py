"""Fine-tuning the top layers of a pretrained speech encoder (issue #22): the frozen lower part's states,
cached once, plus the top layers equal the whole encoder, and only the top layers (and the adapter) learn."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmdiff.encoders.audio import AudioEncoder, AudioEncoderConfig
from mmdiff.model import MultimodalDiffusionLM
from mmdiff.training.banks import SpeechBank
from mmdiff.training.recipe import StageConfig, TrainConfig
from mmdiff.training.trainer import Trainer

N_LAYERS = 3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def tiny_encoder(**overrides) -> AudioEncoder:
    cfg = AudioEncoderConfig(d_model=32, encoder_layers=N_LAYERS, encoder_attention_heads=2, encoder_ffn_dim=64,
                             num_mel_bins=80, max_source_positions=200, max_seconds=4.0, **overrides)
    return AudioEncoder(cfg).eval()


def mels(lengths: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(80, n, generator=g) for n in lengths]


@pytest.mark.parametrize("k", range(1, N_LAYERS + 1))
def test_lower_hidden_state_then_top_layers_equals_the_encoder(k):
    enc = tiny_encoder(output_layers=(-1, -2))
    feats, mask = enc.batch_mels(mels([37, 60, 12]))
    with torch.no_grad():
        full = enc(feats, mask)
        top = enc.forward_from(enc.hidden_state(feats, mask, N_LAYERS - k), mask, start=N_LAYERS - k)
    assert rel_err(top.last, full.last) < 1e-4
    for a, b in zip(top.layers, full.layers, strict=True):
        assert rel_err(a, b) < 1e-4
    assert torch.equal(top.mask, full.mask)


@pytest.mark.parametrize("k", [1, 2])
def test_cached_lower_part_of_each_clip_plus_top_layers_equals_the_encoder(k):
    """The bank caches each clip's own frames (batched 2 at a time) and re-batches them in another order
    and padding: in float32 the result is the whole encoder's; the float16 cache stays close."""
    enc = tiny_encoder()
    clips = mels([37, 60, 12, 44, 20])
    bank = SpeechBank(scene=[0] * 5, qas=[None] * 5, mels=clips)
    model = SimpleNamespace(audio=enc)
    idx = [3, 1, 4]
    feats, mask = enc.batch_mels([clips[i] for i in idx])
    with torch.no_grad():
        full = enc(feats, mask)
        bank.encode_lower(model, N_LAYERS - k, batch_size=2, dtype=torch.float32)
        cached = bank.audio_features(model, idx)
        bank.encode_lower(model, N_LAYERS - k, batch_size=2)  # float16, as the trainer stores it
        half = bank.audio_features(model, idx)
    assert bank.hidden[0].dtype == torch.float16 and bank.hidden_index == N_LAYERS - k
    assert rel_err(cached.last, full.last) < 1e-4 and torch.equal(cached.mask, full.mask)
    assert rel_err(half.last, full.last) < 1e-2


@pytest.mark.parametrize("k", [1, 2])
def test_only_the_top_layers_get_gradients(k):
    enc = tiny_encoder()
    feats, mask = enc.batch_mels(mels([30, 18]))
    with torch.no_grad():
        lower = enc.hidden_state(feats, mask, N_LAYERS - k)
    enc.requires_grad_(False)
    for m in enc.top_layers(k):
        m.requires_grad_(True)
    enc.forward_from(lower, mask, start=N_LAYERS - k).last.pow(2).sum().backward()
    tuned = tuple(f"layers.{i}." for i in range(N_LAYERS - k, N_LAYERS)) + ("layer_norm.",)
    for name, p in enc.encoder.named_parameters():
        if name.startswith(tuned):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_bad_settings_say_what_is_wrong():
    enc = tiny_encoder(output_layers=(1,))
    feats, mask = enc.batch_mels(mels([20]))
    with pytest.raises(ValueError, match="top_layers: k 4 must be in"):
        enc.top_layers(N_LAYERS + 1)
    with pytest.raises(ValueError, match="at most every output layer"):
        enc.forward_from(enc.hidden_state(feats, mask, 2), mask, start=2)  # hidden state 1 is below the cut
    with pytest.raises(ValueError, match="hidden_state index 3"):
        enc.hidden_state(feats, mask, N_LAYERS)
    window = SimpleNamespace(audio=tiny_encoder(pad_to_window=True))
    with pytest.raises(ValueError, match="pad_to_window"):
        SpeechBank(scene=[0], qas=[None], mels=mels([20])).encode_lower(window, 1)
    with pytest.raises(ValueError, match="only in an asr stage"):
        StageConfig(name="d", kind="diffusion", steps=1, audio_top_layers=1)
    with pytest.raises(ValueError, match="only in an asr stage"):
        StageConfig(name="a", kind="asr", steps=1, train=["audio", "audio_adapter"], audio_top_layers=1)


@pytest.mark.needs_espeak
def test_asr_stage_tunes_only_the_top_layer_and_the_model_keeps_it(tmp_path):
    """A from-scratch tiny recipe on a (tiny, float16) Whisper checkpoint: one asr stage with
    ``audio_top_layers`` 1. Only the top layer, the final layer norm and the adapter change; the saved
    model (encoder in float16) holds the tuned layer."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    whisper = tmp_path / "whisper"
    sizes = {"d_model": 16, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 32,
             "num_mel_bins": 80, "max_source_positions": 400}
    WhisperForConditionalGeneration(WhisperConfig(**sizes, decoder_layers=1, decoder_attention_heads=2,
                                                  decoder_ffn_dim=32, vocab_size=60, pad_token_id=0, bos_token_id=0,
                                                  eos_token_id=0, decoder_start_token_id=1)).half().save_pretrained(whisper)
    model = {
        "decoder": {"d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "mlp_hidden": 64,
                    "attn_mode": "prefix", "max_seq_len": 256},
        "vision": {"kind": "timm", "name": "vit_tiny_patch16_224", "img_size": 36, "patch_size": 12,
                   "embed_dim": 32, "depth": 1, "num_heads": 2, "layer": -1},
        "vision_adapter": {"kind": "mlp2x_gelu", "in_dim": 32, "out_dim": 32, "pool": 1, "grid": [3, 3]},
        "audio": {**sizes, "checkpoint": str(whisper), "max_seconds": 8.0},
        "audio_adapter": {"kind": "audio_ctc", "in_dim": 16, "out_dim": 32, "layers": 1, "hidden": 8, "heads": 2},
    }
    recipe = {"out": str(tmp_path / "model"), "model": model, "vocab_size": 300, "tokenizer_texts": 400,
              "bank_images": 20, "val_images": 4, "speech_clips": 6, "speech_val_clips": 3, "threads": 1,
              "eval_every": 3, "spec_augment": True, "fp16_parts": ["audio"],
              "stages": [{"name": "asr", "kind": "asr", "steps": 3, "batch_size": 4, "lr": 0.01, "warmup": 1,
                          "train": ["audio_adapter"], "audio_top_layers": 1, "audio_top_lr": 0.01}]}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    trainer = Trainer(TrainConfig.from_file(tmp_path / "recipe.json"), progress=False)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.run()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    tuned = ("audio.encoder.layers.1.", "audio.encoder.layer_norm.", "audio_adapter.")
    assert changed and all(n.startswith(tuned) for n in changed), sorted(changed)
    assert any(n.startswith("audio.encoder.layers.1.") for n in changed)
    assert trainer.speech.hidden is None and trainer.speech.features is None  # the encoder changed: caches dropped
    saved = MultimodalDiffusionLM.from_pretrained(tmp_path / "model")
    for n, p in trainer.model.audio.state_dict().items():
        assert torch.equal(saved.audio.state_dict()[n], p.half().float()), n  # stored in float16 (fp16_parts)
    log = [json.loads(line) for line in Path(trainer.log_path).read_text().splitlines()]
    assert any("val_asr" in r for r in log)


def plain_and_changed_banks(**change) -> tuple[SpeechBank, SpeechBank]:
    """Two 3-clip speech banks drawn alike from 4 training scenes, the second built with ``change``."""
    import random

    from mmdiff.data.scenes import sample_scene

    model = SimpleNamespace(cfg=SimpleNamespace(audio=SimpleNamespace(num_mel_bins=80)))
    rng = random.Random(0)
    scenes = SimpleNamespace(scenes=[sample_scene(rng, "train") for _ in range(4)])
    kw = dict(n=3, split="train", seed=5, desc="", progress=False)
    return SpeechBank.build(model, scenes, **kw), SpeechBank.build(model, scenes, **kw, **change)


@pytest.mark.needs_espeak
def test_speed_perturbation_speeds_clips_up_by_its_factor():
    """speed_range (a, a) resamples each clip a times faster: the same questions, 1/a of the frames."""
    plain, fast = plain_and_changed_banks(speed_range=(1.25, 1.25))
    assert [q.question for q in fast.qas] == [q.question for q in plain.qas]
    for a, b in zip(plain.mels, fast.mels, strict=True):
        assert b.shape[1] == pytest.approx(a.shape[1] / 1.25, abs=2)


@pytest.mark.parametrize("bad", [[1.1, 0.9], [0.0, 1.0], [0.9]])
def test_speed_perturb_is_checked(bad):
    with pytest.raises(ValueError, match=r"speed_perturb .* must be \[lo, hi\] with 0 < lo <= hi"):
        TrainConfig(out="x", model={}, stages=[], speed_perturb=bad)
    assert TrainConfig(out="x", model={}, stages=[], speed_perturb=[0.9, 1.1]).speed_perturb == (0.9, 1.1)


@pytest.mark.parametrize("bad", [[0.5, 0.1], [-0.1, 0.5], [0.2]])
def test_pad_silence_is_checked(bad):
    with pytest.raises(ValueError, match=r"pad_silence .* must be \[lo, hi\] seconds with 0 <= lo <= hi"):
        TrainConfig(out="x", model={}, stages=[], pad_silence=bad)
    assert TrainConfig(out="x", model={}, stages=[], pad_silence=[0, 0.5]).pad_silence == (0.0, 0.5)


@pytest.mark.needs_espeak
def test_silence_range_adds_the_drawn_silence_to_each_clip():
    plain, padded = plain_and_changed_banks(silence_range=(0.3, 0.3))
    assert [q.question for q in padded.qas] == [q.question for q in plain.qas]
    for a, b in zip(plain.mels, padded.mels, strict=True):
        assert b.shape[1] - a.shape[1] == 60  # 0.6 s at 100 frames per second
