"""``mmdiff demo``: start the Gradio demo (``demo/app.py``) on a model directory."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

from .. import DEFAULT_MODEL_DIR

#: the source checkout holding ``demo/`` (the demo ships with the repository, not the wheel)
REPO_ROOT = Path(__file__).resolve().parents[2]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL_DIR, help=f"model directory (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (default: 7860)")


def load_demo_app() -> ModuleType:
    """Import ``demo.app``, from the source checkout when it is not on ``sys.path`` (console script)."""
    try:
        return importlib.import_module("demo.app")
    except ModuleNotFoundError as e:
        if e.name != "demo":
            raise
    if not (REPO_ROOT / "demo" / "app.py").is_file():
        raise FileNotFoundError(f"the demo app is not installed: no {REPO_ROOT / 'demo' / 'app.py'}; "
                                "run mmdiff from a source checkout")
    sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("demo.app")


def run(args: argparse.Namespace) -> int:
    load_demo_app().main(args.model, host=args.host, port=args.port)
    return 0
