"""Load a YAML experiment into a validated, defaults-filled, frozen :class:`Config`.

Steps (docs/CONFIG.md):

1. read the file and its ``extends:`` parents (paths relative to the file that names
   them; maps merge recursively, lists and scalars replace; cycles are reported with
   the chain);
2. apply ``--set dotted.key=value`` overrides (values parsed as YAML; ``a.b[0].c``
   indexes lists; new keys may be created so that validation reports them);
3. reject legacy trainer variants, validate against the JSON Schema generated from
   ``configs/types.py`` (``configs.validation``; draft 2020-12, ``additionalProperties: false``
   everywhere);
4. fill the declared defaults, run the cross-field checks;
5. resolve the objective pipeline with ``configs.pipeline.resolve_pipeline`` on the
   merged user tree (before defaults, so "was this knob written?" stays answerable);
6. build the frozen dataclass tree of ``configs/types.py``.

YAML is read with YAML 1.2 scalars: ``1e-5`` is a float and only ``true``/``false``
are booleans (so ``mixed_precision: no`` is the string ``"no"``), and a key written
twice in one map is an error instead of the last one silently winning.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from configs.declare import coerce_scalar
from configs.errors import ConfigError, add_debug_flag, clip
from configs.pipeline import resolve_pipeline
from configs.types import CONFIG_META_FIELDS, Config, freeze, thaw
from configs.validation import (  # noqa: F401  (_deref, _root_node, schema_at: re-exported for callers)
    _deref,
    _root_node,
    fill_defaults,
    format_key,
    schema_at,
    type_name,
    validate_tree,
)
from core.vocab import STAGE1, STAGE2_ROLLOUT_ALIGNED, STAGE2_TWO_CHANNEL, STAGE2_VARIANTS, VARIANTS  # noqa: F401  (VARIANTS re-exported)

SCHEMA_DIR = Path(__file__).resolve().parent / "schema"  # the exported copy (scripts/gen_config_doc.py)

LEGACY_VARIANTS = {"stage2_ab_training": STAGE2_TWO_CHANNEL, "rollout_matching_sft": STAGE2_ROLLOUT_ALIGNED}

RESOLVED_FILENAME = "config.resolved.yaml"
MERGED_FILENAME = "config.merged.yaml"
PIPELINE_FILENAME = "pipeline.json"

# ---------------------------------------------------------------- YAML (1.2 scalars, no duplicate keys)

_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 bools/floats and duplicate-key detection."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# A float needs a dot or an exponent (plain digits stay ints, which resolve first).
_YamlLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
        |[0-9][0-9_]*[eE][-+]?[0-9]+)
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml_value(text: str) -> Any:
    """Parse one override value the way a YAML file would (``1e-5`` -> float, ``[1, 2]`` -> list)."""
    return _load_yaml(text, "the value")


# A config is a few hundred values a dozen levels deep. Aliases can make a short file expand to 10^9 values
# (a "billion laughs" tree) and deep nesting exhausts Python's stack: both are refused before any walk.
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 64


def _check_yaml_size(root: yaml.Node, path: str) -> None:
    """Refuse a composed YAML document whose values, aliases expanded, exceed the bounds above (each node
    is visited once: its expanded size is memoised, so the check itself never expands anything)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        if depth > MAX_YAML_DEPTH:
            raise ConfigError("", f"{path}:{node.start_mark.line + 1}: YAML nested more than {MAX_YAML_DEPTH} levels "
                              "deep; a config is a few levels of maps and lists")
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else [])
        if done:
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_YAML_VALUES:
                raise ConfigError("", f"{path}:{node.start_mark.line + 1}: YAML expands to more than {MAX_YAML_VALUES} "
                                  "values (aliases '*name' repeat whole subtrees); a config is a few hundred values")
            continue
        if id(node) in sizes:
            continue
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)


def _load_yaml(text: str, where: str) -> Any:
    """``text`` parsed with :class:`_YamlLoader`, bounded (:func:`_check_yaml_size`); errors name ``where``."""
    try:
        loader = _YamlLoader(text)  # _YamlLoader is a SafeLoader
        try:
            node = loader.get_single_node()
            if node is not None:
                _check_yaml_size(node, where)
            return loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except ConfigError:
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark is not None else where
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError("", f"{at}: invalid YAML: {clip(problem)}") from exc
    except RecursionError:
        raise ConfigError("", f"{where}: YAML nested too deeply to read (more than {MAX_YAML_DEPTH} levels); a "
                          "config is a few levels of maps and lists") from None
    except ValueError as exc:  # e.g. an integer literal of more digits than Python converts
        raise ConfigError("", f"{where}: a value cannot be read: {clip(str(exc))}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError("", f"config file {path} is a directory; pass the YAML file inside it")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{path}: not a UTF-8 text file (byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start}); --config takes a YAML file") from None
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc}") from exc
    tree = _load_yaml(text, str(path))
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError("", f"{path}:1: a config file must be a YAML map at top level, got {type_name(tree)}")
    return tree


# ---------------------------------------------------------------- extends + merge


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: maps merge recursively, everything else (lists too) replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_tree(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(path) :], path))
        raise ConfigError("extends", f"cycle in extends: {cycle}; remove one of these extends entries")
    tree = _read_yaml(path)
    parents = tree.pop("extends", None)
    if parents is None:
        return tree
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) and p for p in parents):
        raise ConfigError("extends", f"{path}: expected a path or a list of paths (relative to this file), got {parents!r}")
    merged: dict[str, Any] = {}
    for parent in parents:
        parent_path = Path(parent).expanduser()
        if not parent_path.is_absolute():
            parent_path = path.parent / parent_path
        if not parent_path.is_file():
            raise ConfigError("extends", f"{path}: extends {parent!r}, but {parent_path} does not exist (paths are relative to the file that names them)")
        merged = deep_merge(merged, _load_tree(parent_path, (*chain, path)))
    return deep_merge(merged, tree)


# ---------------------------------------------------------------- overrides

_OVERRIDE_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_\-]*)((?:\[[0-9]+\])*)$")
_INDEX = re.compile(r"\[([0-9]+)\]")


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``"a.b[0].c=1"`` -> ``(["a", "b", 0, "c"], 1)``; the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    key = key.strip()
    usage = "expected KEY=VALUE with KEY like training.lr or stage2_ab.pipeline.objective[0].weight"
    if not sep or not key:
        raise ConfigError("--set", f"{text!r}: {usage}")
    parts: list[str | int] = []
    for piece in key.split("."):
        match = _OVERRIDE_PART.match(piece)
        if match is None:
            raise ConfigError("--set", f"{text!r}: bad key segment {piece!r}; {usage}")
        parts.append(match.group(1))
        parts.extend(int(i) for i in _INDEX.findall(match.group(2)))
    try:
        parsed = parse_yaml_value(value)
    except ConfigError as exc:
        raise ConfigError(format_key(parts), f"--set value {clip(repr(value))}: {exc}") from None
    return parts, parsed


def apply_override(tree: dict[str, Any], text: str) -> None:
    """Set one ``KEY=VALUE`` in ``tree`` in place, creating missing maps (and a list at index 0)."""
    parts, value = parse_override(text)
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = format_key(parts[: depth + 1])
        fresh: Any = None if last else ([] if isinstance(parts[depth + 1], int) else {})
        if isinstance(part, int):
            if not isinstance(node, list):
                raise ConfigError(here, f"--set {text!r}: [{part}] indexes a list, but {format_key(parts[:depth])} is {type_name(node)}")
            if part > len(node):
                raise ConfigError(here, f"--set {text!r}: index {part} is out of range (the list has {len(node)} items; index {len(node)} appends)")
            if part == len(node):
                node.append(value if last else fresh)
            elif last:
                node[part] = value
        else:
            if not isinstance(node, dict):
                raise ConfigError(here, f"--set {text!r}: {format_key(parts[:depth])} is {type_name(node)}, not a map")
            if last:
                node[part] = value
            elif not isinstance(node.get(part), (dict, list)):
                node[part] = fresh
        if not last:
            node = node[part]


# ---------------------------------------------------------------- variant + cross-field checks


def _variant_of(tree: Mapping[str, Any]) -> Any:
    custom = tree.get("custom")
    return custom.get("trainer_variant") if isinstance(custom, Mapping) else None


def _check_legacy(tree: Mapping[str, Any]) -> None:
    variant = _variant_of(tree)
    if isinstance(variant, str) and variant in LEGACY_VARIANTS:
        new = LEGACY_VARIANTS[variant]
        raise ConfigError(
            "custom.trainer_variant",
            f"{variant!r} is a legacy name that is no longer accepted; use {new!r} (custom.trainer_variant: {new})",
        )


def _check_expect(variant: str, expect: str | None, path: Path | None) -> None:
    if expect not in (None, "stage1", "stage2"):
        raise ValueError(f"load_config(expect=...) must be None, 'stage1' or 'stage2', got {expect!r}")
    where = f" --config {path}" if path is not None else ""
    if expect == "stage1" and variant != STAGE1:
        raise ConfigError(
            "custom.trainer_variant",
            f"{variant!r} is a Stage-2 trainer variant; run it with train_stage2.py{where} (train_stage1.py needs custom.trainer_variant absent or null)",
        )
    if expect == "stage2" and variant == STAGE1:
        raise ConfigError(
            "custom.trainer_variant",
            f"missing: train_stage2.py needs custom.trainer_variant: {' | '.join(STAGE2_VARIANTS)}; for a Stage-1 config run train_stage1.py{where}",
        )


# Sections a variant never reads: writing one is a mistake that would otherwise be silently ignored.
_UNUSED_SECTIONS = {
    STAGE1: {"stage2_ab": "train_stage1.py reads no stage2_ab keys; Stage-2 configs set custom.trainer_variant"},
    STAGE2_ROLLOUT_ALIGNED: {
        "stage2_ab": "stage2_rollout_aligned reads its knobs from rollout_matching "
        "(pipeline, coord_decode_mode, decoding, matching); stage2_ab is the Two-Channel surface",
        "stage1": "Stage-2 reads no stage1 keys",
    },
    STAGE2_TWO_CHANNEL: {"stage1": "Stage-2 reads no stage1 keys"},
}


def _check_unused_sections(raw: Mapping[str, Any], variant: str) -> None:
    for section, why in _UNUSED_SECTIONS.get(variant, {}).items():
        if raw.get(section):
            raise ConfigError(section, f"has no effect under variant {variant}: {why}; remove it")


# model.dtype (parameter storage) x training.mixed_precision (autocast) pairs that cannot train.
HALF_PRECISION_CONFLICTS = {
    ("float16", "bf16"): "two half formats (fp16 parameters, bf16 autocast) do not mix in one forward; "
    "use model.dtype=float32 (fp32 master weights under bf16 autocast, the recipe setting)",
    ("bfloat16", "fp16"): "two half formats (bf16 parameters, fp16 autocast) do not mix in one forward; "
    "use model.dtype=float32 with training.mixed_precision=fp16 or bf16",
    ("float16", "fp16"): "the fp16 gradient scaler cannot unscale fp16 gradients; "
    "use model.dtype=float32 (fp32 master weights under fp16 autocast)",
}


def check_cross_fields(resolved: Mapping[str, Any]) -> None:
    """Checks that involve more than one key (the schema covers single-key types and ranges)."""
    model, data, training = resolved["model"], resolved["data"], resolved["training"]
    if model["tiny"]["enabled"] and model["name_or_path"] is not None:
        raise ConfigError(
            "model.name_or_path",
            f"both model.name_or_path ({model['name_or_path']!r}) and model.tiny.enabled are set; set model.name_or_path: null to use the tiny model, or model.tiny.enabled: false",
        )
    if not model["tiny"]["enabled"] and model["name_or_path"] is None:
        raise ConfigError(
            "model.name_or_path",
            "missing required key: set model.name_or_path to a Qwen3-VL checkpoint (HF id or local dir), or model.tiny.enabled: true",
        )
    synthetic = data["synthetic"]["enabled"]
    if not synthetic and data["train_jsonl"] is None:
        raise ConfigError("data.train_jsonl", "missing required key (a JSONL file, docs/DATA.md); or set data.synthetic.enabled: true for the built-in shapes data")
    if synthetic:
        for key in ("train_jsonl", "val_jsonl"):
            if data[key] is not None:
                raise ConfigError(
                    f"data.{key}",
                    f"data.synthetic.enabled writes its own train/val JSONL under data.synthetic.out_dir; set data.{key}: null or data.synthetic.enabled: false",
                )
    rm = resolved["rollout_matching"]
    if rm["decoding"]["coord_pick"] == "expectation" and rm["backend"] != "hf":
        raise ConfigError(
            "rollout_matching.decoding.coord_pick",
            f"expectation needs rollout_matching.backend: hf (got {rm['backend']!r}); set coord_pick: argmax to keep the {rm['backend']} backend",
        )
    if data["min_pixels"] is not None and data["max_pixels"] is not None and data["min_pixels"] > data["max_pixels"]:
        raise ConfigError("data.min_pixels", f"must be <= data.max_pixels ({data['max_pixels']}), got {data['min_pixels']}")
    half, mixed = model["dtype"], training["mixed_precision"]
    if (half, mixed) in HALF_PRECISION_CONFLICTS:
        raise ConfigError("model.dtype", f"{half} with training.mixed_precision={mixed}: {HALF_PRECISION_CONFLICTS[half, mixed]}")
    if training["warmup_steps"] > 0 and training["warmup_ratio"] > 0:
        raise ConfigError(
            "training.warmup_ratio",
            f"both training.warmup_steps ({training['warmup_steps']}) and training.warmup_ratio ({training['warmup_ratio']}) are set; keep one and set the other to 0",
        )
    if training["warmup_steps"] > training["max_steps"]:
        raise ConfigError(
            "training.warmup_steps",
            f"must be <= training.max_steps ({training['max_steps']}), got {training['warmup_steps']}; "
            f"lower training.warmup_steps, raise training.max_steps, or use training.warmup_ratio (a fraction of max_steps)",
        )


# ---------------------------------------------------------------- dataclass construction


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _convert(args[0], value, key)  # else an explicit anyOf (int | str): the validated scalar
    if is_dataclass(tp):
        return _build(tp, value, key)
    if tp is Any or origin in (Mapping, dict) or tp in (Mapping, dict):
        return freeze(value)
    if origin is tuple:
        args = typing.get_args(tp)
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        return tuple(_convert(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))
    return coerce_scalar(tp, value)


def _build(cls: type, data: Mapping[str, Any], key: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if cls is Config and f.name in CONFIG_META_FIELDS:
            continue
        if f.name not in data:
            # Unreachable while the schema is generated from these dataclasses (a declaration bug otherwise).
            raise RuntimeError(f"{format_key([*([key] if key else []), f.name])}: no value after defaults; the schema generated from configs/types.py lacks it")
        kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{key}.{f.name}" if key else f.name)
    return kwargs if cls is Config else cls(**kwargs)


# ---------------------------------------------------------------- public API


def merge_config_tree(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The merged user tree: ``path`` with its ``extends`` chain, then ``overrides`` (no validation)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError("", f"config file {path} does not exist")
    tree = _load_tree(path, ())
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'KEY=VALUE' strings, not a single string")
    for text in overrides:
        if text.partition("=")[0].strip().split(".")[0].split("[")[0] == "extends":
            raise ConfigError("extends", f"--set {text!r}: extends is resolved before overrides; edit the file's extends: list instead")
        apply_override(tree, text)
    return tree


def load_config(path: str | Path, overrides: Sequence[str] = (), *, expect: str | None = None) -> Config:
    """Load, merge, override, validate, default, cross-check and freeze a config.

    ``expect``: ``"stage1"`` (train_stage1.py: a Stage-2 variant fails), ``"stage2"``
    (train_stage2.py: a missing variant fails) or None (any variant).
    Raises :class:`ConfigError` naming the dotted key for every user error.
    """
    raw = merge_config_tree(path, overrides)
    return build_config(raw, path=Path(path), expect=expect)


def build_config(raw: Mapping[str, Any], *, path: Path | None = None, expect: str | None = None) -> Config:
    """Validate and freeze an already merged user tree (what :func:`load_config` does after merging)."""
    raw = copy.deepcopy(dict(raw))
    raw.pop("extends", None)
    _check_legacy(raw)
    validate_tree(raw)
    variant = _variant_of(raw) or STAGE1
    _check_expect(variant, expect, path)
    _check_unused_sections(raw, variant)
    resolved = fill_defaults(raw)
    check_cross_fields(resolved)

    resolved_pipeline = resolve_pipeline(copy.deepcopy(raw), variant)
    sections = _build(Config, resolved, "")
    return Config(
        **sections,
        raw=freeze(raw),
        resolved=freeze(resolved),
        path=path,
        variant=variant,
        pipeline=resolved_pipeline,
    )


def _pipeline_payload(pipeline: Any) -> dict[str, Any] | None:
    """``ResolvedPipeline.to_dict()`` (module lists, extra, variant, source, checksum), or None."""
    to_dict = getattr(pipeline, "to_dict", None)
    return thaw(to_dict()) if callable(to_dict) else None


def save_resolved(cfg: Config, run_dir: str | Path) -> Path:
    """Write ``config.resolved.yaml`` (full tree with defaults), ``config.merged.yaml``
    (the merged user tree: ``load_config`` on it reproduces this config) and
    ``pipeline.json`` (resolved module lists + checksum) into ``run_dir``.

    Returns the path of ``config.resolved.yaml``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    header = f"# CoordExp config, variant {cfg.variant}, loaded from {cfg.path}\n"
    out = run_dir / RESOLVED_FILENAME
    out.write_text(header + "# every default filled in; for reference (reload config.merged.yaml to rerun)\n" + _dump(cfg.resolved), encoding="utf-8")
    (run_dir / MERGED_FILENAME).write_text(header + "# merged user tree (extends + --set applied)\n" + _dump(cfg.raw), encoding="utf-8")
    payload = _pipeline_payload(cfg.pipeline)
    if payload is not None:
        (run_dir / PIPELINE_FILENAME).write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return out


def _dump(tree: Mapping[str, Any]) -> str:
    return yaml.safe_dump(thaw(tree), sort_keys=False, allow_unicode=True, default_flow_style=False)


def add_config_args(parser: argparse.ArgumentParser,
                    set_example: str = "--set training.lr=2e-5 --set training.max_steps=200") -> argparse.ArgumentParser:
    """Add ``--config PATH`` (required), repeatable ``--set KEY=VALUE`` (dest ``overrides``) and ``--debug``."""
    parser.add_argument("--config", required=True, type=Path, metavar="PATH", help="experiment YAML (see docs/CONFIG.md)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one key after extends, e.g. {set_example} (repeatable; values parsed as YAML)",
    )
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, every path, the tokenizer's coord tokens and all data records, print "
                             "the resolved pipeline and the packing plan, and exit (0 = ready; no weights are loaded)")
    return add_debug_flag(parser)

