"""Media loading, vision encoders (timm, open_clip) and the Whisper audio encoder, at tiny sizes."""
from __future__ import annotations

import json
import logging

import numpy as np
import open_clip
import pytest
import soundfile as sf
import timm
import torch
import torchaudio.functional as AF
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.torch import save_file
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from mmdiff.encoders.audio import AUDIO_ENCODERS, SHAPE_FIELDS, AudioEncoderConfig, build_audio_encoder, log_mel
from mmdiff.encoders.vision import VISION_ENCODERS, VisionEncoderConfig, build_vision_encoder, pad_to_square, preset
from mmdiff.media import load_audio, load_image

TINY_CLIP = "mmdiff-test-tiny-clip"
TINY_TIMM = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TINY_WHISPER = dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64)


@pytest.fixture(scope="module", autouse=True)
def tiny_clip_config(tmp_path_factory):
    """Register a tiny open_clip model config (open_clip only builds registered names)."""
    path = tmp_path_factory.mktemp("open_clip") / f"{TINY_CLIP}.json"
    path.write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(path)


def tiny_vision_cfg(kind: str, **kw) -> VisionEncoderConfig:
    base = {"timm": preset("tiny-test"), "open_clip": VisionEncoderConfig(kind="open_clip", name=TINY_CLIP),
            "siglip": VisionEncoderConfig(kind="siglip", name="siglip-tiny-test"),
            "magvit2": VisionEncoderConfig(kind="magvit2", name="magvitv2-tiny-test", img_size=32),
            "qwen2_5_vl": VisionEncoderConfig(kind="qwen2_5_vl", name="qwen2.5-vl-tiny-test"),
            # a small timm CNN at its stride-8 stage: 32 px -> 4 x 4 tokens of 16 channels
            "timm_cnn": VisionEncoderConfig(kind="timm_cnn", name="mobilenetv2_035", img_size=32, layer=2)}[kind]
    return VisionEncoderConfig.from_dict({**base.to_dict(), **kw})


def write_sine(path, *, sr: int, seconds: float = 1.0, channels: int = 1, freq: float = 440.0, **kw):
    t = np.arange(int(sr * seconds)) / sr
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    data = np.stack([wave * (0.5 + 0.5 * c) for c in range(channels)], axis=1) if channels > 1 else wave
    sf.write(path, data.astype(np.float32), sr, **kw)
    return data.astype(np.float32)


def peak_hz(x: np.ndarray, sr: int) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(x)))) * sr / len(x)


# ------------------------------------------------------------------------------------------------
# media
# ------------------------------------------------------------------------------------------------
def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (5, 3), 200).save(path)
    for src in (path, str(path), Image.open(path)):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (5, 3) and img.getpixel((0, 0)) == (200, 200, 200)


def test_load_image_bad_files_name_the_file_and_problem(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ValueError, match=r"notes\.png: not an image file"):
        load_image(text)
    full = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.png: truncated or corrupt"):
        load_image(cut)
    with pytest.raises(ValueError, match=r"missing\.png: file not found"):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("fmt,sr,channels,kw", [
    ("wav", 48000, 2, {}), ("wav", 8000, 1, {}), ("flac", 22050, 1, {}), ("ogg", 44100, 1, {"subtype": "VORBIS"}),
])
def test_load_audio_resamples_to_16k_mono(tmp_path, fmt, sr, channels, kw):
    path = tmp_path / f"tone.{fmt}"
    write_sine(path, sr=sr, channels=channels, **kw)
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1 and abs(len(x) - 16000) <= 1
    assert abs(peak_hz(x, 16000) - 440.0) <= 1.0


def test_load_audio_downmix_is_channel_mean(tmp_path):
    for sr in (16000, 48000):
        path = tmp_path / f"stereo{sr}.wav"
        data = write_sine(path, sr=sr, channels=2, subtype="FLOAT")  # (n, 2), channels differ in gain
        expected = torch.from_numpy(data.mean(axis=1))
        if sr != 16000:
            expected = AF.resample(expected, orig_freq=sr, new_freq=16000)
        torch.testing.assert_close(torch.from_numpy(load_audio(path)), expected)


def test_load_audio_arrays(tmp_path):
    wave = (0.25 * np.sin(np.arange(8000) / 5)).astype(np.float32)
    np.testing.assert_array_equal(load_audio((wave, 16000)), wave)
    ints = (wave * 32767).astype(np.int16)
    np.testing.assert_allclose(load_audio((ints, 16000)), wave, atol=1e-4)
    with pytest.raises(ValueError, match=r"\(channels, n\)"):
        load_audio((np.stack([wave, wave]), 16000))


def test_load_audio_bad_clips_name_the_file_and_problem(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros((0,), np.float32), 16000)
    sf.write(tmp_path / "silent.wav", np.zeros((16000,), np.float32), 16000)
    write_sine(tmp_path / "long.wav", sr=16000, seconds=1.0)
    (tmp_path / "notes.wav").write_text("not audio")
    with pytest.raises(ValueError, match=r"empty\.wav: empty clip"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(ValueError, match=r"silent\.wav: silent clip"):
        load_audio(tmp_path / "silent.wav")
    with pytest.raises(ValueError, match=r"long\.wav: clip is 1\.00 s long; the limit is 0\.5 s"):
        load_audio(tmp_path / "long.wav", max_seconds=0.5)
    with pytest.raises(ValueError, match=r"notes\.wav: not a readable audio file"):
        load_audio(tmp_path / "notes.wav")
    with pytest.raises(ValueError, match=r"gone\.wav: file not found"):
        load_audio(tmp_path / "gone.wav")


# ------------------------------------------------------------------------------------------------
# vision encoders
# ------------------------------------------------------------------------------------------------
def test_tiny_configs_cover_the_registry():
    assert set(VISION_ENCODERS.names()) == {"timm", "timm_cnn", "open_clip", "siglip", "magvit2", "qwen2_5_vl"}
    assert AUDIO_ENCODERS.names() == ["whisper"]


#: encoders that keep each image's resolution: per-image token counts, tested on their own
NATIVE_RESOLUTION = ("qwen2_5_vl",)


@pytest.mark.parametrize("kind", [k for k in VISION_ENCODERS.names() if k not in NATIVE_RESOLUTION])
def test_vision_encoder_builds_and_runs(kind, tmp_path):
    enc = build_vision_encoder(tiny_vision_cfg(kind)).eval()
    path = tmp_path / "wide.png"
    Image.new("RGB", (40, 24), (255, 0, 0)).save(path)
    pixels = enc.preprocess([path, Image.new("RGB", (32, 32), (0, 0, 255))])
    assert pixels.shape == (2, 3, 32, 32)
    tokens = enc(pixels)
    if enc.emits == "ids":  # a discrete tokenizer (magvit2): one code per latent position, 2x downsampling
        assert enc.grid == (16, 16) and tokens.shape == (2, 256) and tokens.dtype == torch.long
        assert 0 <= int(tokens.min()) and int(tokens.max()) < enc.out_dim == 64
        return
    assert enc.emits == "features"
    width = 16 if kind == "timm_cnn" else 32  # the CNN stage's channels; the transformers' width
    assert enc.grid == (4, 4) and enc.num_tokens == 16 and enc.out_dim == width
    assert tokens.shape == (2, 16, width) and torch.isfinite(tokens).all()


@pytest.mark.parametrize("kind", NATIVE_RESOLUTION)
def test_native_resolution_encoder_builds_and_runs(kind, tmp_path):
    """Each image keeps its aspect ratio: sides rounded to 28 px, one token per 2x2 patches of 14 px."""
    enc = build_vision_encoder(tiny_vision_cfg(kind)).eval()
    path = tmp_path / "wide.png"
    Image.new("RGB", (90, 60), (255, 0, 0)).save(path)
    images = [path, Image.new("RGB", (56, 56), (0, 0, 255))]
    batch = enc.preprocess(images)
    assert batch.grid_thw.tolist() == [[1, 4, 6], [1, 4, 4]] and batch.patches.shape == (40, 3 * 2 * 14 * 14)
    assert enc.token_grids(images) == [(1, 2, 3), (1, 2, 2)]
    with torch.no_grad():
        tokens = enc(batch)
    assert [tuple(t.shape) for t in tokens] == [(6, enc.out_dim), (4, enc.out_dim)]
    assert all(torch.isfinite(t).all() for t in tokens)
    with pytest.raises(ValueError, match="smaller than the 28 px"):
        enc.preprocess([Image.new("RGB", (20, 60))])


@pytest.mark.parametrize("layer", [-2, -1, 0])
def test_timm_weights_file_and_layer_match_forward_intermediates(tmp_path, caplog, layer):
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_TIMM).eval()
    path = tmp_path / "vit.safetensors"
    save_file(source.state_dict(), str(path))
    with caplog.at_level(logging.INFO, logger="mmdiff"):
        enc = build_vision_encoder(tiny_vision_cfg("timm", weights=str(path), layer=layer)).eval()
    assert f"loaded weights from {path}" in caplog.text
    x = torch.randn(2, 3, 32, 32)
    (expected,) = source.forward_intermediates(x, indices=[layer], intermediates_only=True, output_fmt="NLC")
    with torch.no_grad():
        got = enc(x)
    assert source.num_prefix_tokens == 1 and got.shape == (2, 16, 32)  # CLS dropped
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_open_clip_weights_file_matches_source(tmp_path, caplog):
    torch.manual_seed(0)
    source = open_clip.create_model(TINY_CLIP).eval()
    path = tmp_path / "clip.safetensors"
    save_file(source.state_dict(), str(path))
    with caplog.at_level(logging.INFO, logger="mmdiff"):
        enc = build_vision_encoder(tiny_vision_cfg("open_clip", weights=str(path))).eval()
    assert f"loaded weights from {path}" in caplog.text
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # both under no_grad: nn.MultiheadAttention takes its fused path there
        expected = source.visual.forward_intermediates(x, indices=[-2], intermediates_only=True,
                                                       output_fmt="NLC")["image_intermediates"][0]
        torch.testing.assert_close(enc(x), expected, rtol=0, atol=0)


def test_open_clip_size_overrides():
    enc = build_vision_encoder(tiny_vision_cfg("open_clip", img_size=48, embed_dim=48, depth=3, num_heads=3))
    assert enc.grid == (6, 6) and enc.out_dim == 48
    assert len(enc.visual.transformer.resblocks) == 2  # layer -2 of 3 blocks: the last one is pruned
    assert enc.visual.transformer.resblocks[0].attn.num_heads == 3
    assert enc(torch.randn(1, 3, 48, 48)).shape == (1, 36, 48)


def test_random_init_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="mmdiff"):
        build_vision_encoder(tiny_vision_cfg("timm"))
    assert "vision encoder timm:vit_tiny_patch16_224: random init" in caplog.text


def test_shipped_scene_encoder_preprocess_keeps_whole_image():
    enc = build_vision_encoder(preset("mmdiff-scenes")).eval()
    assert enc.grid == (9, 9) and enc.num_tokens == 81 and enc.out_dim == 128
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    pixels = enc.preprocess([img])
    assert pixels.shape == (1, 3, 72, 72)
    # timm's data config for this model: bicubic, mean = std = 0.5; whole image resized, no crop
    expected = TF.pil_to_tensor(img.resize((72, 72), Image.Resampling.BICUBIC)).float() / 255
    torch.testing.assert_close(pixels[0], (expected - 0.5) / 0.5, atol=1e-6, rtol=0)
    assert enc(pixels).shape == (1, 81, 128)


def test_pad_to_square_centres_on_fill():
    img = pad_to_square(Image.new("RGB", (6, 2), (255, 0, 0)), (1, 2, 3))
    assert img.size == (6, 6)
    assert img.getpixel((0, 0)) == (1, 2, 3) and img.getpixel((0, 2)) == (255, 0, 0)
    assert img.getpixel((5, 3)) == (255, 0, 0) and img.getpixel((5, 5)) == (1, 2, 3)


def test_vision_encoder_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown vision encoder 'clip'; known: magvit2, open_clip, qwen2_5_vl, siglip, timm"):
        build_vision_encoder(VisionEncoderConfig(kind="clip"))
    with pytest.raises(ValueError, match="layer 2 is out of range for a 2-block"):
        build_vision_encoder(tiny_vision_cfg("timm", layer=2))
    with pytest.raises(ValueError, match=r"nope\.safetensors: file not found"):
        build_vision_encoder(tiny_vision_cfg("timm", weights=str(tmp_path / "nope.safetensors")))
    with pytest.raises(ValueError, match="unknown timm model 'vit_nope'"):
        build_vision_encoder(VisionEncoderConfig(name="vit_nope"))
    with pytest.raises(ValueError, match="unknown open_clip model config 'nope'"):
        build_vision_encoder(VisionEncoderConfig(kind="open_clip", name="nope"))
    with pytest.raises(ValueError, match="unknown Qwen2.5-VL tower 'nope'; known"):
        build_vision_encoder(VisionEncoderConfig(kind="qwen2_5_vl", name="nope"))
    with pytest.raises(ValueError, match=r"unknown VisionEncoderConfig keys \['size'\]"):
        VisionEncoderConfig.from_dict({"size": 3})
    bad = tmp_path / "bad.png"
    bad.write_text("text")
    enc = build_vision_encoder(tiny_vision_cfg("timm"))
    with pytest.raises(ValueError, match=r"bad\.png: not an image file"):
        enc.preprocess([bad])
    with pytest.raises(ValueError, match="at least one image"):
        enc.preprocess([])


def test_vision_config_json_round_trip():
    cfg = preset("mmdiff-scenes", weights="w.safetensors")
    assert VisionEncoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ------------------------------------------------------------------------------------------------
# audio encoder
# ------------------------------------------------------------------------------------------------
def tiny_audio_cfg(**kw) -> AudioEncoderConfig:
    return AudioEncoderConfig(**{**TINY_WHISPER, "max_source_positions": 150, "max_seconds": 3.0, **kw})


def test_log_mel_matches_whisper_feature_extractor():
    rng = np.random.default_rng(0)
    t = np.arange(int(1.3 * 16000)) / 16000
    x = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    ref = WhisperFeatureExtractor(feature_size=80)(x, sampling_rate=16000, padding="longest",
                                                  return_tensors="pt").input_features[0]
    got = log_mel(x)
    assert got.shape == ref.shape == (80, 130)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_audio_encoder_matches_whisper_encoder_at_full_length():
    """At exactly max_source_positions frames our staged forward equals WhisperEncoder.forward."""
    torch.manual_seed(0)
    enc = build_audio_encoder(tiny_audio_cfg(max_source_positions=50, max_seconds=1.0,
                                             output_layers=(0, 1, -1))).eval()
    t = np.arange(16000) / 16000
    feats, mask = enc.preprocess([(np.sin(2 * np.pi * 300 * t).astype(np.float32), 16000)])
    assert feats.shape == (1, 80, 100) and mask.shape == (1, 50) and mask.all()
    with torch.no_grad():
        out = enc(feats, mask)
        ref = enc.encoder(feats, output_hidden_states=True)
    torch.testing.assert_close(out.last, ref.last_hidden_state, atol=1e-6, rtol=0)
    for got, i in zip(out.layers, (0, 1, -1)):
        torch.testing.assert_close(got, ref.hidden_states[i], atol=1e-6, rtol=0)


def save_whisper_model(directory, **sizes) -> WhisperModel:
    """A tiny random transformers ``WhisperModel`` saved as a checkpoint directory (config.json + safetensors)."""
    torch.manual_seed(0)
    model = WhisperModel(WhisperConfig(**sizes, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
                                       vocab_size=64, max_target_positions=16, pad_token_id=0,
                                       bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                                       suppress_tokens=[], begin_suppress_tokens=[])).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    model.config.to_json_file(str(directory / "config.json"))
    return model


@pytest.mark.parametrize("n_mels", [80, 128])
def test_window_encoder_matches_transformers_whisper_model(tmp_path, n_mels):
    """pad_to_window = WhisperFeatureExtractor (padding to the window) -> WhisperModel.encoder, every layer."""
    sizes = {**TINY_WHISPER, "num_mel_bins": n_mels, "max_source_positions": 150}  # a 3 s window
    ref_model = save_whisper_model(tmp_path, **sizes)
    cfg = AudioEncoderConfig.from_whisper_checkpoint(tmp_path, max_seconds=3.0, pad_to_window=True,
                                                     output_layers=(0, 1, 2))
    assert cfg.num_mel_bins == n_mels and cfg.window_samples == 48000
    enc = build_audio_encoder(cfg).eval()
    rng = np.random.default_rng(1)
    clips = [(0.3 * np.sin(np.arange(n) / 7) + 0.01 * rng.standard_normal(n)).astype(np.float32)
             for n in (17000, 30350)]
    feats, mask = enc.preprocess([(c, 16000) for c in clips])
    fe = WhisperFeatureExtractor(feature_size=n_mels, chunk_length=3)
    ref = fe(clips, sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
    assert feats.shape == ref.input_features.shape == (2, n_mels, 300)
    torch.testing.assert_close(feats, ref.input_features, atol=1e-5, rtol=0)
    lengths = ref_model.encoder._get_feat_extract_output_lengths(ref.attention_mask.sum(-1))
    assert mask.sum(1).tolist() == lengths.tolist() == [54, 95] and mask[1, :95].all()
    with torch.no_grad():
        out = enc(feats, mask)
        want = ref_model.encoder(ref.input_features, output_hidden_states=True)
    torch.testing.assert_close(out.last, want.last_hidden_state, atol=1e-5, rtol=0)
    for got, i in zip(out.layers, (0, 1, 2)):
        torch.testing.assert_close(got, want.hidden_states[i], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pad_to_window: features must fill the window of 300 mel frames, got 100"):
        enc(feats[..., :100], mask[:, :50])


def test_window_batch_mels_pads_with_whispers_silence():
    enc = build_audio_encoder(tiny_audio_cfg(pad_to_window=True, max_source_positions=150))
    t = np.arange(int(1.2 * 16000)) / 16000
    wave = (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    want, want_mask = enc.preprocess([(wave, 16000)])
    got, mask = enc.batch_mels([log_mel(wave)])
    assert got.shape == want.shape == (1, 80, 300) and (mask == want_mask).all()
    torch.testing.assert_close(got[..., :118], want[..., :118], atol=1e-5, rtol=0)  # all but the frames at the clip's end
    torch.testing.assert_close(got[..., 122:], want[..., 122:], atol=1e-5, rtol=0)  # Whisper's silence


@pytest.mark.parametrize("kind", AUDIO_ENCODERS.names())
def test_audio_variable_length_batch_equals_single_clips(kind, tmp_path):
    torch.manual_seed(0)
    enc = build_audio_encoder(tiny_audio_cfg(kind=kind, output_layers=(1, -1))).eval()
    short, long = tmp_path / "short.wav", tmp_path / "long.flac"
    write_sine(short, sr=48000, seconds=1.0, channels=2)
    write_sine(long, sr=16000, seconds=2.5, freq=220.0)
    feats, mask = enc.preprocess([short, long])
    assert feats.shape == (2, 80, 250) and mask.shape == (2, 125)  # padded to the longest clip, not 30 s
    assert mask.sum(1).tolist() == [50, 125] and mask[0, :50].all()
    alone_feats, alone_mask = enc.preprocess([short])
    assert alone_feats.shape == (1, 80, 100)
    with torch.no_grad():
        batch, alone = enc(feats, mask), enc(alone_feats, alone_mask)
    assert batch.last.shape == (2, 125, 32) and enc.out_dim == 32 and len(batch.layers) == 2
    torch.testing.assert_close(batch.last[0, :50], alone.last[0], atol=1e-5, rtol=0)
    for b, a in zip(batch.layers, alone.layers):
        torch.testing.assert_close(b[0, :50], a[0], atol=1e-5, rtol=0)
    assert (batch.last[0, 50:] == 0).all()  # padded frames are zeroed


def test_audio_config_reads_the_removed_mean_norm_only_off():
    assert AudioEncoderConfig.from_dict({**TINY_WHISPER, "mean_norm": False}) == AudioEncoderConfig(**TINY_WHISPER)
    with pytest.raises(ValueError, match="src: mean_norm=True is not supported: per-clip log-mel mean normalisation"):
        AudioEncoderConfig.from_dict({**TINY_WHISPER, "mean_norm": True}, source="src")


def test_audio_preprocess_rejects_bad_clips(tmp_path):
    enc = build_audio_encoder(tiny_audio_cfg(max_seconds=1.0))
    write_sine(tmp_path / "speech.wav", sr=16000, seconds=2.0)
    sf.write(tmp_path / "quiet.wav", np.zeros((800,), np.float32), 16000)
    with pytest.raises(ValueError, match=r"speech\.wav: clip is 2\.00 s long; the limit is 1 s"):
        enc.preprocess([tmp_path / "speech.wav"])
    with pytest.raises(ValueError, match=r"quiet\.wav: silent clip"):
        enc.preprocess([tmp_path / "quiet.wav"])
    with pytest.raises(ValueError, match="at least one clip"):
        enc.preprocess([])


def test_audio_checkpoint_loads_encoder_weights(tmp_path, caplog):
    cfg = tiny_audio_cfg()
    hf = {k: getattr(cfg, k) for k in SHAPE_FIELDS}
    source = WhisperEncoder(WhisperConfig(**hf))
    state = {f"model.encoder.{k}": v for k, v in source.state_dict().items()}
    state["model.decoder.embed_tokens.weight"] = torch.zeros(4, 32)  # decoder keys are ignored
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**hf, "model_type": "whisper"}))
    loaded_cfg = AudioEncoderConfig.from_whisper_checkpoint(tmp_path, max_seconds=3.0)
    assert loaded_cfg.d_model == 32 and loaded_cfg.checkpoint == str(tmp_path)
    with caplog.at_level(logging.INFO, logger="mmdiff"):
        enc = build_audio_encoder(loaded_cfg)
    assert f"loaded weights from {tmp_path}" in caplog.text
    for k, v in source.state_dict().items():
        torch.testing.assert_close(enc.encoder.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"d_model: checkpoint 32 vs config 64"):
        build_audio_encoder(tiny_audio_cfg(d_model=64, checkpoint=str(tmp_path)))


def test_audio_config_validation_and_round_trip():
    cfg = tiny_audio_cfg(output_layers=(0, -1))
    assert AudioEncoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="output_layers"):
        tiny_audio_cfg(output_layers=(3,))
    with pytest.raises(ValueError, match="max_seconds 31.0 exceeds the 30 s"):
        AudioEncoderConfig(max_seconds=31.0)
    with pytest.raises(ValueError, match=r"unknown AudioEncoderConfig keys \['layers'\]"):
        AudioEncoderConfig.from_dict({"layers": 2})
    window = tiny_audio_cfg(pad_to_window=True)
    assert AudioEncoderConfig.from_dict(json.loads(json.dumps(window.to_dict()))) == window


def test_audio_encoder_takes_float32_features_in_any_dtype():
    enc = build_audio_encoder(tiny_audio_cfg()).eval().to(torch.bfloat16)
    feats, mask = enc.preprocess([(np.sin(np.arange(8000) / 9).astype(np.float32), 16000)])
    with torch.no_grad():
        assert enc(feats, mask).last.dtype == torch.bfloat16


def test_shorter_window_matches_a_whisper_encoder_of_that_window(tmp_path):
    """window_positions w = a WhisperEncoder built for w positions (the first w positional embeddings) over
    WhisperFeatureExtractor's features padded to w * 2 frames, every layer."""
    sizes = {**TINY_WHISPER, "max_source_positions": 150}
    ref_model = save_whisper_model(tmp_path, **sizes)
    cfg = AudioEncoderConfig.from_whisper_checkpoint(tmp_path, max_seconds=1.0, pad_to_window=True,
                                                     window_positions=50, output_layers=(0, 2))
    assert cfg.window_states == 50 and cfg.window_samples == 16000
    enc = build_audio_encoder(cfg).eval()
    short = WhisperModel(WhisperConfig(**{**ref_model.config.to_dict(), "max_source_positions": 50})).eval()
    state = {k: v for k, v in ref_model.state_dict().items() if k.startswith("encoder.")}
    state["encoder.embed_positions.weight"] = state["encoder.embed_positions.weight"][:50]
    short.load_state_dict(state, strict=False)
    clip = (0.3 * np.sin(np.arange(9000) / 5)).astype(np.float32)
    feats, mask = enc.preprocess([(clip, 16000)])
    ref = WhisperFeatureExtractor(feature_size=80, chunk_length=1)(clip, sampling_rate=16000, return_tensors="pt")
    assert feats.shape == ref.input_features.shape == (1, 80, 100) and mask.sum().item() == 29
    torch.testing.assert_close(feats, ref.input_features, atol=1e-5, rtol=0)
    with torch.no_grad():
        out = enc(feats, mask)
        want = short.encoder(ref.input_features, output_hidden_states=True)
    torch.testing.assert_close(out.last, want.last_hidden_state, atol=1e-5, rtol=0)
    for got, i in zip(out.layers, (0, 2)):
        torch.testing.assert_close(got, want.hidden_states[i], atol=1e-5, rtol=0)
    got, _ = enc.batch_mels([log_mel(clip)])
    assert got.shape == (1, 80, 100)


@pytest.mark.parametrize("kw, match", [
    (dict(window_positions=50), "pad_to_window is false"),
    (dict(pad_to_window=True, window_positions=0), r"window_positions 0 must be in \[1, max_source_positions 150\]"),
    (dict(pad_to_window=True, window_positions=50), "max_seconds 3.0 exceeds the 1 s that the window of window_positions 50 can hold"),
])
def test_window_positions_is_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_audio_cfg(**kw)
