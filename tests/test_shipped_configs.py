"""Every shipped recipe config trains two optimizer steps in its own precision (CPU).

For each non-demo ``configs/stage*/**/*.yaml``, the config is loaded as shipped and only what ties
it to a real machine is swapped: the tiny random Qwen3-VL instead of the checkpoint, the synthetic
shapes data instead of COCO (and the pixel budget that would blow a 32-px image up to 256 px),
``sdpa`` instead of flash-attention, no wandb, a 512-token row instead of 8192, one
accumulation micro-step (accumulation has its own recipe tests), and Two-Channel ``b_ratio``
0.5 so the two steps are one Channel-A and one Channel-B step. Precision (``model.dtype``, ``training.mixed_precision``), packing, gradient
checkpointing, freezing and the objective pipeline are the config's own; the test checks so on
the run's resolved config.
"""

from __future__ import annotations

import json

import pytest
import yaml

import train_stage1
import train_stage2
from configs import load_config
from tests._recipe_helpers import REPO, finite, read_rows, recipe_argv

SHIPPED = sorted(p for d in ("stage1", "stage2_two_channel", "stage2_rollout_aligned")
                 for p in (REPO / "configs" / d).glob("*.yaml"))
KEPT = ("model.dtype", "model.gradient_checkpointing", "model.freeze", "model.adapter", "training.mixed_precision",
        "training.packing", "custom.trainer_variant")


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """One process runs many recipes here: each must set up accelerate with its own mixed precision
    (accelerate keeps it process-wide), and leave none to the next test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _get(tree, dotted):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def test_every_shipped_recipe_config_is_listed():
    names = {p.relative_to(REPO / "configs").as_posix() for p in SHIPPED}
    assert {"stage1/qwen3vl_2b.yaml", "stage2_two_channel/_base.yaml", "stage2_rollout_aligned/smoke_default.yaml"} <= names
    assert not any(n.startswith("demo/") for n in names)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_shipped_config_trains_two_steps(path, recipe_env, tmp_path, monkeypatch):
    shipped = load_config(path)
    stage2 = shipped.variant != "stage1"
    sets = {
        "model__attn_implementation": "sdpa",
        "run__tracker__backend": "none",
        "data__train_jsonl": None, "data__val_jsonl": None, "data__image_root": None,
        "data__min_pixels": None, "data__max_pixels": None,
        "training__max_length": 512,
        "training__gradient_accumulation_steps": 1,
    }
    if shipped.variant == "stage2_two_channel":
        sets["stage2_ab__schedule__b_ratio"] = 0.5
    argv = recipe_argv(recipe_env, path, tmp_path, name="run", max_steps=2, **sets)
    monkeypatch.chdir(tmp_path)
    (train_stage2 if stage2 else train_stage1).main(argv)

    resolved = yaml.safe_load((tmp_path / "run" / "config.resolved.yaml").read_text())
    shipped_tree = shipped.to_dict()
    for key in KEPT:
        if key.split(".")[0] in shipped_tree:
            assert _get(resolved, key) == _get(shipped_tree, key), key
    identity = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert identity["checksum"] == shipped.pipeline.checksum  # same objective modules, weights and configs
    rows = read_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        losses = {k: v for k, v in row.items() if k.startswith("loss/")}
        assert losses and all(finite(v) for v in losses.values()), row
    if shipped.variant == "stage2_two_channel":
        assert sum(r["stage2/channel_a_count"] for r in rows) == 1
        assert sum(r["stage2/channel_b_count"] for r in rows) == 1
