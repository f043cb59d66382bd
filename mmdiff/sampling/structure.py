"""Structure priors: a response template of fixed tokens and mask slots, placed on the canvas.

Dimple (Yu et al. 2025, "Dimple: Discrete Diffusion Multimodal Large Language Model with Parallel
Decoding", Sec. 3.4 "structure priors") steers a masked-diffusion LM by writing the answer's fixed
tokens on the canvas before step 0 and leaving masks only where content goes: the format and the
length are then fixed, and the model fills the slots conditioned on the skeleton from both sides.
Here this is one :class:`~mmdiff.sampling.sampler.Strategy` of the one sampler loop:

* :class:`Template` - fixed text and slots (``<mask:n>``, ``<mask:a-b>``, ``<digits:a-b>``,
  ``<enum:a|b>``); :meth:`Template.to_canvas` tokenises it into canvas ids and slot spans,
* :class:`StructurePrior` - sets that canvas in ``init_canvas`` and restricts each slot position's
  tokens in ``process_logits``; reads the filled slots back (:meth:`StructurePrior.values`),

The JSON-schema compiler that builds templates is :mod:`mmdiff.sampling.schema`; captioning with
these priors is :mod:`mmdiff.tasks.captioning`.

The syntax, the array-length rule and the caveats are documented in ``docs/structure_priors.md``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ..special_tokens import SpecialIds
from .sampler import SamplerConfig, StepState, Strategy

# ------------------------------------------------------------------------------------------------
# templates
# ------------------------------------------------------------------------------------------------
SLOT_KINDS: tuple[str, ...] = ("mask", "digits", "enum")
_SLOT = re.compile(r"<(mask|digits|enum):([^<>]*)>")  # a whole slot: <kind:spec>
_SLOT_START = re.compile(r"<(?:mask|digits|enum)\b")  # anything that starts like a slot
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
_CLOSERS = {"{": "}", "[": "]"}


@dataclass(frozen=True)
class Slot:
    """A run of canvas positions the model fills.

    Args:
        kind: ``mask`` (any non-special token), ``digits`` (tokens made of 0-9) or ``enum`` (one of
            ``values``; its length comes from the values' tokenisation).
        min_len: tokens that must be content (no EOS/PAD); ``mask`` / ``digits`` only.
        max_len: positions on the canvas; positions past ``min_len`` may hold EOS/PAD, which are
            dropped from the output (variable length); ``mask`` / ``digits`` only.
        values: the allowed strings of an ``enum`` slot; ``""`` makes the slot optional.
        in_string: the slot sits inside a JSON string (between double quotes of the fixed text):
            tokens containing ``"``, ``\\`` or control characters are forbidden there.
    """

    kind: str
    min_len: int = 1
    max_len: int = 1
    values: tuple[str, ...] = ()
    in_string: bool = False

    def __post_init__(self) -> None:
        if self.kind not in SLOT_KINDS:
            raise ValueError(f"unknown slot kind {self.kind!r}; known: {', '.join(SLOT_KINDS)}")
        if self.kind == "enum":
            if not any(self.values) or len(set(self.values)) != len(self.values):
                raise ValueError(f"enum slot needs distinct values, at least one non-empty; got {list(self.values)}")
        elif not (0 <= self.min_len <= self.max_len and self.max_len >= 1):
            raise ValueError(f"slot {self.kind} needs 0 <= min_len <= max_len and max_len >= 1, "
                             f"got {self.min_len}-{self.max_len}")

    def __str__(self) -> str:
        if self.kind == "enum":
            return f"<enum:{'|'.join(self.values)}>"
        spec = str(self.max_len) if self.min_len == self.max_len else f"{self.min_len}-{self.max_len}"
        return f"<{self.kind}:{spec}>"


@dataclass(frozen=True)
class SlotSpan:
    """Where a slot landed on the canvas (from :meth:`Template.to_canvas`).

    Args:
        start: first canvas position.
        stop: one past the last canvas position.
        required: positions ``start .. start+required-1`` must hold content (no EOS/PAD).
        slot: the template slot.
        options: ``enum`` only: the token ids of each value, tokenised on its own.
    """

    start: int
    stop: int
    required: int
    slot: Slot
    options: tuple[tuple[int, ...], ...] = ()

    @property
    def width(self) -> int:
        return self.stop - self.start


class _Balance:
    """Scans fixed text for balanced ``{}``/``[]`` and double quotes (``\\"`` escapes a quote)."""

    def __init__(self) -> None:
        self.stack: list[tuple[str, int]] = []  # (opener, position)
        self.quote: int | None = None  # position of the open quote, None outside strings
        self.escape = False

    def feed(self, text: str, offset: int) -> None:
        for k, ch in enumerate(text):
            pos = offset + k
            if self.quote is not None:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.quote = None
            elif ch == '"':
                self.quote = pos
            elif ch in _CLOSERS:
                self.stack.append((ch, pos))
            elif ch in _CLOSERS.values():
                if not self.stack:
                    raise ValueError(f"template: unbalanced {ch!r} at position {pos}: nothing to close")
                opener, at = self.stack.pop()
                if _CLOSERS[opener] != ch:
                    raise ValueError(f"template: {ch!r} at position {pos} closes {opener!r} opened at position {at}")
        self.escape = False

    def finish(self) -> None:
        if self.quote is not None:
            raise ValueError(f"template: unclosed quote opened at position {self.quote}")
        if self.stack:
            opener, at = self.stack[-1]
            raise ValueError(f"template: unclosed {opener!r} opened at position {at}")


def _parse_slot(kind: str, spec: str, pos: int, in_string: bool) -> Slot:
    where = f"template: slot <{kind}:{spec}> at position {pos}"
    if kind == "enum":
        values = tuple(spec.split("|"))
        if not any(values):
            raise ValueError(f"{where}: an enum needs at least one non-empty value")
        if len(set(values)) != len(values):
            raise ValueError(f"{where}: repeated enum value")
        return Slot("enum", values=values, in_string=in_string)
    m = _RANGE.fullmatch(spec)
    if m is None:
        raise ValueError(f"{where}: expected a length n or a range a-b")
    lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
    if m.group(2) is None and lo < 1:
        raise ValueError(f"{where}: length must be >= 1")
    if lo > hi:
        raise ValueError(f"{where}: range start {lo} > end {hi}")
    if hi < 1:
        raise ValueError(f"{where}: range end must be >= 1")
    return Slot(kind, lo, hi, in_string=in_string)


@dataclass(frozen=True)
class Template:
    """A response skeleton: fixed text pieces and :class:`Slot` s, in order.

    Build one with :meth:`parse` (the text syntax), :meth:`free` (free text of a set length) or
    :func:`schema_to_template`.
    """

    parts: tuple[str | Slot, ...]

    @classmethod
    def parse(cls, text: str) -> "Template":
        """Parse the template syntax (``docs/structure_priors.md``).

        Fixed text is copied as is; ``<mask:n>`` is exactly n tokens, ``<mask:a-b>`` a to b tokens
        (b positions), ``<digits:n>`` / ``<digits:a-b>`` the same with digit tokens only, and
        ``<enum:v1|v2|...>`` one of the values. The fixed text must balance ``{}``, ``[]`` and
        double quotes.

        Raises:
            ValueError: naming the character position of a malformed slot, a bad range, an
                unbalanced brace or quote; or when the template has no slot.
        """
        parts: list[str | Slot] = []
        balance = _Balance()
        i = 0
        while (m := _SLOT_START.search(text, i)) is not None:
            whole = _SLOT.match(text, m.start())
            if whole is None:
                raise ValueError(f"template: malformed slot at position {m.start()} "
                                 f"({text[m.start():m.start() + 16]!r}...); expected <mask:n>, <mask:a-b>, "
                                 "<digits:a-b> or <enum:a|b|...>")
            balance.feed(text[i:m.start()], i)
            if m.start() > i:
                parts.append(text[i:m.start()])
            parts.append(_parse_slot(whole.group(1), whole.group(2), m.start(), balance.quote is not None))
            i = whole.end()
        balance.feed(text[i:], i)
        balance.finish()
        if i < len(text):
            parts.append(text[i:])
        template = cls(tuple(parts))
        if not template.slots:
            raise ValueError(f"template {text[:40]!r} has no slot; add <mask:n>, <mask:a-b>, <digits:a-b> or "
                             "<enum:...>")
        return template

    @classmethod
    def free(cls, length: int) -> "Template":
        """Free text of exactly ``length`` tokens (``<mask:length>``): the global length control."""
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        return cls((Slot("mask", length, length),))

    def __str__(self) -> str:
        return "".join(str(p) for p in self.parts)

    @property
    def slots(self) -> list[Slot]:
        return [p for p in self.parts if isinstance(p, Slot)]

    def to_canvas(self, tokenizer, mask_id: int, *, eos: bool = True) -> tuple[list[int], list[SlotSpan]]:
        """Tokenise into canvas ids (fixed tokens, ``mask_id`` in slots) and the slot spans.

        Each fixed piece and each enum value is tokenised on its own. This equals tokenising a
        filled response in one go when slot boundaries are pre-token boundaries, which mmdiff's
        tokenizer guarantees for quoted JSON string values (``tokenizer.JSON_VALUE``).

        Args:
            tokenizer: the model's tokenizer.
            mask_id: id written into slot positions.
            eos: end the canvas with EOS, as every training response ends.
        """
        ids, spans, _ = self._layout(tokenizer, mask_id, eos=eos)
        return ids, spans

    def _layout(self, tokenizer, mask_id: int, *, eos: bool) -> tuple[list[int], list[SlotSpan], list[int]]:
        """:meth:`to_canvas` plus the canvas start of every part."""
        special = set(tokenizer.all_special_ids)
        memo: dict[str, tuple[int, ...]] = {}  # a schema template repeats its pieces and values

        def encode(text: str) -> tuple[int, ...]:
            if text not in memo:
                memo[text] = tuple(_encode(tokenizer, text))
            return memo[text]

        def encode_value(text: str) -> tuple[int, ...]:
            """A JSON string value as the tokenizer splits it inside ``": "..."`` (its own pre-token,
            ``tokenizer.JSON_VALUE``), which may differ from the text tokenised alone."""
            head, tail = encode('": "'), encode('"')
            full = encode(f'": "{text}"')
            if full[:len(head)] == head and full[len(full) - len(tail):] == tail:
                return full[len(head):len(full) - len(tail)]
            return encode(text)

        ids: list[int] = []
        spans: list[SlotSpan] = []
        starts: list[int] = []
        offset = 0
        for part in self.parts:
            starts.append(len(ids))
            if isinstance(part, str):
                piece = encode(part)
                if special & set(piece):
                    raise ValueError(f"template: fixed text at position {offset} ({part[:20]!r}) encodes to a "
                                     "special token")
                ids += piece
            else:
                options: tuple[tuple[int, ...], ...] = ()
                lo, hi = part.min_len, part.max_len
                if part.kind == "enum":
                    options = tuple((encode_value if part.in_string else encode)(v) for v in part.values)
                    if any(special & set(o) for o in options):
                        raise ValueError(f"template: enum slot at position {offset} has a value that encodes to a "
                                         "special token")
                    lo, hi = min(map(len, options)), max(map(len, options))
                spans.append(SlotSpan(len(ids), len(ids) + hi, lo, part, options))
                ids += [mask_id] * hi
            offset += len(str(part))
        if eos:
            ids.append(tokenizer.eos_token_id)
        return ids, spans, starts


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


# ------------------------------------------------------------------------------------------------
# the strategy
# ------------------------------------------------------------------------------------------------
class StructurePrior(Strategy):
    """Dimple's structure prior as a sampler strategy.

    ``init_canvas`` writes the template's fixed tokens (never changed afterwards: the loop only
    fills mask positions); ``process_logits`` sets to -inf, per position: special tokens (mask,
    BOS, media, role markers) everywhere; EOS/PAD in the required part of a slot; in an ``enum``
    slot every token but its values' tokens, in a ``digits`` slot every non-digit token; in a slot
    inside a JSON string, tokens that would break the string. Multi-token enum slots are narrowed
    at every step to the values still consistent with the slot's already fixed tokens.

    Args:
        template: the response skeleton.
        tokenizer: the model's tokenizer.
        eos: end the canvas with a fixed EOS.
    """

    def __init__(self, template: Template, tokenizer, *, eos: bool = True) -> None:
        if not template.slots:
            raise ValueError(f"template {str(template)[:40]!r} has no slot")
        self.template, self.tokenizer = template, tokenizer
        self.special = SpecialIds.from_tokenizer(tokenizer)
        ids, self.spans, self._starts = template._layout(tokenizer, self.special.mask, eos=eos)
        self.ids = torch.tensor(ids, dtype=torch.long)  # (L,)
        self.length = len(ids)
        self.n_masked = sum(s.width for s in self.spans)
        self._allowed = self._static_allowed()  # (L, V) bool
        self._dynamic = [(s, self._option_matrix(s)) for s in self.spans if s.slot.kind == "enum" and s.width > 1]
        self._cache: dict[tuple[int, str], torch.Tensor] = {}

    # -- construction -----------------------------------------------------------------------------
    def _token_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(digits, string_safe): (V,) bool over the tokenizer's ids, from each token's text."""
        texts = [self.tokenizer.decode([i]) for i in range(len(self.tokenizer))]
        digits = torch.tensor([t.isdigit() and t.isascii() for t in texts])
        safe = torch.tensor([not any(c in '"\\' or ord(c) < 32 for c in t) for t in texts])
        return digits, safe

    def _static_allowed(self) -> torch.Tensor:
        V, sp = len(self.tokenizer), self.special
        content = torch.ones(V, dtype=torch.bool)
        content[list(self.tokenizer.all_special_ids)] = False
        allowed = content.expand(self.length, V).clone()  # (L, V); fixed positions: no special tokens
        needs_texts = any(s.slot.kind == "digits" or s.slot.in_string for s in self.spans)
        digits, safe = self._token_masks() if needs_texts else (content, content)
        for span in self.spans:
            kind = span.slot.kind
            rows = torch.zeros(span.width, V, dtype=torch.bool)  # (W, V)
            if kind == "enum":
                for i in range(span.width):
                    rows[i, [o[i] if i < len(o) else sp.eos for o in span.options]] = True
            else:
                rows[:] = content & (digits if kind == "digits" else safe if span.slot.in_string else content)
                rows[span.required:, sp.eos] = True
            rows[:, sp.pad] = rows[:, sp.eos]  # PAD counts as EOS inside slots
            allowed[span.start:span.stop] = rows
        return allowed

    def _option_matrix(self, span: SlotSpan) -> torch.Tensor:
        """(K, W) token ids of each enum value, EOS-padded to the slot width."""
        return torch.tensor([list(o) + [self.special.eos] * (span.width - len(o)) for o in span.options])

    # -- Strategy hooks ---------------------------------------------------------------------------
    def init_canvas(self, canvas: torch.Tensor, mask_id: int) -> torch.Tensor:
        if mask_id != self.special.mask:
            raise ValueError(f"the sampler's mask id {mask_id} is not the tokenizer's {self.special.mask}")
        if canvas.shape[1] != self.length:
            raise ValueError(f"the canvas has {canvas.shape[1]} positions but the template needs {self.length}; "
                             "run with prior.sampler_config(config)")
        return self.ids.to(canvas.device).expand_as(canvas).clone()  # (B, L)

    def process_logits(self, logits: torch.Tensor, state: StepState) -> torch.Tensor:
        B, L, V = logits.shape
        if L != self.length:
            raise ValueError(f"logits cover {L} positions but the template has {self.length}")
        allowed = self._allowed_on(V, logits.device)  # (L, V)
        if self._dynamic:
            allowed = allowed.expand(B, L, V).clone()  # (B, L, V)
            for span, options in self._dynamic:
                allowed[:, span.start:span.stop] = self._consistent(span, options.to(logits.device),
                                                                    state.canvas[:, span.start:span.stop], V)
        return logits.masked_fill(~allowed, float("-inf"))

    def _allowed_on(self, V: int, device: torch.device) -> torch.Tensor:
        key = (V, str(device))
        if key not in self._cache:
            if V < self._allowed.shape[1]:
                raise ValueError(f"model vocabulary {V} is smaller than the tokenizer's {self._allowed.shape[1]}")
            pad = torch.zeros(self.length, V - self._allowed.shape[1], dtype=torch.bool)  # ids past the tokenizer
            self._cache[key] = torch.cat([self._allowed, pad], dim=1).to(device)
        return self._cache[key]

    def _consistent(self, span: SlotSpan, options: torch.Tensor, seg: torch.Tensor, V: int) -> torch.Tensor:
        """(B, W, V) allowed tokens of a multi-token enum slot: the tokens, at each position, of the
        values that agree with every fixed token of ``seg`` (B, W) (the closest values if none does)."""
        sp = self.special
        seg = torch.where(seg == sp.pad, sp.eos, seg)
        fixed = seg != sp.mask  # (B, W)
        agree = ((options[None] == seg[:, None]) & fixed[:, None]).sum(-1)  # (B, K)
        best = agree == agree.max(-1, keepdim=True).values  # (B, K)
        b, k = best.nonzero(as_tuple=True)
        out = torch.zeros(seg.shape[0], span.width, V, dtype=torch.bool, device=seg.device)
        for i in range(span.width):
            out[b, i, options[k, i]] = True
        out[..., sp.pad] = out[..., sp.eos]
        return out

    # -- reading the result -----------------------------------------------------------------------
    def sampler_config(self, config: SamplerConfig) -> SamplerConfig:
        """``config`` with the canvas set to the template: ``gen_length`` = the template length,
        ``steps`` by default one per slot token, and ``suppress_eos`` kept only when every slot
        position is required (EOS/PAD are already forbidden there; optional positions need them)."""
        exact = all(s.required == s.width for s in self.spans)
        return replace(config, gen_length=self.length, steps=config.steps or self.n_masked,
                       suppress_eos=config.suppress_eos and exact)

    def values(self, tokens: Sequence[int]) -> list[str]:
        """The text of each slot in a finished canvas row, EOS/PAD dropped.

        ``enum`` slots give their value (the one agreeing with most of the slot's tokens, which is
        exact unless two tokens of a multi-token value were fixed in the same step); ``digits``
        slots are normalised with ``int`` (``"07"`` -> ``"7"``; empty stays empty).
        """
        sp, out = self.special, []
        tokens = [int(t) for t in tokens]
        for span in self.spans:
            seg = [sp.eos if t == sp.pad else t for t in tokens[span.start:span.stop]]
            if span.slot.kind == "enum":
                padded = [list(o) + [sp.eos] * (span.width - len(o)) for o in span.options]
                scores = [sum(a == b for a, b in zip(seg, o)) for o in padded]
                out.append(span.slot.values[scores.index(max(scores))])
                continue
            text = self.tokenizer.decode([t for t in seg if t != sp.eos])
            out.append(str(int(text)) if span.slot.kind == "digits" and text else text)
        return out

    def fill(self, tokens: Sequence[int]) -> str:
        """The template text with each slot replaced by its value (:meth:`values`)."""
        values = iter(self.values(tokens))
        return "".join(next(values) if isinstance(p, Slot) else p for p in self.template.parts)

    def check_context(self, max_seq_len: int, *, prompt_len: int = 0) -> None:
        """Raise a ValueError naming the template position where prompt + canvas overflow the model.

        Args:
            max_seq_len: the decoder's context (``DecoderConfig.max_seq_len``).
            prompt_len: prompt tokens, media tokens included.
        """
        budget = max_seq_len - prompt_len
        if self.length <= budget:
            return
        k = max(i for i, s in enumerate(self._starts) if s < budget) if budget > 0 else 0
        offset = sum(len(str(p)) for p in self.template.parts[:k])
        raise ValueError(f"template needs {self.length} canvas tokens + {prompt_len} prompt tokens, more than the "
                         f"model's context (max_seq_len {max_seq_len}); it overflows at template position {offset} "
                         f"({str(self.template.parts[k])[:24]!r})")
