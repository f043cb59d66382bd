"""``mmdiff serve``: the OpenAI-compatible server (:mod:`mmdiff.serving.server`) on a model directory.

Host, port, API key, media folder and decode settings are checked before the model loads: a port in
use, a non-loopback host without an API key or settings the engine cannot batch stop with one line
and exit status 2."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..serving.chat import SERVER_DECODE, server_defaults
from ..serving.engine import DEFAULT_MAX_BATCH
from ..serving.server import check_exposure, serve
from .demo import check_port
from .options import add_decode_arguments, add_model_arguments, check_model_arguments, decode_config_from_args, load_model

#: the environment variable holding the API key when --api-key is not given
API_KEY_ENV = "MMDIFF_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--model-name", help="the name clients send as 'model' (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only; "
                                                       "any other needs an API key)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"most requests denoised together (default: {DEFAULT_MAX_BATCH})")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for a place; beyond, 429 with Retry-After (default: 64)")
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; "
                                                   "none: no key, loopback hosts only)")
    p.add_argument("--media-dir", help="folder whose files image_url may name (file:// or a path); default: none, "
                                       "images come as data: URLs")
    add_decode_arguments(p, SERVER_DECODE, search=False,
                         chosen_later={"cache": "prefix on prefix-LM models, else none"})


def run(args: argparse.Namespace) -> int:
    if args.max_batch < 1 or args.max_queue < 0:
        raise ValueError(f"--max-batch must be >= 1 and --max-queue >= 0, got {args.max_batch}, {args.max_queue}")
    if args.media_dir is not None and not os.path.isdir(args.media_dir):
        raise ValueError(f"--media-dir {args.media_dir}: no such folder")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    decode_config_from_args(args, SERVER_DECODE)  # checked before the model loads
    check_exposure(args.host, api_key)
    check_port(args.host, args.port)
    check_model_arguments(args)
    model = load_model(args)
    serve(model, host=args.host, port=args.port, model_name=args.model_name or Path(args.model).resolve().name,
          api_key=api_key, media_dir=args.media_dir, max_batch=args.max_batch, max_queue=args.max_queue,
          decode=decode_config_from_args(args, server_defaults(model)))
    return 0
