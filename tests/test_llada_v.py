"""LLaDA-V into MultimodalDiffusionLM: a tiny random checkpoint in the released on-disk layout.

There is no LLaDA-V fixture with reference outputs, so the test writes one (real ``config.json`` keys
at tiny sizes, real tensor names, two safetensors shards + index, a LLaDA-style tokenizer) from
independent sources and checks each part against them:

* the LLM against our Decoder loaded by a hand-written rename, and against transformers' Llama run
  with a bidirectional mask (an implementation that shares no code with ours);
* the vision tower against transformers' ``SiglipVisionModel`` at ``hidden_states[-2]`` (LLaVA drops
  the last block and reads the new last one), the projector against the stored matrices;
* ``generate`` on an image prompt (anyres tiling itself: ``tests/test_views.py``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from mmdiff import special_tokens as st
from mmdiff.checkpoints import (
    LLADA_MASK_TOKEN,
    LLADA_V_SYSTEM_PROMPT,
    LLADA_V_UNUSED,
    ReleasedTokenizer,
    detect_format,
    llada_v_model_config,
    load_llada_v,
    tokenizer_files,
)
from mmdiff.decoder import Decoder, DecoderConfig
from mmdiff.encoders.vision import SIGLIP_TOWERS
from mmdiff.loading import load as load_multimodal
from mmdiff.sampling import DecodeConfig, SamplerConfig
from mmdiff.special_tokens import SpecialIds

LLM = dict(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
           intermediate_size=64, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=256)
TOWER = "siglip-tiny-test"
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
              patch_size=8)  # = SIGLIP_TOWERS[TOWER] in transformers' names
LLADA_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  LLADA_MASK_TOKEN]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
VISION = "model.vision_tower.vision_tower.vision_model."
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def llada_tokenizer(*, chat_template: str | None = CHAT_TEMPLATE):
    """A small byte-level BPE with LLaDA's special tokens (ids 0-5) and a Llama-3 style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=LLADA_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["what is in the picture?", "a red circle", "user", "assistant"] * 10, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   additional_special_tokens=LLADA_SPECIALS[2:])
    fast.chat_template = chat_template
    return fast


def llada_v_config(**changes) -> dict:
    """LLaDA-V's config.json keys (LlamaConfig + LLaVA-OneVision's mm_* keys) at tiny sizes."""
    return {
        "architectures": ["LlavaLLaDAModelLM"], "model_type": "llava_llada", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, "hidden_act": "silu",
        "initializer_range": 0.02, "pretraining_tp": 1, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "float32", "use_cache": False, **LLM,
        "image_aspect_ratio": "anyres_max_4", "image_grid_pinpoints": [[32, 32], [32, 64], [64, 32], [64, 64]],
        "image_crop_resolution": None, "image_split_resolution": None, "mm_hidden_size": SIGLIP["hidden_size"],
        "mm_newline_position": "grid", "mm_patch_merge_type": "spatial_unpad", "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu", "mm_resampler_type": None, "mm_spatial_pool_mode": "bilinear",
        "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model", "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": f"mmdiff-test/{TOWER}", "mm_vision_tower_lr": 2e-06, "use_mm_proj": True,
        "use_pos_skipping": False, "vision_tower_pretrained": None, **changes,
    }


def siglip_reference():
    """transformers' SiglipVisionModel at the tiny tower's size, every parameter perturbed off its init."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(1)
    model = SiglipVisionModel(SiglipVisionConfig(**SIGLIP)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def llm_tensors() -> dict[str, torch.Tensor]:
    """Random LLM tensors under Llama names."""
    g = torch.Generator().manual_seed(2)
    D, I, V = LLM["hidden_size"], LLM["intermediate_size"], LLM["vocab_size"]

    def r(*shape: int, mean: float = 0.0) -> torch.Tensor:
        return mean + 0.1 * torch.randn(*shape, generator=g)

    out = {"model.embed_tokens.weight": r(V, D), "model.norm.weight": r(D, mean=1.0), "lm_head.weight": r(V, D)}
    for i in range(LLM["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": r(D, mean=1.0), p + "post_attention_layernorm.weight": r(D, mean=1.0),
                    **{p + f"self_attn.{n}_proj.weight": r(D, D) for n in "qkvo"},
                    p + "mlp.gate_proj.weight": r(I, D), p + "mlp.up_proj.weight": r(I, D),
                    p + "mlp.down_proj.weight": r(D, I)})
    return out


def write_llada_v(directory: Path, *, config: dict | None = None, extra: dict[str, torch.Tensor] | None = None) -> dict:
    """Write a tiny LLaDA-V directory; returns every tensor written, by checkpoint name."""
    directory.mkdir(parents=True, exist_ok=True)
    vision = siglip_reference().state_dict()
    last = SIGLIP["num_hidden_layers"] - 1
    tower = {VISION + k: v for k, v in vision.items()  # as LLaVA saves it: no last block, no pooling head
             if not k.startswith(("head.", f"encoder.layers.{last}."))}
    g = torch.Generator().manual_seed(3)
    D, C = LLM["hidden_size"], SIGLIP["hidden_size"]
    projector = {"model.mm_projector.0.weight": 0.2 * torch.randn(D, C, generator=g),
                 "model.mm_projector.0.bias": 0.1 * torch.randn(D, generator=g),
                 "model.mm_projector.2.weight": 0.2 * torch.randn(D, D, generator=g),
                 "model.mm_projector.2.bias": 0.1 * torch.randn(D, generator=g),
                 "model.image_newline": torch.randn(D, generator=g)}
    llm = llm_tensors()
    first = {k: v for k, v in llm.items() if k.startswith("model.layers.0.") or k == "model.embed_tokens.weight"}
    second = {**{k: v for k, v in llm.items() if k not in first}, **tower, **projector, **(extra or {})}
    save_file({k: v.contiguous() for k, v in first.items()}, str(directory / SHARD1), metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in second.items()}, str(directory / SHARD2), metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(first, SHARD1), **dict.fromkeys(second, SHARD2)}
    total = sum(v.numel() * v.element_size() for v in (*first.values(), *second.values()))
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config or llada_v_config()))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1,
                                                                  "pad_token_id": 1}))
    llada_tokenizer().save_pretrained(directory)
    return {**first, **second}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("llada-v") / "LLaDA-V-tiny"
    return d, write_llada_v(d)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_llada_v(checkpoint[0], dtype=torch.float32)


def picture() -> Image.Image:
    g = torch.Generator().manual_seed(4)
    return Image.fromarray((torch.rand(40, 24, 3, generator=g) * 255).to(torch.uint8).numpy())


# ------------------------------------------------------------------------------------------------
# (a) the LLM
# ------------------------------------------------------------------------------------------------
def test_config_maps_to_decoder_tower_and_projector(checkpoint):
    cfg = llada_v_model_config(json.loads((checkpoint[0] / "config.json").read_text()))
    d = cfg.decoder
    assert (d.vocab_size, d.d_model, d.n_layers, d.n_heads, d.n_kv_heads, d.mlp_hidden) == (384, 32, 2, 4, 4, 64)
    assert (d.rope_theta, d.norm_eps, d.max_seq_len) == (500000.0, 1e-5, 256)
    assert d.attn_mode == "bidirectional" and not (d.qkv_bias or d.tie_embeddings or d.logit_shift)
    assert (cfg.vision.kind, cfg.vision.name, cfg.vision.layer) == ("siglip", TOWER, -2)
    assert (cfg.vision_adapter.kind, cfg.vision_adapter.in_dim, cfg.vision_adapter.out_dim) == ("mlp2x_gelu", 32, 32)
    assert SIGLIP_TOWERS[TOWER]["depth"] == SIGLIP["num_hidden_layers"]


def test_llm_logits_equal_a_hand_assembled_decoder(checkpoint, model):
    tensors = checkpoint[1]
    names = {"self_attn.": "attn.", "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
             "model.layers.": "layers.", "model.embed_tokens": "embed_tokens", "model.norm": "norm"}
    state = {}
    for k, v in tensors.items():
        if k.startswith(("model.layers.", "model.embed_tokens", "model.norm", "lm_head")):
            for a, b in names.items():
                k = k.replace(a, b)
            state[k] = v
    ref = Decoder(DecoderConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden=64,
                                rope_theta=500000.0, norm_eps=1e-5, max_seq_len=256))
    ref.load_state_dict(state, strict=True)
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model.decoder(ids).logits, ref(ids).logits)


def test_llm_matches_transformers_llama_with_a_bidirectional_mask(checkpoint, model):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(**LLM, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                                         attention_bias=False, tie_word_embeddings=False)).eval()
    llm = {k: v for k, v in checkpoint[1].items()
           if k.startswith(("model.layers.", "model.embed", "model.norm", "lm_head"))}
    llama.load_state_dict(llm, strict=True)
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = llama(ids, attention_mask=torch.zeros(2, 1, 12, 12)).logits  # additive 0: everyone sees everyone
        got = model.decoder(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# (b) the vision tower and projector
# ------------------------------------------------------------------------------------------------
def test_vision_tower_equals_siglip_hidden_states_minus_2(model):
    reference = siglip_reference()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # full 3-block tower
        got = model.vision(pixels)
    assert got.shape == (2, 16, 32) and len(model.vision.encoder["layers"]) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_preprocess_matches_the_siglip_processor(model):
    from transformers import SiglipImageProcessor

    image = picture()
    want = SiglipImageProcessor(size={"height": 32, "width": 32})(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(model.vision.preprocess([image]), want, rtol=0, atol=2.5 / 255)  # 8-bit rounding


def test_encode_image_is_tower_then_projector(checkpoint, model):
    t = checkpoint[1]
    image = picture()
    with torch.no_grad():
        feats = model.vision(model.vision.preprocess([image]))
        h = F.gelu(F.linear(feats, t["model.mm_projector.0.weight"], t["model.mm_projector.0.bias"]))
        want = F.linear(h, t["model.mm_projector.2.weight"], t["model.mm_projector.2.bias"])
        torch.testing.assert_close(model.encode_image([image]), want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# (c) prompts and generation
# ------------------------------------------------------------------------------------------------
def test_special_ids_and_the_llava_prompt(model):
    tok = model.tokenizer
    assert model.special.mask == tok.tokenizer.convert_tokens_to_ids(LLADA_MASK_TOKEN) == 5  # from the tokenizer
    assert (model.special.eos, model.special.pad, model.special.bos) == (1, 1, 0)  # from the configs
    ids = model.format_prompt("what is in the picture?", n_images=1)
    assert ids.count(model.special.image) == 1
    assert tok.decode(ids) == (  # LLaVA's llava_llada conversation: system prompt, then <image>\n + question
        f"<|startoftext|><|start_header_id|>system<|end_header_id|>\n\n{LLADA_V_SYSTEM_PROMPT}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nwhat is in the picture?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    embeds, valid = model.embed_prompt([ids], images=[[torch.zeros(16, 32)]])
    assert embeds.shape == (1, len(ids) - 1 + 16, 32) and bool(valid.all())


def test_generate_on_an_image_prompt(model):
    out = model.generate(["what is in the picture?"], images=[picture()], decode=DecodeConfig(sampler=SamplerConfig(gen_length=6, steps=3)))
    assert len(out) == 1 and len(out[0].tokens) == 6 and out[0].nfe == 3
    assert model.special.mask not in out[0].tokens and isinstance(out[0].text, str)


def test_released_tokenizer_without_chat_template_gives_bare_text():
    tok = ReleasedTokenizer(llada_tokenizer(chat_template=None), SpecialIds(mask=5, pad=1, eos=1, bos=0),
                            vocab_size=400)
    text = tok.apply_chat_template([{"role": "user", "content": st.IMAGE + "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<image>\nhi"
    assert SpecialIds.from_tokenizer(tok) == SpecialIds(mask=5, pad=1, eos=1, bos=0, image=tok.special.image,
                                                        audio=tok.special.audio)


def test_placeholder_ids_must_fit_the_embedding():
    with pytest.raises(ValueError, match=r"<image> got id \d+, which is outside the model's 100 embedding rows"):
        ReleasedTokenizer(llada_tokenizer(), SpecialIds(mask=5, pad=1, eos=1, bos=0), vocab_size=100)


# ------------------------------------------------------------------------------------------------
# dtype, detection, errors
# ------------------------------------------------------------------------------------------------
def test_bfloat16_load_has_no_fp32_or_meta_tensor(checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="mmdiff"):
        model = load_multimodal(checkpoint[0], dtype=torch.bfloat16)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.dtype == torch.bfloat16 and not t.is_meta for t in tensors)
    assert "post_layernorm" in caplog.text  # skipped, and said so
    torch.testing.assert_close(model.vision_adapter.image_newline,  # anyres: the row separator is loaded
                               checkpoint[1]["model.image_newline"].to(torch.bfloat16), rtol=0, atol=0)
    assert model.generate(["what is in the picture?"], images=[picture()], decode=DecodeConfig(sampler=SamplerConfig(gen_length=2)))


def test_detect_format_points_to_the_multimodal_loader():
    with pytest.raises(ValueError, match="LLaDA-V.*mmdiff.load"):
        detect_format(llada_v_config())


@pytest.mark.parametrize("change, message", [
    ({"mm_projector_type": "linear"}, r"mm_projector_type='linear' \(supported: 'mlp2x_gelu'\)"),
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
    ({"mm_vision_select_layer": -1}, "mm_vision_select_layer"),
    ({"mm_vision_tower": "openai/clip-vit-large-patch14-336"}, r"clip-vit-large-patch14-336.*known: \["),
    ({"mm_hidden_size": 1152}, "mm_hidden_size 1152 differs from the 32-wide"),
])
def test_unsupported_configs_are_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        llada_v_model_config(llada_v_config(**change))


def test_unknown_tensor_and_missing_tokenizer_are_named(tmp_path):
    d = tmp_path / "extra"
    write_llada_v(d, extra={"model.vision_resampler.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unknown tensors \['model.vision_resampler.weight'\]"):
        load_llada_v(d)
    for f in tokenizer_files(d):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_llada_v(d)


def test_unused_tensor_prefixes_are_the_towers_leftovers():
    assert set(LLADA_V_UNUSED) == {VISION + "post_layernorm.", VISION + "head."}


def test_image_newline_is_unused_without_tiling(tmp_path, caplog):
    d = tmp_path / "square"
    write_llada_v(d, config=llada_v_config(image_aspect_ratio="square", mm_patch_merge_type="flat"))
    with caplog.at_level(logging.INFO, logger="mmdiff"):
        model = load_llada_v(d)
    assert model.vision.views.single and model.vision_adapter.image_newline is None
    assert "model.image_newline" in caplog.text
    assert model.image_tokens([picture()])[0].shape == (16, 32)


def test_a_declared_mask_id_wins_over_the_tokenizer(tmp_path):
    d = tmp_path / "declared"
    write_llada_v(d, config=llada_v_config(mask_token_id=4))
    assert load_llada_v(d).special.mask == 4
