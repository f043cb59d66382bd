"""``mmdiff caption``: caption an image as text or as schema-valid JSON (structure priors).

A thin layer over :func:`mmdiff.tasks.captioning.caption`; the template syntax and the array
length rule are described in ``docs/structure_priors.md``.
"""
from __future__ import annotations

import argparse
import sys

from ..data.scenes import scene_schema
from ..io import read_json
from ..sampling.schema import check_schema
from ..tasks.captioning import caption
from ..tasks.presets import JSON_CAPTION
from .options import add_decode_arguments, add_model_arguments, check_model_arguments, decode_config_from_args, load_model

#: a 6-object JSON caption is about 49 tokens
DEFAULTS = JSON_CAPTION


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="image file (png, jpg, ...)")
    p.add_argument("--format", default="json", choices=["json", "text"],
                   help="json: schema-valid JSON from a structure prior; text: a sentence (default: json)")
    p.add_argument("--schema", help="JSON schema file for --format json (default: the scene-caption schema)")
    p.add_argument("--length", type=int, help="--format text: exactly N tokens (N mask slots, EOS suppressed)")
    p.add_argument("--array-length", default="count",
                   help="arrays of unknown length: count (ask 'how many objects are there?' first), max "
                        "(maxItems slots, incomplete items dropped) or a number (default: count)")
    p.add_argument("--string-tokens", type=int, default=8, help="token budget of a free string field (default: 8)")
    add_model_arguments(p)
    add_decode_arguments(p, DEFAULTS, search=False)


def run(args: argparse.Namespace) -> int:
    if args.format == "text" and args.schema:
        raise ValueError("--schema applies to --format json")
    if args.format == "json" and args.length is not None:
        raise ValueError("--length applies to --format text; JSON lengths come from the schema")
    schema = read_json(args.schema) if args.schema else scene_schema() if args.format == "json" else None
    if args.schema:
        check_schema(schema)  # before loading the model
    array_length = int(args.array_length) if args.array_length.isdigit() else args.array_length
    decode = decode_config_from_args(args, DEFAULTS)  # checked before loading
    check_model_arguments(args)
    model = load_model(args)
    res = caption(model, args.image, format=args.format, schema=schema, length=args.length, decode=decode,
                  array_length=array_length, string_tokens=args.string_tokens)
    print(res.text)
    count = "" if res.count is None else f", count {res.count}"
    print(f"(nfe {res.nfe}{count}, {res.latency_s * 1000:.0f} ms)", file=sys.stderr)
    return 0
