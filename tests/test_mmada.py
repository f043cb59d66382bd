"""MMaDA into MultimodalDiffusionLM, against the released code's outputs recorded in
``tests/fixtures/mmada-tiny/expected.npz`` (how they were made: that folder's README.txt).

* the MAGVIT-v2 tokenizer (our port): preprocessing, latents and the exact code ids;
* the LLM: logits of a text-only batch and of the understanding prompt (image codes included);
* the prompt mmdiff builds for a question about an image equals the released ``inference_mmu.py`` one;
* ``generate`` on an image prompt equals the released ``mmu_generate`` (greedy, low-confidence);
* the ``vq_ids`` path equals embedding the ids; bad directories fail with one clear line.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmdiff.adapters import VQTokensConfig, build_adapter
from mmdiff.checkpoints import MMADA_RESERVED_IDS, VQ_SUBDIR, is_mmada, load_mmada, magvit2_name
from mmdiff.checkpoints.mmada import reserved_ids
from mmdiff.decoder import DecoderConfig
from mmdiff.encoders import VisionEncoderConfig, build_vision_encoder
from mmdiff.encoders.vq import lfq_codes
from mmdiff.loading import load
from mmdiff.sampling import DecodeConfig, SamplerConfig

FIXTURE = Path(__file__).parent / "fixtures" / "mmada-tiny"
QUESTION = "what is in the picture?"  # the question of the recorded understanding prompt
TOL = 1e-4


def rel_err(got: torch.Tensor, want: np.ndarray) -> float:
    want = torch.from_numpy(want)
    return float((got.float() - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(FIXTURE / "expected.npz"))


@pytest.fixture(scope="module")
def model():
    return load(FIXTURE, dtype=torch.float32)


def test_detected_and_loaded_with_image_tokenizer(model):
    assert is_mmada(json.loads((FIXTURE / "config.json").read_text()))
    assert model.cfg.vision.kind == "magvit2" and model.cfg.vision_adapter.kind == "vq_ids"
    assert model.cfg.decoder.attn_mode == "bidirectional" and not model.cfg.decoder.logit_shift


def test_vq_ids_exact(model, expected):
    pixels = model.vision.preprocess([Image.fromarray(expected["image"])])
    assert torch.equal(pixels, torch.from_numpy(expected["pixel_values"]))  # resize, centre crop, [-1, 1]
    with torch.no_grad():
        latents = model.vision.latents(pixels)
        codes = model.vision(pixels)
    assert rel_err(latents, expected["vq_latent"]) < TOL
    assert torch.equal(codes, torch.from_numpy(expected["vq_ids"]))


def test_text_logits(model, expected):
    with torch.no_grad():
        logits = model.decoder(torch.from_numpy(expected["text_input_ids"])).logits
    assert rel_err(logits, expected["text_logits"]) < TOL


def test_understanding_prompt_and_logits(model, expected):
    """mmdiff's own prompt for (image, question) is the released one, id for id, and its logits match."""
    prompt = model.format_prompt(QUESTION, n_images=1)
    with torch.no_grad():
        image = model.encode_image([Image.fromarray(expected["image"])])  # (1, N, D)
        embeds, valid = model.embed_prompt([prompt], images=[[image[0]]])
        released = torch.from_numpy(expected["mmu_prompt_ids"])
        assert torch.equal(embeds, model.decoder.embed(released))
        response = torch.from_numpy(expected["mmu_input_ids"][:, released.shape[1]:])
        logits = model.decoder(inputs_embeds=torch.cat([embeds, model.decoder.embed(response)], 1)).logits
    assert valid.all()
    assert rel_err(logits, expected["mmu_logits"]) < TOL


def test_generate_on_image_matches_released_mmu_generate(model, expected):
    gen = expected["mmu_generate_ids"]  # mmu_generate(max_new_tokens=8, steps=4, block_length=4), greedy
    sampler = SamplerConfig(gen_length=gen.shape[1], steps=4, block_length=4)
    out = model.generate([QUESTION], images=[Image.fromarray(expected["image"])], decode=DecodeConfig(sampler=sampler))
    assert out[0].tokens == gen[0].tolist()


def test_vq_ids_equal_embedding_the_ids():
    dec = DecoderConfig(vocab_size=40, d_model=8, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden=16)
    cfg = VQTokensConfig(kind="vq_ids", in_dim=16, out_dim=8, offset=20, prefix_ids=(3, 4), suffix_ids=(5,)).resolve(dec)
    adapter = build_adapter(cfg)
    codes = torch.tensor([[0, 15, 7], [1, 2, 3]])
    ids = adapter(codes)
    assert ids.tolist() == [[3, 4, 20, 35, 27, 5], [3, 4, 21, 22, 23, 5]]
    assert adapter.num_tokens(3) == 6
    with pytest.raises(ValueError, match="outside the 16-entry codebook"):
        adapter(torch.tensor([[16]]))
    with pytest.raises(ValueError, match="do not fit the decoder's 40-token vocabulary"):
        VQTokensConfig(kind="vq_ids", in_dim=16, out_dim=8, offset=30).resolve(dec)


def test_model_embeds_vq_codes_with_its_own_table(model, expected):
    codes = torch.from_numpy(expected["vq_ids"])
    cfg = model.cfg.vision_adapter
    want = model.decoder.embed(torch.cat([torch.tensor([cfg.prefix_ids]), codes + cfg.offset,
                                          torch.tensor([cfg.suffix_ids])], 1))
    assert torch.equal(model.adapt_image(codes), want)


def test_lfq_bits_msb_first():
    z = torch.tensor([1.0, -1.0, 0.0, 2.0]).view(1, 4, 1, 1)  # bits 1 0 0 1 (zero is the -1 side)
    assert lfq_codes(z).tolist() == [[0b1001]]


def test_reserved_ids_fall_back_to_released_ids(model):
    assert reserved_ids(model.tokenizer.tokenizer, ("<|mmu|>",)) == (model.cfg.vision_adapter.prefix_ids[0],)

    class Unnamed:  # LLaDA's tokenizer keeps MMaDA's markers as unnamed reserved entries
        unk_token_id = 0

        def convert_tokens_to_ids(self, token):
            return 0

    assert reserved_ids(Unnamed(), ("<|soi|>", "<|eoi|>")) == (MMADA_RESERVED_IDS["<|soi|>"],
                                                                 MMADA_RESERVED_IDS["<|eoi|>"])


def test_magvit2_sizes_from_config():
    assert magvit2_name({"_class_name": "MAGVITv2", "_diffusers_version": "0.32.2"}, source="c") == "magvitv2"
    with pytest.raises(ValueError, match="_class_name 'VQModel' is not 'MAGVITv2'"):
        magvit2_name({"_class_name": "VQModel"}, source="c")
    with pytest.raises(ValueError, match="matches no known MAGVIT-v2 tokenizer"):
        magvit2_name({"_class_name": "MAGVITv2", "encoder_config": {"ch": 64, "z_channels": 6}}, source="c")


def test_magvit2_encoder_builds_on_meta_at_released_size():
    with torch.device("meta"):
        enc = build_vision_encoder(VisionEncoderConfig(kind="magvit2", name="magvitv2", img_size=512))
    assert enc.grid == (32, 32) and enc.out_dim == 8192  # MMaDA: 1024 codes of an 8192-entry codebook


@pytest.fixture
def copy_dir(tmp_path):
    dst = tmp_path / "mmada"
    shutil.copytree(FIXTURE, dst)
    return dst


def test_without_vq_model_text_only_refuses_images(copy_dir, caplog):
    shutil.rmtree(copy_dir / VQ_SUBDIR)
    model = load(copy_dir)
    assert model.vision is None and "text-only" in caplog.text
    with pytest.raises(ValueError, match="no vision encoder"):
        model.generate([QUESTION], images=[Image.new("RGB", (16, 16))])


def test_bad_codebook_size(copy_dir):
    config = json.loads((copy_dir / "config.json").read_text())
    config["codebook_size"] = 128
    (copy_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="codebook_size 128 differs from the 64 codes of the magvitv2-tiny-test"):
        load_mmada(copy_dir)


def test_missing_codebook_size(copy_dir):
    config = json.loads((copy_dir / "config.json").read_text())
    del config["codebook_size"]
    (copy_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"MMaDA config lacks \['codebook_size'\]"):
        load_mmada(copy_dir)


def test_pickled_vq_weights_refused(copy_dir):
    (copy_dir / VQ_SUBDIR / "pytorch_model.safetensors").rename(copy_dir / VQ_SUBDIR / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only a pickled pytorch_model.bin"):
        load_mmada(copy_dir)


def test_vq_tensor_shape_mismatch_named(copy_dir):
    from safetensors.torch import load_file, save_file

    path = copy_dir / VQ_SUBDIR / "pytorch_model.safetensors"
    state = load_file(path)
    state["encoder.conv_in.bias"] = torch.zeros(7)
    save_file(state, path)
    with pytest.raises(ValueError, match=r"encoder.conv_in.bias .*checkpoint \(7,\) vs model \(32,\)"):
        load_mmada(copy_dir)


def test_llm_dtype_applies_to_the_llm_only():
    """The tokenizer stays float32 (its codes are sign decisions): a bfloat16 LLM gets the same codes."""
    model = load_mmada(FIXTURE, dtype=torch.bfloat16)
    assert model.decoder.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.vision.parameters()} == {torch.float32}
    expected = np.load(FIXTURE / "expected.npz")
    with torch.no_grad():
        assert torch.equal(model.vision(torch.from_numpy(expected["pixel_values"])), torch.from_numpy(expected["vq_ids"]))
