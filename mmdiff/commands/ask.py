"""``mmdiff ask``: answer one question about an image and/or a spoken question, by plain decoding or
through a self-verifying test-time search (``--search``, :mod:`mmdiff.search`)."""
from __future__ import annotations

import argparse
import json
import sys

from .. import DEFAULT_MODEL_DIR
from ..search import add_search_arguments, search_config_from_args
from .options import (add_sampler_arguments, add_speech_arguments, apply_speech_arguments, pruning_config_from_args,
                      sampler_config_from_args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", nargs="?", default="", help="the question (optional when --audio is given)")
    p.add_argument("--image", help="image file (png, jpg, ...)")
    p.add_argument("--audio", help="spoken question (wav, flac, ogg)")
    p.add_argument("--model", default=DEFAULT_MODEL_DIR, help=f"model directory (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: answer, nfe, latency_s, the settings (and the scored candidates "
                        "with --search; with --audio on an audio_ctc model, 'heard': the transcript it decoded)")
    add_sampler_arguments(p, gen_length=8)
    add_speech_arguments(p)
    add_search_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..model import MultimodalDiffusionLM
    from ..search import search

    if not args.question.strip() and not args.audio:
        raise ValueError("give a question, --audio, or both")
    cfg, pruning = sampler_config_from_args(args), pruning_config_from_args(args)
    search_cfg = search_config_from_args(args)
    searching = search_cfg.strategy != "none"
    if searching and pruning.active:
        raise ValueError("--search decodes without token pruning or layer skipping: drop --prune / --skip-layers, "
                         "or use --search none")
    model = MultimodalDiffusionLM.from_pretrained(args.model)
    apply_speech_arguments(model, args)
    if searching:
        res = search(model, args.question, image=args.image, audio=args.audio, config=cfg, search=search_cfg,
                     cache=args.cache)
        candidates = [{"text": text, "score": score} for text, score in res.candidates]
    else:
        res = model.generate([args.question], images=[args.image], audios=[args.audio], config=cfg, cache=args.cache,
                             pruning=pruning)[0]
        candidates = None
    heard = None
    if args.audio and hasattr(getattr(model, "audio_adapter", None), "transcribe_ids"):
        heard = model.transcribe([args.audio])[0]  # what the decoder was given (audio_ctc)
    if args.json:
        out = {"answer": res.text, "nfe": res.nfe, "latency_s": round(res.latency_s, 4), "sampler": cfg.to_dict(),
               "cache": args.cache, "pruning": pruning.to_dict(), "search": search_cfg.to_dict()}
        out.update({"heard": heard} if heard is not None else {})
        print(json.dumps(out if candidates is None else {**out, "candidates": candidates}))
    else:
        print(res.text)
        how = f", {search_cfg.strategy} over {len(candidates)} distinct answers" if searching else ""
        print(f"(nfe {res.nfe}, {res.latency_s * 1000:.0f} ms{how}" + (f", heard: {heard!r}" if heard is not None else "")
              + ")", file=sys.stderr)
    return 0
