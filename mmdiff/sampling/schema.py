"""A JSON-schema subset compiled to a structure-prior template, and validation against it.

Objects, arrays, string enums, free strings, integers and booleans (:data:`SCHEMA_TYPES`):
:func:`schema_to_template` turns a schema into a :class:`~mmdiff.sampling.structure.Template` of
fixed JSON text and slots whose filled values :meth:`SchemaTemplate.read` parses back;
:func:`validate` checks data against the same subset. Syntax and caveats: ``docs/structure_priors.md``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from .structure import Slot, Template

# ------------------------------------------------------------------------------------------------
# JSON schema subset
# ------------------------------------------------------------------------------------------------
SCHEMA_TYPES: tuple[str, ...] = ("object", "array", "string", "integer", "boolean")
_ANNOTATIONS = {"title", "description", "$schema", "$id", "examples", "default"}
_KEYWORDS: dict[str, set[str]] = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"enum"},
    "integer": set(),
    "boolean": set(),
}
INTEGER_TOKENS = 2  # an integer field is a <digits:1-2> slot: 0..99 with single-digit tokens


def check_schema(schema: Any, path: str = "$") -> None:
    """Raise a ValueError naming the field (``$``, ``$.name``, ``$[].name``) of anything outside the
    supported subset: types object / array / string (free or enum) / integer / boolean."""
    if not isinstance(schema, dict):
        raise ValueError(f"schema at {path}: expected an object, got {type(schema).__name__}")
    kind = schema.get("type")
    if kind is None:
        raise ValueError(f"schema at {path}: missing 'type' (supported: {', '.join(SCHEMA_TYPES)})")
    if not isinstance(kind, str) or kind not in SCHEMA_TYPES:
        raise ValueError(f"schema at {path}: unsupported type {kind!r}; supported: {', '.join(SCHEMA_TYPES)}")
    unknown = sorted(set(schema) - _KEYWORDS[kind] - _ANNOTATIONS - {"type"})
    if unknown:
        raise ValueError(f"schema at {path}: unsupported keyword {unknown[0]!r} for type {kind}")
    if kind == "object":
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise ValueError(f"schema at {path}: 'properties' must be an object")
        for name in schema.get("required", []):
            if name not in props:
                raise ValueError(f"schema at {path}: required field {name!r} is not in 'properties'")
        if not isinstance(schema.get("additionalProperties", True), bool):
            raise ValueError(f"schema at {path}: 'additionalProperties' must be true or false")
        for name, sub in props.items():
            check_schema(sub, f"{path}.{name}")
    elif kind == "array":
        if "items" not in schema:
            raise ValueError(f"schema at {path}: an array needs 'items'")
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        for key, v in (("minItems", lo), ("maxItems", hi)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"schema at {path}: '{key}' must be a non-negative integer, got {v!r}")
        if hi is not None and lo > hi:
            raise ValueError(f"schema at {path}: minItems {lo} > maxItems {hi}")
        check_schema(schema["items"], f"{path}[]")
    elif kind == "string" and "enum" in schema:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise ValueError(f"schema at {path}: 'enum' must be a non-empty list")
        for v in values:
            if not isinstance(v, str) or not v or json.dumps(v)[1:-1] != v or "|" in v:
                raise ValueError(f"schema at {path}: enum value {v!r} is not supported (non-empty strings without "
                                 "characters JSON escapes, or '|')")


def _errors(data: Any, schema: dict, path: str) -> Iterator[str]:
    kind = schema["type"]
    if kind == "object":
        if not isinstance(data, dict):
            yield f"{path}: expected an object, got {type(data).__name__}"
            return
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in data:
                yield f"{path}: missing required field {name!r}"
        if schema.get("additionalProperties", True) is False:
            for name in data:
                if name not in props:
                    yield f"{path}: unexpected field {name!r}"
        for name, sub in props.items():
            if name in data:
                yield from _errors(data[name], sub, f"{path}.{name}")
    elif kind == "array":
        if not isinstance(data, list):
            yield f"{path}: expected an array, got {type(data).__name__}"
            return
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        if len(data) < lo or (hi is not None and len(data) > hi):
            yield f"{path}: {len(data)} items, expected {lo}..{'' if hi is None else hi}"
        for i, item in enumerate(data):
            yield from _errors(item, schema["items"], f"{path}[{i}]")
    elif kind == "string":
        if not isinstance(data, str):
            yield f"{path}: expected a string, got {type(data).__name__}"
        elif "enum" in schema and data not in schema["enum"]:
            yield f"{path}: {data!r} is not one of {schema['enum']}"
    elif kind == "integer":
        if not isinstance(data, int) or isinstance(data, bool):
            yield f"{path}: expected an integer, got {type(data).__name__}"
    elif kind == "boolean" and not isinstance(data, bool):
        yield f"{path}: expected a boolean, got {type(data).__name__}"


def validate(data: Any, schema: dict) -> None:
    """Check ``data`` against a schema of the supported subset.

    Raises:
        ValueError: the schema is outside the subset, or the first violation, with its data path
            (``$[2].color: 'pink' is not one of [...]``).
    """
    check_schema(schema)
    for error in _errors(data, schema, "$"):
        raise ValueError(error)


def is_valid(data: Any, schema: dict) -> bool:
    """Whether ``data`` satisfies ``schema`` (which must be inside the supported subset)."""
    check_schema(schema)
    return next(_errors(data, schema, "$"), None) is None


@dataclass(frozen=True)
class _Leaf:
    slot: int  # index into the template's slots
    type: str  # string | integer | boolean


@dataclass(frozen=True)
class _Object:
    fields: tuple[tuple[str, Any], ...]  # (name, node)


@dataclass(frozen=True)
class _Array:
    items: tuple[Any, ...]
    required: int  # items before this index are complete by construction; later ones may be dropped
    min_items: int  # the array is complete when at least this many items are


@dataclass(frozen=True)
class SchemaTemplate:
    """A schema compiled to a template, and how to read the filled slots back into data.

    Args:
        template: the skeleton (fixed JSON text with one slot per leaf field).
        root: the tree of objects / arrays / leaves over the template's slots.
        free_arrays: outer arrays (not inside another array) whose length was not given and not
            fixed by the schema: path -> (minItems, maxItems or None). They got their maximum.
    """

    template: Template
    root: Any
    free_arrays: dict[str, tuple[int, int | None]] = field(default_factory=dict)

    def read(self, values: Sequence[str]) -> Any:
        """Data from slot values (:meth:`StructurePrior.values`); incomplete optional items are dropped."""
        data, _ = _read(self.root, list(values))
        return data


def _read(node: Any, values: list[str]) -> tuple[Any, bool]:
    """(value, complete): complete when no leaf below is empty."""
    if isinstance(node, _Leaf):
        text = values[node.slot]
        if not text:
            return None, False
        return (int(text) if node.type == "integer" else text == "true" if node.type == "boolean" else text), True
    if isinstance(node, _Object):
        read = [(name, _read(sub, values)) for name, sub in node.fields]
        return {name: v for name, (v, _) in read}, all(ok for _, (_, ok) in read)
    items = [_read(sub, values) for sub in node.items]
    kept = [v for i, (v, ok) in enumerate(items) if ok or i < node.required]
    return kept, sum(ok for _, ok in items) >= node.min_items


class _Compiler:
    def __init__(self, lengths: Mapping[str, int], string_tokens: int, max_items: int) -> None:
        self.lengths, self.string_tokens, self.max_items = lengths, string_tokens, max_items
        self.parts: list[str | Slot] = []
        self.n_slots = 0
        self.arrays: set[str] = set()
        self.free: dict[str, tuple[int, int | None]] = {}

    def slot(self, slot: Slot, kind: str) -> _Leaf:
        self.parts.append(slot)
        self.n_slots += 1
        return _Leaf(self.n_slots - 1, kind)

    def node(self, schema: dict, path: str, *, optional: bool, in_array: bool) -> Any:
        kind = schema["type"]
        if kind == "object":
            fields = []
            self.parts.append("{")
            for i, (name, sub) in enumerate(schema.get("properties", {}).items()):
                self.parts.append((", " if i else "") + json.dumps(name) + ": ")
                fields.append((name, self.node(sub, f"{path}.{name}", optional=optional, in_array=in_array)))
            self.parts.append("}")
            return _Object(tuple(fields))
        if kind == "array":
            n, required = self.array_length(schema, path, in_array)
            items = []
            self.parts.append("[")
            for i in range(n):
                self.parts.append(", " if i else "")
                items.append(self.node(schema["items"], f"{path}[]", optional=optional or i >= required, in_array=True))
            self.parts.append("]")
            return _Array(tuple(items), 0 if optional else required, schema.get("minItems", 0))
        if kind == "string":
            self.parts.append('"')
            if "enum" in schema:
                leaf = self.slot(Slot("enum", values=tuple(schema["enum"]) + (("",) if optional else ()),
                                      in_string=True), "string")
            else:
                leaf = self.slot(Slot("mask", 0 if optional else 1, self.string_tokens, in_string=True), "string")
            self.parts.append('"')
            return leaf
        if kind == "integer":
            return self.slot(Slot("digits", 0 if optional else 1, INTEGER_TOKENS), "integer")
        return self.slot(Slot("enum", values=("true", "false") + (("",) if optional else ())), "boolean")

    def array_length(self, schema: dict, path: str, in_array: bool) -> tuple[int, int]:
        """(items on the canvas, items that must be complete)."""
        self.arrays.add(path)
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        if lo == hi:
            return lo, lo
        if path in self.lengths:
            n = self.lengths[path]
            if n < lo or (hi is not None and n > hi):
                raise ValueError(f"length {n} for the array at {path} is outside minItems {lo}..maxItems {hi}")
            return n, n
        if not in_array:
            self.free[path] = (lo, hi)
        return (hi if hi is not None else max(lo, self.max_items)), lo


def schema_to_template(schema: dict, *, lengths: Mapping[str, int] | None = None, string_tokens: int = 8,
                       max_items: int = 6) -> SchemaTemplate:
    """Compile a JSON schema (supported subset) to a template in ``json.dumps`` layout.

    Properties are emitted in the schema's order (all of them, required or not). Leaves become
    slots: string enum -> ``"<enum:...>"``, free string -> ``"<mask:1-string_tokens>"``, integer ->
    ``<digits:1-2>``, boolean -> ``<enum:true|false>``. An array gets ``lengths[path]`` items, or
    exactly ``minItems`` when it equals ``maxItems``, or else ``maxItems`` (``max_items`` when the
    schema has none) of which those past ``minItems`` are optional: each of their slots may be
    empty, and an item with an empty slot is dropped by :meth:`SchemaTemplate.read`.

    Args:
        schema: the schema; checked with :func:`check_schema`.
        lengths: known array lengths by path (``$`` for a top-level array, ``$.objects``, ...).
        string_tokens: the token budget of a free string.
        max_items: the length of an array without ``maxItems`` whose length is not given.
    """
    check_schema(schema)
    if string_tokens < 1:
        raise ValueError(f"string_tokens must be >= 1, got {string_tokens}")
    lengths = dict(lengths or {})
    compiler = _Compiler(lengths, string_tokens, max_items)
    root = compiler.node(schema, "$", optional=False, in_array=False)
    unknown = sorted(set(lengths) - compiler.arrays)
    if unknown:
        raise ValueError(f"lengths names {unknown[0]}, which is not an array of the schema "
                         f"(arrays: {sorted(compiler.arrays)})")
    parts: list[str | Slot] = []
    for p in compiler.parts:
        if isinstance(p, str) and parts and isinstance(parts[-1], str):
            parts[-1] += p
        elif p != "":
            parts.append(p)
    return SchemaTemplate(Template(tuple(parts)), root, compiler.free)
