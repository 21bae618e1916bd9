"""The JSON Schema generated from the declarations, and the one validator of config values.

``surface_schemas()`` builds one schema per config surface (``root.json`` referencing ``run.json``,
``model.json``, ..., ``pipeline.json``) from the dataclasses of ``configs/types.py``; the loader
validates the merged YAML tree against them (in memory: the declaration is the source, nothing is
read from disk). ``configs/schema/*.json`` are the same schemas exported by
``python scripts/gen_config_doc.py`` for editors and reviewers; a test fails when they are stale.

:func:`check` is the one validator: the whole tree (``validate_tree``), a pipeline module's
``config`` (``configs.pipeline``, against the schema of ``configs/modules.py``), a flat knob value,
and a knob record built in code (:func:`check_record`) all go through it, so every error names the
dotted key and the allowed values in the same words.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from functools import cache, lru_cache
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from configs.declare import SCHEMA_DIALECT, object_schema
from configs.errors import ConfigError, clip, did_you_mean

ROOT_SCHEMA = "root.json"
PIPELINE_SCHEMA = "pipeline.json"
SCHEMA_BASE_URI = "https://coordexp.local/schema/"


# ---------------------------------------------------------------- generation


def surface_schemas() -> dict[str, dict[str, Any]]:
    """``{file name: schema}`` of every config surface, generated from ``configs/types.py``."""
    from configs.types import CONFIG_META_FIELDS, Config, PipelineDecl

    out: dict[str, dict[str, Any]] = {}
    root_props = {}
    for f in dataclasses.fields(Config):
        if f.name in CONFIG_META_FIELDS:
            continue
        cls = _section_type(Config, f.name)
        out[f"{f.name}.json"] = _surface(f.name, cls.__doc__ or "", object_schema(cls))
        root_props[f.name] = {"$ref": f"{f.name}.json"}
    pipeline = object_schema(PipelineDecl)
    pipeline["type"] = ["object", "null"]
    out[PIPELINE_SCHEMA] = _surface(
        "pipeline",
        PipelineDecl.__doc__ + " Module names and module-config keys are checked by configs.pipeline. "
        "null = omitted (the default manifest).",
        pipeline,
    )
    out[ROOT_SCHEMA] = _surface("CoordExp config", "The whole config tree; each surface has its own schema file.",
                                {"type": "object", "additionalProperties": False, "properties": root_props},
                                file=ROOT_SCHEMA)
    return dict(sorted(out.items()))


def _section_type(cls: type, name: str) -> type:
    from configs.declare import hints

    return hints(cls)[name]


def _surface(title: str, description: str, body: dict[str, Any], file: str | None = None) -> dict[str, Any]:
    file = file or f"{title}.json"
    description = " ".join(description.split())
    return {"$schema": SCHEMA_DIALECT, "$id": SCHEMA_BASE_URI + file, "title": title, "description": description, **body}


@lru_cache(maxsize=1)
def _schemas() -> tuple[Draft202012Validator, Registry]:
    resources = []
    for contents in surface_schemas().values():
        Draft202012Validator.check_schema(contents)
        resources.append((contents["$id"], Resource.from_contents(contents, default_specification=DRAFT202012)))
    registry = Registry().with_resources(resources)
    root = registry.contents(SCHEMA_BASE_URI + ROOT_SCHEMA)
    return Draft202012Validator(root, registry=registry), registry


def _deref(schema: Mapping[str, Any], resolver: Any) -> tuple[dict[str, Any], Any]:
    """Follow ``$ref``; keywords next to the ``$ref`` (description, default) win over the target's."""
    schema = dict(schema)
    while "$ref" in schema:
        target = resolver.lookup(schema.pop("$ref"))
        schema = {**target.contents, **schema}
        resolver = target.resolver
    return schema, resolver


def _root_node() -> tuple[dict[str, Any], Any]:
    validator, registry = _schemas()
    return _deref(validator.schema, registry.resolver(base_uri=SCHEMA_BASE_URI + ROOT_SCHEMA))


def schema_at(parts: Sequence[str | int]) -> dict[str, Any] | None:
    """The (dereferenced) subschema at a key path, or None where the schema does not describe it."""
    schema, resolver = _root_node()
    for part in parts:
        if isinstance(part, int):
            sub = schema.get("items")
        else:
            sub = schema.get("properties", {}).get(part)
        if not isinstance(sub, Mapping):
            return None
        schema, resolver = _deref(sub, resolver)
    return schema


def declared_default(key: str) -> Any:
    """The declared default of the config key ``key`` (dotted, e.g. ``"rollout_matching.decoding.seed"``)."""
    schema = schema_at(key_parts(key))
    if schema is None or "default" not in schema:
        raise KeyError(f"no default is declared for config key {key!r}")
    return copy.deepcopy(schema["default"])


def declared_enum(key: str) -> tuple[Any, ...]:
    """The allowed values of the enum config key ``key`` (dotted)."""
    return tuple((schema_at(key_parts(key)) or {})["enum"])


@cache
def record_validator(cls: type) -> Draft202012Validator:
    """A validator of one knob record (a module config class of ``configs/modules.py``)."""
    schema = object_schema(cls)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


# ---------------------------------------------------------------- messages


MISSING = object()  # what lookup returns where a level of the dotted key is absent


def lookup(tree: Any, dotted: str) -> Any:
    """The value at the dotted key ``dotted`` in a nested mapping, or :data:`MISSING`."""
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return MISSING
        node = node[part]
    return node


def format_key(parts: Sequence[str | int]) -> str:
    """``["a", "b", 0, "c"]`` -> ``"a.b[0].c"`` (the dotted form used in every ConfigError)."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def key_parts(key: str) -> list[str | int]:
    """Inverse of :func:`format_key` for the keys this package writes."""
    parts: list[str | int] = []
    for piece in key.split(".") if key else []:
        name, _, rest = piece.partition("[")
        parts.append(name)
        if rest:
            parts.extend(int(i) for i in ("[" + rest).replace("]", "").split("[")[1:])
    return parts


_TYPE_WORDS = {
    "object": "a map",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


def type_name(value: Any) -> str:
    """How a value is named in messages: ``an integer (3)``, ``a string ('x')``, ``a map``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({clip(repr(value))})"
    if isinstance(value, Mapping):
        return "a map"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def range_text(schema: Mapping[str, Any]) -> str:
    """``[lo, hi]`` / ``(lo, hi)`` / ``[lo, inf)`` of a schema's bounds."""
    lo = "[" + repr(schema["minimum"]) if "minimum" in schema else ("(" + repr(schema["exclusiveMinimum"]) if "exclusiveMinimum" in schema else "(-inf")
    hi = repr(schema["maximum"]) + "]" if "maximum" in schema else (repr(schema["exclusiveMaximum"]) + ")" if "exclusiveMaximum" in schema else "inf)")
    return f"{lo}, {hi}"


_BOUND_WORDS = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}


def _expected_types(schema: Mapping[str, Any]) -> str:
    types_ = schema.get("type")
    types_ = [types_] if isinstance(types_, str) else list(types_ or [])
    return " or ".join(_TYPE_WORDS.get(t, t) for t in types_)


def _explain(error: ValidationError, prefix: Sequence[str | int] = ()) -> list[tuple[str, str]]:
    """One or more ``(dotted key, message)`` for a jsonschema error."""
    parts = [*prefix, *error.absolute_path]
    key = format_key(parts)
    schema = error.schema if isinstance(error.schema, Mapping) else {}
    kind = error.validator
    value = error.instance
    if kind == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        allowed_txt = ", ".join(allowed) if allowed else "none (this map takes no keys)"
        out = []
        for extra in sorted(k for k in value if k not in schema.get("properties", {})):
            out.append((format_key([*parts, extra]), f"unknown key{did_you_mean(str(extra), allowed)}; allowed keys here: {allowed_txt}"))
        return out
    if kind == "required":
        missing = [k for k in error.validator_value if k not in value]
        return [(format_key([*parts, k]), "missing required key") for k in missing]
    if kind == "type":
        return [(key, f"expected {_expected_types(schema)}, got {type_name(value)}")]
    if kind == "anyOf":  # e.g. an integer >= 1 or the string 'auto'
        branches = []
        for b in error.validator_value:
            if "const" in b:
                branches.append(repr(b["const"]))
            else:
                branches.append(_expected_types(b) + (f" in {range_text(b)}" if any(k in b for k in ("minimum", "exclusiveMinimum", "maximum")) else ""))
        return [(key, f"expected {' or '.join(branches)}, got {type_name(value)}")]
    if kind == "enum":
        allowed = ", ".join("null" if v is None else repr(v) for v in schema["enum"])
        hint = did_you_mean(value, [v for v in schema["enum"] if isinstance(v, str)]) if isinstance(value, str) else ""
        return [(key, f"expected one of {allowed}, got {type_name(value)}{hint}")]
    if kind in _BOUND_WORDS:
        return [(key, f"expected a value in {range_text(schema)}, got {value!r} (must be {_BOUND_WORDS[kind]} {error.validator_value!r})")]
    if kind in ("minItems", "maxItems"):
        lo, hi = schema.get("minItems"), schema.get("maxItems")
        size = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo or 0} to {hi}")
        return [(key, f"expected a list of {size} items, got {len(value)}")]
    if kind == "uniqueItems":
        return [(key, f"items must be unique, got {clip(repr(value))}")]
    if kind == "minLength":
        return [(key, "expected a non-empty string")]
    if kind == "maxLength":
        return [(key, f"expected at most {error.validator_value} characters, got {len(value)}")]
    if kind == "pattern":
        return [(key, f"{clip(repr(value))} is not allowed here: {schema.get('description', 'see docs/CONFIG.md')}")]
    return [(key, error.message)]


def _non_finite(node: Any, parts: list[str | int]) -> list[tuple[str, str]]:
    """``(dotted key, message)`` for every NaN / +-inf float anywhere in ``node``.

    One rule for every number in the tree (schema keys, pipeline module configs, custom
    extras): JSON Schema's ``number`` accepts NaN and inf, and a NaN passes every range
    check (all comparisons are false), so it would surface much later naming no key.
    """
    if isinstance(node, float) and not math.isfinite(node):
        return [(format_key(parts), f"expected a finite number, got {node!r}; NaN and inf are never valid config values, write a finite number")]
    if isinstance(node, Mapping):
        return [p for key, value in node.items() for p in _non_finite(value, [*parts, key])]
    if isinstance(node, (list, tuple)):
        return [p for i, value in enumerate(node) for p in _non_finite(value, [*parts, i])]
    return []


# ---------------------------------------------------------------- the validator


def check(validator: Draft202012Validator, value: Any, prefix: Sequence[str | int] = ()) -> None:
    """Validate ``value``; raise one :class:`ConfigError` for the first problem (by key), listing the rest.

    ``prefix``: the key path of ``value`` in the config tree (for the dotted key of each problem).
    Non-finite numbers (NaN, +-inf) are rejected wherever they occur.
    """
    problems = [p for error in validator.iter_errors(value) for p in _explain(error, prefix)]
    # Non-finite values first: they are reported even where the schema also complains nearby.
    problems = sorted(_non_finite(value, list(prefix))) + sorted(problems)
    if not problems:
        return
    key, message = problems[0]
    if len(problems) > 1:
        rest = "; ".join(f"{k}: {m}" for k, m in problems[1:11])
        more = f" (+{len(problems) - 11} more)" if len(problems) > 11 else ""
        message += f"\nother problems: {rest}{more}"
    raise ConfigError(key, message)


def validate_tree(tree: Mapping[str, Any]) -> None:
    """Validate a merged user tree against the root schema (see :func:`check`)."""
    check(_schemas()[0], tree)


def check_value(key: str, value: Any) -> None:
    """Validate one value against the schema of the config key ``key`` (dotted), naming ``key``."""
    parts = key_parts(key)
    schema = schema_at(parts)
    if schema is None:
        raise KeyError(f"no config key {key!r} is declared")
    _, registry = _schemas()
    check(Draft202012Validator(schema, registry=registry), value, parts)


def check_record(record: Any, key: str) -> None:
    """Validate a knob record built in code (e.g. ``MatchingConfig(...)`` from CLI flags) against its own declaration."""
    # tuples (list keys) are JSON arrays to the schema
    values = {f.name: json.loads(json.dumps(getattr(record, f.name))) for f in dataclasses.fields(record)}
    check(record_validator(type(record)), values, key_parts(key))


# ---------------------------------------------------------------- defaults


def fill_defaults(tree: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``tree`` with every declared default filled in.

    Missing maps whose schema has properties are created and filled; a missing key
    without a ``default`` and without properties stays absent.
    """
    out = copy.deepcopy(tree)
    _fill(out, *_root_node())
    return out


def _fill(instance: Any, schema: Mapping[str, Any], resolver: Any) -> None:
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            sub, sub_resolver = _deref(sub, resolver)
            if key not in instance:
                if "default" in sub:
                    instance[key] = copy.deepcopy(sub["default"])
                elif "properties" in sub:
                    instance[key] = {}
                else:
                    continue
            _fill(instance[key], sub, sub_resolver)
    elif isinstance(instance, list) and isinstance(schema.get("items"), Mapping):
        items, items_resolver = _deref(schema["items"], resolver)
        for item in instance:
            _fill(item, items, items_resolver)


__all__ = [
    "PIPELINE_SCHEMA",
    "ROOT_SCHEMA",
    "SCHEMA_BASE_URI",
    "check",
    "check_record",
    "check_value",
    "declared_default",
    "declared_enum",
    "fill_defaults",
    "format_key",
    "key_parts",
    "range_text",
    "record_validator",
    "schema_at",
    "surface_schemas",
    "type_name",
    "validate_tree",
]
