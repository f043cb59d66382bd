"""Audio adapters after DIFFA (Zhou et al. 2025, "DIFFA: Large Language Diffusion Models Can Listen").

* ``audio_semantic``: the final Whisper states, subsampled in time by stride-2 convolutions
  (``subsample`` = 4: two of them) with GELU, then an MLP to the decoder width. One token per
  ``subsample`` encoder frames (80 ms at Whisper's 50 frames/s).
* ``audio_acoustic``: a small Q-Former (BLIP-2, Li et al. 2023): ``num_queries`` learned queries
  cross-attend to a softmax-weighted sum of ``n_encoder_layers`` encoder layers
  (``AudioEncoderConfig.output_layers``), giving a fixed number of tokens per clip.
* ``audio_dual``: both; per clip the valid semantic tokens come first, then the queries, then padding.
  (These three are mmdiff's own designs after DIFFA's idea; ``diffa`` below is the released maths.)
* ``diffa``: DIFFA's released dual adapter (NKU-HLT/DIFFA ``src/modeling_DIFFA.py``, ``src/subsample.py``),
  exactly: an acoustic branch, ``num_queries`` learned prompts per tapped encoder layer, each set run
  through one shared BERT Q-Former (post-LN, cross-attending to that layer's states), mixed across
  layers by per-prompt softmax weights, then LayerNorm -> Linear; and a semantic branch, the final
  states (cut to a multiple of ``downsample``) through Conv1d(k3) -> GELU -> Conv1d(k3, stride
  ``downsample``, width x ``downsample``) -> Linear -> ReLU -> Linear -> ReLU -> LayerNorm. Per clip
  the acoustic tokens come first, then one semantic token per ``downsample`` frames.
* ``audio_ctc``: CTC compression (Gaido et al. 2021, "CTC-based compression for direct speech
  translation"): a CTC head over the decoder's vocabulary (plus a blank) labels every encoder
  frame; blank frames are dropped and runs of frames with the same label are averaged, leaving
  about one position per spoken token. Each position is a distribution over the vocabulary, and
  the model embeds it with the decoder's own token table (``emits = "vocab"``), so a well
  recognised spoken question reaches the decoder as (nearly) the embeddings of the typed one.
  At inference, when the model directory has a token n-gram LM (``ctc_lm.json``, written by the
  trainer from the questions it trains on), the frames are instead decoded by CTC prefix beam
  search with that LM (:mod:`mmdiff.adapters.ctc`) and the best transcript reaches the decoder as
  one-hot distributions, i.e. exactly the typed question's embeddings. Training always sees the
  soft runs.

Every adapter returns ``(tokens (B, N', out_dim), mask (B, N') bool)`` (``audio_ctc``: ``(B, N', vocab)``
probabilities, embedded by :meth:`mmdiff.model.MultimodalDiffusionLM.adapt_audio`) with tokens zero where the
mask is False; padded frames never reach a real output, so a clip gives the same tokens alone or
in a batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..encoders.audio import AudioFeatures
from .base import ADAPTERS, AdapterConfig
from .ctc import TokenNGram, ctc_greedy, ctc_prefix_beam_search

if TYPE_CHECKING:
    from ..decoder import DecoderConfig


@dataclass
class SemanticAdapterConfig(AdapterConfig):
    """``audio_semantic``'s sizes: ``in_dim`` encoder states -> ``out_dim`` tokens."""

    subsample: int = 4  # frame subsampling, a power of 2 (one stride-2 conv per factor 2)


@dataclass
class AcousticAdapterConfig(AdapterConfig):
    """``audio_acoustic``'s sizes: ``in_dim`` encoder states -> ``num_queries`` tokens of width ``out_dim``."""

    num_queries: int = 16  # Q-Former queries = output tokens
    qformer_layers: int = 2  # Q-Former blocks
    qformer_heads: int = 4  # attention heads (must divide out_dim)
    n_encoder_layers: int = 1  # encoder layers fused with softmax weights (AudioEncoderConfig.output_layers)


@dataclass
class DualAdapterConfig(SemanticAdapterConfig, AcousticAdapterConfig):
    """``audio_dual``'s sizes: its semantic branch's and its acoustic branch's fields."""


@dataclass
class DiffaAdapterConfig(AdapterConfig):
    """``diffa``'s sizes: ``in_dim`` = the Whisper encoder's width, ``out_dim`` = the decoder's. Defaults are
    the released model's (``DIFFAConfig.prompt_size``, ``WhisperProjector(downsample_rate=4)``, the Q-Former's
    ``BertConfig()`` defaults with 2 layers), except ``qformer_heads``, which DIFFA takes from Whisper."""

    downsample: int = 4  # semantic: frames per token (the strided conv's stride; its width is in_dim * downsample)
    num_queries: int = 64  # acoustic: learned prompts per tapped layer = acoustic tokens per clip
    n_encoder_layers: int = 4  # acoustic: tapped encoder layers (AudioEncoderConfig.output_layers, in order)
    qformer_layers: int = 2  # BERT layers of the Q-Former
    qformer_heads: int = 12  # its attention heads (DIFFA: the Whisper encoder's)
    qformer_ffn: int = 3072  # its intermediate width (BertConfig's default, whatever in_dim is)
    qformer_eps: float = 1e-12  # its LayerNorm eps (BertConfig's layer_norm_eps)


@dataclass
class CTCAdapterConfig(AdapterConfig):
    """``audio_ctc``'s sizes and its LM beam's settings (the beam runs at inference with a ``ctc_lm.json``)."""

    vocab_size: int = 0  # the decoder's vocabulary size (0: the decoder's, filled in by resolve)
    layers: int = 0  # bidirectional transformer layers between the encoder states and the CTC head (0: linear head)
    hidden: int = 256  # their width (the states are projected to it)
    heads: int = 4  # their attention heads
    stride: int = 1  # the layers run on the mean of every ``stride`` frames; each label is repeated ``stride`` times
    beam_width: int = 8  # prefix beam width (0 = soft best-path runs)
    lm_weight: float = 0.3  # alpha, weight of the token n-gram LM in the beam (bench/ctc_lm_sweep.py)
    length_bonus: float = 1.5  # beta, score bonus per emitted token in the beam

    def resolve(self, decoder: DecoderConfig) -> "CTCAdapterConfig":
        """CTC over the decoder's vocabulary: ``vocab_size`` 0 becomes the decoder's."""
        return self if self.vocab_size else replace(self, vocab_size=decoder.vocab_size)


@ADAPTERS.register("audio_semantic")
class SemanticAdapter(nn.Module):
    """Stride-2 Conv1d(k=3) x log2(subsample), each with GELU, then Linear -> GELU -> Linear."""

    modality, emits, config_class = "audio", "embeddings", SemanticAdapterConfig

    def __init__(self, cfg: SemanticAdapterConfig) -> None:
        super().__init__()
        if cfg.subsample < 1 or cfg.subsample & (cfg.subsample - 1):
            raise ValueError(f"{cfg.kind}: subsample must be a power of 2, got {cfg.subsample}")
        self.cfg = cfg
        dims = [cfg.in_dim] + [cfg.out_dim] * int(math.log2(cfg.subsample))
        self.convs = nn.ModuleList(nn.Conv1d(a, b, kernel_size=3, stride=2, padding=1)
                                   for a, b in zip(dims[:-1], dims[1:]))
        self.mlp = nn.Sequential(nn.Linear(dims[-1], cfg.out_dim), nn.GELU(), nn.Linear(cfg.out_dim, cfg.out_dim))

    def num_tokens(self, n_frames: int) -> int:
        """Tokens for a clip of ``n_frames`` encoder frames: ceil(n / 2) per conv."""
        for _ in self.convs:
            n_frames = (n_frames + 1) // 2
        return n_frames

    def forward(self, feats: AudioFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = feats.last.transpose(1, 2), feats.mask  # (B, D, T), (B, T)
        for conv in self.convs:
            mask = mask[:, ::2]  # output j is centred on input 2j: valid iff 2j < length
            x = F.gelu(conv(x)) * mask[:, None]  # (B, out, ceil(T/2)); zero padding for the next conv
        tokens = self.mlp(x.transpose(1, 2)) * mask[..., None]  # (B, N', out)
        return tokens, mask


class QFormerLayer(nn.Module):
    """Pre-norm query block: self-attention over queries -> cross-attention to the audio -> MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q: torch.Tensor, memory: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """q (B, Q, D), memory (B, T, D), pad (B, T) True at padding -> (B, Q, D)."""
        h = self.norm1(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        q = q + self.cross_attn(self.norm2(q), memory, memory, key_padding_mask=pad, need_weights=False)[0]
        return q + self.mlp(self.norm3(q))


@ADAPTERS.register("audio_acoustic")
class AcousticAdapter(nn.Module):
    """Q-Former over sum_i softmax(w)_i * layer_i of the selected encoder layers."""

    modality, emits, config_class = "audio", "embeddings", AcousticAdapterConfig

    def __init__(self, cfg: AcousticAdapterConfig) -> None:
        super().__init__()
        if cfg.out_dim % cfg.qformer_heads:
            raise ValueError(f"{cfg.kind}: out_dim {cfg.out_dim} is not divisible by qformer_heads {cfg.qformer_heads}")
        if min(cfg.n_encoder_layers, cfg.num_queries, cfg.qformer_layers) < 1:
            raise ValueError(f"{cfg.kind}: n_encoder_layers, num_queries and qformer_layers must be >= 1")
        self.cfg = cfg
        self.layer_logits = nn.Parameter(torch.zeros(cfg.n_encoder_layers))  # uniform fusion at init
        self.in_proj = nn.Sequential(nn.LayerNorm(cfg.in_dim), nn.Linear(cfg.in_dim, cfg.out_dim))
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, cfg.out_dim) * 0.02)  # (Q, out)
        self.layers = nn.ModuleList(QFormerLayer(cfg.out_dim, cfg.qformer_heads) for _ in range(cfg.qformer_layers))
        self.norm = nn.LayerNorm(cfg.out_dim)

    def num_tokens(self, n_frames: int) -> int:
        return self.cfg.num_queries

    def forward(self, feats: AudioFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        if len(feats.layers) != self.cfg.n_encoder_layers:
            raise ValueError(f"audio_acoustic fuses n_encoder_layers={self.cfg.n_encoder_layers} layers but the "
                             f"encoder returned {len(feats.layers)} (AudioEncoderConfig.output_layers)")
        w = self.layer_logits.softmax(0)  # (L,)
        fused = sum(w[i] * h for i, h in enumerate(feats.layers))  # (B, T, in)
        memory = self.in_proj(fused)  # (B, T, out)
        q = self.queries.expand(memory.shape[0], -1, -1)  # (B, Q, out)
        for layer in self.layers:
            q = layer(q, memory, ~feats.mask)
        tokens = self.norm(q)  # (B, Q, out)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)


@ADAPTERS.register("audio_dual")
class DualAdapter(nn.Module):
    """DIFFA's dual adapter: semantic tokens then acoustic queries, packed per clip."""

    modality, emits, config_class = "audio", "embeddings", DualAdapterConfig

    def __init__(self, cfg: DualAdapterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.semantic = SemanticAdapter(cfg)
        self.acoustic = AcousticAdapter(cfg)

    def num_tokens(self, n_frames: int) -> int:
        return self.semantic.num_tokens(n_frames) + self.acoustic.num_tokens(n_frames)

    def forward(self, feats: AudioFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        s, s_mask = self.semantic(feats)  # (B, S, out), (B, S)
        a, a_mask = self.acoustic(feats)  # (B, Q, out), (B, Q)
        tokens, mask = torch.cat([s, a], 1), torch.cat([s_mask, a_mask], 1)  # (B, S+Q, ...)
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # valid first, order kept
        tokens = tokens.gather(1, order[..., None].expand_as(tokens))
        return tokens, mask.gather(1, order)


class BertAttention(nn.Module):
    """BERT's attention block (Devlin et al. 2019; ``BertAttention``): multi-head attention with biased
    q/k/v, then LayerNorm(dense(context) + query input), post-norm."""

    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        """x (B, Q, D) attends to memory (B, T, D); pad (B, T) True at keys to ignore, or None."""
        B, Q, D = x.shape
        q, k, v = (t.view(B, -1, self.heads, D // self.heads).transpose(1, 2)  # (B, h, *, D/h)
                   for t in (self.query(x), self.key(memory), self.value(memory)))
        bias = None if pad is None else torch.zeros(pad.shape, dtype=x.dtype, device=x.device).masked_fill(
            pad, torch.finfo(x.dtype).min)[:, None, None, :]  # (B, 1, 1, T)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, h, Q, D/h)
        return self.norm(self.dense(ctx.transpose(1, 2).reshape(B, Q, D)) + x)


class BertQFormerLayer(nn.Module):
    """A BERT layer with cross-attention (``BertLayer`` with ``add_cross_attention``): self-attention over the
    queries (no mask), cross-attention to the audio, then LayerNorm(ffn_out(GELU(ffn_in(h))) + h)."""

    def __init__(self, dim: int, heads: int, ffn: int, eps: float) -> None:
        super().__init__()
        self.self_attn = BertAttention(dim, heads, eps)
        self.cross_attn = BertAttention(dim, heads, eps)
        self.ffn_in, self.ffn_out = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, q: torch.Tensor, memory: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        h = self.cross_attn(self.self_attn(q, q, None), memory, pad)  # (B, Q, D)
        return self.ffn_norm(self.ffn_out(F.gelu(self.ffn_in(h))) + h)


class DiffaAcoustic(nn.Module):
    """DIFFA's ``QformerConnector``: per tapped layer l, prompts P_l (Q, D) -> Q-Former(P_l, layer_l);
    then sum_l softmax_l(layer_weights)[q, l] * out_l[q] -> LayerNorm -> Linear to ``out_dim``."""

    def __init__(self, cfg: DiffaAdapterConfig) -> None:
        super().__init__()
        self.layer_prompts = nn.ParameterList(nn.Parameter(torch.randn(1, cfg.num_queries, cfg.in_dim))
                                              for _ in range(cfg.n_encoder_layers))  # each (1, Q, in)
        self.layer_weights = nn.Parameter(torch.zeros(cfg.num_queries, cfg.n_encoder_layers))  # (Q, L)
        self.qformer = nn.ModuleList(BertQFormerLayer(cfg.in_dim, cfg.qformer_heads, cfg.qformer_ffn, cfg.qformer_eps)
                                     for _ in range(cfg.qformer_layers))
        self.proj = nn.Sequential(nn.LayerNorm(cfg.in_dim), nn.Linear(cfg.in_dim, cfg.out_dim))

    def forward(self, feats: AudioFeatures) -> torch.Tensor:
        pad = None if feats.window else ~feats.mask  # DIFFA attends over Whisper's whole 30-s window
        outs = []
        for prompt, states in zip(self.layer_prompts, feats.layers):
            q = prompt.expand(states.shape[0], -1, -1)  # (B, Q, in)
            for layer in self.qformer:
                q = layer(q, states, pad)
            outs.append(q)
        w = self.layer_weights.softmax(-1)  # (Q, L)
        mixed = (torch.stack(outs, 2) * w[..., None]).sum(2)  # (B, Q, L, in) -> (B, Q, in)
        return self.proj(mixed)  # (B, Q, out)


class DiffaSemantic(nn.Module):
    """DIFFA's ``WhisperProjector``: frames cut to a multiple of r, Conv1d(k3, p1) -> GELU -> Conv1d(k3, stride r,
    p1, width x r) -> Linear -> ReLU -> Linear -> ReLU -> LayerNorm; one token per r frames."""

    def __init__(self, cfg: DiffaAdapterConfig) -> None:
        super().__init__()
        d, r = cfg.in_dim, cfg.downsample
        self.r = r
        self.conv = nn.Sequential(nn.Conv1d(d, d, 3, padding=1), nn.GELU(), nn.Conv1d(d, d * r, 3, stride=r, padding=1))
        self.mlp = nn.Sequential(nn.Linear(d * r, d), nn.ReLU(), nn.Linear(d, cfg.out_dim), nn.ReLU())
        self.norm = nn.LayerNorm(cfg.out_dim)

    def forward(self, feats: AudioFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = feats.mask.sum(1)  # (B,) frames of each clip
        T = int(lengths.max()) // self.r * self.r  # DIFFA cuts the batch to its longest clip, then to a multiple of r
        x = self.conv(feats.last[:, :T].transpose(1, 2)).transpose(1, 2)  # (B, T/r, in * r)
        mask = torch.arange(T // self.r, device=x.device)[None, :] < (lengths // self.r)[:, None]  # (B, T/r)
        return self.norm(self.mlp(x)), mask


@ADAPTERS.register("diffa")
class DiffaAdapter(nn.Module):
    """DIFFA's dual adapter (Zhou et al. 2025): acoustic tokens, then semantic tokens, per clip.

    A clip's semantic tokens read only its own frames (token j sees frames < 4j + 3), so a clip gives
    the same tokens alone or in a batch; the released batch code also appends the tokens of the
    batch's padding frames, which are dropped here by the mask.
    """

    modality, emits, config_class = "audio", "embeddings", DiffaAdapterConfig

    def __init__(self, cfg: DiffaAdapterConfig) -> None:
        super().__init__()
        if cfg.downsample < 1 or min(cfg.num_queries, cfg.n_encoder_layers, cfg.qformer_layers) < 1:
            raise ValueError(f"{cfg.kind}: downsample, num_queries, n_encoder_layers and qformer_layers must be >= 1")
        if cfg.in_dim % cfg.qformer_heads:
            raise ValueError(f"{cfg.kind}: in_dim {cfg.in_dim} is not divisible by qformer_heads {cfg.qformer_heads}")
        self.cfg = cfg
        self.acoustic = DiffaAcoustic(cfg)
        self.semantic = DiffaSemantic(cfg)

    def num_tokens(self, n_frames: int) -> int:
        return self.cfg.num_queries + n_frames // self.cfg.downsample

    def forward(self, feats: AudioFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        if len(feats.layers) != self.cfg.n_encoder_layers:
            raise ValueError(f"diffa taps n_encoder_layers={self.cfg.n_encoder_layers} encoder layers but the "
                             f"encoder returned {len(feats.layers)} (AudioEncoderConfig.output_layers)")
        a = self.acoustic(feats)  # (B, Q, out)
        s, s_mask = self.semantic(feats)  # (B, S, out), (B, S)
        mask = torch.cat([torch.ones(a.shape[:2], dtype=torch.bool, device=a.device), s_mask], 1)  # (B, Q+S)
        return torch.cat([a, s], 1) * mask[..., None], mask


@ADAPTERS.register("audio_ctc")
class CTCAdapter(nn.Module):
    """CTC head over ``vocab_size`` tokens + blank (last index), then CTC compression. The head is linear,
    or ``layers`` bidirectional transformer layers (padded frames masked) then linear.

    ``forward`` returns per clip the kept positions' token distributions (blank removed,
    renormalised) and a mask; ``logits`` gives the raw per-frame CTC logits for the CTC loss.
    With an LM attached (``lm``), ``beam_width`` > 0 and the module in eval mode, ``forward``
    returns the one-hot tokens of :meth:`transcribe_ids` instead.
    """

    # outputs are distributions over the decoder vocabulary, not embeddings
    modality, emits, config_class = "audio", "vocab", CTCAdapterConfig

    def __init__(self, cfg: CTCAdapterConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError(f"{cfg.kind}: vocab_size (the decoder's vocabulary size) must be set, got {cfg.vocab_size}")
        if cfg.layers < 0 or cfg.stride < 1 or (cfg.layers and cfg.hidden % cfg.heads):
            raise ValueError(f"{cfg.kind}: layers must be >= 0, stride >= 1 and hidden {cfg.hidden} divisible by "
                             f"heads {cfg.heads}")
        self.cfg = cfg
        width = cfg.in_dim
        if cfg.layers:  # a frozen pretrained encoder's states need context mixing before a per-frame label
            width = cfg.hidden
            self.proj = nn.Linear(cfg.in_dim, width)
            layer = nn.TransformerEncoderLayer(width, cfg.heads, 4 * width, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, cfg.layers, norm=nn.LayerNorm(width),
                                                enable_nested_tensor=False)
        self.ctc = nn.Linear(width, cfg.vocab_size + 1)
        self.blank = cfg.vocab_size
        self.lm: TokenNGram | None = None  # inference LM (ctc_lm.json); not a parameter

    @property
    def uses_beam(self) -> bool:
        """Whether ``forward`` decodes with the LM beam (eval mode, an LM, beam_width > 0)."""
        return self.lm is not None and self.cfg.beam_width > 0 and not self.training

    def transcribe_ids(self, feats: AudioFeatures) -> list[list[int]]:
        """Token ids per clip: LM-fused prefix beam search when :attr:`uses_beam`, else best path."""
        return self._decode(self.logits(feats).float().log_softmax(-1), feats.mask.sum(-1))

    def _decode(self, logp: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        """(B, T, V+1) frame log-probabilities and (B,) valid frames -> token ids per clip."""
        if not self.uses_beam:
            return ctc_greedy(logp, lengths, self.blank)
        c = self.cfg
        return [ctc_prefix_beam_search(row[:int(n)], self.blank, self.lm, lm_weight=c.lm_weight,
                                       length_bonus=c.length_bonus, beam_width=c.beam_width)
                for row, n in zip(logp, lengths)]

    def num_tokens(self, n_frames: int) -> int:
        """At most one position per frame (the real count depends on the content)."""
        return n_frames

    def logits(self, feats: AudioFeatures) -> torch.Tensor:
        """(B, T, vocab + 1) per-frame CTC logits; the blank is the last class."""
        if not self.cfg.layers:
            return self.ctc(feats.last)
        s, (B, T, D) = self.cfg.stride, feats.last.shape
        pad = -T % s  # padded frames are zero, so a clip pools alike alone or in a batch
        x = F.pad(feats.last, (0, 0, 0, pad)).view(B, -1, s, D).mean(2)  # (B, ceil(T/s), D)
        keep = F.pad(feats.mask, (0, pad)).view(B, -1, s).any(-1)  # (B, ceil(T/s))
        x = self.blocks(self.proj(x), src_key_padding_mask=~keep)  # (B, ceil(T/s), hidden)
        return self.ctc(x.repeat_interleave(s, dim=1)[:, :T])  # (B, T, vocab + 1)

    def forward(self, feats: AudioFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        if self.uses_beam:
            logp, lengths = self.logits(feats).float().log_softmax(-1), feats.mask.sum(-1)  # (B, T, V+1), (B,)
            eye = torch.eye(self.cfg.vocab_size, device=logp.device)
            out = []
            for row, n, ids in zip(logp, lengths, self._decode(logp, lengths)):
                if not ids:  # nothing heard: keep the frame most likely to be speech, as the soft path does
                    row = row[:int(n)]
                    ids = [int(row[row[:, self.blank].argmin(), :self.blank].argmax())]
                out.append(eye[ids])
            return self._pack(out)
        probs = self.logits(feats).float().softmax(-1)  # (B, T, V+1)
        labels = probs.argmax(-1)  # (B, T)
        out = []
        for b in range(probs.shape[0]):
            n = int(feats.mask[b].sum())
            lab, p = labels[b, :n], probs[b, :n]
            keep = lab != self.blank
            if not keep.any():  # all blank: keep the frame most likely to be speech
                keep = torch.zeros_like(keep)
                keep[p[:, self.blank].argmin()] = True
            idx = keep.nonzero().squeeze(1)  # kept frames, in time order
            run = torch.ones_like(idx, dtype=torch.bool)  # a new run starts where the label changes or a frame was dropped
            run[1:] = (lab[idx[1:]] != lab[idx[:-1]]) | (idx[1:] != idx[:-1] + 1)
            seg = run.long().cumsum(0) - 1  # (K,) run index of each kept frame
            tok = p.new_zeros(int(seg[-1]) + 1, p.shape[1]).index_add_(0, seg, p[idx])  # (N', V+1) summed
            tok = tok[:, :self.blank]
            out.append(tok / tok.sum(-1, keepdim=True).clamp_min(1e-9))  # P(token | not blank), averaged
        return self._pack(out)

    def _pack(self, out: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-clip (N_b, V) distributions -> (B, N, V) zero-padded and the (B, N) mask."""
        N = max(1, max(t.shape[0] for t in out))
        tokens = out[0].new_zeros(len(out), N, self.cfg.vocab_size)
        mask = torch.zeros(len(out), N, dtype=torch.bool, device=tokens.device)
        for b, t in enumerate(out):
            tokens[b, :t.shape[0]] = t
            mask[b, :t.shape[0]] = True
        return tokens, mask
