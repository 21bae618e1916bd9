"""Regenerate docs/CONFIG.md and configs/schema/*.json from the config declarations.

    python scripts/gen_config_doc.py            # rewrite the generated files
    python scripts/gen_config_doc.py --check    # exit 1 (listing them) when a generated file is stale

The declarations are the dataclass fields of ``configs/types.py`` (the YAML tree) and
``configs/modules.py`` (pipeline module configs): type, default, allowed values and a one-line doc
per key (``configs.declare``). docs/CONFIG.md is ``scripts/config_doc.md.in`` (the hand-written
narrative) with the key reference generated into it; the JSON Schemas are the ones the loader
validates with, exported for editors and review. ``tests/test_config_files.py`` fails when either
is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.declare import declared_fields, field_schema, has_default, hints, section_class, type_text  # noqa: E402
from configs.errors import run_cli  # noqa: E402
from configs.modules import MODULES  # noqa: E402
from configs.types import CONFIG_META_FIELDS, Config, PipelineEntry  # noqa: E402
from configs.validation import surface_schemas  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "scripts" / "config_doc.md.in"
CONFIG_DOC = REPO / "docs" / "CONFIG.md"
SCHEMA_DIR = REPO / "configs" / "schema"
PLACEHOLDER = "{{KEY_REFERENCE}}"
REGENERATE = "python scripts/gen_config_doc.py"


# ---------------------------------------------------------------- cells


def _value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(str(x) if isinstance(x, str) else _value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def _bounds(s: Mapping[str, Any]) -> str:
    lo = ("[", s["minimum"]) if "minimum" in s else (("(", s["exclusiveMinimum"]) if "exclusiveMinimum" in s else None)
    hi = (s["maximum"], "]") if "maximum" in s else ((s["exclusiveMaximum"], ")") if "exclusiveMaximum" in s else None)
    if lo and hi:
        return f"{lo[0]}{lo[1]!r}, {hi[0]!r}{hi[1]}"
    if lo:
        return (">= " if lo[0] == "[" else "> ") + repr(lo[1])
    if hi:
        return ("<= " if hi[1] == "]" else "< ") + repr(hi[0])
    return ""


def _allowed(s: Mapping[str, Any]) -> str:
    """The allowed values of one key, from its generated schema."""
    if "enum" in s:
        return ", ".join(f"`{_value(v) if not isinstance(v, str) else v}`" for v in s["enum"])
    if "anyOf" in s:
        parts = []
        for b in s["anyOf"]:
            parts.append(f"`{b['const']}`" if "const" in b else " ".join(x for x in (b.get("type", ""), _bounds(b)) if x))
        return " or ".join(parts)
    if "$ref" in s:
        return "a pipeline map (docs/training/PIPELINE.md) or null"
    out = [x for x in (_bounds(s),) if x]
    if s.get("minLength"):
        out.append("non-empty")
    items = s.get("items") or {}
    if "enum" in items:
        out.append("each one of " + ", ".join(f"`{v}`" for v in items["enum"]))
    elif _bounds(items):
        out.append(f"each in {_bounds(items)}")
    if items.get("minLength"):
        out.append("each non-empty")
    lo, hi = s.get("minItems"), s.get("maxItems")
    if lo is not None and lo == hi:
        out.append(f"exactly {lo} items")
    elif lo:
        out.append(f"at least {lo} item{'s' if lo > 1 else ''}")
    if s.get("uniqueItems"):
        out.append("unique")
    return "; ".join(out)


def _prose(text: str | None) -> str:
    return " ".join((text or "").split()).replace("``", "`")


def _cell(text: str) -> str:
    return _prose(text).replace("|", "\\|")


def _type(cls: type, name: str) -> str:
    return type_text(cls, name).replace("|", " or ")


# ---------------------------------------------------------------- tables


def _rows(cls: type, prefix: str) -> list[str]:
    tps = hints(cls)
    rows = []
    for f in declared_fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        s = field_schema(cls, f, tps[f.name])
        sub = section_class(cls, f.name)
        if sub is not None:
            rows.append(f"| `{key}` | map | | | {_cell(s.get('description', ''))} |")
            rows.extend(_rows(sub, key))
            continue
        default = _value(s["default"]) if "default" in s else ("required" if not has_default(f) else "")
        rows.append(f"| `{key}` | {_cell(_type(cls, f.name))} | `{_cell(default)}` | {_cell(_allowed(s))} | "
                    f"{_cell(s.get('description', ''))} |")
    return rows


_HEAD = ["| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]


def key_reference() -> str:
    """The generated part of docs/CONFIG.md: one table per config surface, then one per module config."""
    out: list[str] = []
    for f in Config.__dataclass_fields__.values():
        if f.name in CONFIG_META_FIELDS:
            continue
        cls = hints(Config)[f.name]
        out += [f"### `{f.name}`", "", _prose(cls.__doc__), "", *_HEAD, *_rows(cls, f.name), ""]
    out += ["### Pipeline entries", "",
            "Each item of a `pipeline`'s `objective` / `diagnostics` list (`configs.types.PipelineEntry`; the "
            "lists themselves are `objective` (required when a pipeline is written) and `diagnostics`).", "",
            *_HEAD, *_rows(PipelineEntry, "<entry>"), ""]
    out += ["### Pipeline module `config` keys", "",
            "What a pipeline entry's `config` map accepts, per module (`configs/modules.py`; any other key is "
            "refused with the allowed ones). Omitted keys take these defaults. The flat knobs above that say "
            "`-> module.key` feed these keys when no pipeline is written.", ""]
    for name, decl in MODULES.items():
        cls = decl.config
        out += [f"`{name}`: {_prose(cls.__doc__)}", ""]
        if declared_fields(cls):
            out += [*_HEAD, *_rows(cls, f"{name}.config"), ""]
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------- files


METRICS_DOC = REPO / "docs" / "training" / "METRICS_LOSSES.md"
_MANIFEST_BEGIN = "<!-- default-manifests:begin (generated by `python scripts/gen_config_doc.py` from configs.pipeline) -->"
_MANIFEST_END = "<!-- default-manifests:end -->"


def default_manifests() -> str:
    """The table of each variant's default manifest: per module, enabled and the values that differ from the
    module's declared defaults (configs.pipeline.resolve_pipeline of an empty config)."""
    from configs.declare import defaults_of
    from configs.modules import MODULES
    from configs.pipeline import VARIANTS, resolve_pipeline

    rows = ["| variant | " + " | ".join(f"`{m}`" for m in ("token_ce", "bbox_geo", "coord_reg")) + " |",
            "| --- | --- | --- | --- |"]
    for variant in VARIANTS:
        cells = []
        for spec in resolve_pipeline({}, variant).objective:
            defaults = defaults_of(MODULES[spec.name].config)
            diff = [f"`{k}` {v}" for k, v in spec.config.items() if defaults.get(k) != v]
            cells.append(("" if spec.enabled else "disabled; ") + (", ".join(diff) or "module defaults"))
        rows.append(f"| `{variant}` | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _with_manifests(text: str) -> str:
    head, sep, rest = text.partition(_MANIFEST_BEGIN + "\n")
    _, sep2, tail = rest.partition(_MANIFEST_END)
    if not (sep and sep2):
        raise RuntimeError(f"{METRICS_DOC} lacks the {_MANIFEST_BEGIN} / {_MANIFEST_END} lines")
    return head + sep + default_manifests() + sep2 + tail


def outputs() -> dict[Path, str]:
    """Every generated file and the text it must hold."""
    template = TEMPLATE.read_text(encoding="utf-8")
    if PLACEHOLDER not in template:
        raise RuntimeError(f"{TEMPLATE} has no {PLACEHOLDER} line")
    note = (f"<!-- Generated by `{REGENERATE}` from configs/types.py, configs/modules.py and "
            f"scripts/config_doc.md.in: edit those, then regenerate. -->\n")
    files = {CONFIG_DOC: note + template.replace(PLACEHOLDER + "\n", key_reference()),
             METRICS_DOC: _with_manifests(METRICS_DOC.read_text(encoding="utf-8"))}
    for name, schema in surface_schemas().items():
        files[SCHEMA_DIR / name] = json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
    return files


def stale() -> list[str]:
    """Generated files whose content on disk differs (or that are missing, or left over)."""
    want = outputs()
    out = [str(p.relative_to(REPO)) for p, text in want.items()
           if not p.is_file() or p.read_text(encoding="utf-8") != text]
    out += [str(p.relative_to(REPO)) + " (no longer generated)" for p in sorted(SCHEMA_DIR.glob("*.json")) if p not in want]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/gen_config_doc.py", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        old = stale()
        for name in old:
            print(f"stale: {name}")
        return 1 if old else 0
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        path.unlink()
    for path, text in outputs().items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
