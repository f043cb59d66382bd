"""Checkpoint file helpers: safetensors only (never pickle), with errors that name the problem."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

import torch

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

C = TypeVar("C")


def config_from_dict(cls: type[C], data: Mapping[str, Any], *, source: str = "config") -> C:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys by name."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} keys {unknown}; known: {sorted(names)}")
    return cls(**data)


def drop_retired_keys(data: Mapping[str, Any], retired: Mapping[str, Any], *, source: str, why: str) -> dict:
    """``data`` without the keys of an older format that hold their old default ("off"); a retired key
    set to anything else asks for something that no longer exists and is refused by name.

    Args:
        data: a config section.
        retired: key -> its default in the older format.
        source: where ``data`` came from, for the message.
        why: why the keys are gone, for the message.
    """
    for key, default in retired.items():
        if key in data and data[key] != default:
            raise ValueError(f"{source}: {key}={data[key]!r} is not supported: {why}. Only the old default "
                             f"{key}={default!r} is read (and ignored).")
    return {k: v for k, v in data.items() if k not in retired}


class JsonConfig:
    """Base of the dataclass configs of plain values: :meth:`to_dict` for ``config.json`` and the run
    records, :meth:`from_dict` to read one back (unknown keys refused by name)."""

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], *, source: str | None = None) -> C:
        return config_from_dict(cls, data, source=source or cls.__name__)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def save_weights(module: torch.nn.Module, path: str | Path, *, metadata: dict[str, str] | None = None) -> None:
    """Save ``module``'s state dict as safetensors, atomically (tied tensors stored once)."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_model(module, str(tmp), metadata=metadata or {"format": "pt"})
    os.replace(tmp, path)


def load_safetensors(path: str | Path, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning library errors into a message naming the file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing weights file {path.name} in {path.parent}")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


def load_state_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str,
                       assign: bool = False) -> None:
    """Load ``state`` into ``module`` strictly; list missing, unexpected and mis-shaped keys by name.

    Args:
        module: the target module.
        state: tensors by parameter name.
        source: where ``state`` came from (a path), for the error message.
        assign: assign tensors instead of copying (keeps their dtype/device; for meta-device init).
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unknown keys {_short(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes {_short(shapes)}")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    module.load_state_dict(dict(state), strict=True, assign=assign)


def _short(items: list[str], n: int = 6) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more
