"""Vision and audio adapters at tiny sizes: shapes, pooling, position embeddings, masks, batching; their configs."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import timm  # noqa: F401  (backbone imports are paid at collection, not inside a test)
import torch
import torch.nn.functional as F
import transformers.models.whisper.modeling_whisper  # noqa: F401
from PIL import Image

from mmdiff.adapters import (
    ADAPTERS,
    AdapterConfig,
    CTCAdapterConfig,
    DualAdapterConfig,
    ProjectorConfig,
    adapter_config_from_dict,
    build_adapter,
)
from mmdiff.encoders.audio import AudioEncoderConfig, AudioFeatures, build_audio_encoder
from mmdiff.encoders.vision import build_vision_encoder, preset

IN, OUT = 12, 16
VOCAB = 20  # audio_ctc: distributions over this many tokens


def width(adapter) -> int:
    """Output width: decoder width, or the vocabulary for adapters that emit token distributions."""
    return VOCAB if adapter.emits == "vocab" else OUT


#: tiny sizes, each given to the kinds whose config has the field
TINY = dict(num_queries=3, qformer_layers=1, qformer_heads=2, n_encoder_layers=2, vocab_size=VOCAB, pool=2,
            grid=(4, 4), pos_embed=True)


def tiny_adapter_cfg(kind: str, **kw) -> AdapterConfig:
    cls = ADAPTERS.get(kind).config_class
    own = {f.name for f in dataclasses.fields(cls)}
    return cls(**{"kind": kind, "in_dim": IN, "out_dim": OUT, **{k: v for k, v in TINY.items() if k in own}, **kw})


def audio_feats(lengths: list[int], *, n_layers: int = 2, seed: int = 0) -> AudioFeatures:
    """Encoder-like features: zero beyond each clip's length, like AudioEncoder's output."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    layers = [torch.randn(len(lengths), T, IN, generator=g) * mask[..., None] for _ in range(n_layers)]
    return AudioFeatures(last=layers[-1], layers=layers, mask=mask)


def slice_feats(feats: AudioFeatures, i: int, n: int) -> AudioFeatures:
    """Clip ``i`` of a batch, alone, cut to its ``n`` frames."""
    return AudioFeatures(last=feats.last[i:i + 1, :n], layers=[h[i:i + 1, :n] for h in feats.layers],
                         mask=feats.mask[i:i + 1, :n])


@pytest.mark.parametrize("kind", ADAPTERS.names())
def test_adapter_builds_and_runs(kind):
    torch.manual_seed(0)
    adapter = build_adapter(tiny_adapter_cfg(kind)).eval()
    with torch.no_grad():
        if adapter.emits == "ids":  # vq_ids: code ids in, vocabulary ids out, nothing learned
            codes = torch.randint(0, IN, (2, 16))
            out = adapter(codes)
            assert torch.equal(out, codes + adapter.cfg.offset) and adapter.num_tokens(16) == 16
        elif adapter.modality == "image":
            out = adapter(torch.randn(2, 16, IN))
            assert adapter.num_tokens(16) == 4 and out.shape == (2, 4, width(adapter))
        else:
            assert adapter.modality == "audio"
            tokens, mask = adapter(audio_feats([10, 7]))
            n = [adapter.num_tokens(10), adapter.num_tokens(7)]
            if width(adapter) == VOCAB:  # CTC compression: content-dependent length, at most one per frame
                assert all(0 < k <= m for k, m in zip(mask.sum(1).tolist(), n))
                n = mask.sum(1).tolist()
            assert tokens.shape == (2, max(n), width(adapter)) and mask.dtype == torch.bool
            assert mask.sum(1).tolist() == n
            assert mask.cumsum(1).max(1).values.tolist() == n and (mask[:, :1]).all()  # valid tokens first
            assert (tokens[~mask] == 0).all()
            out = tokens
    assert torch.isfinite(out).all()


def test_expected_token_counts():
    assert build_adapter(tiny_adapter_cfg("audio_semantic")).num_tokens(125) == 32  # ceil(ceil(125/2)/2)
    assert build_adapter(tiny_adapter_cfg("audio_semantic", subsample=1)).num_tokens(7) == 7
    assert build_adapter(tiny_adapter_cfg("audio_acoustic")).num_tokens(125) == 3
    assert build_adapter(tiny_adapter_cfg("audio_dual")).num_tokens(125) == 35
    assert build_adapter(ProjectorConfig(kind="linear", in_dim=IN, out_dim=OUT)).num_tokens(81) == 81
    with pytest.raises(ValueError, match="15 tokens do not form the 4x4 grid"):
        build_adapter(tiny_adapter_cfg("linear")).num_tokens(15)


def test_pool_2x2_on_4x4_grid_matches_hand_computation():
    adapter = build_adapter(ProjectorConfig(kind="linear", in_dim=1, out_dim=1, pool=2, grid=(4, 4)))
    tokens = torch.arange(16.0).reshape(1, 16, 1)  # row-major 4x4 grid: row r, column c -> 4r + c
    pooled = adapter.pool_grid(tokens)
    assert pooled.flatten().tolist() == [(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4,
                                         (8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]
    w, b = adapter.proj.weight, adapter.proj.bias
    torch.testing.assert_close(adapter(tokens), pooled * w + b)


def test_mlp2x_gelu_is_llava_projector():
    adapter = build_adapter(ProjectorConfig(kind="mlp2x_gelu", in_dim=IN, out_dim=OUT))
    assert sorted(adapter.state_dict()) == ["proj.0.bias", "proj.0.weight", "proj.2.bias", "proj.2.weight"]
    mm_projector = {"0.weight": torch.randn(OUT, IN), "0.bias": torch.randn(OUT),
                    "2.weight": torch.randn(OUT, OUT), "2.bias": torch.randn(OUT)}  # LLaDA-V names
    adapter.proj.load_state_dict(mm_projector)
    x = torch.randn(2, 5, IN)
    expected = F.gelu(x @ mm_projector["0.weight"].T + mm_projector["0.bias"]) @ mm_projector["2.weight"].T
    torch.testing.assert_close(adapter(x), expected + mm_projector["2.bias"])


def test_pos_embed_differs_per_position():
    torch.manual_seed(0)
    cfg = dict(kind="mlp2x_gelu", in_dim=IN, out_dim=64, pool=3, grid=(9, 9))
    with_pe, without = build_adapter(ProjectorConfig(**cfg, pos_embed=True)), build_adapter(ProjectorConfig(**cfg))
    without.proj.load_state_dict(with_pe.proj.state_dict())
    same = torch.randn(1, 1, IN).expand(2, 81, IN)  # identical tokens at every position
    plain, embedded = without(same), with_pe(same)
    assert plain.shape == embedded.shape == (2, 9, 64)
    assert torch.allclose(plain, plain[:, :1].expand_as(plain))  # without: one value for all positions
    torch.testing.assert_close(embedded - plain, with_pe.pos_embed.expand_as(plain))
    assert torch.cdist(embedded[0], embedded[0]).add(100 * torch.eye(9)).min() > 1.0  # every position distinct
    assert 0.4 < with_pe.pos_embed.std().item() < 0.6  # N(0, 1) * 0.5


def test_norm_fixes_the_token_scale_before_the_position_embedding():
    torch.manual_seed(0)
    cfg = dict(kind="mlp2x_gelu", in_dim=IN, out_dim=64, pool=3, grid=(9, 9), pos_embed=True)
    normed, plain = build_adapter(ProjectorConfig(**cfg, norm=True)), build_adapter(ProjectorConfig(**cfg))
    plain.load_state_dict(normed.state_dict(), strict=False)
    assert "norm.weight" in normed.state_dict() and "norm.weight" not in plain.state_dict()
    for scale in (1e-2, 1.0, 1e3):  # whatever the encoder's feature scale
        x = torch.randn(2, 81, IN) * scale
        content = normed(x) - normed.pos_embed
        torch.testing.assert_close(content.pow(2).mean(-1), torch.ones(2, 9), atol=1e-3, rtol=1e-3)
        projected = plain(x) - plain.pos_embed  # same direction, unnormalised
        torch.testing.assert_close(content, projected * projected.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt())


@pytest.mark.parametrize("kind", [k for k in ADAPTERS.names() if ADAPTERS.get(k).modality == "audio"])
def test_audio_adapter_batch_equals_single_clips(kind):
    torch.manual_seed(0)
    adapter = build_adapter(tiny_adapter_cfg(kind)).eval()
    feats = audio_feats([12, 7])
    with torch.no_grad():
        batch, batch_mask = adapter(feats)
        for i, n in enumerate([12, 7]):
            alone, alone_mask = adapter(slice_feats(feats, i, n))
            k = adapter.num_tokens(n) if width(adapter) == OUT else alone.shape[1]
            assert alone.shape[1] == k and alone_mask.all() and batch_mask[i, :k].all() and not batch_mask[i, k:].any()
            torch.testing.assert_close(batch[i, :k], alone[0], atol=1e-5, rtol=0)


def test_ctc_adapter_with_layers_gives_a_clip_the_same_logits_alone_or_in_a_batch():
    """The transformer layers before the CTC head mask padded frames: a clip's logits do not depend on
    what it is batched with; layers=0 is the plain linear head."""
    torch.manual_seed(0)
    for stride in (1, 2, 3):
        adapter = build_adapter(tiny_adapter_cfg("audio_ctc", layers=2, hidden=8, heads=2, stride=stride)).eval()
        assert len(adapter.blocks.layers) == 2 and adapter.ctc.in_features == 8
        feats = audio_feats([12, 7])
        with torch.no_grad():
            batch = adapter.logits(feats)  # (2, 12, VOCAB + 1)
            assert batch.shape == (2, 12, VOCAB + 1)
            for i, n in enumerate([12, 7]):
                alone = adapter.logits(slice_feats(feats, i, n))[0]
                torch.testing.assert_close(batch[i, :n], alone, atol=1e-5, rtol=0)
        assert stride == 1 or torch.equal(alone[0], alone[stride - 1])  # one label per stride frames
    linear = build_adapter(tiny_adapter_cfg("audio_ctc"))
    assert not hasattr(linear, "blocks") and linear.ctc.in_features == IN
    with pytest.raises(ValueError, match="hidden 10 divisible by heads 4"):
        build_adapter(tiny_adapter_cfg("audio_ctc", layers=1, hidden=10, heads=4))


def test_dual_packs_semantic_then_acoustic_per_clip():
    torch.manual_seed(0)
    adapter = build_adapter(tiny_adapter_cfg("audio_dual")).eval()
    feats = audio_feats([12, 7])
    with torch.no_grad():
        tokens, mask = adapter(feats)
        s, s_mask = adapter.semantic(feats)
        a, _ = adapter.acoustic(feats)
    for i in range(2):
        n = int(s_mask[i].sum())
        torch.testing.assert_close(tokens[i, :n], s[i, :n])
        torch.testing.assert_close(tokens[i, n:n + 3], a[i])
        assert mask[i, :n + 3].all() and not mask[i, n + 3:].any()


def test_acoustic_fuses_layers_with_softmax_weights():
    torch.manual_seed(0)
    adapter = build_adapter(tiny_adapter_cfg("audio_acoustic")).eval()
    feats = audio_feats([9, 9])
    other = AudioFeatures(last=feats.last, layers=[feats.layers[0], torch.randn_like(feats.layers[1])],
                          mask=feats.mask)
    with torch.no_grad():
        adapter.layer_logits.copy_(torch.tensor([30.0, -30.0]))  # softmax ~ (1, 0): only layer 0 counts
        torch.testing.assert_close(adapter(feats)[0], adapter(other)[0])
        adapter.layer_logits.zero_()  # (1/2, 1/2): layer 1 matters
        assert not torch.allclose(adapter(feats)[0], adapter(other)[0])
    with pytest.raises(ValueError, match="n_encoder_layers=2 layers but the encoder returned 1"):
        adapter(AudioFeatures(last=feats.last, layers=feats.layers[:1], mask=feats.mask))


def test_adapter_config_validation():
    errors = {
        "linear: grid .* is required when pool > 1": dict(kind="linear", pool=2),
        "linear: pool must be >= 1": dict(kind="linear", pool=0),
        r"mlp2x_gelu: grid \(9, 9\) is not divisible by pool 2": dict(kind="mlp2x_gelu", pool=2, grid=[9, 9]),
        "audio_semantic: subsample must be a power of 2": dict(kind="audio_semantic", subsample=3),
        "audio_dual: out_dim 6 is not divisible by qformer_heads 4": dict(kind="audio_dual", out_dim=6),
        "audio_acoustic: n_encoder_layers, num_queries": dict(kind="audio_acoustic", num_queries=0),
        "audio_ctc: vocab_size .* must be set": dict(kind="audio_ctc"),
    }
    for message, fields in errors.items():
        with pytest.raises(ValueError, match=message):
            build_adapter(adapter_config_from_dict({"in_dim": 4, "out_dim": 4, **fields}))
    with pytest.raises(ValueError, match=r"unknown ProjectorConfig keys \['proj'\]"):
        adapter_config_from_dict({"kind": "linear", "in_dim": 1, "out_dim": 1, "proj": "x"})
    with pytest.raises(ValueError, match="Unknown adapter 'mlp3x'; known: audio_acoustic, audio_ctc, audio_dual"):
        build_adapter(ProjectorConfig(kind="mlp3x", in_dim=4, out_dim=4))
    with pytest.raises(TypeError, match="'audio_ctc' takes a CTCAdapterConfig, got a ProjectorConfig"):
        build_adapter(ProjectorConfig(kind="audio_ctc", in_dim=4, out_dim=4))
    with pytest.raises(TypeError, match="'audio_semantic' takes a SemanticAdapterConfig, got a DualAdapterConfig"):
        build_adapter(DualAdapterConfig(kind="audio_semantic", in_dim=4, out_dim=4))
    with pytest.raises(TypeError, match="AdapterConfig is the base of the per-kind configs"):
        AdapterConfig(kind="linear", in_dim=4, out_dim=4)


@pytest.mark.parametrize("kind", ADAPTERS.names())
def test_every_adapter_declares_modality_output_and_config(kind):
    cls = ADAPTERS.get(kind)
    assert cls.modality in ("image", "audio") and cls.emits in ("embeddings", "vocab", "ids")
    assert issubclass(cls.config_class, AdapterConfig) and cls.config_class is not AdapterConfig


@pytest.mark.parametrize("kind", ADAPTERS.names())
def test_adapter_config_round_trip(kind):
    """A kind's config writes only its own fields and reads back (JSON lists -> tuples) as the same
    class, which builds the same adapter."""
    cfg = tiny_adapter_cfg(kind)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["kind"] == kind and set(data) == {f.name for f in dataclasses.fields(cfg)}
    back = adapter_config_from_dict(data)
    assert type(back) is type(cfg) and back == cfg
    shapes = {k: v.shape for k, v in build_adapter(cfg).state_dict().items()}
    assert {k: v.shape for k, v in build_adapter(back).state_dict().items()} == shapes


#: an adapter section as every kind wrote it before issue #18: one config with all kinds' fields
OLD_FLAT = {"kind": "audio_semantic", "in_dim": 4, "out_dim": 4, "pool": 1, "grid": None, "norm": False,
            "pos_embed": False, "subsample": 2, "num_queries": 16, "qformer_layers": 2, "qformer_heads": 4,
            "n_encoder_layers": 1, "vocab_size": 0, "words": None, "word_ids": None, "position_weight": 1.0,
            "empty_weight": 1.0, "beam_width": 8, "lm_weight": 0.3, "length_bonus": 1.5}


def test_old_flat_adapter_section_reads_as_the_kinds_own_config():
    cfg = adapter_config_from_dict(OLD_FLAT)
    assert cfg == tiny_adapter_cfg("audio_semantic", in_dim=4, out_dim=4, subsample=2)
    assert cfg.to_dict() == {"kind": "audio_semantic", "in_dim": 4, "out_dim": 4, "subsample": 2}


@pytest.mark.parametrize("fields, message", [
    (dict(pool=2), "src: pool=2 is not supported: the audio_semantic adapter has no such field .* old default pool=1"),
    (dict(kind="linear", subsample=4, position_weight=3.0), "position_weight=3.0 is not supported: the linear adapter"),
    (dict(kind="cell_words"), "src: adapter kind 'cell_words' is not supported: the lexical vision adapter was an "
                              "experiment and was removed"),
    (dict(kind="mlp3x"), "src: Unknown adapter 'mlp3x'; known: audio_acoustic, audio_ctc, audio_dual, "
                         "audio_semantic, diffa, linear, mlp2x_gelu"),
])
def test_adapter_section_errors_name_the_field_or_kind(fields, message):
    with pytest.raises(ValueError, match=message):
        adapter_config_from_dict({**OLD_FLAT, **fields}, source="src")


def test_shipped_scene_pipeline_gives_one_token_per_cell():
    """mmdiff-scenes: 64 px scene -> 9x9 patch grid -> 3x3 pooling -> 9 decoder tokens."""
    enc = build_vision_encoder(preset("mmdiff-scenes")).eval()
    adapter = build_adapter(ProjectorConfig(kind="mlp2x_gelu", in_dim=enc.out_dim, out_dim=32, pool=3,
                                          grid=enc.grid, pos_embed=True))
    with torch.no_grad():
        tokens = adapter(enc(enc.preprocess([Image.new("RGB", (64, 64), (10, 200, 30))] * 2)))
    assert adapter.num_tokens(enc.num_tokens) == 9 and tokens.shape == (2, 9, 32)


def test_audio_encoder_to_dual_adapter():
    torch.manual_seed(0)
    enc = build_audio_encoder(AudioEncoderConfig(d_model=IN, encoder_layers=2, encoder_attention_heads=2,
                                                 encoder_ffn_dim=24, max_source_positions=100, max_seconds=2.0,
                                                 output_layers=(1, -1))).eval()
    adapter = build_adapter(tiny_adapter_cfg("audio_dual")).eval()
    t = torch.arange(16000 * 3 // 2) / 16000
    clips = [((0.3 * torch.sin(2 * math.pi * 330 * t[:n])).numpy(), 16000) for n in (16000, 24000)]
    with torch.no_grad():
        tokens, mask = adapter(enc(*enc.preprocess(clips)))
    assert mask.sum(1).tolist() == [adapter.num_tokens(50), adapter.num_tokens(75)] == [13 + 3, 19 + 3]
    assert tokens.shape == (2, 22, OUT)


def test_ctc_adapter_drops_blanks_and_merges_repeats():
    """Frames labelled [blank, 5, 5, blank, 5, 7, 7, blank] compress to the tokens 5, 5, 7; padding frames
    never count; an all-blank clip keeps its least-blank frame."""
    V = 9
    adapter = build_adapter(CTCAdapterConfig(kind="audio_ctc", in_dim=V + 1, out_dim=OUT, vocab_size=V)).eval()
    with torch.no_grad():
        adapter.ctc.weight.copy_(torch.eye(V + 1) * 20)
        adapter.ctc.bias.zero_()
    blank = V
    labels = [blank, 5, 5, blank, 5, 7, 7, blank]
    one_hot = torch.nn.functional.one_hot(torch.tensor(labels), V + 1).float()  # (8, V+1)
    quiet = torch.zeros(8, V + 1)
    quiet[:, blank] = 1.0
    quiet[3, blank], quiet[3, 2] = 0.6, 0.4  # frame 3 is the least blank
    last = torch.stack([one_hot, quiet])  # (2, 8, V+1)
    mask = torch.tensor([[True] * 8, [True] * 8])
    with torch.no_grad():
        tokens, tmask = adapter(AudioFeatures(last=last, layers=[last], mask=mask))
    assert tmask.sum(1).tolist() == [3, 1]
    assert tokens[0, :3].argmax(-1).tolist() == [5, 5, 7] and tokens.shape[-1] == V
    torch.testing.assert_close(tokens[tmask].sum(-1), torch.ones(4))  # distributions without the blank
    assert tokens[1, 0].argmax().item() == 2
    with torch.no_grad():  # a padded copy of clip 0 gives the same positions
        padded = torch.cat([one_hot, one_hot[:3]])[None]
        p_tok, p_mask = adapter(AudioFeatures(last=padded, layers=[padded], mask=torch.arange(11)[None] < 8))
    torch.testing.assert_close(p_tok[p_mask], tokens[0, :3])
