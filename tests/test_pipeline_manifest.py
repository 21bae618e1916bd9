"""Pipeline manifests: parsing, validation, default manifests, guardrails, checksum (docs/training/PIPELINE.md)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from types import MappingProxyType

import pytest

from configs.errors import ConfigError
from configs.pipeline import (
    FLAT_OBJECTIVE_KNOBS,
    PIPELINE_LOCATIONS,
    ModuleSpec,
    ResolvedPipeline,
    resolve_pipeline,
)
from pipeline.registry import get_module

TWO = "stage2_two_channel"
RA = "stage2_rollout_aligned"
S1 = "stage1"

# Golden checksums of the default manifests (pipeline omitted, no flat knobs written). Computed
# once from the implementation and pasted here: any drift in defaults, order or canonical form
# must be a deliberate change of this test. Stage-2 values changed when the coord gate became
# part of both Stage-2 defaults (coord_gate_weight 1; docs/training/STAGE2_RUNBOOK.md, "Guard metrics").
GOLDEN = {
    S1: "30c2c9bfbf5e6d67b994352c0dab3e076dfc879e968513d265cf28051a81c032",
    TWO: "f147a599c0485554441c21747ed0ae3e1f0dd89c89f2bb581f7fb3b4556110b3",
    RA: "526c8ed849fbe435925403755fe224dc090984a514fca383157331cf7e9299de",
}

# The flat objective knobs of docs/training/METRICS_LOSSES.md, written out literally (the test below also checks the
# exported table matches this list exactly).
LITERAL_FLAT_KNOBS = {
    TWO: {
        "stage2_ab.desc_ce_weight": "token_ce.desc_ce_weight",
        "stage2_ab.fmt_struct_ce_weight": "token_ce.self_context_struct_ce_weight",
        "stage2_ab.channel_b.drop_invalid_struct_ce_multiplier": "token_ce.rollout_drop_invalid_struct_ce_multiplier",
        "stage2_ab.bbox_smoothl1_weight": "bbox_geo.smoothl1_weight",
        "stage2_ab.bbox_ciou_weight": "bbox_geo.ciou_weight",
        "stage2_ab.coord_ce_weight": "coord_reg.coord_ce_weight",
        "stage2_ab.coord_el1_weight": "coord_reg.coord_el1_weight",
        "stage2_ab.coord_ehuber_weight": "coord_reg.coord_ehuber_weight",
        "stage2_ab.coord_huber_delta": "coord_reg.coord_huber_delta",
        "stage2_ab.coord_entropy_weight": "coord_reg.coord_entropy_weight",
        "stage2_ab.coord_gate_weight": "coord_reg.coord_gate_weight",
        "stage2_ab.text_gate_weight": "coord_reg.text_gate_weight",
    },
    "soft_ce_w1": {
        "custom.coord_soft_ce_w1.enabled": "coord_reg.enabled",
        "custom.coord_soft_ce_w1.ce_weight": "coord_reg.coord_ce_weight",
        "custom.coord_soft_ce_w1.soft_ce_weight": "coord_reg.soft_ce_weight",
        "custom.coord_soft_ce_w1.w1_weight": "coord_reg.w1_weight",
        "custom.coord_soft_ce_w1.gate_weight": "coord_reg.coord_gate_weight",
        "custom.coord_soft_ce_w1.temperature": "coord_reg.temperature",
        "custom.coord_soft_ce_w1.target_sigma": "coord_reg.target_sigma",
        "custom.coord_soft_ce_w1.target_truncate": "coord_reg.target_truncate",
    },
}

SECTION = {S1: "stage1", TWO: "stage2_ab", RA: "rollout_matching"}


def _with_pipeline(variant: str, objective, diagnostics=None, **sections) -> dict:
    pipe = {"objective": objective}
    if diagnostics is not None:
        pipe["diagnostics"] = diagnostics
    raw = {k: dict(v) for k, v in sections.items()}
    raw.setdefault(SECTION[variant], {})["pipeline"] = pipe
    return raw


def _set(raw: dict, dotted: str, value) -> dict:
    node = raw
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return raw


def _cfg(resolved: ResolvedPipeline, name: str) -> dict:
    return dict(next(m for m in resolved.objective if m.name == name).config)


# ------------------------------------------------------------------ parsing and validation


def test_unknown_module_name_lists_known_modules():
    raw = _with_pipeline(TWO, [{"name": "token_ce"}, {"name": "bbox_gio"}])
    with pytest.raises(ConfigError) as err:
        resolve_pipeline(raw, TWO)
    assert err.value.key == "stage2_ab.pipeline.objective[1].name"
    msg = str(err.value)
    assert "did you mean 'bbox_geo'" in msg
    for name in ("bbox_geo", "coord_diag", "coord_reg", "token_ce", "token_stats"):
        assert name in msg


def test_duplicate_module_name_fails():
    raw = _with_pipeline(TWO, [{"name": "token_ce"}, {"name": "coord_reg"}, {"name": "token_ce", "weight": 2}])
    with pytest.raises(ConfigError, match=r"duplicate module 'token_ce' \(first listed at stage2_ab.pipeline.objective\[0\]\)") as err:
        resolve_pipeline(raw, TWO)
    assert err.value.key == "stage2_ab.pipeline.objective[2].name"


def test_unknown_module_config_key_lists_allowed_keys():
    raw = _with_pipeline(TWO, [{"name": "token_ce"}, {"name": "bbox_geo"}, {"name": "coord_reg", "config": {"sof_ce_weight": 0.1}}])
    with pytest.raises(ConfigError) as err:
        resolve_pipeline(raw, TWO)
    assert err.value.key == "stage2_ab.pipeline.objective[2].config.sof_ce_weight"
    msg = str(err.value)
    assert "did you mean 'soft_ce_weight'" in msg
    for key in get_module("coord_reg").defaults:
        assert key in msg


def test_unknown_entry_key_and_missing_name():
    with pytest.raises(ConfigError) as err:
        resolve_pipeline(_with_pipeline(S1, [{"name": "token_ce", "wieght": 1.0}]), S1)
    assert err.value.key == "stage1.pipeline.objective[0].wieght" and "did you mean 'weight'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        resolve_pipeline(_with_pipeline(S1, [{"weight": 1.0}]), S1)
    assert err.value.key == "stage1.pipeline.objective[0].name"


def test_channel_scoping_is_parsed_in_ab_order():
    raw = _with_pipeline(
        TWO,
        [{"name": "token_ce", "channels": ["B", "A"]}, {"name": "bbox_geo", "channels": ["A"]}, {"name": "coord_reg", "channels": ["B"]}],
        [{"name": "coord_diag", "channels": ["B"]}],
    )
    r = resolve_pipeline(raw, TWO)
    assert [m.channels for m in r.objective] == [("A", "B"), ("A",), ("B",)]
    assert r.diagnostics[0].channels == ("B",)
    assert r.source == "explicit"


@pytest.mark.parametrize(
    "channels, match",
    [(["C"], "unknown channel 'C'"), ([], "non-empty list"), (["A", "A"], "twice"), ("A", "non-empty list")],
)
def test_bad_channels_fail(channels, match):
    raw = _with_pipeline(TWO, [{"name": "token_ce", "channels": channels}])
    with pytest.raises(ConfigError, match=match) as err:
        resolve_pipeline(raw, TWO)
    assert err.value.key == "stage2_ab.pipeline.objective[0].channels"


def test_channels_outside_two_channel_are_rejected_where_they_would_be_ignored():
    with pytest.raises(ConfigError, match="only scope modules in stage2_two_channel"):
        resolve_pipeline(_with_pipeline(S1, [{"name": "token_ce", "channels": ["A"]}]), S1)
    with pytest.raises(ConfigError, match="would never run"):
        resolve_pipeline(_with_pipeline(RA, [{"name": "token_ce", "channels": ["A"]}]), RA)
    assert resolve_pipeline(_with_pipeline(RA, [{"name": "token_ce", "channels": ["B"]}]), RA).objective[0].channels == ("B",)


def test_module_in_the_wrong_list_fails():
    with pytest.raises(ConfigError, match="diagnostics module and cannot be listed under 'objective'") as err:
        resolve_pipeline(_with_pipeline(TWO, [{"name": "token_ce"}, {"name": "coord_diag"}]), TWO)
    assert err.value.key == "stage2_ab.pipeline.objective[1].name"
    with pytest.raises(ConfigError, match="objective module and cannot be listed under 'diagnostics'") as err:
        resolve_pipeline(_with_pipeline(TWO, [{"name": "token_ce"}], [{"name": "bbox_geo"}]), TWO)
    assert err.value.key == "stage2_ab.pipeline.diagnostics[0].name"


@pytest.mark.parametrize(
    "entry, key, match",
    [
        ({"name": "token_ce", "weight": -1.0}, "weight", ">= 0"),
        ({"name": "token_ce", "weight": True}, "weight", "number"),
        ({"name": "token_ce", "weight": math.nan}, "weight", "finite"),
        ({"name": "token_ce", "enabled": "yes"}, "enabled", "true or false"),
        ({"name": "token_ce", "config": {"rollout_drop_invalid_struct_ce_multiplier": 5.0}},
         "config.rollout_drop_invalid_struct_ce_multiplier", "<= 4.0"),
        ({"name": "token_ce", "config": {"rollout_drop_invalid_struct_ce_multiplier": 0.5}},
         "config.rollout_drop_invalid_struct_ce_multiplier", ">= 1.0"),
        ({"name": "token_ce", "config": {"desc_ce_weight": -1.0}}, "config.desc_ce_weight", ">= 0"),
        ({"name": "token_ce", "config": {"rollout_fn_desc_weight": math.nan}}, "config.rollout_fn_desc_weight", "finite"),
        ({"name": "token_ce", "config": {"desc_ce_weight": "1"}}, "config.desc_ce_weight", "number"),
        ({"name": "token_ce", "config": {"desc_ce_weight": math.inf}}, "config.desc_ce_weight", "finite"),
        ({"name": "coord_reg", "config": {"temperature": 0.0}}, "config.temperature", "> 0"),
        ({"name": "coord_reg", "config": {"target_truncate": 2.5}}, "config.target_truncate", "integer"),
        ({"name": "coord_reg", "config": {"coord_ce_weight": None}}, "config.coord_ce_weight", "null"),
    ],
)
def test_entry_values_are_type_and_range_checked(entry, key, match):
    with pytest.raises(ConfigError, match=match) as err:
        resolve_pipeline(_with_pipeline(TWO, [entry]), TWO)
    assert err.value.key == f"stage2_ab.pipeline.objective[0].{key}"


def test_explicit_config_gets_defaults_and_float_normalisation():
    raw = _with_pipeline(TWO, [{"name": "coord_reg", "weight": 2, "config": {"coord_ce_weight": 1, "target_truncate": 8}}])
    r = resolve_pipeline(raw, TWO)
    spec = r.objective[0]
    assert spec.weight == 2.0 and isinstance(spec.weight, float)
    cfg = dict(spec.config)
    assert cfg["coord_ce_weight"] == 1.0 and isinstance(cfg["coord_ce_weight"], float)
    assert cfg["target_truncate"] == 8 and isinstance(cfg["target_truncate"], int)
    assert cfg["self_context_soft_ce_weight"] == 0.05 and cfg["coord_huber_delta"] == 0.001
    assert set(cfg) == set(get_module("coord_reg").defaults)
    assert r.diagnostics == ()


def test_written_pipeline_needs_an_enabled_objective_module():
    with pytest.raises(ConfigError, match="is required") as err:
        resolve_pipeline({"stage2_ab": {"pipeline": {"diagnostics": [{"name": "coord_diag"}]}}}, TWO)
    assert err.value.key == "stage2_ab.pipeline.objective"
    with pytest.raises(ConfigError, match="no enabled module"):
        resolve_pipeline(_with_pipeline(TWO, [{"name": "token_ce", "enabled": False}]), TWO)
    with pytest.raises(ConfigError, match="unknown key") as err:
        resolve_pipeline({"stage2_ab": {"pipeline": {"objective": [{"name": "token_ce"}], "diagnostic": []}}}, TWO)
    assert err.value.key == "stage2_ab.pipeline.diagnostic"


def test_diagnostics_weight_is_rejected():
    raw = _with_pipeline(TWO, [{"name": "token_ce"}], [{"name": "coord_diag", "weight": 0.5}])
    with pytest.raises(ConfigError, match="add no loss") as err:
        resolve_pipeline(raw, TWO)
    assert err.value.key == "stage2_ab.pipeline.diagnostics[0].weight"


def test_frozen_raw_mappings_and_tuples_are_accepted():
    raw = MappingProxyType({"stage2_ab": MappingProxyType({"pipeline": MappingProxyType(
        {"objective": ({"name": "token_ce", "channels": ("A",)},)})})})
    assert resolve_pipeline(raw, TWO).objective[0].channels == ("A",)


# ------------------------------------------------------------------ default manifests


@pytest.mark.parametrize("variant", [S1, TWO, RA])
def test_default_manifest_golden_checksum(variant):
    r = resolve_pipeline({}, variant)
    assert r.source == "default"
    assert [m.name for m in r.objective] == ["token_ce", "bbox_geo", "coord_reg"]
    assert [m.name for m in r.diagnostics] == ["coord_diag"]
    assert all(m.weight == 1.0 and m.channels == ("A", "B") for m in r.objective)
    assert r.checksum == GOLDEN[variant]
    # checksum is sha256 of exactly the canonical JSON
    assert r.checksum == hashlib.sha256(r.canonical_json().encode()).hexdigest()
    assert r.to_dict()["checksum"] == GOLDEN[variant]


def test_default_manifest_enabled_flags_per_variant():
    enabled = {v: {m.name: m.enabled for m in resolve_pipeline({}, v).objective} for v in (S1, TWO, RA)}
    assert enabled[S1] == {"token_ce": True, "bbox_geo": False, "coord_reg": True}
    assert enabled[TWO] == {"token_ce": True, "bbox_geo": True, "coord_reg": True}
    assert enabled[RA] == {"token_ce": True, "bbox_geo": True, "coord_reg": True}  # the coord gate alone


def test_two_channel_defaults_without_flat_knobs():
    r = resolve_pipeline({}, TWO)
    assert _cfg(r, "token_ce") == {
        "desc_ce_weight": 1.0, "self_context_struct_ce_weight": 0.1, "rollout_fn_desc_weight": 1.0,
        "rollout_matched_prefix_struct_weight": 1.0, "rollout_drop_invalid_struct_ce_multiplier": 1.0,
    }
    assert _cfg(r, "bbox_geo") == {"smoothl1_weight": 1.0, "ciou_weight": 1.0}
    assert _cfg(r, "coord_reg") == {
        "coord_ce_weight": 0.0, "soft_ce_weight": 0.0, "self_context_soft_ce_weight": 0.05, "w1_weight": 0.0,
        "coord_entropy_weight": 0.0, "coord_el1_weight": 0.0, "coord_ehuber_weight": 0.0, "coord_huber_delta": 0.001,
        "coord_gate_weight": 1.0, "text_gate_weight": 0.0, "temperature": 1.0, "target_sigma": 2.0, "target_truncate": None,
    }
    assert dict(r.extra) == {"variant": TWO, "stage2_ab.coord_ctx_embed_mode": "st", "stage2_ab.coord_decode_mode": "exp"}


def test_two_channel_flat_knobs_map_into_module_configs():
    raw = {
        "stage2_ab": {
            "desc_ce_weight": 0.5, "fmt_struct_ce_weight": 0.2, "bbox_smoothl1_weight": 2.0, "bbox_ciou_weight": 3.0,
            "coord_ce_weight": 0.1, "coord_el1_weight": 0.2, "coord_ehuber_weight": 0.3, "coord_huber_delta": 0.01,
            "coord_entropy_weight": 0.4, "coord_gate_weight": 0.5, "text_gate_weight": 0.6,
            "channel_b": {"drop_invalid_struct_ce_multiplier": 2.0},
            "coord_decode_mode": "st", "coord_ctx_embed_mode": "soft",
        },
        "custom": {"coord_soft_ce_w1": {"enabled": True, "soft_ce_weight": 0.25, "w1_weight": 0.75, "temperature": 0.5,
                                        "target_sigma": 3.0, "target_truncate": 6}},
    }
    r = resolve_pipeline(raw, TWO)
    assert _cfg(r, "token_ce") == {
        "desc_ce_weight": 0.5, "rollout_fn_desc_weight": 0.5, "self_context_struct_ce_weight": 0.2,
        "rollout_matched_prefix_struct_weight": 1.0, "rollout_drop_invalid_struct_ce_multiplier": 2.0,
    }
    assert _cfg(r, "bbox_geo") == {"smoothl1_weight": 2.0, "ciou_weight": 3.0}
    assert _cfg(r, "coord_reg") == {
        "coord_ce_weight": 0.1, "coord_el1_weight": 0.2, "coord_ehuber_weight": 0.3, "coord_huber_delta": 0.01,
        "coord_entropy_weight": 0.4, "coord_gate_weight": 0.5, "text_gate_weight": 0.6,
        "soft_ce_weight": 0.25, "self_context_soft_ce_weight": 0.25, "w1_weight": 0.75,
        "temperature": 0.5, "target_sigma": 3.0, "target_truncate": 6,
    }
    assert r.extra["stage2_ab.coord_decode_mode"] == "st" and r.extra["stage2_ab.coord_ctx_embed_mode"] == "soft"
    assert r.checksum != GOLDEN[TWO]


def test_two_channel_soft_ce_w1_disabled_block_keeps_defaults_and_rejects_unused_keys():
    r = resolve_pipeline({"custom": {"coord_soft_ce_w1": {"enabled": False, "soft_ce_weight": 0.3}}}, TWO)
    assert r.checksum == GOLDEN[TWO]
    with pytest.raises(ConfigError, match="stage2_ab.coord_ce_weight") as err:
        resolve_pipeline({"custom": {"coord_soft_ce_w1": {"enabled": True, "ce_weight": 0.3}}}, TWO)
    assert err.value.key == "custom.coord_soft_ce_w1.ce_weight"


@pytest.mark.parametrize("variant", [S1, RA])
def test_soft_ce_w1_mapping_for_stage1_and_rollout_aligned(variant):
    r = resolve_pipeline({"custom": {"coord_soft_ce_w1": {"enabled": True}}}, variant)
    spec = next(m for m in r.objective if m.name == "coord_reg")
    assert spec.enabled
    cfg = dict(spec.config)
    assert (cfg["coord_ce_weight"], cfg["soft_ce_weight"], cfg["w1_weight"], cfg["coord_gate_weight"]) == (0.0, 1.0, 1.0, 1.0)
    assert (cfg["temperature"], cfg["target_sigma"], cfg["target_truncate"], cfg["text_gate_weight"]) == (1.0, 2.0, None, 0.0)
    r2 = resolve_pipeline({"custom": {"coord_soft_ce_w1": {
        "enabled": True, "ce_weight": 0.2, "soft_ce_weight": 0.3, "w1_weight": 0.4, "gate_weight": 0.5,
        "temperature": 0.9, "target_sigma": 1.5, "target_truncate": 4}}}, variant)
    cfg2 = _cfg(r2, "coord_reg")
    assert (cfg2["coord_ce_weight"], cfg2["soft_ce_weight"], cfg2["w1_weight"], cfg2["coord_gate_weight"]) == (0.2, 0.3, 0.4, 0.5)
    assert (cfg2["temperature"], cfg2["target_sigma"], cfg2["target_truncate"]) == (0.9, 1.5, 4)


def test_stage1_default_is_the_ce_only_baseline():
    cfg = _cfg(resolve_pipeline({}, S1), "coord_reg")
    weights = {k: v for k, v in cfg.items() if k.endswith("_weight")}
    assert weights.pop("coord_ce_weight") == 1.0 and weights.pop("coord_gate_weight") == 1.0
    assert set(weights.values()) == {0.0}


def test_flat_knob_values_are_validated_with_their_own_key():
    with pytest.raises(ConfigError, match="<= 4.0") as err:
        resolve_pipeline({"stage2_ab": {"channel_b": {"drop_invalid_struct_ce_multiplier": 9.0}}}, TWO)
    assert err.value.key == "stage2_ab.channel_b.drop_invalid_struct_ce_multiplier"
    with pytest.raises(ConfigError) as err:
        resolve_pipeline({"custom": {"coord_soft_ce_w1": {"enabled": True, "target_sigma": 0}}}, RA)
    assert err.value.key == "custom.coord_soft_ce_w1.target_sigma"
    with pytest.raises(ConfigError, match="one of 'exp', 'st'") as err:  # the loader's validator and wording
        resolve_pipeline({"rollout_matching": {"coord_decode_mode": "argmax"}}, RA)
    assert err.value.key == "rollout_matching.coord_decode_mode"
    with pytest.raises(ConfigError) as err:
        resolve_pipeline({"stage2_ab": {"coord_ctx_embed_mode": "sfot"}}, TWO)
    assert err.value.key == "stage2_ab.coord_ctx_embed_mode" and "did you mean 'soft'" in str(err.value)


def test_explicit_pipeline_equal_to_default_has_the_default_checksum():
    default = resolve_pipeline({}, TWO)
    objective = [{"name": m.name, "config": dict(m.config)} for m in default.objective]
    explicit = resolve_pipeline(_with_pipeline(TWO, objective, [{"name": "coord_diag"}]), TWO)
    assert explicit.source == "explicit"
    assert explicit.checksum == default.checksum == GOLDEN[TWO]


# ------------------------------------------------------------------ guardrails


def test_variant_pipeline_location_guardrails():
    pipe = {"objective": [{"name": "token_ce"}]}
    with pytest.raises(ConfigError, match="move the module lists to stage2_ab.pipeline") as err:
        resolve_pipeline({"rollout_matching": {"pipeline": pipe}}, TWO)
    assert err.value.key == "rollout_matching.pipeline"
    with pytest.raises(ConfigError, match="move the module lists to rollout_matching.pipeline") as err:
        resolve_pipeline({"stage2_ab": {"pipeline": pipe}}, RA)
    assert err.value.key == "stage2_ab.pipeline"
    for variant in (TWO, RA):
        with pytest.raises(ConfigError) as err:
            resolve_pipeline({"stage1": {"pipeline": pipe}}, variant)
        assert err.value.key == "stage1.pipeline"
    for loc in ("stage2_ab", "rollout_matching"):
        with pytest.raises(ConfigError) as err:
            resolve_pipeline({loc: {"pipeline": pipe}}, S1)
        assert err.value.key == f"{loc}.pipeline"
    # null counts as omitted
    assert resolve_pipeline({"rollout_matching": {"pipeline": None}}, TWO).checksum == GOLDEN[TWO]


def test_flat_knob_table_matches_the_literal_list():
    soft = LITERAL_FLAT_KNOBS["soft_ce_w1"]
    assert FLAT_OBJECTIVE_KNOBS[TWO] == {**LITERAL_FLAT_KNOBS[TWO], **soft}
    assert FLAT_OBJECTIVE_KNOBS[RA] == soft
    assert FLAT_OBJECTIVE_KNOBS[S1] == soft


def _valid_value(module_key: str):
    module, key = module_key.split(".")
    if key == "enabled":
        return True
    default = get_module(module).defaults[key]
    return 3 if default is None else 1.0 if module_key.endswith("multiplier") else default


@pytest.mark.parametrize("variant", [S1, TWO, RA])
def test_every_flat_knob_is_rejected_when_a_pipeline_is_written(variant):
    loc = PIPELINE_LOCATIONS[variant]
    base = _with_pipeline(variant, [{"name": "token_ce"}])
    assert resolve_pipeline(base, variant).source == "explicit"
    for flat, target in FLAT_OBJECTIVE_KNOBS[variant].items():
        raw = _set(copy.deepcopy(base), flat, _valid_value(target))
        with pytest.raises(ConfigError) as err:
            resolve_pipeline(raw, variant)
        assert err.value.key == flat
        module, key = target.split(".")
        msg = str(err.value)
        assert f"module '{module}'" in msg and f"'{key}'" in msg and loc in msg
    # the bare block counts too
    raw = _set(copy.deepcopy(base), "custom.coord_soft_ce_w1", {})
    with pytest.raises(ConfigError, match="coord_reg") as err:
        resolve_pipeline(raw, variant)
    assert err.value.key == "custom.coord_soft_ce_w1"


def test_flat_knobs_of_another_variant_do_not_block_a_pipeline():
    raw = _with_pipeline(RA, [{"name": "token_ce"}], stage2_ab={"desc_ce_weight": 0.5})
    assert resolve_pipeline(raw, RA).source == "explicit"


# ------------------------------------------------------------------ canonicalisation


def _pipe(weight=1.0, cfg=None, extra=None) -> ResolvedPipeline:
    spec = ModuleSpec("token_ce", weight=weight, config=MappingProxyType(cfg or {"desc_ce_weight": 0.5}))
    return ResolvedPipeline("stage1", (spec,), (), MappingProxyType(extra or {"variant": "stage1"}), "explicit")


def test_negative_zero_is_written_as_zero():
    a, b = _pipe(weight=0.0, cfg={"x": 0.0}), _pipe(weight=-0.0, cfg={"x": -0.0})
    assert a.canonical_json() == b.canonical_json() and a.checksum == b.checksum
    assert "-0.0" not in b.canonical_json()


def test_canonical_json_form():
    p = ResolvedPipeline(
        "stage1",
        (ModuleSpec("token_ce", weight=2, channels=("B", "A"), config=MappingProxyType({"b": 1.5, "a": None})),),
        (),
        MappingProxyType({"variant": "stage1"}),
        "explicit",
    )
    expected = {
        "objective": [{"name": "token_ce", "enabled": True, "weight": 2.0, "channels": ["A", "B"], "config": {"a": None, "b": 1.5}}],
        "diagnostics": [],
        "extra": {"variant": "stage1"},
    }
    assert p.canonical_json() == json.dumps(expected, sort_keys=True, separators=(",", ":"))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_rejected(bad):
    with pytest.raises(ValueError, match="not finite"):
        _ = _pipe(weight=bad).checksum
    with pytest.raises(ValueError, match="not finite"):
        _pipe(cfg={"desc_ce_weight": bad}).canonical_json()


def test_decode_mode_changes_the_checksum():
    base = resolve_pipeline({}, TWO).checksum
    assert resolve_pipeline({"stage2_ab": {"coord_decode_mode": "st"}}, TWO).checksum != base
    assert resolve_pipeline({"stage2_ab": {"coord_ctx_embed_mode": "soft"}}, TWO).checksum != base
    ra = resolve_pipeline({}, RA).checksum
    st = resolve_pipeline({"rollout_matching": {"coord_decode_mode": "st"}}, RA)
    assert st.checksum != ra and st.extra["rollout_matching.coord_decode_mode"] == "st"
    # the mode of the other trainer does not enter this variant's identity
    assert resolve_pipeline({"stage2_ab": {"coord_decode_mode": "st"}}, RA).checksum == ra


def test_weight_change_changes_checksum_and_variant_is_part_of_identity():
    a = resolve_pipeline(_with_pipeline(RA, [{"name": "token_ce"}]), RA)
    b = resolve_pipeline(_with_pipeline(RA, [{"name": "token_ce", "weight": 0.5}]), RA)
    assert a.checksum != b.checksum
    assert resolve_pipeline({}, S1).checksum != resolve_pipeline({}, RA).checksum
