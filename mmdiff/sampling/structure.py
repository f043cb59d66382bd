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
* :func:`schema_to_template` - a JSON-schema subset (objects, arrays, string enums, free strings,
  integers, booleans) compiled to a template; :func:`validate` checks data against that subset,
* :func:`caption` - scene captioning as text or schema-valid JSON (count first, then the template).

The syntax, the array-length rule and the caveats are documented in ``docs/structure_priors.md``.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch

from ..special_tokens import SpecialIds
from .decode import DecodeConfig
from .sampler import SamplerConfig, StepEvent, StepState, Strategy

if TYPE_CHECKING:
    from ..model import MultimodalDiffusionLM

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


# ------------------------------------------------------------------------------------------------
# JSON schema subset
# ------------------------------------------------------------------------------------------------
SCHEMA_TYPES: tuple[str, ...] = ("object", "array", "string", "integer", "boolean")
_ANNOTATIONS = {"title", "description", "$schema", "$id", "examples", "default"}
_KEYWORDS: dict[str, set[str]] = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"enum"},
    "integer": set(),
    "boolean": set(),
}
INTEGER_TOKENS = 2  # an integer field is a <digits:1-2> slot: 0..99 with single-digit tokens


def check_schema(schema: Any, path: str = "$") -> None:
    """Raise a ValueError naming the field (``$``, ``$.name``, ``$[].name``) of anything outside the
    supported subset: types object / array / string (free or enum) / integer / boolean."""
    if not isinstance(schema, dict):
        raise ValueError(f"schema at {path}: expected an object, got {type(schema).__name__}")
    kind = schema.get("type")
    if kind is None:
        raise ValueError(f"schema at {path}: missing 'type' (supported: {', '.join(SCHEMA_TYPES)})")
    if not isinstance(kind, str) or kind not in SCHEMA_TYPES:
        raise ValueError(f"schema at {path}: unsupported type {kind!r}; supported: {', '.join(SCHEMA_TYPES)}")
    unknown = sorted(set(schema) - _KEYWORDS[kind] - _ANNOTATIONS - {"type"})
    if unknown:
        raise ValueError(f"schema at {path}: unsupported keyword {unknown[0]!r} for type {kind}")
    if kind == "object":
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise ValueError(f"schema at {path}: 'properties' must be an object")
        for name in schema.get("required", []):
            if name not in props:
                raise ValueError(f"schema at {path}: required field {name!r} is not in 'properties'")
        if not isinstance(schema.get("additionalProperties", True), bool):
            raise ValueError(f"schema at {path}: 'additionalProperties' must be true or false")
        for name, sub in props.items():
            check_schema(sub, f"{path}.{name}")
    elif kind == "array":
        if "items" not in schema:
            raise ValueError(f"schema at {path}: an array needs 'items'")
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        for key, v in (("minItems", lo), ("maxItems", hi)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"schema at {path}: '{key}' must be a non-negative integer, got {v!r}")
        if hi is not None and lo > hi:
            raise ValueError(f"schema at {path}: minItems {lo} > maxItems {hi}")
        check_schema(schema["items"], f"{path}[]")
    elif kind == "string" and "enum" in schema:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise ValueError(f"schema at {path}: 'enum' must be a non-empty list")
        for v in values:
            if not isinstance(v, str) or not v or json.dumps(v)[1:-1] != v or "|" in v:
                raise ValueError(f"schema at {path}: enum value {v!r} is not supported (non-empty strings without "
                                 "characters JSON escapes, or '|')")


def _errors(data: Any, schema: dict, path: str) -> Iterator[str]:
    kind = schema["type"]
    if kind == "object":
        if not isinstance(data, dict):
            yield f"{path}: expected an object, got {type(data).__name__}"
            return
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in data:
                yield f"{path}: missing required field {name!r}"
        if schema.get("additionalProperties", True) is False:
            for name in data:
                if name not in props:
                    yield f"{path}: unexpected field {name!r}"
        for name, sub in props.items():
            if name in data:
                yield from _errors(data[name], sub, f"{path}.{name}")
    elif kind == "array":
        if not isinstance(data, list):
            yield f"{path}: expected an array, got {type(data).__name__}"
            return
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        if len(data) < lo or (hi is not None and len(data) > hi):
            yield f"{path}: {len(data)} items, expected {lo}..{'' if hi is None else hi}"
        for i, item in enumerate(data):
            yield from _errors(item, schema["items"], f"{path}[{i}]")
    elif kind == "string":
        if not isinstance(data, str):
            yield f"{path}: expected a string, got {type(data).__name__}"
        elif "enum" in schema and data not in schema["enum"]:
            yield f"{path}: {data!r} is not one of {schema['enum']}"
    elif kind == "integer":
        if not isinstance(data, int) or isinstance(data, bool):
            yield f"{path}: expected an integer, got {type(data).__name__}"
    elif kind == "boolean" and not isinstance(data, bool):
        yield f"{path}: expected a boolean, got {type(data).__name__}"


def validate(data: Any, schema: dict) -> None:
    """Check ``data`` against a schema of the supported subset.

    Raises:
        ValueError: the schema is outside the subset, or the first violation, with its data path
            (``$[2].color: 'pink' is not one of [...]``).
    """
    check_schema(schema)
    for error in _errors(data, schema, "$"):
        raise ValueError(error)


def is_valid(data: Any, schema: dict) -> bool:
    """Whether ``data`` satisfies ``schema`` (which must be inside the supported subset)."""
    check_schema(schema)
    return next(_errors(data, schema, "$"), None) is None


@dataclass(frozen=True)
class _Leaf:
    slot: int  # index into the template's slots
    type: str  # string | integer | boolean


@dataclass(frozen=True)
class _Object:
    fields: tuple[tuple[str, Any], ...]  # (name, node)


@dataclass(frozen=True)
class _Array:
    items: tuple[Any, ...]
    required: int  # items before this index are complete by construction; later ones may be dropped
    min_items: int  # the array is complete when at least this many items are


@dataclass(frozen=True)
class SchemaTemplate:
    """A schema compiled to a template, and how to read the filled slots back into data.

    Args:
        template: the skeleton (fixed JSON text with one slot per leaf field).
        root: the tree of objects / arrays / leaves over the template's slots.
        free_arrays: outer arrays (not inside another array) whose length was not given and not
            fixed by the schema: path -> (minItems, maxItems or None). They got their maximum.
    """

    template: Template
    root: Any
    free_arrays: dict[str, tuple[int, int | None]] = field(default_factory=dict)

    def read(self, values: Sequence[str]) -> Any:
        """Data from slot values (:meth:`StructurePrior.values`); incomplete optional items are dropped."""
        data, _ = _read(self.root, list(values))
        return data


def _read(node: Any, values: list[str]) -> tuple[Any, bool]:
    """(value, complete): complete when no leaf below is empty."""
    if isinstance(node, _Leaf):
        text = values[node.slot]
        if not text:
            return None, False
        return (int(text) if node.type == "integer" else text == "true" if node.type == "boolean" else text), True
    if isinstance(node, _Object):
        read = [(name, _read(sub, values)) for name, sub in node.fields]
        return {name: v for name, (v, _) in read}, all(ok for _, (_, ok) in read)
    items = [_read(sub, values) for sub in node.items]
    kept = [v for i, (v, ok) in enumerate(items) if ok or i < node.required]
    return kept, sum(ok for _, ok in items) >= node.min_items


class _Compiler:
    def __init__(self, lengths: Mapping[str, int], string_tokens: int, max_items: int) -> None:
        self.lengths, self.string_tokens, self.max_items = lengths, string_tokens, max_items
        self.parts: list[str | Slot] = []
        self.n_slots = 0
        self.arrays: set[str] = set()
        self.free: dict[str, tuple[int, int | None]] = {}

    def slot(self, slot: Slot, kind: str) -> _Leaf:
        self.parts.append(slot)
        self.n_slots += 1
        return _Leaf(self.n_slots - 1, kind)

    def node(self, schema: dict, path: str, *, optional: bool, in_array: bool) -> Any:
        kind = schema["type"]
        if kind == "object":
            fields = []
            self.parts.append("{")
            for i, (name, sub) in enumerate(schema.get("properties", {}).items()):
                self.parts.append((", " if i else "") + json.dumps(name) + ": ")
                fields.append((name, self.node(sub, f"{path}.{name}", optional=optional, in_array=in_array)))
            self.parts.append("}")
            return _Object(tuple(fields))
        if kind == "array":
            n, required = self.array_length(schema, path, in_array)
            items = []
            self.parts.append("[")
            for i in range(n):
                self.parts.append(", " if i else "")
                items.append(self.node(schema["items"], f"{path}[]", optional=optional or i >= required, in_array=True))
            self.parts.append("]")
            return _Array(tuple(items), 0 if optional else required, schema.get("minItems", 0))
        if kind == "string":
            self.parts.append('"')
            if "enum" in schema:
                leaf = self.slot(Slot("enum", values=tuple(schema["enum"]) + (("",) if optional else ()),
                                      in_string=True), "string")
            else:
                leaf = self.slot(Slot("mask", 0 if optional else 1, self.string_tokens, in_string=True), "string")
            self.parts.append('"')
            return leaf
        if kind == "integer":
            return self.slot(Slot("digits", 0 if optional else 1, INTEGER_TOKENS), "integer")
        return self.slot(Slot("enum", values=("true", "false") + (("",) if optional else ())), "boolean")

    def array_length(self, schema: dict, path: str, in_array: bool) -> tuple[int, int]:
        """(items on the canvas, items that must be complete)."""
        self.arrays.add(path)
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        if lo == hi:
            return lo, lo
        if path in self.lengths:
            n = self.lengths[path]
            if n < lo or (hi is not None and n > hi):
                raise ValueError(f"length {n} for the array at {path} is outside minItems {lo}..maxItems {hi}")
            return n, n
        if not in_array:
            self.free[path] = (lo, hi)
        return (hi if hi is not None else max(lo, self.max_items)), lo


def schema_to_template(schema: dict, *, lengths: Mapping[str, int] | None = None, string_tokens: int = 8,
                       max_items: int = 6) -> SchemaTemplate:
    """Compile a JSON schema (supported subset) to a template in ``json.dumps`` layout.

    Properties are emitted in the schema's order (all of them, required or not). Leaves become
    slots: string enum -> ``"<enum:...>"``, free string -> ``"<mask:1-string_tokens>"``, integer ->
    ``<digits:1-2>``, boolean -> ``<enum:true|false>``. An array gets ``lengths[path]`` items, or
    exactly ``minItems`` when it equals ``maxItems``, or else ``maxItems`` (``max_items`` when the
    schema has none) of which those past ``minItems`` are optional: each of their slots may be
    empty, and an item with an empty slot is dropped by :meth:`SchemaTemplate.read`.

    Args:
        schema: the schema; checked with :func:`check_schema`.
        lengths: known array lengths by path (``$`` for a top-level array, ``$.objects``, ...).
        string_tokens: the token budget of a free string.
        max_items: the length of an array without ``maxItems`` whose length is not given.
    """
    check_schema(schema)
    if string_tokens < 1:
        raise ValueError(f"string_tokens must be >= 1, got {string_tokens}")
    lengths = dict(lengths or {})
    compiler = _Compiler(lengths, string_tokens, max_items)
    root = compiler.node(schema, "$", optional=False, in_array=False)
    unknown = sorted(set(lengths) - compiler.arrays)
    if unknown:
        raise ValueError(f"lengths names {unknown[0]}, which is not an array of the schema "
                         f"(arrays: {sorted(compiler.arrays)})")
    parts: list[str | Slot] = []
    for p in compiler.parts:
        if isinstance(p, str) and parts and isinstance(parts[-1], str):
            parts[-1] += p
        elif p != "":
            parts.append(p)
    return SchemaTemplate(Template(tuple(parts)), root, compiler.free)


def scene_schema() -> dict:
    """The scene-caption schema: the objects of :func:`mmdiff.data.questions.caption_json`, in reading
    order, each with enum fields shape / color / size / position (vocabularies of ``data.scenes``)."""
    from ..data.scenes import COLOURS, MAX_OBJECTS, POSITIONS, SHAPES, SIZES

    fields = {"shape": SHAPES, "color": COLOURS, "size": SIZES, "position": POSITIONS}
    item = {"type": "object", "properties": {k: {"type": "string", "enum": list(v)} for k, v in fields.items()},
            "required": list(fields), "additionalProperties": False}
    return {"type": "array", "items": item, "minItems": 1, "maxItems": MAX_OBJECTS}


def __getattr__(name: str) -> Any:
    # SCENE_SCHEMA is built on first access, so importing this module does not import mmdiff.data
    if name == "SCENE_SCHEMA":
        return scene_schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------
# captioning
# ------------------------------------------------------------------------------------------------
#: the count family's question about every object (``Filter().noun(plural=True)`` = "objects")
COUNT_QUESTION = "how many objects are there?"
ARRAY_LENGTHS = ("count", "max")


@dataclass
class CaptionResult:
    """A caption with its cost.

    Args:
        text: the caption; for JSON, ``json.dumps(data)``.
        data: the parsed, schema-valid JSON value (None for text captions).
        nfe: denoiser evaluations, the count question's included.
        latency_s: wall time of the whole caption.
        count: the decoded answer to the count question (None when it was not asked).
    """

    text: str
    data: Any
    nfe: int
    latency_s: float
    count: int | None = None


def _image_tokens(model: "MultimodalDiffusionLM") -> int:
    return model.vision_adapter.num_tokens(model.vision.num_tokens) if model.vision is not None else 0


def generate_with_prior(model: "MultimodalDiffusionLM", question: str, image: Any, prior: StructurePrior, *,
                        decode: DecodeConfig, callback: Callable[[StepEvent], None] | None = None
                        ) -> tuple[list[int], int]:
    """Answer ``question`` about ``image`` on the prior's canvas; returns (canvas tokens, nfe).

    Args:
        decode, callback: as :meth:`MultimodalDiffusionLM.generate` (the canvas and steps of
            ``decode.sampler`` are set from the template).

    Raises:
        ValueError: when prompt + template do not fit the decoder's context.
    """
    prompt_len = len(model.format_prompt(question, n_images=1)) - 1 + _image_tokens(model)
    prior.check_context(model.cfg.decoder.max_seq_len, prompt_len=prompt_len)
    res = model.generate([question], images=[image], decode=decode.replace(sampler=prior.sampler_config(decode.sampler)),
                         strategies=[prior], callback=callback)[0]
    return res.tokens, res.nfe


def ask_count(model: "MultimodalDiffusionLM", image: Any, *, decode: DecodeConfig, question: str = COUNT_QUESTION,
              callback: Callable[[StepEvent], None] | None = None) -> tuple[int, int]:
    """Decode the answer to ``question`` in a ``<digits:1-2>`` slot; returns (count, nfe)."""
    prior = StructurePrior(Template((Slot("digits", 1, INTEGER_TOKENS),)), model.tokenizer)
    tokens, nfe = generate_with_prior(model, question, image, prior, decode=decode, callback=callback)
    return int(prior.values(tokens)[0]), nfe


def caption(model: "MultimodalDiffusionLM", image: Any, *, format: str = "json", schema: dict | None = None,
            length: int | None = None, decode: DecodeConfig | None = None, array_length: str | int = "count",
            string_tokens: int = 8, callback: Callable[[StepEvent], None] | None = None) -> CaptionResult:
    """Caption an image as text or as JSON that always validates against ``schema``.

    JSON: the outer arrays of unknown length are sized by first decoding the answer to
    :data:`COUNT_QUESTION` (a trained question family); when that count is outside the array's
    minItems..maxItems, the array gets maxItems optional items and incomplete items are dropped.
    Then ``"describe the image in json."`` is answered on the schema's template.

    Args:
        model: the multimodal model.
        image: a path or PIL image.
        format: ``json`` or ``text``.
        schema: the JSON schema (supported subset); default the scene schema (:func:`scene_schema`).
        length: text only: exactly this many tokens (``<mask:length>``, EOS suppressed); None lets
            the model end the caption within ``decode.sampler.gen_length``.
        decode: sampler, cache and pruning settings of every sampler run (canvas length and steps
            are set from the template); a test-time search does not apply.
        array_length: ``count`` (count question first), ``max`` (maxItems, incomplete items
            dropped) or an int (the known length of the outer arrays).
        string_tokens: token budget of a free string field.
        callback: sees every denoising step of every sampler run, in order (the count question's,
            then the caption's; each run starts again at step 1).
    """
    from ..data.questions import CAPTION_JSON_QUESTION, CAPTION_QUESTION

    decode = decode or DecodeConfig()
    if decode.search.active:
        raise ValueError("captions decode without a test-time search: set the search to none")
    t0 = time.perf_counter()
    if format == "text":
        if schema is not None:
            raise ValueError("schema applies to format='json'")
        if length is None:
            res = model.generate([CAPTION_QUESTION], images=[image], decode=decode, callback=callback)[0]
            return CaptionResult(res.text, None, res.nfe, time.perf_counter() - t0)
        prior = StructurePrior(Template.free(length), model.tokenizer)
        exact = decode.replace(sampler=replace(decode.sampler, suppress_eos=True))
        tokens, nfe = generate_with_prior(model, CAPTION_QUESTION, image, prior, decode=exact, callback=callback)
        return CaptionResult(prior.fill(tokens), None, nfe, time.perf_counter() - t0)
    if format != "json":
        raise ValueError(f"unknown format {format!r}; known: json, text")
    if length is not None:
        raise ValueError("length applies to format='text'; JSON lengths come from the schema")
    if not isinstance(array_length, int) and array_length not in ARRAY_LENGTHS:
        raise ValueError(f"unknown array_length {array_length!r}; known: {', '.join(ARRAY_LENGTHS)} or an int")
    schema = scene_schema() if schema is None else schema
    compiled = schema_to_template(schema, string_tokens=string_tokens)
    count, nfe = None, 0
    if compiled.free_arrays and array_length != "max":
        if isinstance(array_length, int):
            n = array_length
        else:
            count, nfe = ask_count(model, image, decode=decode, callback=callback)
            n = count
        if all(lo <= n and (hi is None or n <= hi) for lo, hi in compiled.free_arrays.values()):
            compiled = schema_to_template(schema, lengths={p: n for p in compiled.free_arrays},
                                          string_tokens=string_tokens)
        elif isinstance(array_length, int):
            raise ValueError(f"array_length {n} is outside minItems..maxItems of {sorted(compiled.free_arrays)}")
    values: list[str] = []
    if compiled.template.slots:
        prior = StructurePrior(compiled.template, model.tokenizer)
        tokens, n_steps = generate_with_prior(model, CAPTION_JSON_QUESTION, image, prior, decode=decode,
                                              callback=callback)
        values, nfe = prior.values(tokens), nfe + n_steps
    data = compiled.read(values)
    validate(data, schema)  # holds by construction; a failure here is a bug
    return CaptionResult(json.dumps(data), data, nfe, time.perf_counter() - t0, count)
