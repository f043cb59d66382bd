"""Dimple (Yu et al. 2025) into MultimodalDiffusionLM, against the released modeling code.

``tests/fixtures/dimple-tiny`` is a tiny random checkpoint in Dimple-7B's on-disk format whose
``expected.npz`` holds what the released ``DimpleModel`` (yu-rp/Dimple @ 848f132, transformers
4.46.2) computes, on the inputs its own processor makes (see the fixture's README.txt):

* (a) two text questions, left padded: the chat prompt ids, the 1-D positions, the raw logits of
  prompt + 8 mask tokens (the canvas ``diffusion_generate`` appends);
* (b) a question about ``image.png``: the processor's pixel patches and grid, the prompt ids (6
  ``<|image_pad|>``), the M-RoPE positions of ``get_rope_index``, the raw logits.

mmdiff reproduces each from the directory alone (``mmdiff.load``): preprocessing, prompt, positions,
logits at rel error < 1e-4; the denoiser's canvas logits are the released sampler's shifted ones.
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
from mmdiff.checkpoints import dimple_model_config
from mmdiff.decoder import DecoderConfig, multimodal_positions, rope_cos_sin
from mmdiff.encoders.vision import QwenVLVisionEncoder
from mmdiff.model import IMAGE
from mmdiff.sampling import DecodeConfig, SamplerConfig
from mmdiff.sampling.sampler import StepState

FIXTURE = Path(__file__).parent / "fixtures" / "dimple-tiny"
TOL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(FIXTURE / "expected.npz"))


@pytest.fixture(scope="module")
def model():
    return mmdiff.load(FIXTURE)


@pytest.fixture(scope="module")
def image():
    return Image.open(FIXTURE / "image.png")


def test_load_builds_dimple_parts(model):
    assert isinstance(model.vision, QwenVLVisionEncoder)
    assert model.vision_adapter.cfg.kind == "mlp2x_silu"
    assert model.cfg.decoder.logit_shift and model.cfg.decoder.qkv_bias
    assert model.cfg.decoder.mrope_section == [2, 3, 3]
    assert model.exact_cache == "none"  # bidirectional: no cache is exact


@torch.no_grad()
def test_text_prompt_and_logits_match_reference(model, expected):
    questions = [str(q) for q in expected["text_questions"]]
    ref_ids, attn = torch.from_numpy(expected["text_input_ids"]), torch.from_numpy(expected["text_attention_mask"])
    P = ref_ids.shape[1]
    for b, q in enumerate(questions):
        assert model.format_prompt(q) == ref_ids[b][attn[b, :P].bool()].tolist()
    embeds, valid, _, positions = model.prepare(questions, return_positions=True)
    assert torch.equal(valid, attn[:, :P].bool())
    L = int(expected["canvas_length"])
    canvas = torch.full((len(questions), L), model.special.mask)
    _, out = model.decoder.forward_response(embeds, valid, canvas, prompt_positions=positions)
    ref = torch.from_numpy(expected["text_logits"])
    rows = attn.bool()  # padding queries attend differently (never read by either sampler)
    assert rel(out.logits[rows], ref[rows]) < TOL


@torch.no_grad()
def test_image_pixels_prompt_positions_and_logits_match_reference(model, expected, image):
    batch = model.vision.preprocess([image])
    assert torch.equal(batch.grid_thw, torch.from_numpy(expected["image_grid_thw"]))
    assert rel(batch.patches, torch.from_numpy(expected["image_pixel_values"])) < 1e-6
    question = str(expected["image_question"])
    ref_ids = torch.from_numpy(expected["image_input_ids"])[0].tolist()
    n_tokens = int(np.prod(expected["image_grid_thw"][0])) // 4  # one token per 2x2 patches
    image_pad = model.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids = [t for i in model.format_prompt(question, n_images=1)
           for t in ([image_pad] * n_tokens if i == model.special.image else [i])]
    assert ids == ref_ids  # the released processor repeats <|image_pad|> once per token
    embeds, valid, kinds, positions = model.prepare([question], images=[image], return_positions=True)
    assert int((kinds == IMAGE).sum()) == n_tokens
    L = int(expected["canvas_length"])
    canvas = torch.full((1, L), model.special.mask)
    _, out = model.decoder.forward_response(embeds, valid, canvas, prompt_positions=positions)
    shifted = model(embeds, valid, canvas, positions=positions)  # (1, L, V): token i read at i-1
    assert torch.equal(shifted, out.logits[:, embeds.shape[1] - 1:-1])
    after = (positions.max() + 1 + torch.arange(L)).expand(3, 1, L)
    assert torch.equal(torch.cat([positions, after], -1), torch.from_numpy(expected["image_position_ids"]))
    assert rel(out.logits, torch.from_numpy(expected["image_logits"])) < TOL


@torch.no_grad()
@pytest.mark.parametrize("cache", ["none", "block", "dual"])
def test_canvas_logits_are_the_released_samplers_shifted_logits(model, expected, image, cache):
    """Dimple's ``_sample`` reads token i's prediction at i-1 (``cat([l[:, :1], l[:, :-1]])``), as Dream;
    the first step of every denoiser (a full forward for the block caches) gives exactly those."""
    question = str(expected["image_question"])
    embeds, valid, kinds, positions = model.prepare([question], images=[image], return_positions=True)
    L, P = int(expected["canvas_length"]), embeds.shape[1]
    decode = DecodeConfig(cache=cache, sampler=SamplerConfig(gen_length=L, steps=L, block_length=L))
    denoiser = model.denoiser(embeds, valid, kinds=kinds, decode=decode, positions=positions)
    state = StepState(canvas=torch.full((1, L), model.special.mask), step=0, block=0, block_slice=slice(0, L),
                      mask_id=model.special.mask)
    ref = torch.from_numpy(expected["image_logits"])
    shifted = torch.cat([ref[:, :1], ref[:, :-1]], dim=1)[:, P:]  # the released sampler's canvas logits
    assert rel(denoiser.logits(state), shifted) < TOL


def test_generate_on_an_image_prompt_decodes(model, image):
    for transfer in ("schedule", "threshold"):  # threshold: Dimple's confident decoding
        decode = DecodeConfig(sampler=SamplerConfig(gen_length=6, steps=3, transfer=transfer, threshold=0.95))
        (out,) = model.generate(["What is in the picture?"], images=[image], decode=decode)
        assert len(out.tokens) == 6 and isinstance(out.text, str)
        assert model.special.mask not in out.tokens


def test_image_prompt_without_positions_is_refused(model, image):
    embeds, valid, kinds = model.prepare(["What is in the picture?"], images=[image])
    with pytest.raises(ValueError, match="M-RoPE"):
        model.sample(embeds, valid, kinds=kinds)
    with pytest.raises(ValueError, match="M-RoPE"):
        model.generate_ar(["What is in the picture?"], images=[image])


def test_mrope_with_equal_positions_is_1d_rope():
    pos = torch.arange(7)[None].expand(2, 7)
    cos1, sin1 = rope_cos_sin(pos, 16, 1e6)
    cos3, sin3 = rope_cos_sin(pos.expand(3, 2, 7), 16, 1e6, mrope_section=[2, 3, 3])
    assert torch.equal(cos1, cos3) and torch.equal(sin1, sin3)


def test_multimodal_positions_follow_get_rope_index():
    # 2 text tokens, a 1x2x3 grid, 2 text tokens: text resumes one past the largest grid position
    pos = multimodal_positions([2, (1, 2, 3), 2])
    assert pos[:, :2].tolist() == [[0, 1]] * 3
    assert pos[0, 2:8].tolist() == [2] * 6
    assert pos[1, 2:8].tolist() == [2, 2, 2, 3, 3, 3]
    assert pos[2, 2:8].tolist() == [2, 3, 4, 2, 3, 4]
    assert pos[:, 8:].tolist() == [[5, 6]] * 3


def _config(**changes) -> dict:
    config = json.loads((FIXTURE / "config.json").read_text())
    config.update(changes)
    return config


@pytest.mark.parametrize("changes, message", [
    (dict(full_attn_mask=False), "full_attn_mask"),
    (dict(mrope_section=[4, 4, 4]), "mrope_section"),
    (dict(vision_config={"depth": 5}), "not a known Qwen2.5-VL tower"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_bad_config_is_refused_with_one_clear_line(changes, message):
    with pytest.raises(ValueError, match=message) as info:
        dimple_model_config(_config(**changes))
    assert "\n" not in str(info.value)


def test_bad_config_on_disk_is_refused_by_load(tmp_path):
    bad = tmp_path / "dimple"
    shutil.copytree(FIXTURE, bad)
    (bad / "config.json").write_text(json.dumps(_config(vision_start_token_id=5)))
    with pytest.raises(ValueError, match="vision_start_token_id"):
        mmdiff.load(bad)
    with pytest.raises(ValueError, match="mrope_section"):
        DecoderConfig(d_model=32, n_heads=2, n_kv_heads=1, mrope_section=[1, 1, 1])


def test_engine_batches_dimple_image_requests_as_generate_does(model, image):
    """The serving engine carries each request's M-RoPE positions (left padded with its batch); the
    PrefixCache path is covered by test_prefix_cache_rows_keep_their_positions_when_stacked."""
    from mmdiff.serving.engine import Engine

    wide = Image.new("RGB", (112, 56), (10, 200, 30))  # another grid: 1 x 2 x 4 tokens
    requests = [("What is in the picture?", image), ("Describe this image.", wide), ("What colour?", image)]
    decode = DecodeConfig(sampler=SamplerConfig(gen_length=6, steps=3), cache="none")  # the exact one for Dimple
    engine = Engine(model, max_batch=8)
    handles = [engine.submit(q, image=im, decode=decode) for q, im in requests]
    engine.run_until_idle()
    for h, (q, im) in zip(handles, requests):
        assert h.result(timeout=0).tokens == model.generate([q], images=[im], decode=decode)[0].tokens


def test_search_on_an_image_is_refused_for_dimple(model, image):
    from mmdiff.sampling import SearchConfig
    from mmdiff.search import answer

    decode = DecodeConfig(sampler=SamplerConfig(gen_length=4, steps=2), search=SearchConfig(strategy="best_of_n"))
    with pytest.raises(ValueError, match="M-RoPE"):
        answer(model, ["What is in the picture?"], images=[image], audios=[None], decode=decode)


@torch.no_grad()
def test_prefix_cache_rows_keep_their_positions_when_stacked(model, image):
    """PrefixCache (the engine's stacked rows) continues each canvas after its own M-RoPE prompt."""
    from mmdiff.sampling.denoisers import PrefixCache

    questions, images = ["What is in the picture?", "Describe it."], [image, Image.new("RGB", (112, 56))]
    embeds, valid, kinds, positions = model.prepare(questions, images=images, return_positions=True)
    batch = PrefixCache(model.decoder, embeds, valid, positions=positions)
    alone = [PrefixCache(model.decoder, *model.prepare([q], images=[im], return_positions=True)[:2],
                         positions=model.prepare([q], images=[im], return_positions=True)[3])
             for q, im in zip(questions, images)]
    stacked = PrefixCache.stack(alone)
    assert torch.equal(stacked.first_position, batch.first_position)
    state = StepState(canvas=torch.full((2, 4), model.special.mask), step=0, block=0, block_slice=slice(0, 4),
                      mask_id=model.special.mask)
    assert rel(stacked.logits(state), batch.logits(state)) < TOL
