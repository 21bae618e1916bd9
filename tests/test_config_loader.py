"""Config loader: extends, overrides, validation errors, defaults, cross-field checks, freezing."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import pickle
import textwrap
from pathlib import Path

import pytest

from configs import (
    Config,
    ConfigError,
    FrozenDict,
    add_config_args,
    load_config,
    save_resolved,
    thaw,
)
from configs.loader import apply_override, deep_merge, merge_config_tree, parse_override

MINIMAL = """
model: {name_or_path: /ckpt/qwen3vl}
data: {train_jsonl: train.jsonl}
"""

PIPELINE_CFG = """
model: {name_or_path: /ckpt/qwen3vl}
data: {train_jsonl: train.jsonl}
custom: {trainer_variant: stage2_two_channel}
stage2_ab:
  pipeline:
    objective:
      - {name: token_ce, weight: 1.0, channels: [A, B], config: {desc_ce_weight: 1.0}}
      - {name: bbox_geo}
      - {name: coord_reg, config: {soft_ce_weight: 0.05}}
    diagnostics:
      - {name: coord_diag}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(path: Path, overrides=(), **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, **kwargs)
    return info.value


# ---------------------------------------------------------------- unknown keys, types, ranges


def test_unknown_key_three_levels_deep_names_key_and_suggests(tmp_path):
    path = write(tmp_path, "c.yaml", "model:\n  name_or_path: /x\n  freeze: {visoin: true}\ndata: {train_jsonl: t.jsonl}\n")
    err = error_of(path)
    assert err.key == "model.freeze.visoin"
    assert "did you mean 'vision'?" in str(err)
    assert "language_model" in str(err)  # lists the allowed keys at that level


def test_unknown_key_inside_pipeline_entry_has_list_index(tmp_path):
    path = write(tmp_path, "c.yaml", PIPELINE_CFG)
    err = error_of(path, ["stage2_ab.pipeline.objective[1].weigth=2.0"])
    assert err.key == "stage2_ab.pipeline.objective[1].weigth"
    assert "did you mean 'weight'?" in str(err)


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, "c.yaml", MINIMAL + "trainig: {lr: 1.0e-4}\n")
    err = error_of(path)
    assert err.key == "trainig"
    assert "did you mean 'training'?" in str(err)


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = write(tmp_path, "c.yaml", MINIMAL + "training: {lr: fast}\n")
    err = error_of(path)
    assert err.key == "training.lr"
    assert "expected a number" in str(err) and "'fast'" in str(err)


def test_wrong_type_in_list_entry(tmp_path):
    path = write(tmp_path, "c.yaml", PIPELINE_CFG)
    err = error_of(path, ["stage2_ab.pipeline.objective[1].weight=heavy"])
    assert err.key == "stage2_ab.pipeline.objective[1].weight"
    assert "expected a number" in str(err)


def test_bool_is_not_a_number(tmp_path):
    path = write(tmp_path, "c.yaml", MINIMAL + "training: {max_steps: true}\n")
    err = error_of(path)
    assert err.key == "training.max_steps" and "expected an integer" in str(err)


def test_enum_lists_allowed_values_and_suggests(tmp_path):
    path = write(tmp_path, "c.yaml", MINIMAL + "training: {lr_scheduler: cosin}\n")
    err = error_of(path)
    assert err.key == "training.lr_scheduler"
    assert "'cosine', 'linear', 'constant'" in str(err)
    assert "did you mean 'cosine'?" in str(err)


def test_channels_enum_inside_list(tmp_path):
    path = write(tmp_path, "c.yaml", PIPELINE_CFG)
    err = error_of(path, ["stage2_ab.pipeline.objective[0].channels=[A, C]"])
    assert err.key == "stage2_ab.pipeline.objective[0].channels[1]"
    assert "'A', 'B'" in str(err)


@pytest.mark.parametrize(
    ("override", "key", "range_text"),
    [
        ("training.warmup_ratio=1.0", "training.warmup_ratio", "[0, 1)"),
        ("training.warmup_ratio=-0.1", "training.warmup_ratio", "[0, 1)"),
        ("stage2_ab.schedule.b_ratio=1.5", "stage2_ab.schedule.b_ratio", "[0, 1]"),
        ("stage2_ab.channel_b.drop_invalid_struct_ce_multiplier=0.5", "stage2_ab.channel_b.drop_invalid_struct_ce_multiplier", "[1.0, 4.0]"),
        ("stage2_ab.channel_b.drop_invalid_struct_ce_multiplier=4.5", "stage2_ab.channel_b.drop_invalid_struct_ce_multiplier", "[1.0, 4.0]"),
        ("stage2_ab.n_softctx_iter=0", "stage2_ab.n_softctx_iter", "[1, inf)"),
    ],
)
def test_range_errors_state_the_range(tmp_path, override, key, range_text):
    path = write(tmp_path, "c.yaml", MINIMAL)
    err = error_of(path, [override])
    assert err.key == key
    assert range_text in str(err)


@pytest.mark.parametrize(
    "override",
    [
        "training.warmup_ratio=0.999",
        "stage2_ab.schedule.b_ratio=1.0",
        "stage2_ab.schedule.b_ratio=0",
        "stage2_ab.channel_b.drop_invalid_struct_ce_multiplier=4.0",
        "stage2_ab.channel_b.drop_invalid_struct_ce_multiplier=1",
        "stage2_ab.n_softctx_iter=1",
    ],
)
def test_range_bounds_that_are_allowed(tmp_path, override):
    variant = ["custom.trainer_variant=stage2_two_channel"] if override.startswith("stage2_ab.") else []
    load_config(write(tmp_path, "c.yaml", MINIMAL), [*variant, override])


def test_several_problems_are_all_reported(tmp_path):
    path = write(tmp_path, "c.yaml", MINIMAL + "training: {lr: fast, max_steps: -1}\n")
    err = error_of(path)
    assert err.key == "training.lr"
    assert "training.max_steps" in str(err)


# ---------------------------------------------------------------- variants


@pytest.mark.parametrize(("legacy", "new"), [("stage2_ab_training", "stage2_two_channel"), ("rollout_matching_sft", "stage2_rollout_aligned")])
def test_legacy_trainer_variant_names_new_value(tmp_path, legacy, new):
    path = write(tmp_path, "c.yaml", MINIMAL + f"custom: {{trainer_variant: {legacy}}}\n")
    err = error_of(path)
    assert err.key == "custom.trainer_variant"
    assert repr(new) in str(err) and legacy in str(err)


def test_unknown_trainer_variant_lists_allowed(tmp_path):
    err = error_of(write(tmp_path, "c.yaml", MINIMAL), ["custom.trainer_variant=stage2_two_chanel"])
    assert err.key == "custom.trainer_variant"
    assert "did you mean 'stage2_two_channel'?" in str(err)


def test_expect_stage1_rejects_stage2_variant(tmp_path):
    path = write(tmp_path, "c.yaml", MINIMAL + "custom: {trainer_variant: stage2_rollout_aligned}\n")
    err = error_of(path, expect="stage1")
    assert err.key == "custom.trainer_variant" and "train_stage2.py" in str(err)
    assert load_config(path, expect="stage2").variant == "stage2_rollout_aligned"


def test_expect_stage2_rejects_missing_variant(tmp_path):
    path = write(tmp_path, "c.yaml", MINIMAL)
    err = error_of(path, expect="stage2")
    assert err.key == "custom.trainer_variant" and "train_stage1.py" in str(err)
    assert load_config(path, expect="stage1").variant == "stage1"


def test_expect_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="expect"):
        load_config(write(tmp_path, "c.yaml", MINIMAL), expect="stage3")


# ---------------------------------------------------------------- required keys + cross-field checks


def test_missing_train_jsonl_without_synthetic(tmp_path):
    err = error_of(write(tmp_path, "c.yaml", "model: {name_or_path: /x}\n"))
    assert err.key == "data.train_jsonl" and "missing required key" in str(err)
    assert "data.synthetic.enabled" in str(err)


def test_synthetic_data_needs_no_train_jsonl(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", "model: {tiny: {enabled: true}}\ndata: {synthetic: {enabled: true}}\n"))
    assert cfg.data.train_jsonl is None and cfg.data.synthetic.enabled is True


def test_synthetic_conflict_reported_on_key(tmp_path):
    path = write(tmp_path, "c.yaml", "model: {name_or_path: /x}\ndata: {train_jsonl: t.jsonl, synthetic: {enabled: true}}\n")
    err = error_of(path)
    assert err.key == "data.train_jsonl" and "data.synthetic.enabled" in str(err)


def test_model_needs_checkpoint_or_tiny(tmp_path):
    err = error_of(write(tmp_path, "c.yaml", "data: {train_jsonl: t.jsonl}\n"))
    assert err.key == "model.name_or_path" and "model.tiny.enabled" in str(err)
    err = error_of(write(tmp_path, "d.yaml", MINIMAL), ["model.tiny.enabled=true"])
    assert err.key == "model.name_or_path" and "null" in str(err)
    cfg = load_config(write(tmp_path, "e.yaml", MINIMAL), ["model.tiny.enabled=true", "model.name_or_path=null"])
    assert cfg.model.tiny.enabled and cfg.model.name_or_path is None


def test_pipeline_entry_needs_name(tmp_path):
    err = error_of(write(tmp_path, "c.yaml", PIPELINE_CFG), ["stage2_ab.pipeline.objective[3]={weight: 1.0}"])
    assert err.key == "stage2_ab.pipeline.objective[3].name" and "missing required key" in str(err)


def test_warmup_steps_and_ratio_are_exclusive(tmp_path):
    err = error_of(write(tmp_path, "c.yaml", MINIMAL), ["training.warmup_steps=10", "training.warmup_ratio=0.1"])
    assert err.key == "training.warmup_ratio" and "training.warmup_steps" in str(err)


def test_warmup_steps_above_max_steps_fails_at_load_with_fix(tmp_path):
    err = error_of(write(tmp_path, "c.yaml", MINIMAL), ["training.max_steps=10", "training.warmup_steps=11"])
    assert err.key == "training.warmup_steps"
    assert "training.max_steps (10)" in str(err) and "got 11" in str(err) and "warmup_ratio" in str(err)
    load_config(write(tmp_path, "ok.yaml", MINIMAL), ["training.max_steps=10", "training.warmup_steps=10"])


def _number_keys() -> list[str]:
    """Every key the schema types as a number (list items indexed [0])."""
    from configs.loader import _deref, _root_node, format_key

    out: list[str] = []

    def walk(schema, resolver, parts):
        kind = schema.get("type")
        if "number" in ([kind] if isinstance(kind, str) else list(kind or [])):
            out.append(format_key(parts))
        for key, sub in schema.get("properties", {}).items():
            walk(*_deref(sub, resolver), [*parts, key])
        if isinstance(schema.get("items"), dict):
            walk(*_deref(schema["items"], resolver), [*parts, 0])

    walk(*_root_node(), [])
    return out


def test_schema_has_float_keys_to_check():
    keys = _number_keys()
    assert len(keys) > 30 and "training.lr" in keys and "stage2_ab.schedule.b_ratio" in keys and "rollout_matching.matching.iou_gate" in keys


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_number_rejected_for_every_float_key(tmp_path, value):
    path = write(tmp_path, "c.yaml", MINIMAL)
    for key in _number_keys():
        err = error_of(path, [f"{key}={value}"])
        assert err.key == key, (key, str(err))
        assert "finite" in str(err)


def test_non_finite_inside_pipeline_module_config_names_the_key(tmp_path):
    path = write(tmp_path, "c.yaml", PIPELINE_CFG)
    err = error_of(path, ["stage2_ab.pipeline.objective[0].config.desc_ce_weight=.nan"])
    assert err.key == "stage2_ab.pipeline.objective[0].config.desc_ce_weight" and "finite" in str(err)


def test_non_finite_written_in_the_yaml_file_is_rejected(tmp_path):
    path = write(tmp_path, "c.yaml", MINIMAL + "training: {lr: .NaN}\nrollout_matching: {matching: {iou_gate: -.inf}}\n")
    err = error_of(path)
    assert err.key == "rollout_matching.matching.iou_gate" and "training.lr" in str(err)


def test_min_pixels_not_above_max_pixels(tmp_path):
    err = error_of(write(tmp_path, "c.yaml", MINIMAL), ["data.min_pixels=4096", "data.max_pixels=1024"])
    assert err.key == "data.min_pixels"


def test_coord_pick_expectation_needs_the_hf_backend(tmp_path):
    path = write(tmp_path, "c.yaml", MINIMAL)
    err = error_of(path, ["rollout_matching.decoding.coord_pick=expectation", "rollout_matching.backend=vllm"])
    assert err.key == "rollout_matching.decoding.coord_pick" and "rollout_matching.backend: hf" in str(err)
    assert load_config(path, ["rollout_matching.decoding.coord_pick=expectation"]).rollout_matching.decoding.coord_pick == "expectation"


# ---------------------------------------------------------------- extends


def test_extends_cycle_is_reported_with_chain(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n" + MINIMAL)
    write(tmp_path, "b.yaml", "extends: sub/c.yaml\n")
    write(tmp_path, "sub/c.yaml", "extends: ../a.yaml\n")
    err = error_of(tmp_path / "a.yaml")
    assert err.key == "extends"
    message = str(err)
    assert "cycle" in message
    # the chain starts and ends at the file that closes the loop
    assert message.count("a.yaml") == 2 and "b.yaml" in message and "c.yaml" in message
    assert message.index("a.yaml") < message.index("b.yaml") < message.index("c.yaml")


def test_extends_self_is_a_cycle(tmp_path):
    err = error_of(write(tmp_path, "a.yaml", "extends: a.yaml\n" + MINIMAL))
    assert err.key == "extends" and "cycle" in str(err)


def test_extends_relative_paths_several_levels(tmp_path):
    write(
        tmp_path,
        "base/root.yaml",
        """
        model: {name_or_path: /path/to/ckpt, freeze: {vision: true, merger: true}}
        data: {train_jsonl: root.jsonl}
        training: {lr: 1.0e-4, max_steps: 10, adam_betas: [0.8, 0.9]}
        run: {tracker: {tags: [a, b, c]}}
        """,
    )
    write(
        tmp_path,
        "base/mid/mid.yaml",
        """
        extends: ../root.yaml
        model: {freeze: {vision: false}}
        training: {max_steps: 20}
        run: {tracker: {tags: [mid]}}
        """,
    )
    leaf = write(
        tmp_path,
        "exp/deep/leaf.yaml",
        """
        extends: ../../base/mid/mid.yaml
        training: {max_steps: 30}
        """,
    )
    cfg = load_config(leaf)
    assert cfg.training.max_steps == 30  # leaf wins
    assert cfg.training.lr == 1e-4  # from root, two levels up
    assert cfg.model.freeze.vision is False and cfg.model.freeze.merger is True  # maps merge recursively
    assert cfg.run.tracker.tags == ("mid",)  # lists replace
    assert cfg.training.adam_betas == (0.8, 0.9)
    assert "extends" not in cfg.raw
    assert cfg.raw["model"] == {"name_or_path": "/path/to/ckpt", "freeze": {"vision": False, "merger": True}}


def test_extends_list_applies_in_order(tmp_path):
    write(tmp_path, "one.yaml", MINIMAL + "training: {lr: 1.0e-4, max_steps: 5}\n")
    write(tmp_path, "two.yaml", "training: {lr: 2.0e-4}\n")
    cfg = load_config(write(tmp_path, "c.yaml", "extends: [one.yaml, two.yaml]\nrun: {name: x}\n"))
    assert cfg.training.lr == 2e-4 and cfg.training.max_steps == 5 and cfg.run.name == "x"


def test_diamond_extends_is_not_a_cycle(tmp_path):
    write(tmp_path, "root.yaml", MINIMAL)
    write(tmp_path, "l.yaml", "extends: root.yaml\ntraining: {max_steps: 3}\n")
    write(tmp_path, "r.yaml", "extends: root.yaml\ntraining: {lr: 0.5}\n")
    cfg = load_config(write(tmp_path, "c.yaml", "extends: [l.yaml, r.yaml]\n"))
    assert (cfg.training.max_steps, cfg.training.lr) == (3, 0.5)


def test_extends_missing_file(tmp_path):
    err = error_of(write(tmp_path, "c.yaml", "extends: nope.yaml\n" + MINIMAL))
    assert err.key == "extends" and "nope.yaml" in str(err) and "does not exist" in str(err)


def test_deep_merge_does_not_mutate_inputs():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    over = {"a": {"b": 2}, "e": {"f": 1}}
    snapshot = copy.deepcopy((base, over))
    assert deep_merge(base, over) == {"a": {"b": 2, "c": [1, 2]}, "d": 1, "e": {"f": 1}}
    assert (base, over) == snapshot


# ---------------------------------------------------------------- YAML details


def test_yaml_scientific_floats_and_yaml12_booleans(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", MINIMAL + "training: {lr: 1e-5, adam_eps: 1E-8, mixed_precision: no}\n"))
    assert cfg.training.lr == 1e-5 and isinstance(cfg.training.lr, float)
    assert cfg.training.adam_eps == 1e-8
    assert cfg.training.mixed_precision == "no"


def test_duplicate_yaml_key_is_an_error_with_line(tmp_path):
    path = write(tmp_path, "c.yaml", "model: {name_or_path: /x}\ndata: {train_jsonl: t.jsonl}\ntraining: {lr: 0.1}\ntraining: {lr: 0.2}\n")
    err = error_of(path)
    assert f"{path}:4" in str(err) and "duplicate key 'training'" in str(err)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "c.yaml", "model:\n  name_or_path: [unclosed\ndata: {}\n")
    err = error_of(path)
    assert str(path) in str(err) and "invalid YAML" in str(err)


def test_top_level_must_be_a_map(tmp_path):
    err = error_of(write(tmp_path, "c.yaml", "- a\n- b\n"))
    assert "top level" in str(err)


# ---------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("text", "parts", "value"),
    [
        ("training.max_steps=7", ["training", "max_steps"], 7),
        ("training.lr=2e-5", ["training", "lr"], 2e-5),
        ("training.lr=0.5", ["training", "lr"], 0.5),
        ("training.adam_betas=[0.8, 0.95]", ["training", "adam_betas"], [0.8, 0.95]),
        ("run.tracker={backend: wandb, tags: [x]}", ["run", "tracker"], {"backend": "wandb", "tags": ["x"]}),
        ("model.freeze.vision=true", ["model", "freeze", "vision"], True),
        ("data.val_jsonl=null", ["data", "val_jsonl"], None),
        ("run.name=my run=2", ["run", "name"], "my run=2"),
        ("training.mixed_precision=no", ["training", "mixed_precision"], "no"),
        ("stage2_ab.pipeline.objective[0].config.desc_ce_weight=0", ["stage2_ab", "pipeline", "objective", 0, "config", "desc_ce_weight"], 0),
        ("a.b[1][2].c=x", ["a", "b", 1, 2, "c"], "x"),
    ],
)
def test_parse_override(text, parts, value):
    got_parts, got_value = parse_override(text)
    assert got_parts == parts
    assert got_value == value and type(got_value) is type(value)


@pytest.mark.parametrize("text", ["training.lr", "=3", "training..lr=1", "training.lr[x]=1", "1abc=2"])
def test_parse_override_rejects_malformed(text):
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    assert "KEY=VALUE" in str(info.value)


def test_apply_override_creates_keys_and_indexes_lists():
    tree = {"stage2_ab": {"pipeline": {"objective": [{"name": "token_ce"}, {"name": "bbox_geo"}]}}}
    apply_override(tree, "stage2_ab.pipeline.objective[1].weight=0.5")
    apply_override(tree, "stage2_ab.pipeline.objective[2]={name: coord_reg}")  # index == len appends
    apply_override(tree, "training.lr=3e-4")  # new maps created
    apply_override(tree, "run.tracker.tags[0]=first")  # new list created at index 0
    assert tree == {
        "stage2_ab": {"pipeline": {"objective": [{"name": "token_ce"}, {"name": "bbox_geo", "weight": 0.5}, {"name": "coord_reg"}]}},
        "training": {"lr": 3e-4},
        "run": {"tracker": {"tags": ["first"]}},
    }


def test_apply_override_index_out_of_range():
    tree = {"a": {"b": [1]}}
    with pytest.raises(ConfigError) as info:
        apply_override(tree, "a.b[3]=1")
    assert info.value.key == "a.b[3]" and "out of range" in str(info.value)


def test_apply_override_index_on_a_map():
    with pytest.raises(ConfigError) as info:
        apply_override({"a": {"b": {}}}, "a.b[0]=1")
    assert info.value.key == "a.b[0]"


def test_overrides_apply_after_extends(tmp_path):
    write(tmp_path, "base.yaml", PIPELINE_CFG)
    path = write(tmp_path, "c.yaml", "extends: base.yaml\ntraining: {lr: 1.0e-3}\n")
    cfg = load_config(path, ["training.lr=5e-4", "stage2_ab.pipeline.objective[0].weight=0.25", "training.max_steps=9"])
    assert cfg.training.lr == 5e-4 and cfg.training.max_steps == 9
    assert cfg.stage2_ab.pipeline["objective"][0]["weight"] == 0.25
    assert cfg.raw["training"] == {"lr": 5e-4, "max_steps": 9}


def test_override_creating_unknown_key_is_reported(tmp_path):
    err = error_of(write(tmp_path, "c.yaml", MINIMAL), ["training.optim.lr=1"])
    assert err.key == "training.optim" and "unknown key" in str(err)


def test_override_cannot_set_extends(tmp_path):
    err = error_of(write(tmp_path, "c.yaml", MINIMAL), ["extends=other.yaml"])
    assert err.key == "extends" and "before overrides" in str(err)


def test_overrides_must_be_a_sequence(tmp_path):
    with pytest.raises(TypeError):
        merge_config_tree(write(tmp_path, "c.yaml", MINIMAL), "training.lr=1")


# ---------------------------------------------------------------- defaults, types, freezing


def test_defaults_filled(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", MINIMAL))
    # values from docs/training/PIPELINE.md / docs/CONFIG.md, not read back from the schema
    assert cfg.variant == "stage1"
    assert cfg.run.name == "run" and cfg.run.seed == 42 and cfg.run.run_dir == Path("runs/run")
    assert cfg.run.tracker.backend == "none" and cfg.run.tracker.tags == ()
    assert cfg.model.dtype == "float32" and cfg.model.coord_tokens.init == "sincos" and cfg.model.freeze.vision is False
    assert cfg.data.coords == "pixel" and cfg.data.object_order == "yx" and cfg.data.val_jsonl is None
    assert cfg.training.lr == 1e-5 and cfg.training.max_steps == 100 and cfg.training.adam_betas == (0.9, 0.999)
    assert cfg.training.packing is True and cfg.training.mixed_precision == "no" and cfg.training.resume_from is None
    assert cfg.custom.trainer_variant is None and cfg.custom.coord_soft_ce_w1.soft_ce_weight == 1.0
    assert cfg.custom.coord_soft_ce_w1.target_truncate is None
    s2 = cfg.stage2_ab
    assert (s2.schedule.b_ratio, s2.n_softctx_iter, s2.softctx_grad_mode, s2.softctx_temperature) == (0.2, 2, "unroll", 1.0)
    assert (s2.coord_ctx_embed_mode, s2.coord_decode_mode) == ("st", "exp")
    assert (s2.desc_ce_weight, s2.fmt_struct_ce_weight, s2.bbox_smoothl1_weight, s2.bbox_ciou_weight) == (1.0, 0.1, 1.0, 1.0)
    assert (s2.coord_huber_delta, s2.text_gate_weight, s2.channel_b.drop_invalid_struct_ce_multiplier) == (0.001, 0.0, 1.0)
    assert s2.fallback.on_rollout_failure == "fail" and s2.pipeline is None and cfg.stage1.pipeline is None
    rm = cfg.rollout_matching
    assert (rm.coord_decode_mode, rm.backend, rm.pipeline) == ("exp", "hf", None)
    assert (rm.decoding.temperature, rm.decoding.top_p, rm.decoding.max_new_tokens, rm.decoding.batch_size) == (0.0, 1.0, 512, 8)
    assert (rm.matching.iou_gate, rm.matching.fp_cost, rm.matching.fn_cost) == (0.3, 1.0, 1.0)
    assert (rm.eval_detection.enabled, rm.eval_detection.metrics, rm.eval_detection.score_mode) == (True, "coco", "token_prob")
    assert cfg.eval.max_samples is None and cfg.eval.batch_size == 8
    # raw keeps only what was written; resolved has everything
    assert set(cfg.raw) == {"model", "data"}
    assert cfg.resolved["stage2_ab"]["schedule"]["b_ratio"] == 0.2


def test_pipeline_entry_defaults_in_resolved_not_raw(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", PIPELINE_CFG))
    entry = cfg.resolved["stage2_ab"]["pipeline"]["objective"][1]
    assert entry == {"name": "bbox_geo", "enabled": True, "weight": 1.0, "channels": ("A", "B"), "config": {}}
    assert cfg.raw["stage2_ab"]["pipeline"]["objective"][1] == {"name": "bbox_geo"}


def test_numbers_are_coerced_to_field_types(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", MINIMAL + "training: {lr: 1, max_steps: 10.0}\n"))
    assert cfg.training.lr == 1.0 and type(cfg.training.lr) is float
    assert cfg.training.max_steps == 10 and type(cfg.training.max_steps) is int


def test_config_is_frozen(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", PIPELINE_CFG))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.stage2_ab.schedule.b_ratio = 0.5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.variant = "stage1"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.raw["training"] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.resolved["training"]["lr"] = 2.0  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.stage2_ab.pipeline["objective"][0]["config"].update(desc_ce_weight=0.0)
    with pytest.raises(AttributeError):
        cfg.stage2_ab.pipeline["objective"].append({})  # tuples, not lists
    assert isinstance(cfg.resolved, dict) and isinstance(cfg.resolved, FrozenDict)


def test_frozen_maps_copy_out_mutable(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", PIPELINE_CFG))
    mutable = copy.deepcopy(cfg.raw)
    mutable["training"] = {"lr": 1.0}
    assert type(mutable) is dict and "training" not in cfg.raw
    plain = cfg.to_dict()
    assert plain == thaw(cfg.resolved) and isinstance(plain["stage2_ab"]["pipeline"]["objective"], list)
    again = pickle.loads(pickle.dumps(cfg.resolved))
    assert again == cfg.resolved and isinstance(again, FrozenDict)


def test_raw_is_passed_to_resolve_pipeline_before_defaults(tmp_path, monkeypatch):
    import configs.loader as loader

    seen = {}

    def spy(raw, variant):
        seen["raw"], seen["variant"] = copy.deepcopy(raw), variant
        return "resolved-pipeline"

    monkeypatch.setattr(loader, "resolve_pipeline", spy)
    write(tmp_path, "base.yaml", PIPELINE_CFG)
    cfg = load_config(write(tmp_path, "c.yaml", "extends: base.yaml\n"), ["training.lr=0.1"])
    assert seen["variant"] == "stage2_two_channel"
    assert "extends" not in seen["raw"] and seen["raw"]["training"] == {"lr": 0.1}
    assert "schedule" not in seen["raw"]["stage2_ab"]  # defaults not filled
    assert type(seen["raw"]) is dict
    assert cfg.pipeline == "resolved-pipeline" and cfg.variant == "stage2_two_channel"


# ---------------------------------------------------------------- save_resolved + CLI helpers


def test_save_resolved_roundtrips(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", PIPELINE_CFG), ["training.lr=3e-4"])
    out = save_resolved(cfg, tmp_path / "run")
    assert out == tmp_path / "run" / "config.resolved.yaml" and out.is_file()
    import yaml

    assert yaml.safe_load(out.read_text()) == thaw(cfg.resolved)
    again = load_config(tmp_path / "run" / "config.merged.yaml")
    assert again.resolved == cfg.resolved
    assert (tmp_path / "run" / "pipeline.json").is_file()


def test_add_config_args(tmp_path):
    parser = add_config_args(argparse.ArgumentParser())
    args = parser.parse_args(["--config", "x.yaml", "--set", "training.lr=1e-4", "--set", "run.name=a"])
    assert args.config == Path("x.yaml") and args.overrides == ["training.lr=1e-4", "run.name=a"]
    assert parser.parse_args(["--config", "y.yaml"]).overrides == []
    path = write(tmp_path, "c.yaml", MINIMAL)
    args = parser.parse_args(["--config", str(path), "--set", "training.max_steps=3"])
    cfg = load_config(args.config, args.overrides, expect="stage1")
    assert isinstance(cfg, Config) and cfg.training.max_steps == 3 and cfg.path == path


# ---------------------------------------------------------------- integration with configs.pipeline


def test_pipeline_is_resolved_at_load(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", PIPELINE_CFG))
    assert cfg.pipeline.source == "explicit" and cfg.pipeline.variant == "stage2_two_channel"
    assert [m.name for m in cfg.pipeline.objective] == ["token_ce", "bbox_geo", "coord_reg"]
    default = load_config(write(tmp_path, "d.yaml", PIPELINE_CFG), ["stage2_ab.pipeline=null"])
    assert default.pipeline.source == "default" and default.stage2_ab.pipeline is None
    save_resolved(cfg, tmp_path / "run")
    import json

    saved = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert saved["checksum"] == cfg.pipeline.checksum and len(saved["checksum"]) == 64


def test_pipeline_errors_surface_at_load(tmp_path):
    err = error_of(write(tmp_path, "c.yaml", PIPELINE_CFG), ["stage2_ab.pipeline.objective[1].name=bbox_goe"])
    assert err.key == "stage2_ab.pipeline.objective[1].name" and "did you mean 'bbox_geo'?" in str(err)
    err = error_of(write(tmp_path, "d.yaml", PIPELINE_CFG), ["stage2_ab.desc_ce_weight=0.5"])
    assert err.key == "stage2_ab.desc_ce_weight"


def test_decode_mode_changes_pipeline_checksum(tmp_path):
    path = write(tmp_path, "c.yaml", MINIMAL + "custom: {trainer_variant: stage2_two_channel}\n")
    exp = load_config(path)
    st = load_config(path, ["stage2_ab.coord_decode_mode=st"])
    assert exp.pipeline.checksum != st.pipeline.checksum


@pytest.mark.parametrize(
    ("variant", "section"),
    [("stage2_rollout_aligned", "stage2_ab"), ("stage2_rollout_aligned", "stage1"), ("stage2_two_channel", "stage1"), (None, "stage2_ab")],
)
def test_section_a_variant_never_reads_is_rejected(tmp_path, variant, section):
    """A written section the variant ignores would be a silent no-op: it fails at load, naming the section."""
    body = {"stage2_ab": {"schedule": {"b_ratio": 0.5}}, "stage1": {"pipeline": {"objective": [{"name": "token_ce"}]}}}[section]
    tree = {"model": {"tiny": {"enabled": True}}, "data": {"synthetic": {"enabled": True}}, section: body}
    if variant is not None:
        tree["custom"] = {"trainer_variant": variant}
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(tree))  # JSON is YAML
    with pytest.raises(ConfigError, match=rf"^{section}: has no effect under variant"):
        load_config(path)
