"""The masked-diffusion language-model decoder: a Llama-style transformer.

RMSNorm -> RoPE attention (grouped-query, optional q/k/v bias) -> SwiGLU MLP -> Block -> Decoder.
The same module expresses LLaDA-8B (MHA, no bias, untied head, theta 5e5) and Dream-7B (GQA, q/k/v
bias, theta 1e6, logits shifted by one position) as configs.

The attention mask is switchable per call (:func:`attention_mask`):

* ``bidirectional``: every token sees every token (masked diffusion, LLaDA / Dream),
* ``causal``: token i sees tokens <= i (the autoregressive phase of Dimple's recipe, AR baseline),
* ``prefix``: prompt/media tokens see only the prompt; response tokens see everything (LaViDa's
  prefix-DLM), so the prompt's keys/values never depend on the response and can be cached exactly.

Positions are 1-D RoPE positions by default. With ``mrope_section`` set, RoPE is Qwen2-VL's
multimodal RoPE (M-RoPE, Wang et al. 2024, §2.1; Dimple's LLM): each position has a (temporal,
height, width) triple and the head's frequency bands are split among the three axes. Text has
three equal components, where M-RoPE equals 1-D RoPE; image tokens get their grid coordinates
(:func:`multimodal_positions`).

Fast inference goes through one optional argument of :meth:`Decoder.forward`: a :class:`LayerPlan`,
consulted at each layer boundary, may drop tokens from that layer on (visual-token pruning: FastV,
DivPrune, VTW) or skip the layer. The decoder reports the shapes it actually ran
(:class:`LayerShape`) so FLOPs can be counted from them (``mmdiff.flops``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .io import JsonConfig

AttnMode = Literal["bidirectional", "causal", "prefix"]
ATTN_MODES: tuple[str, ...] = ("bidirectional", "causal", "prefix")


@dataclass
class DecoderConfig(JsonConfig):
    """Shape and conventions of a decoder. Saved as JSON beside the weights."""

    vocab_size: int = 512  # rows of the embedding and of the output head
    d_model: int = 256  # residual width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 4  # key/value heads (< n_heads: grouped-query attention)
    mlp_hidden: int = 704  # SwiGLU hidden width
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2 / Dream)
    tie_embeddings: bool = False  # output head shares the embedding matrix
    logit_shift: bool = False  # Dream: the prediction for position i is read at position i-1
    attn_mode: str = "bidirectional"  # default mask: bidirectional | causal | prefix
    max_seq_len: int = 2048  # longest sequence accepted
    mrope_section: list[int] | None = None  # M-RoPE bands (t, h, w) summing to head_dim/2; None = 1-D RoPE

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.attn_mode not in ATTN_MODES:
            raise ValueError(f"attn_mode {self.attn_mode!r} not in {ATTN_MODES}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head dimension must be even for RoPE")
        if self.mrope_section is not None:
            self.mrope_section = [int(s) for s in self.mrope_section]  # JSON gives a list
            if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
                raise ValueError(f"mrope_section {self.mrope_section} must be 3 bands (t, h, w) summing to "
                                 f"head_dim/2 = {self.head_dim // 2}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


#: Named presets (data, not code). ``llada-8b`` / ``dream-7b`` are the released shapes.
PRESETS: dict[str, dict] = {
    "tiny-test": dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=64),
    "mmdiff-tiny": dict(vocab_size=512, d_model=256, n_layers=6, n_heads=8, n_kv_heads=8, mlp_hidden=704),
    "llada-8b": dict(vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                     mlp_hidden=12288, rope_theta=500000.0, norm_eps=1e-5, max_seq_len=4096),
    "dream-7b": dict(vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                     mlp_hidden=18944, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True, logit_shift=True,
                     max_seq_len=131072),
}


def preset(name: str, **overrides) -> DecoderConfig:
    """A :class:`DecoderConfig` from a named preset, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"Unknown decoder preset {name!r}; known: {sorted(PRESETS)}")
    return DecoderConfig(**{**PRESETS[name], **overrides})


# ------------------------------------------------------------------------------------------------
# masks, positions, RoPE
# ------------------------------------------------------------------------------------------------
def attention_mask(mode: str, key_valid: torch.Tensor, *, q_len: int | None = None,
                   prefix_len: int | torch.Tensor = 0) -> torch.Tensor:
    """Boolean attention mask (B, 1, Tq, Tk); True = may attend.

    The queries are the last ``q_len`` positions of the ``Tk`` keys (all of them by default), so the
    same function serves a full forward and a forward over new tokens with cached keys.

    Args:
        mode: ``bidirectional``, ``causal`` or ``prefix``.
        key_valid: (B, Tk) bool, False at padding.
        q_len: number of query positions (the last ones).
        prefix_len: ``prefix`` mode: positions ``< prefix_len`` form the prompt (int or (B,) tensor).
    """
    B, Tk = key_valid.shape
    Tq = Tk if q_len is None else q_len
    qpos = torch.arange(Tk - Tq, Tk, device=key_valid.device)[:, None]  # (Tq, 1) absolute
    kpos = torch.arange(Tk, device=key_valid.device)[None, :]  # (1, Tk)
    allowed = key_valid[:, None, :].expand(B, Tq, Tk)  # (B, Tq, Tk)
    if mode == "causal":
        allowed = allowed & (kpos <= qpos)
    elif mode == "prefix":
        p = torch.as_tensor(prefix_len, device=key_valid.device).reshape(-1, 1, 1)  # (B|1, 1, 1)
        allowed = allowed & ((qpos >= p) | (kpos < p))
    elif mode != "bidirectional":
        raise ValueError(f"attention mode {mode!r} not in {ATTN_MODES}")
    allowed = allowed | (kpos == qpos)  # a padding query still sees itself: no empty softmax row
    return allowed[:, None]  # (B, 1, Tq, Tk)


def positions_from_valid(valid: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) counting only valid tokens, so left padding does not shift positions."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, *,
                 mrope_section: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, 1, T, head_dim) for RoPE (Su et al. 2021), computed in float32.

    inv_freq_j = theta^(-2j/d); the two halves of each head share frequencies ("rotate_half").
    With ``mrope_section`` (t, h, w) (M-RoPE, Qwen2-VL): ``positions`` is (3, B, T) (or (B, T), the
    same for all three axes) and frequency band k of sizes (t, h, w) rotates by axis k's position.

    Args:
        positions: (B, T) positions, or (3, B, T) (temporal, height, width) positions for M-RoPE.
        head_dim: the head width d.
        theta: RoPE base.
        mrope_section: M-RoPE band sizes summing to d/2, or None for 1-D RoPE.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    if mrope_section is None:
        if positions.dim() != 2:
            raise ValueError(f"1-D RoPE takes (B, T) positions, got shape {tuple(positions.shape)}")
        ang = positions.float()[..., None] * inv_freq  # (B, T, d/2)
    else:
        if positions.dim() == 2:
            positions = positions.expand(3, *positions.shape)
        per_axis = positions.float()[..., None] * inv_freq  # (3, B, T, d/2)
        bands = per_axis.split(list(mrope_section), dim=-1)  # band k: (3, B, T, s_k)
        ang = torch.cat([band[k] for k, band in enumerate(bands)], dim=-1)  # (B, T, d/2)
    ang = torch.cat([ang, ang], dim=-1)[:, None]  # (B, 1, T, d)
    return ang.cos(), ang.sin()


def multimodal_positions(spans: Sequence[int | tuple[int, int, int]], *, start: int = 0) -> torch.Tensor:
    """M-RoPE positions (3, T) of a sequence of text runs and media grids (Qwen2-VL's ``get_rope_index``).

    A text run of n tokens continues 1-D from the next free position p (all three axes p, p+1, ...).
    A media grid (t, h, w) of t*h*w tokens (row-major, time slowest) gets (p + i_t, p + i_h, p + i_w).
    The next free position is one past the largest position used so far.

    Args:
        spans: text run lengths (int) and media token grids ((t, h, w) tuples), in sequence order.
        start: the first position.
    """
    parts, nxt = [], start
    for span in spans:
        if isinstance(span, int):
            pos = (nxt + torch.arange(span)).expand(3, span)  # (3, n)
        else:
            t, h, w = span
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
            pos = nxt + grid.reshape(3, -1)  # (3, t*h*w)
        parts.append(pos)
        if pos.numel():
            nxt = int(pos.max()) + 1
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)


def next_positions(prompt_positions: torch.Tensor, prompt_valid: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) 1-D positions of ``length`` tokens after a prompt: one past its largest valid
    position (= the number of valid tokens for 1-D positions), as Qwen2-VL's ``get_rope_index``
    continues text after media.

    Args:
        prompt_positions: (B, P) or (3, B, P) prompt positions.
        prompt_valid: (B, P) bool, False at padding.
        length: tokens to place.
    """
    pos = prompt_positions if prompt_positions.dim() == 3 else prompt_positions[None]
    last = pos.masked_fill(~prompt_valid[None], -1).amax(dim=(0, 2))  # (B,)
    return last[:, None] + 1 + torch.arange(length, device=pos.device)  # (B, length)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (j, j + d/2) of ``x`` (B, H, T, d): x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


@dataclass
class KVCache:
    """Keys/values of already-processed positions, one entry per layer: the explicit cache object.

    ``keys[i]`` is (B, H_kv, T_cached, d). The sampler owns it; the decoder reads it and, when asked
    to ``store``, appends the keys/values of the positions it has just processed. A token that a
    :class:`LayerPlan` dropped before layer i has no keys there: its slot holds zeros and
    ``alive[i]`` (B, T_cached) is False at it (``alive[i]`` None = every slot holds keys).
    """

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    alive: list[torch.Tensor | None] = field(default_factory=list)

    @classmethod
    def empty(cls, n_layers: int) -> "KVCache":
        return cls([None] * n_layers, [None] * n_layers, [None] * n_layers)

    @property
    def length(self) -> int:
        k = next((k for k in self.keys if k is not None), None)
        return 0 if k is None else k.shape[2]

    def alive_at(self, layer: int) -> torch.Tensor | None:
        """(B, T_cached) bool of the slots holding keys at ``layer``, or None when all do."""
        return self.alive[layer] if layer < len(self.alive) else None

    def crop(self, length: int) -> None:
        """Keep the first ``length`` cached positions."""
        self.keys = [None if k is None else k[:, :, :length] for k in self.keys]
        self.values = [None if v is None else v[:, :, :length] for v in self.values]
        self.alive = [None if a is None else a[:, :length] for a in self.alive]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, *, rows: torch.Tensor | None = None,
               n_new: int | None = None) -> None:
        """Append the keys/values (B, H_kv, T', d) of new positions at ``layer``.

        Args:
            rows: (B, T') which of the ``n_new`` new positions ``k``/``v`` belong to (the others were
                dropped before this layer and get empty, dead slots); None = all of them, in order.
            n_new: number of new positions (with ``rows``).
        """
        B, Hkv, _, d = k.shape
        alive_new = None
        if rows is not None:
            idx = rows[:, None, :, None].expand(B, Hkv, rows.shape[1], d)
            k = k.new_zeros(B, Hkv, n_new, d).scatter(2, idx, k)  # (B, Hkv, n_new, d)
            v = v.new_zeros(B, Hkv, n_new, d).scatter(2, idx, v)
            alive_new = torch.zeros(B, n_new, dtype=torch.bool, device=k.device).scatter(1, rows, True)
        while len(self.alive) < len(self.keys):
            self.alive.append(None)
        old_k, old_a = self.keys[layer], self.alive[layer]
        if alive_new is not None or old_a is not None:
            Tc = 0 if old_k is None else old_k.shape[2]
            old_a = torch.ones(B, Tc, dtype=torch.bool, device=k.device) if old_a is None else old_a
            alive_new = torch.ones(B, k.shape[2], dtype=torch.bool, device=k.device) if alive_new is None else alive_new
            self.alive[layer] = torch.cat([old_a, alive_new], dim=1)  # (B, Tc+T)
        self.keys[layer] = k if old_k is None else torch.cat([old_k, k], dim=2)
        self.values[layer] = v if old_k is None else torch.cat([self.values[layer], v], dim=2)


class LayerPlan:
    """What one decoder call leaves out: consulted by :meth:`Decoder.forward` at layer boundaries.

    Positions are absolute over the call's keys: ``0 .. Tc-1`` are the cached positions and
    ``Tc .. Tc+T-1`` the call's new tokens. The defaults change nothing; subclasses implement token
    pruning (FastV, DivPrune, VTW) and layer skipping (``mmdiff.sampling.pruning``).
    """

    def keep(self, layer: int, received: torch.Tensor | None) -> torch.Tensor | None:
        """Before ``layer`` runs: (B, Tc+T) bool, False at positions to drop from here on, or None.

        A dropped new token stops running (its row leaves the batch, saving its projections and
        MLP); a dropped cached position is masked out of attention. Every row must drop the same
        number of new tokens.

        Args:
            received: (B, Tc+T) attention paid to each position by the :meth:`probe` queries at
                the latest probed layer (zero at dropped positions), or None before any probe.
        """
        return None

    def skip(self, layer: int) -> bool:
        """True to skip ``layer`` (its residual update is left out)."""
        return False

    def probe(self, layer: int) -> torch.Tensor | None:
        """(B, T) weights over the call's new tokens whose attention at ``layer`` to score, or None."""
        return None


class LayerShape(NamedTuple):
    """The work one layer did for one sequence of a call (for FLOP counting)."""

    rows: int  # tokens that ran through the layer (queries, projections, MLP)
    keys: int  # keys each query attended over (cached slots gathered + new; mask-only exclusions included)
    probe_rows: int = 0  # queries whose attention scores were also computed explicitly (probe)


class Attention(nn.Module):
    """Multi-head / grouped-query attention with RoPE, via ``scaled_dot_product_attention``."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, *,
                cache: KVCache | None = None, layer: int = 0, store: bool = False,
                probe: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                n_new: int | None = None,
                cached_cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend; returns (output (B, T, D), attention received per key (B, Tk) or None).

        Args:
            probe: (B, T) float weights over query positions; when given, also return the
                head-averaged attention those queries pay to every key (FastV-style scores).
            rows, n_new: the call's tokens were pruned: ``x`` holds rows ``rows`` (B, T) of
                ``n_new`` new tokens (for storing keys at the right cache slots).
            cached_cols: (B, Tc') the cached slots to attend (gathered from the cache), or None for all.
        """
        B, T, _ = x.shape
        hd, H, Hkv = self.cfg.head_dim, self.cfg.n_heads, self.cfg.n_kv_heads
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_new, v_new = k, v
        if cache is not None and cache.keys[layer] is not None:
            ck, cv = cache.keys[layer], cache.values[layer]  # (B, Hkv, Tc, hd)
            if cached_cols is not None:
                idx = cached_cols[:, None, :, None].expand(B, Hkv, -1, hd)
                ck, cv = ck.gather(2, idx), cv.gather(2, idx)  # (B, Hkv, Tc', hd)
            k = torch.cat([ck, k], dim=2)  # (B, Hkv, Tc'+T, hd)
            v = torch.cat([cv, v], dim=2)
        if store and cache is not None:
            cache.append(layer, k_new, v_new, rows=rows, n_new=n_new)
        if Hkv != H:  # GQA: each kv head serves H/Hkv consecutive query heads
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        received = None
        if probe is not None:
            qi = probe.ne(0).any(0).nonzero().squeeze(-1)  # (n,) only queries some row weighs
            scores = (q[:, :, qi].float() @ k.float().transpose(-1, -2)) / math.sqrt(hd)  # (B, H, n, Tk)
            if mask is not None:
                scores = scores.masked_fill(~mask[:, :, qi], float("-inf"))
            attn = scores.softmax(-1).mean(1)  # (B, n, Tk)
            w = probe.float() / probe.float().sum(-1, keepdim=True).clamp(min=1e-9)  # (B, T)
            received = (w[:, qi, None] * attn).sum(1)  # (B, Tk)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * hd)), received


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, mask, **attn_kwargs):
        a, received = self.attn(self.attn_norm(x), cos, sin, mask, **attn_kwargs)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), received


class _Pruned:
    """Book-keeping of one forward call under a :class:`LayerPlan`: which new tokens still run
    (``rows``), which positions were dropped (``dead``), and the last state of dropped rows."""

    def __init__(self, B: int, T: int, Tc: int, device: torch.device) -> None:
        self.B, self.T, self.Tc, self.device = B, T, Tc, device
        self.rows: torch.Tensor | None = None  # (B, T') indices of the new tokens still running; None = all
        self.dead: torch.Tensor | None = None  # (B, Tc+T) bool, positions dropped in this call
        self._full: torch.Tensor | None = None  # (B, T, D) latest state of every new token
        self.cached_cols: torch.Tensor | None = None  # (B, Tc') cached slots the current layer attends; None = all
        self.cached_ok: torch.Tensor | None = None  # (B, Tc') False at the padding of rows with fewer live slots

    def _cur(self) -> torch.Tensor:
        return torch.arange(self.T, device=self.device).expand(self.B, -1) if self.rows is None else self.rows

    def drop(self, keep: torch.Tensor, x: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Apply a plan's ``keep`` (B, Tc+T): mark positions dead, remove dead rows from x / RoPE."""
        if keep.shape != (self.B, self.Tc + self.T):
            raise ValueError(f"LayerPlan.keep returned shape {tuple(keep.shape)}, expected "
                             f"{(self.B, self.Tc + self.T)} (cached + new positions)")
        if bool(keep.all()):
            return x, cos, sin
        self.dead = ~keep if self.dead is None else self.dead | ~keep
        cur = self._cur()  # (B, T')
        alive = ~self.dead.gather(1, self.Tc + cur)  # (B, T')
        if bool(alive.all()):
            return x, cos, sin
        counts = alive.sum(1)
        if bool((counts != counts[0]).any()):
            raise ValueError(f"LayerPlan.keep must drop the same number of new tokens in every row, got "
                             f"{counts.tolist()} kept")
        D = x.shape[-1]
        self._full = self.full(x)
        sel = alive.nonzero()[:, 1].view(self.B, -1)  # (B, T'') ascending
        self.rows = cur.gather(1, sel)
        x = x.gather(1, sel[..., None].expand(-1, -1, D))  # (B, T'', D)
        idx = sel[:, None, :, None].expand(-1, 1, -1, cos.shape[-1])
        return x, cos.gather(2, idx), sin.gather(2, idx)

    def full(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D): ``x`` at the running rows, the last state elsewhere."""
        if self.rows is None:
            return x
        base = self._full if self._full is not None else x.new_zeros(self.B, self.T, x.shape[-1])
        return base.scatter(1, self.rows[..., None].expand(-1, -1, x.shape[-1]), x)

    def rows_of(self, weights: torch.Tensor) -> torch.Tensor:
        """Per-new-token weights (B, T) restricted to the running rows (B, T')."""
        return weights if self.rows is None else weights.gather(1, self.rows)

    def select_cached(self, has_cached: bool, alive: torch.Tensor | None) -> torch.Tensor | None:
        """Choose the cached slots a layer attends: every slot, or only the live ones gathered.

        A cached slot is left out when the plan dropped its position in this call (``dead``) or
        when the cache holds no keys there (``alive`` False: the position was dropped when it was
        stored). Leaving such slots out of the key tensor, rather than masking them, gives the same
        attention (a masked key has softmax weight exactly 0) and removes their QKᵀ and AV work, so a
        pruned prompt saves attention FLOPs with the cache too. Rows with fewer live slots are padded
        with some of their dead slots, masked (``cached_ok``).

        Returns:
            (B, Tc') the gathered slots, ascending, or None when every slot is attended.
        """
        self.cached_cols = self.cached_ok = None
        if not has_cached:
            return None
        ok = torch.ones(self.B, self.Tc, dtype=torch.bool, device=self.device)
        if self.dead is not None:
            ok &= ~self.dead[:, :self.Tc]
        if alive is not None:
            ok &= alive
        if bool(ok.all()):
            return None
        pos = torch.arange(self.Tc, device=self.device)
        order = (pos + self.Tc * (~ok).long()).argsort(dim=1)  # live slots first, each group ascending
        n = max(int(ok.sum(1).max()), 1)
        cols = order[:, :n].sort(dim=1).values  # (B, Tc') live slots (and padding) in position order
        self.cached_cols, self.cached_ok = cols, ok.gather(1, cols)
        return cols

    def key_positions(self, has_cached: bool) -> torch.Tensor:
        """(B, Tk) absolute position of each key slot of a layer: cached ones, then running rows."""
        cols = self.Tc + self._cur()
        if has_cached:
            cached = (torch.arange(self.Tc, device=self.device).expand(self.B, -1) if self.cached_cols is None
                      else self.cached_cols)
            cols = torch.cat([cached, cols], dim=1)
        return cols

    def to_positions(self, r: torch.Tensor, *, has_cached: bool) -> torch.Tensor:
        """Per-key-slot values (B, Tk) -> per-position (B, Tc+T), zero at positions not attended."""
        cols = self.key_positions(has_cached)
        if cols.shape[1] == self.Tc + self.T and self.rows is None:
            return r
        return r.new_zeros(self.B, self.Tc + self.T).scatter(1, cols, r)

    def mask(self, base: torch.Tensor | None, *, has_cached: bool) -> torch.Tensor | None:
        """A layer's attention mask (B, 1, T', Tk) from the call's ``base`` (B, 1, T, Tc+T) or None,
        over the key slots :meth:`select_cached` chose."""
        if self.rows is None and self.cached_cols is None and (has_cached or self.Tc == 0):
            return base
        cur, cols = self._cur(), self.key_positions(has_cached)  # (B, T'), (B, Tk)
        Tq, Tk = cur.shape[1], cols.shape[1]
        ok = torch.ones(self.B, Tk, dtype=torch.bool, device=self.device)  # running rows are never dead
        if self.cached_ok is not None:  # the padding of rows with fewer live cached slots
            ok[:, :self.cached_ok.shape[1]] &= self.cached_ok
        if base is None and bool(ok.all()):
            return None  # bidirectional, nothing masked: keep the unmasked attention kernel
        m = base if base is not None else torch.ones(self.B, 1, self.T, self.Tc + self.T, dtype=torch.bool,
                                                      device=self.device)
        m = m.gather(2, cur[:, None, :, None].expand(-1, 1, -1, m.shape[-1]))  # (B, 1, T', Tc+T)
        m = m.gather(3, cols[:, None, None, :].expand(-1, 1, Tq, -1))  # (B, 1, T', Tk)
        m = m & ok[:, None, None, :]
        eye = torch.eye(Tq, dtype=torch.bool, device=self.device)
        return m | F.pad(eye, (Tk - Tq, 0))  # a query still sees itself: no empty softmax row


@dataclass
class DecoderOutput:
    """What a forward pass returns: logits plus the optional extras that were asked for."""

    logits: torch.Tensor  # (B, T, V), raw: position i's own output (see Decoder.shifted)
    hidden_states: list[torch.Tensor] | None = None  # n_layers + 1 tensors (B, T, D) when requested
    attn_received: dict[int, torch.Tensor] | None = None  # probed layer -> (B, Tc+T) attention received
    cache: KVCache | None = None
    layers_run: list[LayerShape | None] | None = None  # per layer, per sequence; None = skipped


class Decoder(nn.Module):
    """Token/embedding input -> logits. Stages: ``embed``, ``forward_layers``, ``forward_head``."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # a tied head reuses the embedding matrix and owns no parameter of its own
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    # -- stages ----------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) embeddings."""
        return self.embed_tokens(input_ids)

    def forward_head(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) final hidden states -> (B, T, V) logits."""
        h = self.norm(h)
        return F.linear(h, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)

    def shifted(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, 1+L, V) raw logits of the position before a span and of the span -> (B, L, V) logits
        whose position i predicts span token i: Dream reads token i's prediction at position i-1
        (``logit_shift``), LLaDA at position i."""
        return raw[:, :-1] if self.cfg.logit_shift else raw[:, 1:]

    def forward_response(self, prompt_embeds: torch.Tensor, prompt_valid: torch.Tensor, response: torch.Tensor, *,
                         prompt_positions: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, DecoderOutput]:
        """Prompt and response in one forward: (B, L, V) response logits (position i predicts
        response token i, :meth:`shifted`) and the whole output.

        Args:
            prompt_embeds: (B, P, D) prompt embeddings, left padded.
            prompt_valid: (B, P) bool, False at padding.
            response: (B, L) response token ids (the mask id where undecided).
            prompt_positions: (3, B, P) M-RoPE positions of the prompt (media grids); the response
                continues after them (:func:`next_positions`). None: counted over valid tokens.
            **kwargs: further :meth:`forward` arguments (``attn_mode``, ``plan``, ``store_cache``,
                ``output_hidden_states``).
        """
        P = prompt_embeds.shape[1]
        x = torch.cat([prompt_embeds, self.embed(response)], dim=1)  # (B, P+L, D)
        valid = torch.cat([prompt_valid, torch.ones_like(response, dtype=torch.bool)], dim=1)  # (B, P+L)
        if prompt_positions is not None:
            after = next_positions(prompt_positions, prompt_valid, response.shape[1])  # (B, L)
            kwargs["position_ids"] = torch.cat([prompt_positions, after.expand(3, *after.shape)], dim=-1)
        out = self(inputs_embeds=x, valid=valid, prefix_len=P, **kwargs)
        return self.shifted(out.logits[:, P - 1:]), out

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                attn_mode: str | None = None, valid: torch.Tensor | None = None,
                prefix_len: int | torch.Tensor = 0, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, store_cache: bool = False,
                output_hidden_states: bool = False, plan: LayerPlan | None = None) -> DecoderOutput:
        """Run the decoder.

        Args:
            input_ids: (B, T) token ids, or
            inputs_embeds: (B, T, D) precomputed embeddings (image/audio tokens merged in).
            attn_mode: mask kind; defaults to ``cfg.attn_mode``.
            valid: (B, Tc+T) bool over cached + new positions, False at (left) padding.
            prefix_len: prompt length for ``prefix`` mode, counted from the first cached position.
            position_ids: (B, T) RoPE positions, or (3, B, T) with ``cfg.mrope_section``; by default
                counted over ``valid`` tokens.
            cache: keys/values of earlier positions, prepended to this call's.
            store_cache: append this call's keys/values to ``cache``.
            output_hidden_states: also return the residual stream after embedding and every layer.
            plan: per-layer decisions (token dropping, layer skipping, probing); see :class:`LayerPlan`.
                Logits and hidden states keep all T rows: a dropped token's row holds its state at
                the layer it was dropped. The attention received at every probed layer is returned
                in ``attn_received``.
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        Tc = 0 if cache is None else cache.length
        if Tc + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {Tc + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        if valid is None:
            valid = torch.ones(B, Tc + T, dtype=torch.bool, device=x.device)
        if position_ids is None:
            position_ids = positions_from_valid(valid)[:, Tc:]
        mode = attn_mode or self.cfg.attn_mode
        if mode == "prefix" and isinstance(prefix_len, int) and Tc >= prefix_len:
            mode = "bidirectional"  # every query is past the prompt: it sees all keys (no mask kernel needed)
        mask = None
        if mode != "bidirectional" or not bool(valid.all()):
            mask = attention_mask(mode, valid, q_len=T, prefix_len=prefix_len)  # (B, 1, T, Tc+T)
        if position_ids.dim() == 3 and self.cfg.mrope_section is None:
            raise ValueError("(3, B, T) M-RoPE positions given to a decoder without mrope_section")
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta,
                                mrope_section=self.cfg.mrope_section)
        hidden = [x] if output_hidden_states else None
        if cache is None and store_cache:
            cache = KVCache.empty(self.cfg.n_layers)
        pruned = _Pruned(B, T, Tc, x.device)  # which of this call's tokens still run
        scores = None  # (B, Tc+T) attention at the latest probed layer, for the plan
        received: dict[int, torch.Tensor] = {}  # probed layer -> attention received per key
        shapes: list[LayerShape | None] = []
        for i, block in enumerate(self.layers):
            keep = None if plan is None else plan.keep(i, scores)
            if keep is not None:
                x, cos, sin = pruned.drop(keep, x, cos, sin)
            if plan is not None and plan.skip(i):
                shapes.append(None)
                if hidden is not None:
                    hidden.append(pruned.full(x))
                continue
            has_cached = cache is not None and cache.keys[i] is not None
            cached_cols = pruned.select_cached(has_cached, cache.alive_at(i) if has_cached else None)
            layer_mask = pruned.mask(mask, has_cached=has_cached)
            weights = None if plan is None else plan.probe(i)
            q_weights = None if weights is None else pruned.rows_of(weights)
            x, r = block(x, cos, sin, layer_mask, cache=cache, layer=i, store=store_cache, probe=q_weights,
                         rows=pruned.rows, n_new=T, cached_cols=cached_cols)
            n_probe = 0 if q_weights is None else int(q_weights.ne(0).any(0).sum())
            n_cached = 0 if not has_cached else Tc if cached_cols is None else cached_cols.shape[1]
            shapes.append(LayerShape(x.shape[1], x.shape[1] + n_cached, n_probe))
            if r is not None:
                scores = pruned.to_positions(r, has_cached=has_cached)  # (B, Tc+T)
                received[i] = scores
            if hidden is not None:
                hidden.append(pruned.full(x))
        return DecoderOutput(self.forward_head(pruned.full(x)), hidden, received or None, cache, shapes)
