"""Image views: LLaDA-V's anyres tiling against LLaVA-NeXT's own code, recorded as data.

``tests/fixtures/llada-v-tiny/expected_anyres.npz`` holds, for five images of different shapes and
three configs (``anyres_max_4`` over a 2 x 2 grid of 32-pixel tiles, ``anyres_max_1`` which makes the
tile map shrink, plain ``anyres`` over 3 x 1 / 1 x 3 / 3 x 3 canvases), the pixel values of every view
that LLaVA-NeXT's ``process_anyres_image`` produces and the prompt embeddings its
``prepare_inputs_labels_for_multimodal`` builds (``spatial_unpad``: base view, stitched and unpadded
tile map, ``image_newline`` per row) from the fixture's tower, projector, newline and token
embedding (how: the fixture's README.txt). mmdiff must reproduce both.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmdiff.checkpoints import llada_v_model_config
from mmdiff.encoders.views import AnyResViews, build_views, resize_and_pad, select_best_resolution, unpad
from mmdiff.loading import load

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "llada-v-tiny"
EXPECTED = np.load(FIXTURE / "expected_anyres.npz")
VARIANTS = ("anyres_max_4", "anyres_max_1", "anyres")
N_IMAGES = sum(1 for k in EXPECTED.files if k.startswith("image_") and k[6:].isdigit())


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request, tmp_path_factory) -> tuple[str, object]:
    """(name, model) of the fixture with the variant's config changes."""
    name = request.param
    d = tmp_path_factory.mktemp(name) / "llada-v"
    shutil.copytree(FIXTURE, d)
    changes = json.loads(bytes(EXPECTED[f"{name}/config"]).decode())
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **changes}))
    return name, load(d, dtype=torch.float32)


def image(i: int) -> Image.Image:
    return Image.fromarray(EXPECTED[f"image_{i}"])


@pytest.mark.parametrize("i", range(N_IMAGES))
def test_views_are_llava_next_pixels(variant, i):
    name, model = variant
    crops, _ = model.vision.views.split(image(i), tile=model.vision.input_size)
    want = torch.from_numpy(EXPECTED[f"{name}/pixels_{i}"])
    got = model.vision.preprocess(crops)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("i", range(N_IMAGES))
def test_prompt_embeddings_are_llava_next_spatial_unpad(variant, i):
    name, model = variant
    prompt = [model.special.image if t == int(EXPECTED["image_token_index"]) else int(t) for t in EXPECTED["prompt"]]
    with torch.no_grad():
        tokens = model.image_tokens([image(i)])
        embeds, valid = model.embed_prompt([prompt], images=[tokens])
    want = torch.from_numpy(EXPECTED[f"{name}/embeds_{i}"])
    assert embeds.shape[1:] == want.shape and bool(valid.all())
    assert rel_err(embeds[0], want) < 1e-4
    assert model.num_image_tokens(image(i)) == tokens[0].shape[0]


def test_the_fixture_config_tiles(variant):
    name, model = variant
    assert model.vision.cfg.views == "anyres" and model.vision_adapter.image_newline is not None
    assert model.vision.cfg.max_tiles == {"anyres_max_4": 4, "anyres_max_1": 1, "anyres": None}[name]


# ------------------------------------------------------------------------------------------------
# config mapping and refusals
# ------------------------------------------------------------------------------------------------
def fixture_config(**changes) -> dict:
    return {**json.loads((FIXTURE / "config.json").read_text()), **changes}


def test_llava_range_pinpoints_are_tiles_of_the_tower():
    cfg = llada_v_model_config(fixture_config(image_grid_pinpoints="(1x1),...,(2x3)",
                                              image_aspect_ratio="anyres_max_9"))
    assert cfg.vision.grid_pinpoints == ((32, 32), (32, 64), (32, 96), (64, 32), (64, 64), (64, 96))
    assert cfg.vision.max_tiles == 9 and cfg.vision_adapter.newline


def test_square_flat_is_the_base_view_without_newline():
    cfg = llada_v_model_config(fixture_config(image_aspect_ratio="square", mm_patch_merge_type="flat"))
    assert cfg.vision.views == "single" and not cfg.vision_adapter.newline


@pytest.mark.parametrize("changes, message", [
    ({"image_aspect_ratio": "pad"}, "'pad' with mm_patch_merge_type 'spatial_unpad' is not supported"),
    ({"mm_patch_merge_type": "spatial"}, "'spatial' is not supported"),
    ({"image_aspect_ratio": "anyres_max_x"}, "'anyres_max_x'"),
    ({"image_grid_pinpoints": None}, "needs image_grid_pinpoints"),
])
def test_unsupported_view_configs_are_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message):
        llada_v_model_config(fixture_config(**changes))


def test_anyres_needs_pinpoints_that_cut_into_tiles():
    with pytest.raises(ValueError, match="need grid_pinpoints"):
        build_views("anyres")
    with pytest.raises(ValueError, match="not multiples of the tower's 32-pixel input"):
        AnyResViews(grid_pinpoints=[(48, 32)]).split(Image.new("RGB", (10, 10)), tile=32)


def test_geometry_helpers_on_hand_computed_cases():
    assert select_best_resolution((100, 50), [(32, 32), (64, 32), (64, 64)]) == (64, 32)  # keeps most pixels
    assert select_best_resolution((10, 10), [(64, 64), (32, 32)]) == (32, 32)  # same pixels, less waste
    canvas = resize_and_pad(Image.new("RGB", (20, 10), (255, 255, 255)), (64, 64))
    assert canvas.getpixel((0, 0)) == (0, 0, 0) and canvas.getpixel((32, 32)) == (255, 255, 255)
    x = torch.arange(2 * 8 * 8, dtype=torch.float).view(2, 8, 8)
    assert unpad(x, (20, 10)).shape == (2, 4, 8)  # a wide image: rows of padding above and below go
    assert unpad(x, (10, 20)).shape == (2, 8, 4)
