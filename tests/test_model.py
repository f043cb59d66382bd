"""The multimodal model: placeholder merge, save/load, media bad input, two images + a clip in one prompt."""
import dataclasses
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmdiff import decoder
from mmdiff.sampling import DecodeConfig
from mmdiff.adapters import AdapterConfig
from mmdiff.encoders import AudioEncoderConfig, vision
from mmdiff.model import AUDIO, IMAGE, TEXT, ModelConfig, MultimodalDiffusionLM
from mmdiff.sampling import SamplerConfig


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    torch.manual_seed(0)
    dec = decoder.preset("tiny-test", vocab_size=len(tiny_tokenizer))
    vis = vision.preset("tiny-test")
    aud = AudioEncoderConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                             max_source_positions=200, max_seconds=4.0)
    cfg = ModelConfig(decoder=dec, vision=vis,
                      vision_adapter=AdapterConfig(kind="mlp2x_gelu", in_dim=vis.embed_dim, out_dim=dec.d_model),
                      audio=aud, audio_adapter=AdapterConfig(kind="audio_semantic", in_dim=32, out_dim=dec.d_model))
    return MultimodalDiffusionLM(cfg, tiny_tokenizer).eval()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(d / "red.png")
    Image.new("RGB", (32, 32), (30, 30, 200)).save(d / "blue.png")
    t = np.arange(16000) / 16000
    sf.write(d / "tone.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16000)
    sf.write(d / "silent.wav", np.zeros(8000), 16000)
    (d / "text.png").write_text("not an image")
    return d


def test_placeholder_merge_puts_media_at_their_positions(model, media):
    img = model.encode_image([media / "red.png", media / "blue.png"])  # (2, N, D)
    (clip,) = model.encode_audio([media / "tone.wav"])
    sp = model.special
    text = model.tokenizer("how many?", add_special_tokens=False)["input_ids"]
    prompts = [[sp.bos, sp.image] + text + [sp.audio, sp.image], text]
    embeds, valid, kinds = model.embed_prompt(prompts, images=[[img[0], img[1]], []], audios=[[clip], []],
                                              return_kinds=True)
    n, a = img.shape[1], clip.shape[0]
    row = embeds[0]
    assert valid[0].all() and kinds[0].tolist() == ([TEXT] + [IMAGE] * n + [TEXT] * len(text) + [AUDIO] * a
                                                    + [IMAGE] * n)
    torch.testing.assert_close(row[1:1 + n], img[0])
    torch.testing.assert_close(row[1 + n + len(text):1 + n + len(text) + a], clip)
    torch.testing.assert_close(row[-n:], img[1])
    torch.testing.assert_close(row[0], model.decoder.embed(torch.tensor(sp.bos)))
    # the text-only row is left padded and its tokens sit at the end
    assert not valid[1, : embeds.shape[1] - len(text)].any()
    torch.testing.assert_close(embeds[1, -len(text):], model.decoder.embed(torch.tensor(text)))


def test_placeholder_count_mismatch(model, media):
    img = model.encode_image([media / "red.png"])
    p = model.format_prompt("where?", n_images=2)
    with pytest.raises(ValueError, match=r"prompt 0 has 2 <image> placeholder\(s\) but 1 image"):
        model.embed_prompt([p], images=[[img[0]]])
    with pytest.raises(ValueError, match=r"0 <audio> placeholder\(s\) but 1 audio"):
        model.embed_prompt([model.format_prompt("x")], audios=[[img[0]]])


def test_two_images_and_a_clip_answer_through_generate(model, media):
    """A prompt with two images and one clip, through the one sampler (untrained: noise, but complete)."""
    sp = model.special
    img = model.encode_image([media / "red.png", media / "blue.png"])
    (clip,) = model.encode_audio([media / "tone.wav"])
    prompt = model.format_prompt("which is red?", n_images=2, n_audio=1)
    embeds, valid = model.embed_prompt([prompt], images=[[img[0], img[1]]], audios=[[clip]])
    out = model.sample(embeds, valid, decode=DecodeConfig(sampler=SamplerConfig(gen_length=6, steps=3)))
    assert out.nfe == 3 and (out.tokens != sp.mask).all()
    assert isinstance(model.decode(out.tokens[0].tolist()), str)


def test_generate_batch_with_mixed_media(model, media):
    res = model.generate(["what color?", "", "count?"], images=[media / "red.png", media / "blue.png", None], audios=[None, media / "tone.wav", None], decode=DecodeConfig(sampler=SamplerConfig(gen_length=4)))
    assert len(res) == 3 and all(r.nfe == 4 and len(r.tokens) == 4 for r in res)
    ar = model.generate_ar(["what color?"], images=[media / "red.png"], max_new_tokens=4)
    assert ar[0].nfe >= 1 and len(ar[0].tokens) == 4


def test_save_load_roundtrip_identical_logits(model, media, tmp_path):
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert set(cfg) == {"model_type", "decoder", "vision", "vision_adapter", "audio", "audio_adapter"}
    again = MultimodalDiffusionLM.from_pretrained(tmp_path)
    for m in (model, again):
        e, v, _ = m.prepare(["what color?"], images=[media / "red.png"], audios=[media / "tone.wav"])
        m.logits = m(e, v, torch.full((1, 4), m.special.mask))
    torch.testing.assert_close(model.logits, again.logits, rtol=0, atol=0)


def test_freeze_parts(model):
    model.freeze(["decoder", "vision"])
    assert not any(p.requires_grad for p in model.decoder.parameters())
    assert all(p.requires_grad for p in model.vision_adapter.parameters())
    model.freeze(["decoder", "vision"], frozen=False)
    with pytest.raises(ValueError, match="unknown part 'llm'"):
        model.freeze(["llm"])


@pytest.mark.parametrize("kind,message", [
    ("text_image", "not an image file"),
    ("silent", "silent"),
    ("empty_question", "empty question and no audio"),
])
def test_bad_input_messages(model, media, kind, message):
    with pytest.raises(ValueError, match=message) as err:
        if kind == "text_image":
            model.generate(["what?"], images=[media / "text.png"])
        elif kind == "silent":
            model.generate(["what?"], audios=[media / "silent.wav"])
        else:
            model.generate(["  "], images=[media / "red.png"])
    if kind != "empty_question":
        assert ("text.png" if kind == "text_image" else "silent.wav") in str(err.value)


def test_missing_model_directory_and_config_section(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MultimodalDiffusionLM.from_pretrained(tmp_path / "nope")
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["speech"] = {}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown sections"):
        MultimodalDiffusionLM.from_pretrained(tmp_path / "m")


def test_cell_words_adapter_reads_images_as_words(world_tokenizer, tmp_path):
    """cell_words: the model resolves the scene words with its tokenizer (every spelling of a
    name), embeds the adapter's word weights with the decoder's own table, and keeps the ids
    through save/load."""
    from mmdiff.adapters.vision import scene_words

    torch.manual_seed(0)
    dec = decoder.preset("tiny-test", vocab_size=len(world_tokenizer))
    vis = dataclasses.replace(vision.preset("tiny-test"), img_size=48)  # 6 x 6 patches, 2 x 2 per cell
    cfg = ModelConfig(decoder=dec, vision=vis, vision_adapter=AdapterConfig(
        kind="cell_words", in_dim=vis.embed_dim, out_dim=dec.d_model, pool=2, grid=(6, 6)))
    model = MultimodalDiffusionLM(cfg, world_tokenizer).eval()
    ids = model.cfg.vision_adapter.word_ids
    tok = world_tokenizer
    red = {tuple(tok(w, add_special_tokens=False)["input_ids"]) for w in ("red", " red")}
    assert {tuple(f) for f in ids["colour"][scene_words()["colour"].index("red")]} == red
    assert len(ids["position"]) == 9 and len(ids["shape"]) == 5
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    with torch.no_grad():
        feats = model.vision(model.vision.preprocess([image]))
        weights = model.vision_adapter(feats)  # (1, 9, V)
        tokens = model.encode_image([image])  # (1, 9, D)
    assert weights.shape == (1, 9, len(tok)) and tokens.shape == (1, 9, dec.d_model)
    torch.testing.assert_close(tokens, weights @ model.decoder.embed_tokens.weight)
    top_left = model.cfg.vision_adapter.word_ids["position"][0][0]  # "top left": its words weigh >= 1/3 each
    assert all(weights[0, 0, t] >= 1 / 3 - 1e-6 for t in top_left)
    model.save_pretrained(tmp_path)
    again = MultimodalDiffusionLM.from_pretrained(tmp_path).eval()
    assert again.cfg.vision_adapter.word_ids == ids
    model.vision_adapter.pos_embed = torch.nn.Parameter(torch.ones(9, dec.d_model))  # added after embedding
    with torch.no_grad():
        torch.testing.assert_close(model.adapt_image(feats), tokens + 1.0)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image([image]), tokens)
