"""The ``mmdiff`` command line: a thin layer over the library (no sampling logic lives here).

Each subcommand lives in the module that owns its feature and exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only lists them, so ``mmdiff --help`` stays fast (imports are lazy).
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "ask": ("mmdiff.commands.ask", "answer a question about an image and/or a spoken question"),
    "data": ("mmdiff.data.cli", "generate a synthetic scene dataset (JSONL + images [+ speech])"),
    "train": ("mmdiff.training.cli", "train a model from a committed config file"),
    "train-adapter": ("mmdiff.training.adapters", "train only an image or audio adapter against a frozen LLaDA / Dream / LLaDA-V (DIFFA recipe)"),
    "convert": ("mmdiff.checkpoints", "convert a LLaDA / Dream checkpoint to mmdiff format"),
    "caption": ("mmdiff.commands.caption", "caption an image as text or schema-valid JSON (structure priors)"),
    "demo": ("mmdiff.commands.demo", "start the Gradio demo (image/audio Q&A with live denoising)"),
    "eval": ("mmdiff.evaluation.cli", "batch VQA evaluation with resumable predictions"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdiff", description="Multimodal discrete-diffusion language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        _lazy_arguments(p, module)
    return parser


def _lazy_arguments(p: argparse.ArgumentParser, module: str) -> None:
    """Defer importing the subcommand's module until its arguments are needed."""
    p._mmdiff_module = module  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        args = parser.parse_args(argv)  # prints help or the unknown-command error
        if args.command is None:
            parser.print_help()
            return 0
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    sp = argparse.ArgumentParser(prog=f"mmdiff {name}", description=COMMANDS[name][1])
    module.add_arguments(sp)
    args = sp.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"mmdiff {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
