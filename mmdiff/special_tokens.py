"""Every special token of mmdiff's own tokenizer, in one place.

No other module writes a special token string or id literal: they import the names below and
resolve ids through the tokenizer (``tokenizer.convert_tokens_to_ids``) or :class:`SpecialIds`.
"""
from __future__ import annotations

from dataclasses import dataclass

MASK = "<|mask|>"
PAD = "<|pad|>"
EOS = "<|eos|>"
BOS = "<|bos|>"
IMAGE = "<image>"
AUDIO = "<audio>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SYSTEM = "<|system|>"
END_TURN = "<|end|>"

#: Order fixes the ids of a freshly trained tokenizer: MASK=0, PAD=1, ...
ALL: tuple[str, ...] = (MASK, PAD, EOS, BOS, IMAGE, AUDIO, USER, ASSISTANT, SYSTEM, END_TURN)

#: Jinja chat template (transformers ``apply_chat_template``). The assistant turn ends with EOS;
#: with ``add_generation_prompt`` the prompt stops after the assistant marker.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}<|end|>"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
    "{% else %}<|assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokens the sampler and the model need, resolved from a tokenizer."""

    mask: int
    pad: int
    eos: int
    bos: int | None = None
    image: int | None = None
    audio: int | None = None

    @classmethod
    def from_tokenizer(cls, tok) -> "SpecialIds":
        """Resolve the ids of mmdiff's special tokens in a (transformers) tokenizer."""

        def tid(token: str) -> int | None:
            i = tok.convert_tokens_to_ids(token)
            return None if i is None or i == tok.unk_token_id and token != tok.unk_token else int(i)

        ids = {name: tid(tokn) for name, tokn in (("mask", MASK), ("pad", PAD), ("eos", EOS),
                                                   ("bos", BOS), ("image", IMAGE), ("audio", AUDIO))}
        for need in ("mask", "pad", "eos"):
            if ids[need] is None:
                raise ValueError(f"tokenizer has no {need} token")
        return cls(**ids)
