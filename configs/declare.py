"""The one declaration of a config key: a dataclass field that carries its type, default, allowed values and doc.

Every config fact is written once, on a field of a frozen dataclass (``configs/types.py`` for the
YAML tree, ``configs/modules.py`` for the pipeline modules' ``config`` maps)::

    lr: float = knob(1e-05, "Peak learning rate.", exclusive_minimum=0)
    coords: str = knob("pixel", "...", enum=("pixel", "bins"))
    tiny: TinyModelConfig = section(TinyModelConfig, "Built-in tiny random Qwen3-VL (tests, demo).")

From these fields :func:`object_schema` generates the JSON Schema (draft 2020-12) that the loader
validates with (``configs.validation``), :func:`defaults_of` the defaults that ``configs.pipeline``
fills in, and ``scripts/gen_config_doc.py`` the key reference of docs/CONFIG.md and the exported
``configs/schema/*.json``. The type comes from the annotation (``bool``, ``int``, ``float``,
``str``, ``X | None``, ``tuple[X, ...]``, ``tuple[X, X]``, a nested dataclass); ``schema=`` gives
a keyword set the annotation cannot express (``anyOf``, ``$ref``).

A *flat knob* that feeds a pipeline module's config key (``stage2_ab.desc_ce_weight`` ->
``token_ce.desc_ce_weight``) is declared with :func:`alias`: it takes the module key's type, range
and default (unless one is given) and records the target, so the range is written once.

Standard library only: ``losses/`` and ``pipeline/`` import their knob records from ``configs``
without pulling in the loader's YAML / jsonschema machinery.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

# knob() keyword -> JSON Schema keyword (value constraints)
_CONSTRAINTS = {
    "minimum": "minimum",
    "maximum": "maximum",
    "exclusive_minimum": "exclusiveMinimum",
    "exclusive_maximum": "exclusiveMaximum",
    "min_length": "minLength",
    "max_length": "maxLength",
    "min_items": "minItems",
    "unique_items": "uniqueItems",
    "pattern": "pattern",
}
_META = "coordexp"  # the key of our entry in dataclasses.Field.metadata
REQUIRED = object()  # knob(REQUIRED, ...): the key has no default and must be written
OMITTED = object()  # knob(OMITTED, ...): no default and not required (absent stays absent)


def knob(
    default: Any,
    doc: str = "",
    *,
    enum: tuple[Any, ...] | None = None,
    items: Mapping[str, Any] | None = None,
    schema: Mapping[str, Any] | None = None,
    maps_to: str | None = None,
    **constraints: Any,
) -> Any:
    """A config key: ``default`` (a tuple for a list key; :data:`REQUIRED` for none), a one-line ``doc``.

    ``enum``: the allowed values (``None`` among them when the annotation allows None).
    ``items``: extra JSON Schema keywords of each list item (e.g. ``{"minimum": 0}``).
    ``schema``: keywords that replace the generated type (``anyOf``, ``$ref``).
    ``maps_to``: ``module.config_key`` this flat knob feeds (set by :func:`alias`).
    ``constraints``: ``minimum``, ``maximum``, ``exclusive_minimum``, ``exclusive_maximum``,
    ``min_length``, ``max_length``, ``min_items``, ``unique_items``, ``pattern`` (a regular expression the whole string must match;
    the doc says in words what it allows).
    """
    unknown = sorted(set(constraints) - set(_CONSTRAINTS))
    if unknown:
        raise TypeError(f"knob(): unknown constraint(s) {unknown}; allowed: {sorted(_CONSTRAINTS)}")
    meta = {
        "doc": doc,
        "enum": None if enum is None else tuple(enum),
        "items": dict(items or {}),
        "schema": dict(schema or {}),
        "maps_to": maps_to,
        "constraints": {_CONSTRAINTS[k]: v for k, v in constraints.items() if v is not None and v is not False},
    }
    if default is REQUIRED:
        return dataclasses.field(metadata={_META: meta})
    if default is OMITTED:
        return dataclasses.field(default=None, metadata={_META: {**meta, "omitted": True}})
    if isinstance(default, (list, dict, set)):
        raise TypeError("knob(): write a list default as a tuple (config values are immutable)")
    return dataclasses.field(default=default, metadata={_META: meta})


def section(cls: type, doc: str = "") -> Any:
    """A nested map of the config: the dataclass ``cls`` with every default filled."""
    return dataclasses.field(default_factory=cls, metadata={_META: {"doc": doc, "section": True}})


_SAME = object()


def alias(owner: type, key: str, doc: str = "", *, default: Any = _SAME) -> Any:
    """A flat knob feeding config key ``key`` of the module config ``owner`` (a :func:`knob` field there).

    Type, enum and range are the module key's; the default too unless ``default`` is given.
    """
    target = _field(owner, key)
    meta = _meta(target)
    module = getattr(owner, "MODULE", None)
    if module is None:
        raise TypeError(f"alias(): {owner.__name__} has no MODULE name")
    value = target.default if default is _SAME else default
    return knob(value, doc, enum=meta["enum"], items=meta["items"], schema=meta["schema"],
                maps_to=f"{module}.{key}", **{k: meta["constraints"].get(v) for k, v in _CONSTRAINTS.items()})


# ---------------------------------------------------------------- reading declarations


def _meta(f: dataclasses.Field) -> dict[str, Any]:
    return f.metadata.get(_META, {})


def _field(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} declares no key {name!r}")


def declared_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are config keys (declared with knob / section / alias)."""
    return [f for f in dataclasses.fields(cls) if _META in f.metadata]


def hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of ``cls`` (the declarations use ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def doc_of(cls: type, name: str) -> str:
    return _meta(_field(cls, name)).get("doc", "")


def maps_to(cls: type, name: str) -> str | None:
    """``module.config_key`` the flat knob ``name`` of ``cls`` feeds, or None."""
    return _meta(_field(cls, name)).get("maps_to")


def has_default(f: dataclasses.Field) -> bool:
    if _meta(f).get("omitted"):
        return False
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def is_required(f: dataclasses.Field) -> bool:
    return not has_default(f) and not _meta(f).get("omitted")


def default_value(f: dataclasses.Field) -> Any:
    """The JSON form of a field's default (tuples -> lists, sections -> their defaults map)."""
    if _meta(f).get("section"):
        return defaults_of(f.default_factory)
    return _jsonable(f.default)


def defaults_of(cls: type) -> dict[str, Any]:
    """Every declared default of ``cls`` as a plain (JSON-able) dict, nested sections included."""
    return {f.name: default_value(f) for f in declared_fields(cls) if has_default(f)}


def section_class(cls: type, name: str) -> type | None:
    """The dataclass of a nested section ``name`` of ``cls``, or None for a plain key."""
    f = _field(cls, name)
    return f.default_factory if _meta(f).get("section") else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def coerce_scalar(tp: Any, value: Any) -> Any:
    """A validated value in its declared type: ints for ``float`` keys become floats (``lr: 1`` -> 1.0),
    integral floats for ``int`` keys become ints (``max_steps: 10.0`` -> 10); anything else unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or len(args) != 1:  # None, or a value of an explicit anyOf (int | str): as validated
            return value
        (tp,) = args
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def coerce_record(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (validated against ``cls``'s schema) with each key in its declared type."""
    tps = hints(cls)
    return {k: coerce_scalar(tps[k], v) for k, v in values.items()}


# ---------------------------------------------------------------- JSON Schema generation

_SCALARS = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _type_schema(tp: Any, where: str) -> tuple[dict[str, Any], bool]:
    """``(schema, nullable)`` of an annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"{where}: only 'X | None' unions are declarable, got {tp}")
        inner, _ = _type_schema(args[0], where)
        return inner, True
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}, False
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _type_schema(args[0], where)[0]}, False
        if args and all(a == args[0] for a in args):
            n = len(args)
            return {"type": "array", "items": _type_schema(args[0], where)[0], "minItems": n, "maxItems": n}, False
    if dataclasses.is_dataclass(tp):
        return object_schema(tp), False
    raise TypeError(f"{where}: annotation {tp} needs an explicit schema= on its knob()")


def field_schema(cls: type, f: dataclasses.Field, tp: Any) -> dict[str, Any]:
    """The JSON Schema of one declared field (with ``default`` and ``description``)."""
    meta = _meta(f)
    where = f"{cls.__name__}.{f.name}"
    if meta.get("section"):
        out = object_schema(f.default_factory)
        if meta["doc"]:
            out["description"] = meta["doc"]
        return out
    if meta["schema"]:
        out = dict(meta["schema"])
    else:
        base, nullable = _type_schema(tp, where)
        if meta["enum"] is not None:
            out = {"enum": list(meta["enum"])}
        else:
            out = base
            if nullable:
                out["type"] = [base["type"], "null"]
        if meta["items"]:
            item_type = {} if "enum" in meta["items"] else out.get("items", {})  # an enum replaces the item type
            out["items"] = {**item_type, **meta["items"]}
    out.update(meta["constraints"])
    if has_default(f):
        out["default"] = default_value(f)
    if meta["doc"]:
        out["description"] = meta["doc"]
    return out


def object_schema(cls: type) -> dict[str, Any]:
    """``{"type": "object", "additionalProperties": false, "properties": ..., "required": ...}`` of ``cls``."""
    tps = hints(cls)
    props = {f.name: field_schema(cls, f, tps[f.name]) for f in declared_fields(cls)}
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    required = [f.name for f in declared_fields(cls) if is_required(f)]
    if required:
        out["required"] = required
    return out


def type_text(cls: type, name: str) -> str:
    """Short type of a key for docs: ``int``, ``str|null``, ``list[str]``, ``[float, float]``, ``map``."""
    f = _field(cls, name)
    meta = _meta(f)
    if meta.get("section"):
        return "map"
    return _type_text(hints(cls)[name], meta)


def _type_text(tp: Any, meta: Mapping[str, Any]) -> str:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _type_text(args[0], meta) + "|null"
    if tp in _SCALARS:
        return tp.__name__
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{_type_text(args[0], {})}]"
        return "[" + ", ".join(_type_text(a, {}) for a in args) + "]"
    if tp is Mapping or typing.get_origin(tp) is Mapping:
        return "map"
    branches = meta.get("schema", {}).get("anyOf")
    if branches:  # e.g. an integer or the string 'auto'
        names = {"integer": "int", "number": "float", "string": "str", "boolean": "bool"}
        return "|".join(names.get(b.get("type"), "str" if isinstance(b.get("const"), str) else "any") for b in branches)
    return "any"


__all__ = [
    "OMITTED",
    "REQUIRED",
    "SCHEMA_DIALECT",
    "alias",
    "coerce_record",
    "coerce_scalar",
    "declared_fields",
    "default_value",
    "defaults_of",
    "doc_of",
    "field_schema",
    "has_default",
    "hints",
    "is_required",
    "knob",
    "maps_to",
    "object_schema",
    "section",
    "section_class",
    "type_text",
]
