"""Settings that describe themselves: help, choices and ranges kept in dataclass field metadata.

A user-facing config (the sampler's, the cache's, pruning's, the search's) declares each field with
:func:`setting`. From that one declaration come

* the value checks (:func:`check_settings`, called by each config's ``__post_init__``),
* the command-line flags (``mmdiff.commands.options``), the demo's controls (``demo/app.py``) and
  the lmms-eval plugin's ``model_args``, all through :class:`Option` (:func:`options_of`),

so a new option is one new field. This module imports nothing from mmdiff.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable, Iterable, Sequence

Choices = Sequence[str] | Callable[[], Sequence[str]]

_KINDS: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}


def setting(default: Any = MISSING, help: str = "", *, choices: Choices | None = None, low: float | None = None,
            high: float | None = None, low_open: bool = False, high_open: bool = False, key: str | None = None,
            noun: str | None = None, widget_max: float | None = None) -> Any:
    """A dataclass field that carries its own description.

    Args:
        default: the default value (tuples for multi-valued fields).
        help: one line for ``--help``, the demo's info text and error messages.
        choices: allowed names, or a callable returning them (a registry's ``names``).
        low, high: inclusive bounds of a number (of each element of a tuple), None = unbounded.
        low_open, high_open: make the bound exclusive.
        key: the option's flat name (flag ``--key-with-dashes``, demo control, plugin argument) when
            the field name alone is ambiguous across sections (default: the field name).
        noun: what a value is called in "Unknown <noun> 'x'" (default: the key, spaced).
        widget_max: the top of the demo's slider where ``high`` is unbounded.
    """
    meta = dict(help=help, choices=choices, low=low, high=high, low_open=low_open, high_open=high_open, key=key,
                noun=noun, widget_max=widget_max)
    return dataclasses.field(default=default, metadata={"setting": meta})


@dataclass(frozen=True)
class Option:
    """One setting as a flat, typed option (see the module docstring)."""

    key: str  # flat name: flag --key-with-dashes, demo control name, plugin model_arg
    section: str  # the config field of the enclosing config holding it ("" = a field of that config itself)
    name: str  # field name within its section's config
    kind: type  # int | float | str | bool (of each element when ``many``)
    optional: bool  # None is allowed
    many: bool  # a tuple of ``kind``
    default: Any
    help: str
    choices: tuple[str, ...] | None
    noun: str  # what a value is called in "Unknown <noun> 'x'"
    low: float | None
    high: float | None
    low_open: bool
    high_open: bool
    widget_max: float | None

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def describe_range(self) -> str:
        """``"in (0, 1]"``, ``">= 1"``, ... or ``""``."""
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f"in {'(' if self.low_open else '['}{lo:g}, {hi:g}{')' if self.high_open else ']'}"
        if lo is not None:
            return f"{'>' if self.low_open else '>='} {lo:g}"
        if hi is not None:
            return f"{'<' if self.high_open else '<='} {hi:g}"
        return ""

    def parse(self, raw: Any) -> Any:
        """A value from text or a page (``"0.5"``, ``"3,4"``, ``"None"``, ``True``) as this option's
        type; the range is checked by the config itself.

        Raises:
            ValueError: naming the option and the expected type.
        """
        if isinstance(raw, str) and raw.strip() in ("None", "none", "") and self.optional:
            return None
        if raw is None:
            if self.optional:
                return None
            raise ValueError(f"{self.key}: a value is required")
        if self.many:
            items = re.split(r"[,;\s]+", raw.strip()) if isinstance(raw, str) else list(raw)
            return tuple(self._scalar(x) for x in items if x != "")
        return self._scalar(raw)

    def _scalar(self, raw: Any) -> Any:
        what = {int: "a number", float: "a number", bool: "true or false", str: "text"}[self.kind]
        try:
            if self.kind is bool:
                if isinstance(raw, str):
                    if raw.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    return raw.strip().lower() in ("true", "1", "yes")
                return bool(raw)
            if self.kind is int:
                value = float(raw) if isinstance(raw, str) else raw
                if isinstance(value, bool) or float(value) != int(value):
                    what = "a whole number"
                    raise ValueError
                return int(value)
            if self.kind is float:
                if isinstance(raw, bool):
                    raise ValueError
                return float(raw)
            return str(raw)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{self.key} must be {what}, got {raw!r}") from None


def _kind(annotation: Any) -> tuple[type, bool, bool]:
    """(element type, optional, tuple) of a field annotation string like ``"int | None"``."""
    text = str(annotation).replace(" ", "")
    optional = text.endswith("|None")
    text = text.removesuffix("|None")
    many = text.startswith("tuple[")
    if many:
        text = text[len("tuple["):].split(",")[0]
    if text not in _KINDS:
        raise TypeError(f"unsupported setting type {annotation!r}")
    return _KINDS[text], optional, many


def _choices(choices: Choices | None) -> tuple[str, ...] | None:
    if choices is None:
        return None
    return tuple(choices() if callable(choices) else choices)


def options_of(config_cls: type, *, section: str = "") -> list[Option]:
    """The :class:`Option` of every :func:`setting` field of ``config_cls``; nested config fields
    (a dataclass whose own fields are settings) are walked with their field name as ``section``."""
    out: list[Option] = []
    for f in fields(config_cls):
        meta = f.metadata.get("setting")
        if meta is None:
            nested = f.default_factory if f.default_factory is not MISSING else None
            if nested is not None and dataclasses.is_dataclass(nested):
                out += options_of(nested, section=f.name)
            continue
        kind, optional, many = _kind(f.type)
        default = f.default if f.default is not MISSING else f.default_factory()
        out.append(Option(meta["key"] or f.name, section, f.name, kind, optional, many, default, meta["help"],
                          _choices(meta["choices"]), meta["noun"] or (meta["key"] or f.name).replace("_", " "),
                          meta["low"], meta["high"], meta["low_open"], meta["high_open"],
                          meta["widget_max"]))
    keys = [o.key for o in out]
    if len(keys) != len(set(keys)):
        raise TypeError(f"{config_cls.__name__}: duplicate option keys {sorted(k for k in keys if keys.count(k) > 1)}")
    return out


def check_settings(config: Any) -> None:
    """Check every :func:`setting` field of ``config`` against its type, choices and range.

    Raises:
        ValueError: one line naming the field, what it must be and the value given.
    """
    for opt in options_of(type(config)):
        if opt.section:
            continue  # nested configs check themselves
        value = getattr(config, opt.name)
        if value is None:
            if not opt.optional:
                raise ValueError(f"{opt.key} must be set")
            continue
        values: Iterable[Any] = value if opt.many else (value,)
        if opt.many and not isinstance(value, tuple):
            raise ValueError(f"{opt.key} must be a tuple, got {value!r}")
        for v in values:
            _check_one(opt, v)


def _check_one(opt: Option, v: Any) -> None:
    ok_type = {int: lambda x: isinstance(x, int) and not isinstance(x, bool),
               float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
               bool: lambda x: isinstance(x, bool), str: lambda x: isinstance(x, str)}[opt.kind]
    if not ok_type(v):
        raise ValueError(f"{opt.key} must be of type {opt.kind.__name__}, got {v!r}")
    if opt.choices is not None and v not in opt.choices:
        raise ValueError(f"Unknown {opt.noun} {v!r}; known: {', '.join(opt.choices)}")
    if opt.kind in (int, float):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{opt.key} must be a finite number, got {v!r}")
        too_low = opt.low is not None and (v <= opt.low if opt.low_open else v < opt.low)
        too_high = opt.high is not None and (v >= opt.high if opt.high_open else v > opt.high)
        if too_low or too_high:
            raise ValueError(f"{opt.key} must be {opt.describe_range()}, got {v!r}")
