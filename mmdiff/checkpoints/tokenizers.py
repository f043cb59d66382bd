"""Released tokenizers under mmdiff's special-token names.

Released tokenizers name their special tokens their own way and have no ``<image>`` placeholder;
:class:`ReleasedTokenizer` presents them under mmdiff's names (:mod:`mmdiff.special_tokens`).
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import special_tokens as st
from ..special_tokens import SpecialIds
from .formats import TOKENIZER_FILES, _hf_special_ids, load_tokenizer_if_present

# ------------------------------------------------------------------------------------------------
# released tokenizers under mmdiff's special-token names
# ------------------------------------------------------------------------------------------------
#: LLaDA's mask token in its tokenizer; the mask id comes from it only when no config declares one.
LLADA_MASK_TOKEN = "<|mdm_mask|>"


class ReleasedTokenizer:
    """A released checkpoint's tokenizer, presented under mmdiff's special-token names.

    :class:`~mmdiff.model.MultimodalDiffusionLM` resolves its ids by name
    (:meth:`SpecialIds.from_tokenizer`) and writes prompts with ``<image>`` / ``<audio>``
    placeholders. This wrapper answers mmdiff's MASK / PAD / EOS / BOS names with the ids the
    checkpoint declares, adds ``<image>`` and ``<audio>`` to the tokenizer as special tokens (their
    embeddings are never read: :meth:`~mmdiff.model.MultimodalDiffusionLM.embed_prompt` replaces
    them), and writes a placeholder before the text in the family's layout (``media_format``; LLaVA's
    default: on its own line; Qwen2-VL's: between vision start/end tokens). Prompts use the
    tokenizer's own chat template, after the model's system prompt when it has one; a tokenizer
    without a template (a base model's) gets the bare text.

    Args:
        tokenizer: the checkpoint's transformers tokenizer (placeholders are added to it).
        special: the ids the checkpoint declares.
        vocab_size: rows of the model's embedding; the placeholder ids must fall below it.
        system: system prompt put before the conversation when it has none (LLaDA-V's).
        media_layout: where media placeholders go (:data:`MEDIA_LAYOUTS`): ``llava``, on their own
            line before the user's text; ``before_chat``, in front of the whole chat text (MMaDA: the
            image block, then the chat template from its BOS on).
        media_format: ``llava`` layout: how one placeholder is written before the text, ``{}``
            standing for it (LLaVA: ``"{}\n"``; Dimple / Qwen2-VL: ``"<|vision_start|>{}<|vision_end|>"``).
    """

    #: mmdiff's placeholder name -> the string added to the tokenizer for it (a family whose prompts hold
    #: the text ``<audio>`` itself, like DIFFA's, adds other strings so that text stays text)
    PLACEHOLDERS: dict[str, str] = {st.IMAGE: st.IMAGE, st.AUDIO: st.AUDIO}

    def __init__(self, tokenizer: Any, special: SpecialIds, *, vocab_size: int, system: str | None = None,
                 media_layout: str = "llava", media_format: str = "{}\n") -> None:
        if media_layout not in MEDIA_LAYOUTS:
            raise ValueError(f"unknown media layout {media_layout!r}; known: {list(MEDIA_LAYOUTS)}")
        self.media_layout, self.media_format = media_layout, media_format
        tokenizer.add_tokens([self.PLACEHOLDERS[st.IMAGE], self.PLACEHOLDERS[st.AUDIO]], special_tokens=True)
        image, audio = (int(tokenizer.convert_tokens_to_ids(self.PLACEHOLDERS[t])) for t in (st.IMAGE, st.AUDIO))
        taken = sorted({i for i in (special.mask, special.pad, special.eos, special.bos) if i is not None})
        for name, i in ((st.IMAGE, image), (st.AUDIO, audio)):
            if i >= vocab_size or i in taken:
                raise ValueError(f"placeholder {name} got id {i}, which is outside the model's {vocab_size} "
                                 f"embedding rows or is one of its special ids {taken}")
        self.tokenizer, self.system = tokenizer, system
        self.special = replace(special, image=image, audio=audio)
        self._ids: dict[str, int | None] = {st.MASK: special.mask, st.PAD: special.pad, st.EOS: special.eos,
                                            st.BOS: special.bos, st.IMAGE: image, st.AUDIO: audio}

    @property
    def unk_token(self) -> str | None:
        return self.tokenizer.unk_token

    @property
    def unk_token_id(self) -> int | None:
        return self.tokenizer.unk_token_id

    @property
    def backend_tokenizer(self) -> Any:
        return self.tokenizer.backend_tokenizer

    @property
    def eos_token_id(self) -> int:
        return self.special.eos

    @property
    def pad_token_id(self) -> int:
        return self.special.pad

    @property
    def all_special_ids(self) -> list[int]:
        """Every id no answer may contain (structure priors forbid them): the tokenizer's special
        tokens, the ids the checkpoint declares (mask, pad, eos, bos) and the media placeholders."""
        return sorted(set(self.tokenizer.all_special_ids) | {i for i in self._ids.values() if i is not None})

    def __len__(self) -> int:
        return len(self.tokenizer)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        """mmdiff's special names map to the checkpoint's ids; other tokens are looked up as usual."""
        return self._ids[token] if token in self._ids else self.tokenizer.convert_tokens_to_ids(token)

    def __call__(self, text: str | list[str], **kwargs: Any) -> Any:
        return self.tokenizer(text, **kwargs)

    def decode(self, ids: Sequence[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(list(ids), **kwargs)

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> Any:
        """The tokenizer's chat template with the media placeholders where the family expects them
        (``media_layout``), wherever mmdiff's prompt placed them: ``llava``, first in the message, each
        in ``media_format`` (``<image>\\nquestion``; :meth:`layout`); ``before_chat``, in front of the
        chat text."""
        if self.media_layout == "before_chat":
            media = "".join("".join(_placeholders(m["content"])) for m in messages)
            messages = [{**m, "content": _strip_placeholders(m["content"])} for m in messages]
            text = media + self._chat_text(messages, kwargs)
        else:
            text = self._chat_text([{**m, "content": self.layout(m["content"])} for m in messages], kwargs)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if kwargs.get("tokenize", True) else text

    def layout(self, content: str) -> str:
        """A message's content with mmdiff's placeholders where this family puts its media (LLaVA's layout)."""
        return _media_first(content, self.media_format)

    def _chat_text(self, messages: list[dict[str, str]], kwargs: dict[str, Any]) -> str:
        if self.system is not None and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system}, *messages]
        if self.tokenizer.chat_template is None:  # base models: the text itself
            return "".join(m["content"] for m in messages)
        return self.tokenizer.apply_chat_template(messages, **{**kwargs, "tokenize": False})


#: where a released family's prompts put media placeholders (see :class:`ReleasedTokenizer`)
MEDIA_LAYOUTS: tuple[str, ...] = ("llava", "before_chat")


def _placeholders(content: str) -> list[str]:
    return re.findall(f"{re.escape(st.IMAGE)}|{re.escape(st.AUDIO)}", content)


def _strip_placeholders(content: str) -> str:
    return content.replace(st.IMAGE, "").replace(st.AUDIO, "")


def _media_first(content: str, media_format: str = "{}\n") -> str:
    """Move ``<image>`` / ``<audio>`` placeholders to the front, each written in ``media_format``,
    keeping their order."""
    return "".join(media_format.format(p) for p in _placeholders(content)) + _strip_placeholders(content)


def require_tokenizer(directory: Path) -> Any:
    tokenizer = load_tokenizer_if_present(directory)
    if tokenizer is None:
        raise FileNotFoundError(f"{directory} has no tokenizer files (any of {list(TOKENIZER_FILES)}); "
                                "a multimodal model needs the checkpoint's tokenizer")
    return tokenizer


def released_special_ids(directory: Path, config: Mapping[str, Any], tokenizer: Any, *,
                         mask_token: str = LLADA_MASK_TOKEN) -> SpecialIds:
    """A released checkpoint's special ids (``config.json``, else ``generation_config.json``), the mask
    id falling back to the tokenizer's ``mask_token`` when no config declares one."""
    mask = tokenizer.convert_tokens_to_ids(mask_token)
    return _hf_special_ids(directory, config, fallback={
        "mask_token_id": None if mask is None or mask == tokenizer.unk_token_id else mask})
