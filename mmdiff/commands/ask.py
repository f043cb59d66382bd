"""``mmdiff ask``: answer one question about an image and/or a spoken question, by plain decoding or
through a self-verifying test-time search (``--search``, :mod:`mmdiff.search`).

Inputs are read and checked by the library (:func:`mmdiff.search.answer`, :mod:`mmdiff.media`): a bad
image, clip or question, or a question without the image a vision model needs, is a ``ValueError``
that ``mmdiff`` prints as one line with exit status 2."""
from __future__ import annotations

import argparse
import json
import sys

from ..media import MAX_IMAGE_PIXELS, MAX_QUESTION_CHARS, read_question
from ..search import SearchResult, answer
from ..tasks.presets import SHORT_ANSWER
from .options import (
    add_decode_arguments,
    add_model_arguments,
    add_speech_arguments,
    apply_speech_arguments,
    check_model_arguments,
    decode_config_from_args,
    load_model,
)

#: short answers: the canvas mmdiff-tiny is trained on
DEFAULTS = SHORT_ANSWER


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", nargs="?", default="",
                   help=f"the question (optional when --audio is given; at most {MAX_QUESTION_CHARS} characters)")
    p.add_argument("--image", help=f"image file (png, jpg, ...: any mode or bit depth, at most "
                                   f"{MAX_IMAGE_PIXELS / 1e6:g} MP); a model with a vision encoder needs one")
    p.add_argument("--audio", help="spoken question (wav, flac, ogg: any sample rate from 8 kHz, any channels); "
                                   "a model with an audio encoder hears it")
    add_model_arguments(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: answer, nfe, latency_s, the decode settings (and the scored "
                        "candidates with --search; with --audio on an audio_ctc model, 'heard': the transcript it "
                        "decoded)")
    add_decode_arguments(p, DEFAULTS)
    add_speech_arguments(p)


def run(args: argparse.Namespace) -> int:
    if not args.question.strip() and not args.audio:
        raise ValueError("give a question, --audio, or both")
    read_question(args.question)  # UTF-8, control characters, length: before the model loads
    decode = decode_config_from_args(args, DEFAULTS)  # checked before the model loads
    check_model_arguments(args)
    model = load_model(args)
    apply_speech_arguments(model, args)
    res = answer(model, [args.question], images=[args.image], audios=[args.audio], decode=decode)[0]
    candidates = ([{"text": text, "score": score} for text, score in res.candidates]
                  if isinstance(res, SearchResult) else None)
    heard = None
    if args.audio and model.transcribes:
        heard = model.transcribe([args.audio])[0]  # what the decoder was given (audio_ctc)
    if args.json:
        out = {"answer": res.text, "nfe": res.nfe, "latency_s": round(res.latency_s, 4), **decode.to_dict()}
        out.update({"heard": heard} if heard is not None else {})
        print(json.dumps(out if candidates is None else {**out, "candidates": candidates}))
    else:
        print(res.text)
        how = f", {decode.search.strategy} over {len(candidates)} distinct answers" if candidates is not None else ""
        print(f"(nfe {res.nfe}, {res.latency_s * 1000:.0f} ms{how}" + (f", heard: {heard!r}" if heard is not None else "")
              + ")", file=sys.stderr)
    return 0
