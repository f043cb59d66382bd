"""The multimodal model: placeholder merge, save/load (and configs saved before issue #18), media bad input,
two images + a clip in one prompt, and check_inputs (issue #19: what answer() refuses, e.g. no image)."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmdiff import decoder
from mmdiff.adapters import CTCAdapterConfig, ProjectorConfig, SemanticAdapterConfig
from mmdiff.encoders import AudioEncoderConfig, vision
from mmdiff.model import AUDIO, IMAGE, NO_IMAGE, TEXT, ModelConfig, MultimodalDiffusionLM
from mmdiff.sampling import DecodeConfig, SamplerConfig, SearchConfig


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    torch.manual_seed(0)
    dec = decoder.preset("tiny-test", vocab_size=len(tiny_tokenizer))
    vis = vision.preset("tiny-test")
    aud = AudioEncoderConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                             max_source_positions=200, max_seconds=4.0)
    cfg = ModelConfig(decoder=dec, vision=vis,
                      vision_adapter=ProjectorConfig(kind="mlp2x_gelu", in_dim=vis.embed_dim, out_dim=dec.d_model),
                      audio=aud, audio_adapter=SemanticAdapterConfig(kind="audio_semantic", in_dim=32,
                                                                     out_dim=dec.d_model))
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


ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("mmdiff-tiny", "mmdiff-tiny-ar")
#: checkpoints/mmdiff-tiny/config.json as shipped before issue #18: one flat adapter config for every kind
OLD_SHIPPED_CONFIG = """\
{
  "model_type": "mmdiff",
  "decoder": {
    "vocab_size": 483,
    "d_model": 192,
    "n_layers": 6,
    "n_heads": 6,
    "n_kv_heads": 6,
    "mlp_hidden": 512,
    "rope_theta": 10000.0,
    "norm_eps": 1e-05,
    "qkv_bias": false,
    "tie_embeddings": false,
    "logit_shift": false,
    "attn_mode": "prefix",
    "max_seq_len": 512
  },
  "vision": {
    "kind": "timm",
    "name": "vit_tiny_patch16_224",
    "img_size": 72,
    "patch_size": 12,
    "embed_dim": 128,
    "depth": 4,
    "num_heads": 4,
    "layer": -1,
    "weights": null
  },
  "vision_adapter": {
    "kind": "mlp2x_gelu",
    "in_dim": 128,
    "out_dim": 192,
    "pool": 2,
    "grid": [
      6,
      6
    ],
    "norm": true,
    "pos_embed": true,
    "subsample": 4,
    "num_queries": 16,
    "qformer_layers": 2,
    "qformer_heads": 4,
    "n_encoder_layers": 1,
    "vocab_size": 0,
    "words": null,
    "word_ids": null,
    "position_weight": 1.0,
    "empty_weight": 1.0,
    "beam_width": 8,
    "lm_weight": 0.3,
    "length_bonus": 1.5
  },
  "audio": {
    "kind": "whisper",
    "d_model": 192,
    "encoder_layers": 2,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 768,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "checkpoint": null,
    "max_seconds": 30.0,
    "output_layers": [
      -1
    ]
  },
  "audio_adapter": {
    "kind": "audio_ctc",
    "in_dim": 192,
    "out_dim": 192,
    "pool": 1,
    "grid": null,
    "norm": false,
    "pos_embed": false,
    "subsample": 4,
    "num_queries": 16,
    "qformer_layers": 2,
    "qformer_heads": 4,
    "n_encoder_layers": 1,
    "vocab_size": 483,
    "words": null,
    "word_ids": null,
    "position_weight": 1.0,
    "empty_weight": 1.0,
    "beam_width": 8,
    "lm_weight": 0.3,
    "length_bonus": 1.5
  }
}
"""


def test_old_flat_config_reads_as_the_per_kind_configs_the_shipped_ones_were_migrated_to():
    cfg = ModelConfig.from_dict(json.loads(OLD_SHIPPED_CONFIG))
    assert cfg.vision == vision.VisionEncoderConfig(kind="timm", name="vit_tiny_patch16_224", img_size=72,
                                                    patch_size=12, embed_dim=128, depth=4, num_heads=4, layer=-1)
    assert cfg.vision_adapter == ProjectorConfig(kind="mlp2x_gelu", in_dim=128, out_dim=192, pool=2, grid=(6, 6),
                                                 norm=True, pos_embed=True)
    assert cfg.audio_adapter == CTCAdapterConfig(kind="audio_ctc", in_dim=192, out_dim=192, vocab_size=483)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # what save_pretrained writes reads back the same
    for name in SHIPPED:  # the decoder of every shipped model has kept its shape since
        shipped = ModelConfig.from_dict(json.loads((ROOT / "checkpoints" / name / "config.json").read_text()))
        assert shipped.decoder == cfg.decoder


def test_directory_with_an_old_flat_config_loads_the_same_model(tmp_path):
    """A model of the pre-#18 shipped shape (random weights, the shipped tokenizer and CTC LM) saved by
    save_pretrained, and the same files under the pre-#18 config.json: the same configs and weights."""
    from mmdiff.tokenizer import load_tokenizer

    cfg = ModelConfig.from_dict(json.loads(OLD_SHIPPED_CONFIG))
    torch.manual_seed(0)
    MultimodalDiffusionLM(cfg, load_tokenizer(ROOT / "checkpoints" / "mmdiff-tiny")).save_pretrained(tmp_path / "new")
    (tmp_path / "new" / "ctc_lm.json").write_bytes((ROOT / "checkpoints" / "mmdiff-tiny" / "ctc_lm.json").read_bytes())
    (tmp_path / "old").mkdir()
    for f in (tmp_path / "new").iterdir():
        if f.is_file() and f.name != "config.json":
            (tmp_path / "old" / f.name).symlink_to(f)
    (tmp_path / "old" / "config.json").write_text(OLD_SHIPPED_CONFIG)
    old, new = (MultimodalDiffusionLM.from_pretrained(tmp_path / d) for d in ("old", "new"))
    assert old.cfg == new.cfg and old.audio_adapter.lm.to_dict() == new.audio_adapter.lm.to_dict()
    new_state = new.state_dict()
    assert all(torch.equal(v, new_state[k]) for k, v in old.state_dict().items())


@pytest.mark.parametrize("section, fields, message", [
    ("vision_adapter", {"kind": "cell_words"}, "config.json vision_adapter: adapter kind 'cell_words' is not "
                                               "supported: the lexical vision adapter was an experiment"),
    ("audio", {"mean_norm": True}, "config.json audio: mean_norm=True is not supported: per-clip log-mel mean "
                                   "normalisation was an experiment"),
    ("audio_adapter", {"grid": [6, 6]}, r"config.json audio_adapter: grid=\[6, 6\] is not supported: the "
                                        "audio_ctc adapter has no such field"),
])
def test_old_config_setting_a_removed_experiment_or_foreign_field_is_refused(section, fields, message):
    data = json.loads(OLD_SHIPPED_CONFIG)
    data[section].update(fields)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(data)
    data[section] = json.loads(OLD_SHIPPED_CONFIG)[section]
    data["audio"]["mean_norm"] = False  # the removed option, off: read as before
    assert ModelConfig.from_dict(data) == ModelConfig.from_dict(json.loads(OLD_SHIPPED_CONFIG))


# ------------------------------------------------------------------------------------------------
# check_inputs: what answer() (the CLI, eval and the demo) refuses
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("question,image,audio,message", [
    ("how many objects are there?", None, None, NO_IMAGE),
    ("", None, "tone.wav", NO_IMAGE),  # a spoken question about an image needs one too
    ("", "red.png", None, "empty question and no audio"),
    ("\udcff\udcfe", "red.png", None, "the question is not valid UTF-8 text (byte 0xff at position 0)"),
    ("what\x1b[2J?", "red.png", None, "the question contains the control character U+001B"),
])
def test_answer_refuses_what_the_model_cannot_answer(model, media, question, image, audio, message):
    from mmdiff.search import answer

    image, audio = image and media / image, audio and media / audio
    for decode in (DecodeConfig(), DecodeConfig(search=SearchConfig(strategy="best_of_n", candidates=2))):
        with pytest.raises(ValueError) as err:
            answer(model, [question], images=[image], audios=[audio], decode=decode)
        assert str(err.value).startswith(message)


def test_check_inputs_allows_a_typed_question_about_a_clip_and_names_the_sample(model, media):
    """An ASR row ("transcribe the audio.", a clip, no image) is answerable; in a batch the refused sample is named."""
    assert model.check_inputs([b"transcribe the audio.", "what?"], images=[None, media / "red.png"],
                              audios=[media / "tone.wav", None]) == ["transcribe the audio.", "what?"]
    with pytest.raises(ValueError, match=f"^sample 1: {NO_IMAGE}$"):
        model.check_inputs(["what?", "count?"], images=[media / "red.png", None], audios=[None, None])
    with pytest.raises(ValueError, match="2 questions but 1 images and 2 audio entries"):
        model.check_inputs(["a", "b"], images=[None], audios=[None, None])


def test_the_typed_question_limit_is_the_edges_not_a_data_sets(model, media):
    """mmdiff ask and the demo refuse questions over MAX_QUESTION_CHARS; a data set's prompt may be longer."""
    long = "describe the image. " * 30
    assert model.check_inputs([long], images=[media / "red.png"], audios=[None]) == [long]


def test_a_model_without_a_vision_encoder_answers_without_an_image(tiny_tokenizer):
    text_only = MultimodalDiffusionLM(ModelConfig(decoder=decoder.preset("tiny-test", vocab_size=len(tiny_tokenizer))),
                                      tiny_tokenizer).eval()
    assert text_only.check_inputs(["what is two and two?"], images=[None], audios=[None]) == ["what is two and two?"]


def test_eval_rows_without_an_image_become_errors_and_the_others_are_answered(model, media):
    """mmdiff eval's answer_batch catches the ValueError per row (errors.jsonl); a bomb row too."""
    from mmdiff.evaluation.runner import answer_batch

    bomb = media / "bomb.png"
    Image.new("1", (15000, 15000)).save(bomb)
    results = answer_batch(model, ["what color?", "count?", "what?"], images=[media / "red.png", None, bomb],
                           audios=[None, None, None], decode=DecodeConfig(sampler=SamplerConfig(gen_length=4)))
    assert isinstance(results[0].text, str)
    assert str(results[1]) == NO_IMAGE
    assert str(results[2]) == f"cannot read image {bomb}: 15000 x 15000 pixels (225 MP) is over the 64 MP limit"
