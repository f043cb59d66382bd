"""``mmdiff demo``: start the Gradio demo (``demo/app.py``) on a model directory."""
from __future__ import annotations

import argparse
import errno
import importlib
import socket
import sys
from pathlib import Path
from types import ModuleType

from ..serving.engine import DEFAULT_MAX_BATCH
from .options import add_model_arguments

#: the source checkout holding ``demo/`` (the demo ships with the repository, not the wheel)
REPO_ROOT = Path(__file__).resolve().parents[2]
#: --engine: requests stepped at once unless --max-batch says otherwise


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (default: 7860)")
    p.add_argument("--engine", action="store_true",
                   help="answer the Ask tab through one shared step-batching engine: concurrent users' answers "
                        "advance in the same decoder forwards (settings it does not batch run on their own)")
    p.add_argument("--max-batch", type=int,
                   help=f"with --engine: requests stepped at once (default: {DEFAULT_MAX_BATCH})")


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


def check_port(host: str, port: int) -> None:
    """Refuse, before gradio loads, a port that cannot be served: out of range, in use, or a host this
    machine does not have (a probe bind, with SO_REUSEADDR as servers use it).

    Raises:
        ValueError: one line naming host, port and the problem.
    """
    if not 0 < port < 65536:
        raise ValueError(f"--port {port}: a TCP port is 1-65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            why = {errno.EADDRINUSE: "is already in use (another demo?): choose another --port",
                   errno.EACCES: "needs privileges (a port below 1024): choose one above 1024 with --port",
                   errno.EADDRNOTAVAIL: "is not an address of this machine: use --host 127.0.0.1 or 0.0.0.0"}
            raise ValueError(f"{host}:{port} {why.get(e.errno, f'cannot be served: {e.strerror}')}") from None


def run(args: argparse.Namespace) -> int:
    if args.max_batch is not None and (not args.engine or args.max_batch < 1):
        raise ValueError(f"--max-batch {args.max_batch}: the engine's batch, a positive number, with --engine")
    check_port(args.host, args.port)
    from ..loading import resolve_device

    resolve_device(args.device)  # the model directory is checked by the app, which says how to get one
    max_batch = (args.max_batch or DEFAULT_MAX_BATCH) if args.engine else None
    load_demo_app().main(args.model, host=args.host, port=args.port, max_batch=max_batch, dtype=args.dtype,
                         device=args.device)
    return 0
