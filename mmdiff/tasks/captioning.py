"""Captioning with structure priors (Dimple, Yu et al. 2025, Sec. 3.4): an image described as text,
or as JSON that always validates against a schema.

JSON: the outer arrays of unknown length are first sized by the model's own answer to
:data:`COUNT_QUESTION`, then ``"describe the image in json."`` is answered on the schema's template
(:func:`mmdiff.sampling.schema.schema_to_template`) placed on the canvas by a
:class:`~mmdiff.sampling.structure.StructurePrior`. The array-length rule and caveats are in
``docs/structure_priors.md``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from ..model import NO_VISION, MultimodalDiffusionLM
from ..sampling import DecodeConfig, StepEvent
from ..sampling.schema import INTEGER_TOKENS, schema_to_template, validate
from ..sampling.structure import Slot, StructurePrior, Template
from .prompts import CAPTION_JSON_QUESTION, CAPTION_QUESTION, COUNT_QUESTION

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


def generate_with_prior(model: MultimodalDiffusionLM, question: str, image: Any, prior: StructurePrior, *,
                        decode: DecodeConfig, callback: Callable[[StepEvent], None] | None = None
                        ) -> tuple[list[int], int]:
    """Answer ``question`` about ``image`` on the prior's canvas; returns (canvas tokens, nfe).

    Args:
        decode, callback: as :meth:`MultimodalDiffusionLM.generate` (the canvas and steps of
            ``decode.sampler`` are set from the template).

    Raises:
        ValueError: when prompt + template do not fit the decoder's context.
    """
    prompt_len = len(model.format_prompt(question, n_images=1)) - 1 + model.num_image_tokens(image)
    prior.check_context(model.cfg.decoder.max_seq_len, prompt_len=prompt_len)
    res = model.generate([question], images=[image], decode=decode.replace(sampler=prior.sampler_config(decode.sampler)),
                         strategies=[prior], callback=callback)[0]
    return res.tokens, res.nfe


def ask_count(model: MultimodalDiffusionLM, image: Any, *, decode: DecodeConfig, question: str = COUNT_QUESTION,
              callback: Callable[[StepEvent], None] | None = None) -> tuple[int, int]:
    """Decode the answer to ``question`` in a ``<digits:1-2>`` slot; returns (count, nfe)."""
    prior = StructurePrior(Template((Slot("digits", 1, INTEGER_TOKENS),)), model.tokenizer)
    tokens, nfe = generate_with_prior(model, question, image, prior, decode=decode, callback=callback)
    return int(prior.values(tokens)[0]), nfe


def caption(model: MultimodalDiffusionLM, image: Any, *, format: str = "json", schema: dict | None = None,
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
        schema: the JSON schema (supported subset, :mod:`mmdiff.sampling.schema`); required for
            ``json`` (the shipped model's scene schema is :func:`mmdiff.data.scenes.scene_schema`).
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
    decode = decode or DecodeConfig()
    if decode.search.active:
        raise ValueError("captions decode without a test-time search: set the search to none")
    if model.vision is None:
        raise ValueError(NO_VISION)
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
    if schema is None:
        raise ValueError("format='json' needs a schema (the scene schema: mmdiff.data.scenes.scene_schema())")
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
