"""The ``mmdiff`` command line: a thin layer over the library (no sampling logic lives here).

Each subcommand lives in the module that owns its feature and exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only lists them, so ``mmdiff --help`` stays fast (imports are lazy).
"""
from __future__ import annotations

import argparse
import errno
import importlib
import sys
import typing

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "ask": ("mmdiff.commands.ask", "answer a question about an image and/or a spoken question"),
    "data": ("mmdiff.data.cli", "generate a synthetic scene dataset (JSONL + images [+ speech])"),
    "train": ("mmdiff.training.cli", "train a model from a committed config file"),
    "train-adapter": ("mmdiff.training.adapters", "train only an image or audio adapter against a frozen LLaDA / Dream / LLaDA-V (DIFFA recipe)"),
    "convert-whisper": ("mmdiff.checkpoints.whisper_ct2", "convert a CTranslate2 Whisper directory into a transformers "
                                                       "Whisper directory (safetensors, config, tokenizer)"),
    "convert-timm-cnn": ("mmdiff.checkpoints.timm_cnn", "convert a released CNN backbone's state dict (.pth, plain tensors) into "
                                                      "a safetensors file under timm's names (the timm_cnn vision encoder)"),
    "convert": ("mmdiff.checkpoints.convert", "write a text-only LLaDA / Dream checkpoint in the mmdiff-decoder format "
                                      "(optional: mmdiff.load reads them as they are)"),
    "caption": ("mmdiff.commands.caption", "caption an image as text or schema-valid JSON (structure priors)"),
    "demo": ("mmdiff.commands.demo", "start the Gradio demo (image/audio Q&A with live denoising)"),
    "serve": ("mmdiff.commands.serve", "serve a model over an OpenAI-compatible HTTP API (batched, streaming)"),
    "eval": ("mmdiff.evaluation.cli", "batch VQA evaluation with resumable predictions"),
}


#: what a user can get wrong about a path: shown as one line, like ValueError and FileNotFoundError
PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
#: errno of other OSErrors a user can fix: a read-only file system, a full disk, a name too long, a
#: symlink loop, a port in use or an address this machine does not have
USER_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP,
                         errno.EADDRINUSE, errno.EADDRNOTAVAIL})


class OneLineParser(argparse.ArgumentParser):
    """A subcommand's parser whose errors are one line (``mmdiff ask: error: ...``) and exit 2, like the
    errors of ``run``; ``--help`` still shows the usage."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def user_error(e: Exception) -> str | None:
    """The one line for an error the user can fix (a bad value, a missing or unwritable path), or
    None for anything else: a real bug keeps its traceback."""
    if isinstance(e, ValueError) or (isinstance(e, PATH_ERRORS) and not e.filename):
        return str(e)
    if isinstance(e, PATH_ERRORS) or (isinstance(e, OSError) and e.errno in USER_ERRNOS):
        return f"{e.filename}: {e.strerror}" if e.filename else str(e)
    return None


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
    sp = OneLineParser(prog=f"mmdiff {name}", description=COMMANDS[name][1])
    module.add_arguments(sp)
    args = sp.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except (ValueError, OSError) as e:
        line = user_error(e)
        if line is None:
            raise
        print(f"mmdiff {name}: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
