"""Every shipped YAML loads; schemas are strict and agree with configs/types.py and docs/CONFIG.md."""

from __future__ import annotations

import json
import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from configs import load_config
from configs.loader import SCHEMA_DIR, schema_at
from configs.types import CONFIG_META_FIELDS, Config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ACCELERATE = CONFIGS / "accelerate"
EXPERIMENT_YAMLS = sorted(p for p in CONFIGS.rglob("*.yaml") if ACCELERATE not in p.parents)
ACCELERATE_YAMLS = sorted(ACCELERATE.glob("*.yaml"))


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_the_examples_exist():
    names = {_rel(p) for p in EXPERIMENT_YAMLS}
    for required in (
        "configs/stage1/qwen3vl_2b.yaml",
        "configs/stage1/qwen3vl_4b.yaml",
        "configs/stage1/qwen3vl_8b.yaml",
        "configs/stage2_two_channel/qwen3vl_2b.yaml",
        "configs/stage2_two_channel/qwen3vl_2b_st.yaml",
        "configs/stage2_two_channel/qwen3vl_2b_pipeline.yaml",
        "configs/stage2_rollout_aligned/qwen3vl_2b.yaml",
    ):
        assert required in names
    assert {p.name for p in ACCELERATE_YAMLS} >= {"ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"}


@pytest.mark.parametrize("path", EXPERIMENT_YAMLS, ids=_rel)
def test_every_config_yaml_loads(path):
    cfg = load_config(path)
    folder = path.parent.name
    expected = {"stage1": "stage1", "stage2_two_channel": "stage2_two_channel", "stage2_rollout_aligned": "stage2_rollout_aligned"}
    if folder in expected:
        assert cfg.variant == expected[folder]
        if path.name.startswith("smoke_"):
            # CPU smoke configs run the built-in tiny model on synthetic shapes
            assert cfg.model.tiny.enabled and cfg.data.synthetic.enabled
        else:
            # real-model examples ship placeholder paths, never a machine-specific one
            assert cfg.model.name_or_path.startswith("/path/to/") and cfg.data.train_jsonl.startswith("/path/to/")
    assert cfg.pipeline is not None


def test_st_example_differs_from_default_only_in_modes():
    base = load_config(CONFIGS / "stage2_two_channel/qwen3vl_2b.yaml").to_dict()
    st = load_config(CONFIGS / "stage2_two_channel/qwen3vl_2b_st.yaml").to_dict()
    assert st["stage2_ab"]["coord_decode_mode"] == "st" and base["stage2_ab"]["coord_decode_mode"] == "exp"
    st["stage2_ab"]["coord_decode_mode"] = "exp"
    st["run"] = base["run"]
    assert st == base


@pytest.mark.parametrize("path", ACCELERATE_YAMLS, ids=_rel)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import ClusterConfig

    tree = yaml.safe_load(path.read_text())
    assert isinstance(tree, dict) and "distributed_type" in tree
    # accelerate's own reader rejects unknown top-level keys
    ClusterConfig.from_yaml_file(str(path))
    ds = tree.get("deepspeed_config") or {}
    # left out on purpose: accelerate would override training.gradient_accumulation_steps
    assert "gradient_accumulation_steps" not in ds


# ---------------------------------------------------------------- schema files


def _schema_files():
    return sorted(SCHEMA_DIR.glob("*.json"))


def test_schema_files_per_surface():
    names = {p.stem for p in _schema_files()}
    assert names == {"root", "run", "model", "data", "training", "custom", "stage1", "stage2_ab", "rollout_matching", "eval", "pipeline"}


@pytest.mark.parametrize("path", _schema_files(), ids=lambda p: p.name)
def test_schemas_are_valid_and_strict(path):
    schema = json.loads(path.read_text())
    Draft202012Validator.check_schema(schema)

    def walk(node, where):
        if isinstance(node, dict):
            if "properties" in node:
                assert node.get("additionalProperties") is False, f"{path.name}:{where} must set additionalProperties: false"
            for key, value in node.items():
                if key != "default":
                    walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(schema, "#")


def _check_dataclass_matches_schema(cls, parts):
    schema = schema_at(parts)
    assert schema is not None, f"no schema at {parts}"
    props = schema.get("properties", {})
    names = [f.name for f in fields(cls) if not (cls is Config and f.name in CONFIG_META_FIELDS)]
    assert sorted(names) == sorted(props), f"{'.'.join(map(str, parts)) or 'root'}: dataclass {cls.__name__} vs schema"
    hints = typing.get_type_hints(cls)
    for name in names:
        tp = hints[name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if len(args) == 1 and is_dataclass(args[0]):
            _check_dataclass_matches_schema(args[0], [*parts, name])
        else:
            assert "properties" not in props[name] or name == "pipeline", f"{name} is a map in the schema but not a dataclass"
        assert "default" in props[name] or "properties" in schema_at([*parts, name]), f"{name}: no default"


def test_dataclasses_match_schemas():
    _check_dataclass_matches_schema(Config, [])


def _leaf_keys(parts=()):
    schema = schema_at(list(parts))
    for name in schema.get("properties", {}):
        yield name
        if name != "pipeline" and "properties" in (schema_at([*parts, name]) or {}):
            yield from _leaf_keys((*parts, name))


def test_docs_name_every_key():
    doc = (REPO / "docs" / "CONFIG.md").read_text()
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", doc))
    missing = sorted({k for k in _leaf_keys()} - words)
    assert not missing, f"docs/CONFIG.md does not mention {missing}"


def test_real_configs_ship_attn_auto():
    """flash-attn is an optional extra (requirements-gpu.txt): real configs must load without it."""
    real = [p for d in ("stage1", "stage2_two_channel", "stage2_rollout_aligned")
            for p in sorted((REPO / "configs" / d).glob("*.yaml"))]
    assert real
    for path in real:
        assert load_config(path).model.attn_implementation == "auto", path


# ---------------------------------------------------------------- one declaration


def test_generated_docs_and_schema_files_are_fresh():
    from scripts.gen_config_doc import REGENERATE, stale

    old = stale()
    assert not old, f"stale generated files {old}: run `{REGENERATE}` and commit the result"


def _declared_classes():
    from configs.declare import declared_fields, section_class
    from configs.modules import MODULES
    from configs.types import PipelineEntry

    todo = [typing.get_type_hints(Config)[f.name] for f in fields(Config) if f.name not in CONFIG_META_FIELDS]
    todo += [PipelineEntry, *(d.config for d in MODULES.values())]
    seen = []
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo += [section_class(cls, f.name) for f in declared_fields(cls) if section_class(cls, f.name)]
    return seen


def test_every_declared_key_has_a_doc_and_every_field_is_declared():
    from configs.declare import declared_fields, doc_of

    for cls in _declared_classes():
        assert [f.name for f in fields(cls)] == [f.name for f in declared_fields(cls)], cls.__name__
        for f in declared_fields(cls):
            assert doc_of(cls, f.name).strip(), f"{cls.__name__}.{f.name}: knob() without a doc"


def test_declared_defaults_are_the_filled_defaults():
    from configs.declare import defaults_of
    from configs.loader import fill_defaults

    filled = fill_defaults({})
    for f in fields(Config):
        if f.name not in CONFIG_META_FIELDS:
            assert filled[f.name] == defaults_of(typing.get_type_hints(Config)[f.name]), f.name


def test_flat_knobs_share_the_range_of_their_module_key():
    from configs.declare import declared_fields, maps_to
    from configs.modules import MODULES

    checked = 0
    for cls in _declared_classes():
        for f in declared_fields(cls):
            target = maps_to(cls, f.name)
            if target is None or target.endswith(".enabled"):
                continue
            module, key = target.split(".")
            mine = {k: v for k, v in f.metadata["coordexp"]["constraints"].items()}
            theirs = next(g for g in fields(MODULES[module].config) if g.name == key).metadata["coordexp"]["constraints"]
            assert mine == theirs, (cls.__name__, f.name)
            checked += 1
    assert checked >= 19
    flat = schema_at(["stage2_ab", "channel_b", "drop_invalid_struct_ce_multiplier"])
    assert (flat["minimum"], flat["maximum"]) == (1.0, 4.0)


def test_declared_enums_are_the_code_vocabularies():
    # The code owns what it can compute; the declaration (and so the schema, the docs and every
    # error) must offer exactly that set, in the same order.
    from configs.validation import declared_enum
    from data.records import COORD_MODES
    from eval.scores import SCORE_MODES
    from losses.coord import DECODE_MODES, EMBED_MODES
    from pipeline.forwards import GRAD_MODES
    from rollout.backends import COMPILE_MODES

    assert declared_enum("data.coords") == COORD_MODES
    assert declared_enum("stage2_ab.coord_decode_mode") == declared_enum("rollout_matching.coord_decode_mode") == DECODE_MODES
    assert declared_enum("stage2_ab.coord_ctx_embed_mode") == EMBED_MODES
    assert declared_enum("stage2_ab.softctx_grad_mode") == GRAD_MODES
    assert declared_enum("rollout_matching.eval_detection.score_mode") == SCORE_MODES
    assert declared_enum("rollout_matching.hf.compile") == COMPILE_MODES
