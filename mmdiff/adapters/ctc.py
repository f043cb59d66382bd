"""Decoding the ``audio_ctc`` adapter's per-frame CTC distributions into token sequences.

* :func:`ctc_greedy`: best path (argmax per frame, merge repeats, drop blanks).
* :class:`TokenNGram`: an n-gram language model over the decoder's own token ids, with interpolated
  absolute discounting (Ney, Essen & Kneser 1994, "On structuring probabilistic dependences in
  stochastic language modelling"):

      P(w | h) = max(c(h, w) - D, 0) / c(h) + D * N1+(h, .) / c(h) * P(w | h')

  where h' drops the oldest token of h, N1+(h, .) counts the distinct tokens seen after h, and the
  recursion ends in the uniform distribution over the vocabulary (plus the end of the sentence).
  A history never seen falls back to h' with weight 1. Fitted on the questions a model is trained
  to hear, it is saved beside the weights as ``ctc_lm.json`` (counts only: plain JSON, no code).
* :func:`ctc_prefix_beam_search`: CTC prefix beam search with shallow LM fusion (Hannun et al.
  2014, "First-pass large vocabulary continuous speech recognition using bi-directional recurrent
  DNNs", Alg. 1). Each prefix l keeps the probability of ending in a blank, p_b(l), and in its last
  token, p_nb(l); its score is

      log(p_b(l) + p_nb(l)) + alpha * log P_LM(l) + beta * |l|

  (the LM term is added as each token is appended; at the end the LM scores the end of sentence).
  A repeated token extends the prefix only across a blank, as in CTC's collapse rule.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import torch

#: file name of the LM beside a model's weights
LM_NAME = "ctc_lm.json"
BOS, EOS = -1, -2  # sentence boundary symbols of the n-gram model (never real token ids)
NEG_INF = -math.inf


def ctc_greedy(logp: torch.Tensor, lengths: torch.Tensor, blank: int) -> list[list[int]]:
    """Best-path CTC decoding: argmax per frame, merge repeats, drop blanks.

    Args:
        logp: (B, T, C) per-frame log-probabilities (or logits).
        lengths: (B,) valid frames per row.
        blank: the blank class.
    """
    out = []
    for row, n in zip(logp.argmax(-1), lengths):
        ids, prev = [], None
        for t in row[:n].tolist():
            if t != prev and t != blank:
                ids.append(t)
            prev = t
        out.append(ids)
    return out


class TokenNGram:
    """Interpolated absolute-discounting n-gram model over token ids (see the module docstring).

    Args:
        order: n (the history holds n - 1 tokens).
        vocab_size: size of the token vocabulary (the uniform floor is 1 / (vocab_size + 1)).
        discount: D in (0, 1).
    """

    def __init__(self, order: int, vocab_size: int, discount: float = 0.5) -> None:
        if order < 1 or vocab_size < 1 or not 0 < discount < 1:
            raise ValueError(f"TokenNGram needs order >= 1, vocab_size >= 1 and 0 < discount < 1, got "
                             f"{order}, {vocab_size}, {discount}")
        self.order, self.vocab_size, self.discount = order, vocab_size, discount
        self.counts: dict[tuple[int, ...], dict[int, int]] = defaultdict(dict)  # history -> {next: count}
        self._cache: dict[tuple[tuple[int, ...], int], float] = {}

    @classmethod
    def fit(cls, sequences: Iterable[Sequence[int]], *, order: int, vocab_size: int,
            discount: float = 0.5) -> "TokenNGram":
        """Count every history of length 0..order-1 in ``sequences`` (token ids, without BOS/EOS)."""
        lm = cls(order, vocab_size, discount)
        pad = (BOS,) * (order - 1)
        for seq in sequences:
            ids = pad + tuple(int(t) for t in seq) + (EOS,)
            for i in range(order - 1, len(ids)):
                for n in range(order):
                    nxt = lm.counts[ids[i - n:i]]
                    nxt[ids[i]] = nxt.get(ids[i], 0) + 1
        lm.counts = dict(lm.counts)
        return lm

    def history(self, prefix: Sequence[int]) -> tuple[int, ...]:
        """The last order - 1 tokens of ``prefix``, padded with BOS."""
        n = self.order - 1
        return ((BOS,) * n + tuple(prefix))[len(prefix):] if n else ()

    def logp(self, history: tuple[int, ...], token: int) -> float:
        """log P(token | history); ``token`` may be :data:`EOS`."""
        key = (history, token)
        if key not in self._cache:
            p = 1.0 / (self.vocab_size + 1)
            for n in range(self.order):  # from the empty history up to the full one
                seen = self.counts.get(history[len(history) - n:] if n else ())
                if not seen:
                    break
                total = sum(seen.values())
                p = max(seen.get(token, 0) - self.discount, 0) / total + self.discount * len(seen) / total * p
            self._cache[key] = math.log(p)
        return self._cache[key]

    def score(self, tokens: Sequence[int]) -> float:
        """log P(tokens, EOS) of a whole sentence."""
        return sum(self.logp(self.history(tokens[:i]), t) for i, t in enumerate([*tokens, EOS]))

    def to_dict(self) -> dict:
        return {"order": self.order, "vocab_size": self.vocab_size, "discount": self.discount,
                "counts": [[list(h), [[t, c] for t, c in sorted(nxt.items())]] for h, nxt in sorted(self.counts.items())]}

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "n-gram LM") -> "TokenNGram":
        try:
            lm = cls(int(data["order"]), int(data["vocab_size"]), float(data["discount"]))
            lm.counts = {tuple(int(t) for t in h): {int(t): int(c) for t, c in nxt} for h, nxt in data["counts"]}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: not a TokenNGram file ({type(e).__name__}: {e})") from None
        if any(len(h) >= lm.order for h in lm.counts):
            raise ValueError(f"{source}: a history is longer than order - 1 = {lm.order - 1}")
        return lm

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), separators=(",", ":")))

    @classmethod
    def load(cls, path: str | Path) -> "TokenNGram":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))


def _logaddexp(a: float, b: float) -> float:
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


def ctc_prefix_beam_search(logp: torch.Tensor, blank: int, lm: TokenNGram | None = None, *, lm_weight: float = 0.3,
                           length_bonus: float = 1.5, beam_width: int = 8, top_k: int = 6,
                           min_logp: float = -8.0) -> list[int]:
    """The best token sequence of one clip under CTC x LM^alpha x e^(beta |l|) (module docstring).

    Args:
        logp: (T, C) per-frame log-probabilities of one clip (valid frames only); ``blank`` is a class.
        blank: the blank class.
        lm: the LM fused in; None = CTC scores only (then ``lm_weight`` is unused).
        lm_weight: alpha.
        length_bonus: beta, per emitted token (balances the LM's cost of every token).
        beam_width: prefixes kept after each frame.
        top_k: tokens tried per frame (the most likely non-blank ones) ...
        min_logp: ... among those above this log-probability.
    """
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, NEG_INF)}  # prefix -> (log p_b, log p_nb)
    values, indices = logp.float().topk(min(top_k + 1, logp.shape[-1]), -1)
    blank_lp = logp[:, blank].tolist()
    for t, (vals, idx) in enumerate(zip(values.tolist(), indices.tolist())):
        cands = [(c, v) for c, v in zip(idx, vals) if c != blank and v > min_logp][:top_k]
        nxt: dict[tuple[int, ...], list[float]] = defaultdict(lambda: [NEG_INF, NEG_INF])
        for prefix, (pb, pnb) in beams.items():
            total = _logaddexp(pb, pnb)
            stay = nxt[prefix]
            stay[0] = _logaddexp(stay[0], total + blank_lp[t])
            last = prefix[-1] if prefix else None
            hist = lm.history(prefix) if lm is not None else ()
            for c, v in cands:
                bonus = length_bonus + (lm_weight * lm.logp(hist, c) if lm is not None else 0.0)
                grown = nxt[prefix + (c,)]
                if c == last:  # "aa" without a blank between collapses to "a"; a new "a" needs the blank
                    stay[1] = _logaddexp(stay[1], pnb + v)
                    grown[1] = _logaddexp(grown[1], pb + v + bonus)
                else:
                    grown[1] = _logaddexp(grown[1], total + v + bonus)
        beams = dict(sorted(((k, (b, nb)) for k, (b, nb) in nxt.items()),
                            key=lambda kv: -_logaddexp(*kv[1]))[:beam_width])

    def final(item) -> float:
        prefix, (pb, pnb) = item
        end = lm_weight * lm.logp(lm.history(prefix), EOS) if lm is not None else 0.0
        return _logaddexp(pb, pnb) + end

    return list(max(beams.items(), key=final)[0])
