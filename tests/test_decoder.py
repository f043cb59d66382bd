import json

import pytest
import torch

from mmdiff.checkpoints import load_checkpoint, save_decoder
from mmdiff.decoder import PRESETS, Decoder, DecoderConfig, LayerPlan, attention_mask, preset


def tiny(**kw) -> Decoder:
    return Decoder(preset("tiny-test", **kw)).eval()


def test_presets_are_valid_configs():
    for name in PRESETS:
        assert preset(name).head_dim % 2 == 0


@pytest.mark.parametrize("kw", [{}, {"qkv_bias": True, "tie_embeddings": True, "logit_shift": True}])
def test_save_load_roundtrip_identical_logits(tmp_path, kw):
    d = tiny(**kw)
    ids = torch.randint(0, 128, (2, 9))
    save_decoder(d, tmp_path)
    d2 = load_checkpoint(tmp_path)
    assert d2.cfg == d.cfg
    torch.testing.assert_close(d(ids).logits, d2(ids).logits, rtol=0, atol=0)


def reference_forward(d: Decoder, ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """Naive re-implementation from the maths: per-position loops, explicit softmax, float64."""
    cfg = d.cfg
    hd, H, Hkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    T = ids.shape[1]
    W = {k: v.double() for k, v in d.state_dict().items()}

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rope(v, pos):  # v (hd,), pairs (j, j + hd/2)
        half = hd // 2
        out = v.clone()
        for j in range(half):
            ang = pos * cfg.rope_theta ** (-2 * j / hd)
            c, s = torch.cos(torch.tensor(ang, dtype=torch.float64)), torch.sin(torch.tensor(ang, dtype=torch.float64))
            out[j] = v[j] * c - v[j + half] * s
            out[j + half] = v[j + half] * c + v[j] * s
        return out

    x = W["embed_tokens.weight"][ids[0]]  # (T, D)
    for l in range(cfg.n_layers):
        p = f"layers.{l}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = (h @ W[p + "attn.q_proj.weight"].T).view(T, H, hd)
        k = (h @ W[p + "attn.k_proj.weight"].T).view(T, Hkv, hd)
        v = (h @ W[p + "attn.v_proj.weight"].T).view(T, Hkv, hd)
        att = torch.zeros(T, H, hd, dtype=torch.float64)
        for i in range(T):
            for hh in range(H):
                kv = hh // (H // Hkv)
                keys = range(i + 1) if causal else range(T)
                scores = torch.stack([rope(q[i, hh], i) @ rope(k[j, kv], j) / hd ** 0.5 for j in keys])
                w = scores.softmax(0)
                att[i, hh] = sum(w[n] * v[j, kv] for n, j in enumerate(keys))
        x = x + att.reshape(T, -1) @ W[p + "attn.o_proj.weight"].T
        h = rms(x, W[p + "mlp_norm.weight"])
        g, u = h @ W[p + "mlp.gate_proj.weight"].T, h @ W[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ W[p + "mlp.down_proj.weight"].T
    return (rms(x, W["norm.weight"]) @ W["lm_head.weight"].T)[None].float()


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_matches_naive_reference(mode):
    """Causal mode is next-token prediction: logits at i see only tokens <= i (reference computation)."""
    d = tiny()
    ids = torch.randint(0, 128, (1, 6))
    torch.testing.assert_close(d(ids, attn_mode=mode).logits, reference_forward(d, ids, mode == "causal"),
                               rtol=1e-4, atol=1e-5)
    if mode == "causal":  # the future never changes the past
        other = torch.cat([ids[:, :3], torch.randint(0, 128, (1, 3))], 1)
        torch.testing.assert_close(d(ids, attn_mode=mode).logits[:, :3], d(other, attn_mode=mode).logits[:, :3])


def test_prefix_mask_prompt_ignores_response():
    d = tiny()
    ids = torch.randint(0, 128, (1, 10))
    other = ids.clone()
    other[:, 6:] = torch.randint(0, 128, (1, 4))
    a = d(ids, attn_mode="prefix", prefix_len=6, output_hidden_states=True).hidden_states[-1][:, :6]
    b = d(other, attn_mode="prefix", prefix_len=6, output_hidden_states=True).hidden_states[-1][:, :6]
    torch.testing.assert_close(a, b)


def test_left_padding_equals_unpadded():
    d = tiny()
    ids = torch.randint(0, 128, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    valid = torch.tensor([[False] * 3 + [True] * 6])
    for mode in ("bidirectional", "causal", "prefix"):
        a = d(ids, attn_mode=mode, prefix_len=4).logits
        b = d(padded, valid=valid, attn_mode=mode, prefix_len=7).logits[:, 3:]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_attention_mask_shapes_and_rules():
    valid = torch.ones(1, 4, dtype=torch.bool)
    causal = attention_mask("causal", valid)[0, 0]
    assert torch.equal(causal, torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    prefix = attention_mask("prefix", valid, prefix_len=2)[0, 0]
    assert prefix[0].tolist() == [True, True, False, False] and prefix[3].all()
    with pytest.raises(ValueError, match="attention mode"):
        attention_mask("sideways", valid)


class ProbeAt(LayerPlan):
    """Records the attention ``weights``' queries pay at ``layer``."""

    def __init__(self, layer: int, weights: torch.Tensor) -> None:
        self.layer, self.weights = layer, weights

    def probe(self, layer: int) -> torch.Tensor | None:
        return self.weights if layer == self.layer else None


class Skip(LayerPlan):
    def __init__(self, layers: set[int]) -> None:
        self.layers = layers

    def skip(self, layer: int) -> bool:
        return layer in self.layers


def test_hidden_states_and_attention_probe():
    d = tiny()
    ids = torch.randint(0, 128, (2, 7))
    probe = torch.zeros(2, 7)
    probe[:, -2:] = 1
    out = d(ids, output_hidden_states=True, plan=ProbeAt(1, probe))
    assert len(out.hidden_states) == d.cfg.n_layers + 1
    assert set(out.attn_received) == {1}
    torch.testing.assert_close(out.attn_received[1].sum(-1), torch.ones(2))  # each query's weights sum to 1
    torch.testing.assert_close(out.logits, d(ids).logits)  # extras do not change the result


def test_kv_cache_equals_full_forward():
    d = tiny()
    ids = torch.randint(0, 128, (2, 9))
    full = d(ids, attn_mode="prefix", prefix_len=5).logits[:, 5:]
    pre = d(ids[:, :5], attn_mode="prefix", prefix_len=5, store_cache=True)
    rest = d(ids[:, 5:], attn_mode="prefix", prefix_len=5, cache=pre.cache).logits
    torch.testing.assert_close(full, rest, rtol=1e-5, atol=1e-5)


def test_skip_layers_changes_output_and_none_is_noop():
    d = tiny()
    ids = torch.randint(0, 128, (1, 5))
    torch.testing.assert_close(d(ids, plan=Skip(set())).logits, d(ids).logits)
    assert not torch.allclose(d(ids, plan=Skip({1})).logits, d(ids).logits)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="divisible"):
        DecoderConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown DecoderConfig keys"):
        DecoderConfig.from_dict({"d_model": 32, "bogus": 1})


def test_broken_checkpoint_directory_errors(tmp_path):
    d = tiny()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    save_decoder(d, tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(tmp_path / "a")
    # wrong shapes: config says a bigger model than the weights
    save_decoder(d, tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg["d_model"] = 64
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="wrong shapes"):
        load_checkpoint(tmp_path / "b")
    # unknown keys in the weights
    from safetensors.torch import save_file

    save_decoder(d, tmp_path / "c")
    state = {k: v.contiguous() for k, v in d.state_dict().items()}
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(ValueError, match="unknown tensors .*extra.weight"):
        load_checkpoint(tmp_path / "c")
    # corrupt weights file
    save_decoder(d, tmp_path / "d")
    (tmp_path / "d" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "d")
