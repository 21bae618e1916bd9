"""Objective pipeline manifests: parse, validate, default, and fingerprint (docs/training/PIPELINE.md).

``resolve_pipeline(raw, variant)`` turns the merged user YAML (a plain nested mapping, *before*
schema defaults are filled, so "written" means "present in raw") into a
:class:`ResolvedPipeline`: the ordered objective and diagnostics module lists with every module
config default applied, plus the ``extra`` identity keys (variant, decode/embed modes) that enter
the checksum. Every problem raises ``configs.errors.ConfigError`` with a dotted key such as
``stage2_ab.pipeline.objective[2].config.sof_ce_weight``.

Where a pipeline lives per variant:

    stage1                  -> stage1.pipeline
    stage2_two_channel      -> stage2_ab.pipeline
    stage2_rollout_aligned  -> rollout_matching.pipeline

A pipeline value of ``null`` counts as omitted (so ``--set stage2_ab.pipeline=null`` returns to
the default manifest).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import configs.types as _types
from configs.declare import coerce_record, declared_fields, default_value, defaults_of, maps_to, section_class
from configs.errors import ConfigError, did_you_mean
from configs.modules import DIAGNOSTICS, MODULES, OBJECTIVE, ModuleDecl
from configs.types import CHANNELS, CoordSoftCEW1Config, PipelineEntry, Stage2ABConfig, thaw
from configs.validation import MISSING, check, check_value, declared_default, key_parts, lookup, record_validator
from core.vocab import STAGE1, STAGE2_ROLLOUT_ALIGNED, STAGE2_TWO_CHANNEL, VARIANTS

PIPELINE_LOCATIONS: dict[str, str] = {
    STAGE1: "stage1.pipeline",
    STAGE2_TWO_CHANNEL: "stage2_ab.pipeline",
    STAGE2_ROLLOUT_ALIGNED: "rollout_matching.pipeline",
}

ENTRY_KEYS: tuple[str, ...] = tuple(f.name for f in declared_fields(PipelineEntry))
ENTRY_DEFAULTS: dict[str, Any] = defaults_of(PipelineEntry)  # enabled, weight, channels (config: {})
CHANNEL_ORDER: tuple[str, ...] = CHANNELS

# ST / decode modes that change what the objective computes: part of the pipeline identity
# (defaults and allowed values: their declarations in configs/types.py).
MODE_KEYS: dict[str, tuple[str, ...]] = {
    STAGE1: (),
    STAGE2_TWO_CHANNEL: ("stage2_ab.coord_ctx_embed_mode", "stage2_ab.coord_decode_mode"),
    STAGE2_ROLLOUT_ALIGNED: ("rollout_matching.coord_decode_mode",),
}


def _flat_knobs(cls: type, prefix: str) -> dict[str, tuple[str, Any]]:
    """Every flat knob declared under ``cls`` (nested sections too): dotted key -> (module.config_key, default)."""
    out: dict[str, tuple[str, Any]] = {}
    for f in declared_fields(cls):
        sub = section_class(cls, f.name)
        if sub is not None:
            out.update(_flat_knobs(sub, f"{prefix}.{f.name}"))
        elif maps_to(cls, f.name) is not None:
            out[f"{prefix}.{f.name}"] = (maps_to(cls, f.name), default_value(f))
    return out


# custom.coord_soft_ce_w1 sub-key -> coord_reg key, and its defaults (docs/training/METRICS_LOSSES.md). "enabled"
# maps to the coord_reg entry's own ``enabled`` key (an entry key, not a config key).
_SOFT_CE_W1_MAP: dict[str, str] = {
    k.rsplit(".", 1)[1]: target.split(".", 1)[1]
    for k, (target, _) in _flat_knobs(CoordSoftCEW1Config, "custom.coord_soft_ce_w1").items()
}
_SOFT_CE_W1_DEFAULTS: dict[str, Any] = defaults_of(CoordSoftCEW1Config)
_SOFT_CE_W1_KNOBS: dict[str, str] = {f"custom.coord_soft_ce_w1.{k}": f"coord_reg.{v}" for k, v in _SOFT_CE_W1_MAP.items()}

# Two-Channel flat knob -> (module.config_key, default), from configs/types.py. desc_ce_weight feeds two
# token_ce keys; coord_gate_weight defaults to 1 there (unlike the module default 0; the declaration says why).
_TWO_CHANNEL_FLAT: dict[str, tuple[str, Any]] = _flat_knobs(Stage2ABConfig, "stage2_ab")

FLAT_OBJECTIVE_KNOBS: dict[str, dict[str, str]] = {
    STAGE1: dict(_SOFT_CE_W1_KNOBS),
    STAGE2_TWO_CHANNEL: {**{k: v[0] for k, v in _TWO_CHANNEL_FLAT.items()}, **_SOFT_CE_W1_KNOBS},
    STAGE2_ROLLOUT_ALIGNED: dict(_SOFT_CE_W1_KNOBS),
}
"""Per variant: every flat objective knob (dotted key in raw) -> the ``module.config_key`` that
replaces it in a written pipeline (``coord_reg.enabled`` is the entry's ``enabled`` key). When a
pipeline is written, each of these present in raw is rejected; so is a bare
``custom.coord_soft_ce_w1`` block. Derived from the ``alias`` declarations of configs/types.py."""

DEFAULT_OBJECTIVE_ORDER: tuple[str, ...] = ("token_ce", "bbox_geo", "coord_reg")

# A default manifest (pipeline omitted) = each module's declared defaults (configs/modules.py), overlaid with
# these per-variant values, then with the variant's flat knobs (their own defaults: the aliases of
# configs/types.py). The one place these values are written: docs/training/METRICS_LOSSES.md shows the
# resolved manifests (scripts/gen_config_doc.py). Without custom.coord_soft_ce_w1, Stage-1 trains the
# CE-only baseline (coord_ce + coord_gate = plain next-token CE at coord slots) and both Stage-2 variants
# keep the coord gate on (Two-Channel through stage2_ab.coord_gate_weight's default).
VARIANT_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    STAGE1: {"coord_reg": {"coord_ce_weight": 1.0, "coord_gate_weight": 1.0}},
    STAGE2_TWO_CHANNEL: {},
    STAGE2_ROLLOUT_ALIGNED: {"coord_reg": {"coord_gate_weight": 1.0}},
}
DISABLED_BY_DEFAULT: dict[str, tuple[str, ...]] = {STAGE1: ("bbox_geo",)}  # listed, enabled: false
DEFAULT_DIAGNOSTICS: tuple[str, ...] = ("coord_diag",)


# ---------------------------------------------------------------------------- contracts


@dataclass(frozen=True)
class ModuleSpec:
    """One resolved pipeline entry. ``config`` has every default applied (read-only mapping).

    ``channels``: subset of ("A", "B") in that order; only Stage-2 Two-Channel scopes by it.
    """

    name: str
    enabled: bool = ENTRY_DEFAULTS["enabled"]
    weight: float = ENTRY_DEFAULTS["weight"]
    channels: tuple[str, ...] = CHANNEL_ORDER
    config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def to_dict(self) -> dict[str, Any]:
        """The normalised entry of docs/training/PIPELINE.md (``weight`` float, channels in A,B order, floats finite, -0.0 -> 0.0)."""
        return {
            "name": self.name,
            "enabled": bool(self.enabled),
            "weight": _canon_value(float(self.weight), f"{self.name}.weight"),
            "channels": [c for c in CHANNEL_ORDER if c in self.channels],
            "config": {k: _canon_value(v, f"{self.name}.config.{k}") for k, v in sorted(self.config.items())},
        }


@dataclass(frozen=True)
class ResolvedPipeline:
    """The objective of one run: ordered module lists, identity extras and where it came from.

    ``source`` is ``"default"`` (built from flat knobs, docs/training/METRICS_LOSSES.md) or ``"explicit"`` (written).
    ``extra`` holds ``variant`` and the decode/embed modes under their full dotted names.
    """

    variant: str
    objective: tuple[ModuleSpec, ...]
    diagnostics: tuple[ModuleSpec, ...]
    extra: Mapping[str, Any]
    source: str

    def identity(self) -> dict[str, Any]:
        """The object the checksum is taken of: ``{"objective", "diagnostics", "extra"}``."""
        return {
            "objective": [m.to_dict() for m in self.objective],
            "diagnostics": [m.to_dict() for m in self.diagnostics],
            "extra": {k: _canon_value(v, f"extra.{k}") for k, v in sorted(self.extra.items())},
        }

    def canonical_json(self) -> str:
        """``json.dumps(identity, sort_keys=True, separators=(",", ":"))``; NaN/Inf raise ValueError."""
        return json.dumps(self.identity(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @property
    def checksum(self) -> str:
        """sha256 hex of :meth:`canonical_json` (docs/training/PIPELINE.md)."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """Identity plus ``variant``, ``source`` and ``checksum``: what the trainer logs and saves."""
        return {"variant": self.variant, "source": self.source, **self.identity(), "checksum": self.checksum}


def _canon_value(value: Any, where: str) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"pipeline value {where} = {value!r} is not finite; NaN/Inf cannot be fingerprinted")
        return 0.0 if value == 0.0 else value  # -0.0 -> 0.0
    if isinstance(value, Mapping):
        return {str(k): _canon_value(v, f"{where}.{k}") for k, v in sorted(value.items())}
    if isinstance(value, Sequence):
        return [_canon_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"pipeline value {where} has type {type(value).__name__}; expected bool/int/float/str/null")


# ---------------------------------------------------------------------------- raw access


def _is_written(raw: Mapping[str, Any], dotted: str) -> bool:
    value = lookup(raw, dotted)
    return value is not MISSING and value is not None


def _is_seq(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


# ---------------------------------------------------------------------------- value checks


def _module_config(mod: ModuleDecl, written: Mapping[str, Any], where: str) -> MappingProxyType:
    """Defaults of ``mod`` overlaid with ``written``, validated against the module's declared config
    (configs/modules.py) by the config validator; unknown keys raise with the allowed ones."""
    written = dict(written)
    check(record_validator(mod.config), written, key_parts(where))
    return MappingProxyType({**defaults_of(mod.config), **coerce_record(mod.config, written)})


# ---------------------------------------------------------------------------- explicit pipelines


def _parse_entry(entry: Any, where: str, list_kind: str, variant: str) -> ModuleSpec:
    if not isinstance(entry, Mapping):
        raise ConfigError(where, f"each module entry must be a mapping with keys {', '.join(ENTRY_KEYS)}; got {entry!r}")
    # Keys, types and ranges come from the entry's declaration (configs.types.PipelineEntry), checked by
    # the one validator; channels are checked below, with the variant's scoping rules.
    declared = thaw({k: v for k, v in entry.items() if k != "channels" and not (k == "config" and v is None)})
    check(record_validator(PipelineEntry), declared, key_parts(where))
    name = entry["name"]
    mod = MODULES.get(name)
    if mod is None:
        known = sorted(MODULES, key=lambda n: (MODULES[n].kind != OBJECTIVE, n))
        raise ConfigError(
            f"{where}.name", f"unknown module {name!r}{did_you_mean(name, known)}; known modules: {', '.join(known)} "
            "(a module of your own: list its file in custom.plugins)"
        )
    if mod.kind != list_kind:
        other = "diagnostics" if list_kind == OBJECTIVE else "objective"
        raise ConfigError(
            f"{where}.name",
            f"{name!r} is a {mod.kind} module and cannot be listed under '{list_kind}'; move it to '{other}'",
        )

    enabled = entry.get("enabled", ENTRY_DEFAULTS["enabled"])
    weight = float(entry.get("weight", ENTRY_DEFAULTS["weight"]))
    if list_kind == DIAGNOSTICS and weight != 1.0:
        raise ConfigError(f"{where}.weight", "diagnostics modules add no loss; remove 'weight' from this entry")

    channels_raw = entry.get("channels", ENTRY_DEFAULTS["channels"])
    if not _is_seq(channels_raw) or not channels_raw:
        raise ConfigError(f"{where}.channels", f"must be a non-empty list drawn from [A, B], got {channels_raw!r}")
    for c in channels_raw:
        if c not in CHANNEL_ORDER:
            raise ConfigError(f"{where}.channels", f"unknown channel {c!r}; allowed: A, B")
    if len(set(channels_raw)) != len(channels_raw):
        raise ConfigError(f"{where}.channels", f"lists a channel twice: {list(channels_raw)!r}")
    channels = tuple(c for c in CHANNEL_ORDER if c in channels_raw)
    if variant == STAGE1 and channels != CHANNEL_ORDER:
        raise ConfigError(f"{where}.channels", "channels only scope modules in stage2_two_channel; Stage-1 runs every "
                          "module, so remove 'channels' (or disable the module with enabled: false)")
    if variant == STAGE2_ROLLOUT_ALIGNED and "B" not in channels:
        raise ConfigError(f"{where}.channels", "stage2_rollout_aligned steps are all rollout (channel B) steps; a module "
                          "scoped to [A] would never run: use [B], [A, B] or enabled: false")

    written_cfg = entry.get("config") or {}
    config = _module_config(mod, written_cfg, f"{where}.config")
    return ModuleSpec(name=name, enabled=enabled, weight=weight, channels=channels, config=config)


def _parse_list(value: Any, where: str, list_kind: str, variant: str) -> tuple[ModuleSpec, ...]:
    if not _is_seq(value):
        raise ConfigError(where, f"must be a list of module entries, got {value!r}")
    specs: list[ModuleSpec] = []
    first_at: dict[str, int] = {}
    for i, entry in enumerate(value):
        spec = _parse_entry(entry, f"{where}[{i}]", list_kind, variant)
        if spec.name in first_at:
            raise ConfigError(
                f"{where}[{i}].name",
                f"duplicate module {spec.name!r} (first listed at {where}[{first_at[spec.name]}]); each module runs once",
            )
        first_at[spec.name] = i
        specs.append(spec)
    return tuple(specs)


def _parse_explicit(pipe: Any, loc: str, variant: str) -> tuple[tuple[ModuleSpec, ...], tuple[ModuleSpec, ...]]:
    if not isinstance(pipe, Mapping):
        raise ConfigError(loc, f"must be a mapping with keys objective, diagnostics; got {pipe!r}")
    for key in pipe:
        if key not in (OBJECTIVE, DIAGNOSTICS):
            raise ConfigError(f"{loc}.{key}", f"unknown key{did_you_mean(str(key), (OBJECTIVE, DIAGNOSTICS))}; "
                              "allowed: objective, diagnostics")
    if OBJECTIVE not in pipe or pipe[OBJECTIVE] is None:
        raise ConfigError(f"{loc}.objective", "is required when a pipeline is written (list at least one objective "
                          "module, e.g. [{name: token_ce}])")
    objective = _parse_list(pipe[OBJECTIVE], f"{loc}.objective", OBJECTIVE, variant)
    if not any(m.enabled for m in objective):
        raise ConfigError(f"{loc}.objective", "has no enabled module: the step would have no loss")
    diag_raw = pipe.get(DIAGNOSTICS)
    diagnostics = () if diag_raw is None else _parse_list(diag_raw, f"{loc}.diagnostics", DIAGNOSTICS, variant)
    return objective, diagnostics


# ---------------------------------------------------------------------------- default manifests


def _flat(raw: Mapping[str, Any], dotted: str) -> Any:
    """The value of the flat key ``dotted`` in raw, checked against its declaration; its declared
    default when it is absent or null."""
    value = lookup(raw, dotted)
    if value is MISSING or value is None:
        return declared_default(dotted)
    check_value(dotted, value)  # raw may come unvalidated (resolve_pipeline is public)
    return value


def _soft_ce_w1(raw: Mapping[str, Any], variant: str) -> dict[str, Any]:
    block = lookup(raw, "custom.coord_soft_ce_w1")
    if block is MISSING or block is None:
        block = {}
    check_value("custom.coord_soft_ce_w1", thaw(block))
    if variant == STAGE2_TWO_CHANNEL:
        # Two-Channel takes coord CE and the coord gate from its own flat knobs (docs/training/METRICS_LOSSES.md);
        # accepting these here would silently do nothing.
        for key, replacement in (("ce_weight", "stage2_ab.coord_ce_weight"), ("gate_weight", "stage2_ab.coord_gate_weight")):
            if key in block:
                raise ConfigError(f"custom.coord_soft_ce_w1.{key}", f"is not used by stage2_two_channel; set {replacement} instead")
    return {**_SOFT_CE_W1_DEFAULTS, **block}


def _build(name: str, values: Mapping[str, Any], *, enabled: bool = True) -> ModuleSpec:
    """Default-manifest entry: the module's declared defaults overlaid with ``values`` (already checked
    flat-knob values or built-in constants), each in its declared type."""
    mod = MODULES[name]
    cfg = {**defaults_of(mod.config), **coerce_record(mod.config, values)}
    return ModuleSpec(name=name, enabled=enabled, weight=1.0, channels=CHANNEL_ORDER, config=MappingProxyType(cfg))


def _coord_reg_from_soft(soft: Mapping[str, Any]) -> dict[str, Any]:
    reg = {target: soft[key] for key, target in _SOFT_CE_W1_MAP.items() if key != "enabled"}
    reg["text_gate_weight"] = 0.0
    return reg


def _default_manifest(raw: Mapping[str, Any], variant: str) -> tuple[ModuleSpec, ...]:
    soft = _soft_ce_w1(raw, variant)
    if variant == STAGE2_TWO_CHANNEL:
        v = {flat: _flat(raw, flat) for flat in _TWO_CHANNEL_FLAT}
        desc = v["stage2_ab.desc_ce_weight"]
        token_ce = _build("token_ce", {
            "desc_ce_weight": desc,
            "rollout_fn_desc_weight": desc,
            "self_context_struct_ce_weight": v["stage2_ab.fmt_struct_ce_weight"],
            "rollout_drop_invalid_struct_ce_multiplier": v["stage2_ab.channel_b.drop_invalid_struct_ce_multiplier"],
        })
        bbox_geo = _build("bbox_geo", {
            "smoothl1_weight": v["stage2_ab.bbox_smoothl1_weight"],
            "ciou_weight": v["stage2_ab.bbox_ciou_weight"],
        })
        reg: dict[str, Any] = {
            target.split(".", 1)[1]: v[flat]
            for flat, (target, _) in _TWO_CHANNEL_FLAT.items()
            if target.startswith("coord_reg.")
        }
        if soft["enabled"]:
            for key in ("soft_ce_weight", "w1_weight", "temperature", "target_sigma", "target_truncate"):
                reg[key] = soft[key]
            reg["self_context_soft_ce_weight"] = soft["soft_ce_weight"]
        return (token_ce, bbox_geo, _build("coord_reg", reg))

    if variant == STAGE2_ROLLOUT_ALIGNED:
        token_ce = _build("token_ce", {})
        bbox_geo = _build("bbox_geo", {})
        reg = _coord_reg_from_soft(soft) if soft["enabled"] else dict(VARIANT_DEFAULTS[variant]["coord_reg"])
        return (token_ce, bbox_geo, _build("coord_reg", reg))

    # Stage-1: geometry only when asked for (an explicit pipeline); coord_reg either the
    # soft-CE/W1 mapping or the CE-only baseline (coord_ce + coord_gate = plain next-token CE).
    token_ce = _build("token_ce", {})
    bbox_geo = _build("bbox_geo", {}, enabled="bbox_geo" not in DISABLED_BY_DEFAULT[variant])
    if soft["enabled"]:
        reg = _coord_reg_from_soft(soft)
    else:
        reg = {k: 0.0 for k in defaults_of(MODULES["coord_reg"].config) if k.endswith("_weight")}
        reg.update(VARIANT_DEFAULTS[variant]["coord_reg"])
    return (token_ce, bbox_geo, _build("coord_reg", reg))


# ---------------------------------------------------------------------------- entry point


def _check_guardrails(raw: Mapping[str, Any], variant: str) -> None:
    own = PIPELINE_LOCATIONS[variant]
    for other_variant, loc in PIPELINE_LOCATIONS.items():
        if other_variant != variant and _is_written(raw, loc):
            shown = "null (Stage-1)" if variant == STAGE1 else variant
            raise ConfigError(
                loc,
                f"is only read by custom.trainer_variant={other_variant if other_variant != STAGE1 else 'null (Stage-1)'}, "
                f"but this config runs custom.trainer_variant={shown}; move the module lists to {own} "
                f"(or change custom.trainer_variant)",
            )


def _check_no_flat_knobs(raw: Mapping[str, Any], variant: str) -> None:
    loc = PIPELINE_LOCATIONS[variant]
    for flat, target in FLAT_OBJECTIVE_KNOBS[variant].items():
        if lookup(raw, flat) is not MISSING:
            module, key = target.split(".", 1)
            if key == "enabled":
                what = "entry key 'enabled' (and the soft_ce_weight / w1_weight config keys)"
            elif flat == "stage2_ab.desc_ce_weight":
                what = "config keys 'desc_ce_weight' and 'rollout_fn_desc_weight'"
            else:
                what = f"config key '{key}'"
            raise ConfigError(
                flat,
                f"is a flat objective knob, but {loc} is written (one config mode at a time): delete {flat} and "
                f"set {what} of module '{module}' in {loc}.objective instead",
            )
    if lookup(raw, "custom.coord_soft_ce_w1") is not MISSING:
        mapping = ", ".join(f"{k} -> coord_reg.{v}" for k, v in _SOFT_CE_W1_MAP.items())
        raise ConfigError(
            "custom.coord_soft_ce_w1",
            f"is a flat objective block, but {loc} is written: delete it and configure module 'coord_reg' in "
            f"{loc}.objective ({mapping})",
        )


def _extra(raw: Mapping[str, Any], variant: str) -> MappingProxyType:
    extra: dict[str, Any] = {"variant": variant}
    for dotted in MODE_KEYS[variant]:
        extra[dotted] = _flat(raw, dotted)
    return MappingProxyType(extra)


def load_plugins(plugins: Sequence[str]) -> None:
    """Import each of ``custom.plugins`` once per process: a ``.py`` file (absolute, or relative to the
    working directory) or an importable module name. Importing it declares and registers its modules
    (``pipeline.registry.register_module``)."""
    for plugin in plugins:
        if not plugin.endswith(".py"):
            importlib.import_module(plugin)
            continue
        path = Path(plugin).expanduser().resolve()
        name = f"coordexp_plugin_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}_{path.stem}"
        if name in sys.modules:
            continue
        if not path.is_file():
            raise FileNotFoundError(f"custom.plugins: {plugin} does not exist (a path relative to the working "
                                    f"directory {Path.cwd()}, or a module name)")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise


def resolve_pipeline(raw: Mapping[str, Any], variant: str) -> ResolvedPipeline:
    """Resolve the objective of ``variant`` from the merged user config ``raw`` (no defaults filled).

    Written pipeline -> parsed and validated (``source="explicit"``); omitted -> the default
    manifest of docs/training/METRICS_LOSSES.md from the flat knobs (``source="default"``). Raises ConfigError.
    """
    if variant not in VARIANTS:
        raise ConfigError("custom.trainer_variant", f"unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    if not isinstance(raw, Mapping):
        raise ConfigError("", f"config root must be a mapping, got {type(raw).__name__}")
    for section in ("stage1", "stage2_ab", "rollout_matching", "custom"):
        value = lookup(raw, section)
        if value is not MISSING and value is not None and not isinstance(value, Mapping):
            raise ConfigError(section, f"must be a mapping, got {value!r}")
    plugins = lookup(raw, "custom.plugins")
    if plugins is not MISSING and plugins:
        load_plugins(plugins)  # before any module name is looked up
    _check_guardrails(raw, variant)
    loc = PIPELINE_LOCATIONS[variant]
    extra = _extra(raw, variant)
    if _is_written(raw, loc):
        _check_no_flat_knobs(raw, variant)
        objective, diagnostics = _parse_explicit(lookup(raw, loc), loc, variant)
        source = "explicit"
    else:
        objective = _default_manifest(raw, variant)
        diagnostics = tuple(_build(name, {}) for name in DEFAULT_DIAGNOSTICS)
        source = "default"
    resolved = ResolvedPipeline(variant=variant, objective=objective, diagnostics=diagnostics, extra=extra, source=source)
    resolved.canonical_json()  # NaN/Inf or unserialisable values fail here, at config load
    return resolved


__all__ = [
    "DEFAULT_DIAGNOSTICS",
    "DEFAULT_OBJECTIVE_ORDER",
    "FLAT_OBJECTIVE_KNOBS",
    "MODE_KEYS",
    "PIPELINE_LOCATIONS",
    "VARIANTS",
    "ModuleSpec",
    "ResolvedPipeline",
    "resolve_pipeline",
]

# Config.pipeline is annotated with this class; configs.types cannot import this module (it builds on
# configs.types), so the name is bound there once it exists (typing.get_type_hints resolves it).
_types.ResolvedPipeline = ResolvedPipeline
