"""What a streamed answer may send while its canvas is still being denoised.

A masked-diffusion canvas fills out of order, and a client joins the streamed ``delta.content``
pieces into the answer, so a piece may never be taken back. :func:`final_text` is the text no later
step can change: the decoded canvas up to its first still-masked position (a fixed token never
changes: the sampler writes masked positions only). :func:`canvas_view` is one step's whole canvas
as token strings, for clients that show the denoising.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from .. import special_tokens as st
from ..model import MultimodalDiffusionLM
from ..sampling import StepEvent


def final_text(model: MultimodalDiffusionLM, canvas: Sequence[int]) -> str:
    """The part of the answer that no later step can change (a prefix of ``model.decode`` of the
    finished canvas).

    The tokens before the first mask are decoded as the answer is; when they do not reach an EOS or
    the canvas end, a trailing partial UTF-8 character (U+FFFD) is held back and, with a tokenizer
    that cleans up spaces before punctuation (``" 's"`` -> ``"'s"``), so is the text after the last
    space, which a later token could still join to it.
    """
    mask = model.special.mask
    cut = next((i for i, t in enumerate(canvas) if t == mask), len(canvas))
    prefix = list(canvas[:cut])
    text = model.decode(prefix)
    if cut == len(canvas) or model.special.eos in prefix:
        return text
    text = text.rstrip("\ufffd")
    if getattr(model.tokenizer, "clean_up_tokenization_spaces", False):
        text = re.sub(r"\s*\S*$", "", text)
    return text


def canvas_view(model: MultimodalDiffusionLM, event: StepEvent) -> dict[str, Any]:
    """One step's canvas: ``{"step", "block", "ids", "tokens", "fixed", "masked"}``, where ``tokens``
    holds each position's text (a masked one is ``<|mask|>``, EOS and PAD by name) and ``fixed`` the
    positions this step fixed."""
    sp = model.special
    names = {sp.mask: st.MASK, sp.eos: st.EOS, sp.pad: st.PAD}
    ids = event.canvas.tolist()
    return {"step": event.step, "block": event.block, "ids": ids,
            "tokens": [names.get(t) or model.tokenizer.decode([t]) for t in ids],
            "fixed": [i for i, f in enumerate(event.fixed.tolist()) if f], "masked": sum(t == sp.mask for t in ids)}
