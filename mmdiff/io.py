"""Where things are read from and written to: safetensors only (never pickle), JSON configs whose
values are checked against their fields' types, atomic writes that honour the umask, output folders
and devices checked before any work starts; errors name the problem."""
from __future__ import annotations

import json
import os
import tempfile
import types
import typing
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

import torch

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

C = TypeVar("C")


def config_from_dict(cls: type[C], data: Mapping[str, Any], *, source: str = "config") -> C:
    """Build dataclass ``cls`` from ``data`` (a JSON object), rejecting unknown keys by name and values
    whose type does not fit the field's annotation (:func:`check_field_types`)."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} keys {unknown}; known: {sorted(names)}")
    check_field_types(cls, data, source=source)
    return cls(**data)


def check_field_types(cls: type, data: Mapping[str, Any], *, source: str) -> None:
    """Check each value of ``data`` against the annotation of ``cls``'s field of that name, as JSON
    delivers values: an int is not a bool (nor a bool an int), an int is fine for a float, a tuple
    arrives as a list, ``X | None`` takes null.

    Raises:
        ValueError: ``"{source}: d_model must be an int, got '192'"``.
    """
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if name in hints and not _fits(value, hints[name]):
            raise ValueError(f"{source}: {name} must be {_describe(hints[name])}, got {value!r}")


def _fits(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits annotation ``tp`` (unknown typing constructs pass)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and (not args or all(_fits(k, args[0]) and _fits(v, args[1])
                                                            for k, v in value.items()))
    if origin is typing.Literal:
        return value in args
    return isinstance(value, origin or tp) if isinstance(origin or tp, type) else True


def _describe(tp: Any) -> str:
    """``int`` -> "an int", ``tuple[int, ...] | None`` -> "a list of ints or null", ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    names = {type(None): "null", bool: "a bool (true or false)", int: "an int", float: "a number",
             str: "a string", dict: "an object", list: "a list", tuple: "a list"}
    plural = {bool: "bools", int: "ints", float: "numbers", str: "strings"}
    if tp in names:
        return names[tp]
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} " + (plural[args[0]] if len(set(args)) == 1 and args[0] in plural else "values")
        return "a list" + (f" of {plural[args[0]]}" if args and args[0] in plural else "")
    if origin is dict:
        return "an object"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    return f"a {getattr(tp, '__name__', tp)}"


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
    """Write ``data`` to ``path`` through a temporary file and an atomic rename. The file gets the mode
    of the file it replaces, or the one ``open()`` would give a new file (0666 less the umask): the
    temporary file's private 0600 does not leak into results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_dir(path: str | Path, *, flag: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be written: an existing file where the
    folder should be, a file among its parents, or a read-only or unwritable folder. Nothing is created.

    Args:
        path: the folder to be written (it may not exist yet).
        flag: how the user named it, for the message.

    Raises:
        FileExistsError, NotADirectoryError, PermissionError: one line naming the path and the problem.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{flag} {path} is an existing file, not a folder: give a folder path "
                              "(the file is left as it is)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {existing} is a file, so no folder can be made under it")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise PermissionError(f"{flag} {path}: {existing} is on a read-only file system")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: {existing} is not writable (permission denied)")
    return path


def check_device(name: str, *, flag: str = "--device") -> str:
    """Refuse a device this machine does not have, naming the ones it has.

    Raises:
        ValueError: ``"--device cuda: not available on this machine; available: cpu"``.
    """
    available = available_devices()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{flag} {name!r} is not a device name; available: {', '.join(available)}") from None
    kinds = {a.partition(":")[0] for a in available}
    if str(device) in available or (device.index is None and device.type in kinds):
        return name
    raise ValueError(f"{flag} {name}: not available on this machine; available: {', '.join(available)}")


def available_devices() -> list[str]:
    """``cpu``, then every CUDA device (``cuda:0``, ...) and ``mps`` that torch can use here."""
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["cpu", *cuda, *(["mps"] if torch.backends.mps.is_available() else [])]


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
