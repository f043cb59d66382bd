"""LaViDa (LLaDA and Dream variants) against the released code's logits, recorded as data.

``tests/fixtures/lavida-{llada,dream}-tiny`` are tiny random checkpoints in LaViDa's on-disk format,
written and run by the released modeling code (jacklishufan/LaViDa @ 284ef5c; see each README.txt).
``expected.npz`` holds, for a text-only prompt and a prompt with ``image.png``: the released prompt ids
(``tokenizer_image_token``, image = -200), the released ``anyres`` pixels, the prompt embeddings after
LLaVA's image merge, and the logits of the released decoding paths on prompt + an 8-token canvas:
``logits`` (``prefix_lm=False``: one bidirectional forward), ``prefix_logits`` / ``cached_logits``
(``prefix_lm=True``: the prompt's last-position logits from the prefill, then the canvas against the
cached prompt keys/values).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmdiff
from mmdiff.checkpoints import (
    LAVIDA_SYSTEM_PROMPT,
    detect_format,
    is_lavida,
    is_llada_v,
    lavida_model_config,
    lavida_variant,
)
from mmdiff.encoders import VisionEncoderConfig
from mmdiff.encoders.views import Layout, build_views, select_best_resolution, unpad
from mmdiff.sampling import DecodeConfig, SamplerConfig
from mmdiff.sampling.denoisers import build_denoiser
from mmdiff.sampling.sampler import StepState

FIXTURES = Path(__file__).parent / "fixtures"
VARIANTS = ("llada", "dream")
RELEASED_IMAGE_ID = -200  # LLaVA's IMAGE_TOKEN_INDEX in the recorded prompt ids
QUESTION = "what is in the picture?"


def rel(got: torch.Tensor, want: np.ndarray) -> float:
    """max |got - want| / max |want|."""
    want = torch.as_tensor(want, dtype=torch.float32)
    return ((got.float() - want).abs().max() / want.abs().max()).item()


@pytest.fixture(scope="module", params=VARIANTS)
def case(request):
    d = FIXTURES / f"lavida-{request.param}-tiny"
    return request.param, d, mmdiff.load(d), dict(np.load(d / "expected.npz"))


def image_of(d: Path) -> Image.Image:
    return Image.open(d / "image.png").convert("RGB")


def prompt_embeds(model, d: Path, expected: dict, kind: str) -> torch.Tensor:
    """The released prompt ids through mmdiff's placeholder merge (the image encoded by mmdiff)."""
    ids = [model.special.image if t == RELEASED_IMAGE_ID else t for t in expected[f"{kind}_input_ids"][0].tolist()]
    images = [[model.image_tokens([image_of(d)])[0]]] if kind == "image" else None
    embeds, valid = model.embed_prompt([ids], images=images)
    assert bool(valid.all())
    return embeds


# ------------------------------------------------------------------------------------------------
# parity with the released code
# ------------------------------------------------------------------------------------------------
def test_anyres_pixels_equal_the_released_preprocessing(case):
    _, d, model, expected = case
    views, layout = model.vision.views.split(image_of(d), tile=model.vision.input_size)
    pixels = torch.stack([model.vision.transform(v) for v in views])
    want = expected["image_pixel_values"][0]  # (1 + tiles, 3, 40, 40)
    assert pixels.shape == want.shape and layout.tiles[0] * layout.tiles[1] == len(views) - 1
    torch.testing.assert_close(pixels, torch.as_tensor(want), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["text", "image"])
def test_prompt_embeddings_equal_the_released_merge(case, kind):
    _, d, model, expected = case
    with torch.no_grad():
        embeds = prompt_embeds(model, d, expected, kind)
    assert embeds.shape == expected[f"{kind}_prompt_embeds"].shape
    assert rel(embeds, expected[f"{kind}_prompt_embeds"]) < 1e-4


@pytest.mark.parametrize("kind", ["text", "image"])
def test_uncached_logits_equal_the_released_forward(case, kind):
    _, d, model, expected = case
    canvas = torch.as_tensor(expected[f"{kind}_canvas"])
    with torch.no_grad():
        embeds = prompt_embeds(model, d, expected, kind)
        x = torch.cat([embeds, model.decoder.embed(canvas)], dim=1)
        logits = model.decoder(inputs_embeds=x, attn_mode="bidirectional").logits  # prefix_lm=False
    assert logits.shape == expected[f"{kind}_logits"].shape
    assert rel(logits, expected[f"{kind}_logits"]) < 1e-4


@pytest.mark.parametrize("kind", ["text", "image"])
def test_prefix_cache_equals_the_released_prefix_dlm_cache(case, kind):
    """mmdiff's PrefixCache (the model's exact cache) gives LaViDa's prefix_lm=True logits, read the
    variant's way (Dream: position i from raw position i-1, the first from the prefill)."""
    _, d, model, expected = case
    assert model.exact_cache == "prefix" and model.cfg.decoder.attn_mode == "prefix"
    canvas = torch.as_tensor(expected[f"{kind}_canvas"])
    with torch.no_grad():
        embeds = prompt_embeds(model, d, expected, kind)
        denoiser = build_denoiser("prefix", model.decoder, embeds, torch.ones(embeds.shape[:2], dtype=torch.bool),
                                  attn_mode=model.cfg.decoder.attn_mode)
        got = denoiser.logits(StepState(canvas, 0, 0, slice(0, canvas.shape[1]), model.special.mask))
    raw = torch.cat([torch.as_tensor(expected[f"{kind}_prefix_logits"]),
                     torch.as_tensor(expected[f"{kind}_cached_logits"])], dim=1)  # (1, 1 + L, V)
    want = model.decoder.shifted(raw)
    assert rel(got, want.numpy()) < 1e-4


def test_prompts_are_the_released_conversation(case):
    """Text: the released ids. Image: LaViDa's ``<image>\\n`` + question as training tokenizes it; the
    released inference helper ``tokenizer_image_token`` drops the first token after ``<image>`` when the
    prompt starts with BOS and the tokenizer adds none (LLaDA variant, this fixture's tokenizer)."""
    variant, _, model, expected = case
    text = model.format_prompt(QUESTION)
    assert text == expected["text_input_ids"][0].tolist()
    assert LAVIDA_SYSTEM_PROMPT in str(expected["text_prompt"])
    image = model.format_prompt(QUESTION, n_images=1)
    released = [model.special.image if t == RELEASED_IMAGE_ID else t for t in expected["image_input_ids"][0].tolist()]
    if variant == "llada":
        at = released.index(model.special.image) + 1
        newline = model.tokenizer("\n", add_special_tokens=False)["input_ids"]
        released = released[:at] + newline + released[at:]
    assert image == released
    assert model.tokenizer.decode(image) == str(expected["image_prompt"])


def test_generate_on_an_image_prompt_is_the_same_with_the_exact_cache(case):
    variant, d, model, _ = case
    sampler = SamplerConfig(gen_length=8, steps=4)
    plain = model.generate([QUESTION], images=[image_of(d)], decode=DecodeConfig(sampler=sampler))
    cached = model.generate([QUESTION], images=[image_of(d)], decode=DecodeConfig(sampler=sampler, cache="prefix"))
    assert len(plain[0].tokens) == 8 and plain[0].nfe == 4 and model.special.mask not in plain[0].tokens
    assert cached[0].tokens == plain[0].tokens


def test_bfloat16_load(case):
    _, d, _, _ = case
    model = mmdiff.load(d, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 and not t.is_meta for t in model.parameters())
    assert model.generate([QUESTION], images=[image_of(d)], decode=DecodeConfig(sampler=SamplerConfig(gen_length=2)))


# ------------------------------------------------------------------------------------------------
# configs, detection, errors
# ------------------------------------------------------------------------------------------------
def config_of(variant: str, **changes) -> dict:
    return {**json.loads((FIXTURES / f"lavida-{variant}-tiny" / "config.json").read_text()), **changes}


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_maps_to_decoder_tower_projector_and_views(variant):
    cfg = lavida_model_config(config_of(variant))
    d = cfg.decoder
    assert (d.d_model, d.n_layers, d.vocab_size, d.attn_mode) == (32, 2, 320, "prefix")
    assert d.logit_shift == (variant == "dream") and d.qkv_bias == (variant == "dream")
    assert (cfg.vision.kind, cfg.vision.name, cfg.vision.layer) == ("siglip", "siglip-tiny-lavida-test", -2)
    assert (cfg.vision_adapter.kind, cfg.vision_adapter.in_dim, cfg.vision_adapter.out_dim) == ("mlp2x_gelu", 32, 32)
    assert cfg.vision_adapter.newline
    v = cfg.vision
    assert (v.views, v.grid_pinpoints, v.max_tiles, v.view_pool, v.view_pool_stride) == (
        "anyres", ((40, 80), (80, 40), (80, 80), (120, 40), (40, 120)), None, "bilinear", 2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lavida_is_told_apart_from_llada_v(variant):
    config = config_of(variant)
    assert is_lavida(config) and not is_llada_v(config) and lavida_variant(config).name == variant
    llada_v = {"architectures": ["LlavaLLaDAModelLM"], "model_type": "llava_llada", "hidden_size": 32,
               "mm_vision_tower": "x"}
    assert is_llada_v(llada_v) and not is_lavida(llada_v)
    with pytest.raises(ValueError, match="LaViDa checkpoint.*mmdiff.load"):
        detect_format(config)


@pytest.mark.parametrize("change, message", [
    ({"image_aspect_ratio": "square"}, r"image_aspect_ratio='square' \(supported: 'anyres'\)"),
    ({"mm_patch_merge_type": "flat"}, r"mm_patch_merge_type='flat' \(supported: 'spatial_unpad'\)"),
    ({"mm_spatial_pool_mode": "conv"}, "mm_spatial_pool_mode='conv'"),
    ({"mm_projector_type": "linear"}, "mm_projector_type='linear'"),
    ({"image_grid_pinpoints": [[40]]}, "needs image_grid_pinpoints, a list of"),
    ({"mm_vision_tower": "openai/clip-vit-large-patch14-336"}, "is not a known SigLIP tower"),
    ({"mm_hidden_size": 1152}, "mm_hidden_size 1152 differs"),
    ({"architectures": ["Foo"], "model_type": "foo"}, "not a LaViDa config"),
])
@pytest.mark.parametrize("variant", VARIANTS)
def test_unsupported_configs_are_refused_by_name(variant, change, message):
    with pytest.raises(ValueError, match=message):
        lavida_model_config(config_of(variant, **change))


def test_missing_image_newline_is_named(tmp_path):
    d = tmp_path / "lavida"
    shutil.copytree(FIXTURES / "lavida-llada-tiny", d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.image_newline"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model.image_newline"):
        mmdiff.load(d)


def test_anyres_arithmetic_is_llava_next_s():
    # 36 x 30 on the 40-px canvases: (40, 80) and (80, 40) keep as much and waste as much; the first wins
    assert select_best_resolution((36, 30), [(40, 80), (80, 40), (80, 80)]) == (40, 80)
    assert select_best_resolution((90, 50), [(40, 80), (80, 40), (80, 80), (120, 40)]) == (80, 80)
    x = torch.arange(6 * 6.).view(1, 6, 6)
    assert unpad(x, (90, 50)).shape == (1, 4, 6)  # int(50 * 6 / 90) = 3 rows shown -> pad 1 above and below
    assert unpad(x, (30, 60)).shape == (1, 6, 4)


def test_saved_model_keeps_the_views(case, tmp_path):
    _, d, model, _ = case
    model.save_pretrained(tmp_path / "saved")
    again = mmdiff.load(tmp_path / "saved")
    assert again.cfg.vision == model.cfg.vision and again.cfg.vision_adapter == model.cfg.vision_adapter
    with torch.no_grad():
        assert torch.equal(again.image_tokens([image_of(d)])[0], model.image_tokens([image_of(d)])[0])
    assert again.num_image_tokens(image_of(d)) == model.image_tokens([image_of(d)])[0].shape[0]


def test_view_pool_configs_and_the_single_view_path():
    with pytest.raises(ValueError, match="unknown view_pool 'conv'"):
        VisionEncoderConfig(view_pool="conv")
    with pytest.raises(ValueError, match="view_pool_stride must be >= 1"):
        VisionEncoderConfig(view_pool_stride=0)
    with pytest.raises(ValueError, match="unknown view pooling 'conv'"):
        build_views("anyres", grid_pinpoints=[(40, 40)], pool="conv")
    single = build_views("single", pool="average")  # one view, 4 x 4 -> 2 x 2
    out = single.merge(torch.ones(1, 16, 4), Layout((40, 40), (0, 0)), grid=(4, 4), newline=None)
    assert out.shape == (4, 4)
    assert single.num_tokens((40, 40), tile=40, grid=(4, 4), n_per_view=16) == 4
    bilinear = build_views("single", pool="bilinear")  # odd grids round up, as get_2dPool
    assert bilinear.merge(torch.ones(1, 25, 4), Layout((40, 40), (0, 0)), grid=(5, 5), newline=None).shape == (9, 4)
