"""Loading released LLaDA / Dream checkpoints: logit parity with the reference code, conversion,
memory-frugal dtype handling, and errors that name the problem.

The fixtures (tiny random checkpoints in the exact on-disk formats, with the logits the original
modeling code computes) live in ``../shared/fixtures`` beside the checkout.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mmdiff.checkpoints import (
    DECODER_NAMES,
    FORMATS,
    SPECIAL_TOKENS_NAME,
    assert_materialised,
    detect_format,
    dream_decoder_config,
    expand_names,
    llada_decoder_config,
    load_checkpoint,
    load_pretrained,
    load_tokenizer_if_present,
    save_decoder,
    special_ids_from_configs,
)
from mmdiff.cli import main as cli_main
from mmdiff.decoder import Decoder, DecoderConfig, preset
from mmdiff.sampling import FullRecompute, SamplerConfig, sample
from mmdiff.special_tokens import SpecialIds

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
KINDS = ("llada-tiny", "dream-tiny")
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


def fixture(kind: str) -> Path:
    d = FIXTURES / kind
    if not (d / "expected.npz").is_file():
        pytest.skip(f"parity fixture {kind} not found at {d} (expected ../shared/fixtures beside the checkout)")
    return d


def copy_fixture(kind: str, tmp_path: Path) -> Path:
    """A writable copy of a fixture directory (the originals are read-only)."""
    src, dst = fixture(kind), tmp_path / kind
    dst.mkdir()
    for f in src.iterdir():
        shutil.copyfile(f, dst / f.name)
    return dst


def expected(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(fixture(kind) / "expected.npz")
    return torch.from_numpy(data["input_ids"]), torch.from_numpy(data["logits"])


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


@torch.no_grad()
def logits_of(model: Decoder, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ------------------------------------------------------------------------------------------------
# parity with the reference forward pass
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_reference(kind):
    ids, ref = expected(kind)
    model = load_checkpoint(fixture(kind), dtype=torch.float32, device="cpu")
    assert rel_err(logits_of(model, ids), ref) < 1e-4  # Dream: raw, before the shift


def test_dream_logits_shift_by_one_and_llada_does_not_shift():
    ids, ref = expected("dream-tiny")
    dream = load_checkpoint(fixture("dream-tiny"))
    aligned = dream.shifted(logits_of(dream, ids))  # position i predicts token i + 1
    assert rel_err(aligned, ref[:, :-1]) < 1e-4
    llada_ids, _ = expected("llada-tiny")
    llada = load_checkpoint(fixture("llada-tiny"))
    raw = logits_of(llada, llada_ids)
    assert torch.equal(llada.shifted(raw), raw[:, 1:])


def test_config_mapping_follows_the_released_configs():
    llada = llada_decoder_config(json.loads((fixture("llada-tiny") / "config.json").read_text()))
    assert (llada.vocab_size, llada.d_model, llada.n_layers, llada.n_heads, llada.n_kv_heads) == (512, 64, 2, 4, 4)
    assert llada.mlp_hidden == 160  # mlp_hidden_size wins over mlp_ratio * d_model = 256
    assert (llada.rope_theta, llada.norm_eps, llada.max_seq_len) == (500000.0, 1e-5, 256)
    assert not (llada.qkv_bias or llada.tie_embeddings or llada.logit_shift)
    dream = dream_decoder_config(json.loads((fixture("dream-tiny") / "config.json").read_text()))
    assert (dream.vocab_size, dream.d_model, dream.n_heads, dream.n_kv_heads, dream.mlp_hidden) == (512, 64, 4, 2, 160)
    assert (dream.rope_theta, dream.norm_eps) == (1e6, 1e-6)
    assert dream.qkv_bias and dream.logit_shift and not dream.tie_embeddings


def test_llada_config_fallbacks():
    base = dict(d_model=64, n_layers=1, n_heads=4, vocab_size=500, rope=True, layer_norm_type="rms",
                block_type="llama", activation_type="silu")
    cfg = llada_decoder_config({**base, "mlp_hidden_size": None, "embedding_size": None, "n_kv_heads": None})
    assert (cfg.mlp_hidden, cfg.vocab_size, cfg.n_kv_heads) == (256, 500, 4)
    assert llada_decoder_config({**base, "embedding_size": 512}).vocab_size == 512  # embedding rows


@pytest.mark.parametrize("reader, change, word", [
    (llada_decoder_config, {"alibi": True}, "alibi"),
    (llada_decoder_config, {"rope": False}, "rope"),
    (llada_decoder_config, {"layer_norm_type": "default"}, "layer_norm_type"),
    (llada_decoder_config, {"block_type": "sequential"}, "block_type"),
    (dream_decoder_config, {"use_sliding_window": True}, "use_sliding_window"),
    (dream_decoder_config, {"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
])
def test_unsupported_options_are_refused_by_name(reader, change, word):
    kind = "llada-tiny" if reader is llada_decoder_config else "dream-tiny"
    config = {**json.loads((fixture(kind) / "config.json").read_text()), **change}
    with pytest.raises(ValueError, match=word):
        reader(config)


def test_missing_shape_key_is_named():
    config = json.loads((fixture("dream-tiny") / "config.json").read_text())
    del config["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        dream_decoder_config(config)


# ------------------------------------------------------------------------------------------------
# format detection
# ------------------------------------------------------------------------------------------------
def test_detect_format():
    assert detect_format({"model_type": "llada", "architectures": ["LLaDAModelLM"]}).name == "llada"
    assert detect_format({"architectures": ["LLaDAModelLM"]}).name == "llada"
    assert detect_format({"model_type": "Dream", "architectures": ["DreamModel"]}).name == "dream"
    assert detect_format({"model_type": "mmdiff-decoder"}).name == "mmdiff-decoder"


@pytest.mark.parametrize("config", [
    {"model_type": "llava_llada", "architectures": ["LlavaLLaDAModelLM"]},
    {"model_type": "llada", "architectures": ["LLaDAModelLM"], "mm_vision_tower": "siglip"},
])
def test_llada_v_needs_the_multimodal_loader(config):
    with pytest.raises(ValueError, match="LLaDA-V.*mmdiff.load"):
        detect_format(config)


def test_unknown_model_type_is_named(tmp_path):
    d = copy_fixture("llada-tiny", tmp_path)
    edit_json(d / "config.json", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"'gpt2'.*GPT2LMHeadModel.*supported.*llada"):
        load_checkpoint(d)


# ------------------------------------------------------------------------------------------------
# broken checkpoints
# ------------------------------------------------------------------------------------------------
def test_missing_shard_is_named(tmp_path):
    d = copy_fixture("llada-tiny", tmp_path)
    (d / SHARD2).unlink()
    with pytest.raises(FileNotFoundError, match=SHARD2):
        load_checkpoint(d)


def test_no_weights_at_all(tmp_path):
    d = copy_fixture("dream-tiny", tmp_path)
    for name in (INDEX, SHARD1, SHARD2):
        (d / name).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(d)


def test_wrong_shape_names_the_tensor_and_both_shapes(tmp_path):
    d = copy_fixture("llada-tiny", tmp_path)
    name = "model.transformer.blocks.0.q_proj.weight"
    tensors = load_file(d / SHARD1)
    tensors[name] = tensors[name][:, :32].contiguous()  # (64, 32) instead of (64, 64)
    save_file(tensors, d / SHARD1, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name}.*\(64, 32\).*\(64, 64\)"):
        load_checkpoint(d)


def test_unknown_and_missing_tensors_are_named(tmp_path):
    d = copy_fixture("dream-tiny", tmp_path)
    tensors = load_file(d / SHARD2)
    tensors["model.layers.1.extra.weight"] = torch.zeros(3)
    del tensors["model.norm.weight"]
    save_file(tensors, d / SHARD2, metadata={"format": "pt"})
    index = json.loads((d / INDEX).read_text())
    index["weight_map"]["model.layers.1.extra.weight"] = SHARD2
    del index["weight_map"]["model.norm.weight"]
    (d / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"unknown tensors \['model.layers.1.extra.weight'\].*"
                                         r"missing tensors \['model.norm.weight'\]"):
        load_checkpoint(d)


def test_index_pointing_at_the_wrong_shard_is_named(tmp_path):
    d = copy_fixture("dream-tiny", tmp_path)
    index = json.loads((d / INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = SHARD1
    (d / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"model.norm.weight in {SHARD1}"):
        load_checkpoint(d)


def test_mixed_dtypes_need_an_explicit_dtype(tmp_path):
    d = copy_fixture("llada-tiny", tmp_path)
    tensors = load_file(d / SHARD2)
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, d / SHARD2, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="mixed dtypes"):
        load_checkpoint(d)
    assert next(load_checkpoint(d, dtype=torch.float32).parameters()).dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# dtype, device, meta
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_load_keeps_bf16_and_nothing_on_meta(kind):
    ids, ref = expected(kind)
    model = load_checkpoint(fixture(kind), dtype=torch.bfloat16)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and not t.is_meta for t in tensors)
    assert rel_err(logits_of(model, ids), ref) < 3e-2  # bf16 rounding only


def test_default_dtype_is_the_checkpoints():
    assert {p.dtype for p in load_checkpoint(fixture("llada-tiny")).parameters()} == {torch.float32}


def test_meta_leftovers_are_caught():
    with torch.device("meta"):
        model = Decoder(preset("tiny-test"))
    with pytest.raises(RuntimeError, match="meta device.*embed_tokens.weight"):
        assert_materialised(model)


# ------------------------------------------------------------------------------------------------
# special ids, tokenizer
# ------------------------------------------------------------------------------------------------
def test_special_ids_come_from_the_configs():
    assert load_pretrained(fixture("llada-tiny")).special_ids == SpecialIds(mask=500, pad=449, eos=449, bos=448)
    assert load_pretrained(fixture("dream-tiny")).special_ids == SpecialIds(mask=503, pad=480, eos=480, bos=480)


def test_special_ids_fallbacks():
    ids = special_ids_from_configs({"mask_token_id": 7}, {"eos_token_id": [3, 4], "bos_token_id": 1})
    assert ids == SpecialIds(mask=7, pad=3, eos=3, bos=1)  # eos from generation_config, pad = eos
    with pytest.raises(ValueError, match="mask_token_id"):
        special_ids_from_configs({"eos_token_id": 3}, {})


def test_tokenizer_is_loaded_only_when_present(tmp_path):
    assert load_tokenizer_if_present(fixture("llada-tiny")) is None
    from mmdiff.tokenizer import train_tokenizer

    d = copy_fixture("llada-tiny", tmp_path)
    train_tokenizer(["a tiny corpus for a tiny tokenizer"] * 4, vocab_size=300).save_pretrained(d)
    loaded = load_pretrained(d)
    assert loaded.tokenizer is not None and loaded.tokenizer("tiny")["input_ids"]
    dst = tmp_path / "converted"
    assert cli_main(["convert", str(d), str(dst)]) == 0
    assert (dst / "tokenizer.json").is_file() and (dst / "tokenizer_config.json").is_file()


# ------------------------------------------------------------------------------------------------
# mmdiff convert
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_convert_then_load_gives_identical_logits(kind, tmp_path):
    ids, _ = expected(kind)
    src = load_pretrained(fixture(kind))
    dst = tmp_path / "converted"
    assert cli_main(["convert", str(fixture(kind)), str(dst), "--dtype", "float32", "--device", "cpu"]) == 0
    want = logits_of(src.decoder, ids)
    assert torch.equal(logits_of(load_checkpoint(dst), ids), want)
    back = load_pretrained(dst)
    assert back.format == "mmdiff-decoder" and back.decoder.cfg == src.decoder.cfg
    assert back.special_ids == src.special_ids
    assert torch.equal(logits_of(back.decoder, ids), want)


def test_convert_to_bfloat16_stays_bfloat16(tmp_path):
    ids, _ = expected("dream-tiny")
    dst = tmp_path / "bf16"
    assert cli_main(["convert", str(fixture("dream-tiny")), str(dst), "--dtype", "bfloat16"]) == 0
    back = load_checkpoint(dst)  # default: the stored dtype
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    direct = load_checkpoint(fixture("dream-tiny"), dtype=torch.bfloat16)
    assert torch.equal(logits_of(back, ids), logits_of(direct, ids))


def test_convert_refuses_a_non_empty_destination_and_reports_errors(tmp_path, capsys):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / SPECIAL_TOKENS_NAME).write_text("{}")
    assert cli_main(["convert", str(fixture("llada-tiny")), str(dst)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# tables, generation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS.names())
def test_weight_tables_target_decoder_names(fmt):
    table = FORMATS.get(fmt).weights
    full = set(Decoder(DecoderConfig(**{**preset("tiny-test").to_dict(), "qkv_bias": True})).state_dict())
    assert set(expand_names(table, 2).values()) == full
    assert set(expand_names(dict.fromkeys(DECODER_NAMES, ""), 2)) == full
    assert len(set(table.values())) == len(table)  # one source per Decoder name


@pytest.mark.parametrize("kind", KINDS)
def test_sampler_fills_every_mask(kind):
    loaded = load_pretrained(fixture(kind))
    decoder, mask = loaded.decoder, loaded.special_ids.mask
    ids, _ = expected(kind)
    prompt = ids[:, :12]
    with torch.no_grad():
        denoiser = FullRecompute(decoder, decoder.embed(prompt), torch.ones_like(prompt, dtype=torch.bool))
        out = sample(denoiser, batch_size=2, config=SamplerConfig(gen_length=8, steps=4), mask_id=mask)
    assert out.tokens.shape == (2, 8) and not (out.tokens == mask).any()
    assert out.nfe == 4


def test_tokenizer_loading_never_runs_or_asks_about_checkpoint_code(tmp_path, tiny_tokenizer):
    d = copy_fixture("llada-tiny", tmp_path)  # its config.json has an auto_map to modeling code
    tiny_tokenizer.save_pretrained(d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="DreamTokenizer",
                  auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]})
    (d / "tokenizer_config.json").write_text(json.dumps(config))  # a class only the checkpoint's code defines
    tok = load_tokenizer_if_present(d)
    assert tok("tiny")["input_ids"] == tiny_tokenizer("tiny")["input_ids"]


# ------------------------------------------------------------------------------------------------
# load_multimodal on text-only directories
# ------------------------------------------------------------------------------------------------
def test_load_multimodal_wraps_a_text_only_checkpoint(tmp_path, tiny_tokenizer):
    from mmdiff.loading import load as load_multimodal

    d = copy_fixture("llada-tiny", tmp_path)
    tiny_tokenizer.save_pretrained(d)
    model = load_multimodal(d)
    assert model.vision is None and model.audio is None
    assert (model.special.mask, model.special.eos, model.special.bos) == (500, 449, 448)  # the checkpoint's ids
    ids, ref = expected("llada-tiny")
    assert rel_err(logits_of(model.decoder, ids), ref) < 1e-4
    assert model.generate(["how many red circles are there?"])[0].tokens
    dst = tmp_path / "converted"
    assert cli_main(["convert", str(d), str(dst)]) == 0
    back = load_multimodal(dst)  # special_tokens.json + the copied tokenizer
    assert back.special == model.special and torch.equal(logits_of(back.decoder, ids), logits_of(model.decoder, ids))


def test_load_multimodal_errors_and_mmdiff_directories(tmp_path, tiny_tokenizer):
    from mmdiff.loading import load as load_multimodal
    from mmdiff.model import ModelConfig, MultimodalDiffusionLM

    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_multimodal(fixture("llada-tiny"))
    plain = tmp_path / "plain"
    save_decoder(Decoder(preset("tiny-test")), plain)
    with pytest.raises(ValueError, match="no special_tokens.json"):
        load_multimodal(plain)
    own = MultimodalDiffusionLM(ModelConfig(decoder=preset("tiny-test", vocab_size=len(tiny_tokenizer))),
                                tiny_tokenizer)
    own.save_pretrained(tmp_path / "own")
    back = load_multimodal(tmp_path / "own")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in own.state_dict().items())
