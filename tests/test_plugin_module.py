"""A new objective module in one file outside the package (docs/ARCHITECTURE.md, "A new module in one
file"): its config dataclass, its loss and its registration, listed in a YAML pipeline through
``custom.plugins``, trains Stage-1 and both Stage-2 channels; no file of the project is edited."""

from __future__ import annotations

import math

import pytest

import train_stage1
import train_stage2
from tests._recipe_helpers import STAGE1_DEMO, STAGE2_DEMO, read_rows, recipe_argv

PLUGIN = '''
"""center_l1: L1 distance between decoded box centres and GT centres (a worked example of a plugin)."""
from dataclasses import dataclass

from configs.declare import knob
from losses.coord import decode_coords
from core.vocab import NUM_COORD_BINS, loss_key
from pipeline.context import MODE_ROLLOUT, ROLLOUT_GEO_SUBSETS
from pipeline.registry import OBJECTIVE, ModuleOutput, register_module


@dataclass(frozen=True)
class CenterL1Config:
    scale: float = knob(1.0, "multiplies the mean L1 distance", minimum=0)


@register_module("center_l1", OBJECTIVE, CenterL1Config, "L1 between decoded and GT box centres",
                 components={"center_l1": ()})
def center_l1(ctx, spec, settings):
    mode = ctx.require_contexts("center_l1")
    view = ctx.bbox_view(ROLLOUT_GEO_SUBSETS if mode == MODE_ROLLOUT else None, module="center_l1")
    logits = ctx.coord_logits(ctx.geometry_context()).index_select(0, view.index.reshape(-1))
    box = decode_coords(logits, ctx.coord_decode_mode).reshape(-1, 4)
    target = view.bins.to(box.dtype) / (NUM_COORD_BINS - 1)
    centre = lambda b: (b[:, :2] + b[:, 2:]) / 2  # noqa: E731
    loss = spec.config["scale"] * (centre(box) - centre(target)).abs().mean() if view.num_boxes else logits.sum() * 0
    return ModuleOutput(loss=loss, metrics={loss_key("center_l1"): loss.detach()} if view.num_boxes else {})
'''


def _config(tmp_path, plugin, extends, body):
    path = tmp_path / f"{extends.stem}_center_l1.yaml"
    path.write_text(f"extends: {extends}\ncustom:\n  plugins: [{plugin}]\n{body}")
    return path


def test_a_module_in_one_file_trains_stage1_and_both_stage2_channels(recipe_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plugin = tmp_path / "center_l1.py"
    plugin.write_text(PLUGIN)
    s1 = _config(tmp_path, plugin, STAGE1_DEMO, """stage1:
  pipeline:
    objective:
      - {name: token_ce}
      - {name: center_l1, weight: 0.5, config: {scale: 2.0}}
""")
    train_stage1.main(recipe_argv(recipe_env, s1, tmp_path, name="s1", max_steps=2, training__eval_every=0,
                                  training__save_every=2))
    rows = read_rows(tmp_path / "s1")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss/center_l1"]) and r["loss/center_l1"] > 0 for r in rows)
    pipeline = (tmp_path / "s1" / "pipeline.json").read_text()
    assert '"center_l1"' in pipeline and '"scale": 2.0' in pipeline

    s2 = _config(tmp_path, plugin, STAGE2_DEMO, f"""  trainer_variant: stage2_two_channel
model:
  name_or_path: {tmp_path / "s1" / "checkpoint-2" / "model"}
stage2_ab:
  schedule: {{b_ratio: 0.5}}
  pipeline:
    objective:
      - {{name: token_ce}}
      - {{name: center_l1, channels: [A, B]}}
""")
    argv = recipe_argv(recipe_env, s2, tmp_path, name="s2", max_steps=2, training__eval_every=0)
    argv[argv.index("model.tiny.enabled=true")] = "model.tiny.enabled=false"
    argv[argv.index("model.name_or_path=null")] = f"model.name_or_path={tmp_path / 's1' / 'checkpoint-2' / 'model'}"
    train_stage2.main(argv)
    rows = read_rows(tmp_path / "s2")
    channels = [r["stage2/channel_b_count"] for r in rows]
    assert sorted(channels) == [0.0, 1.0]  # one Channel-A step, one Channel-B (rollout) step
    assert all(math.isfinite(r["loss/center_l1"]) for r in rows)


def test_a_plugin_that_does_not_exist_is_one_config_line(tmp_path):
    from configs.errors import run_cli

    cfg = _config(tmp_path, tmp_path / "missing.py", STAGE1_DEMO, "")
    assert run_cli(train_stage1.main, ["--config", str(cfg), "--dry-run"]) == 2


@pytest.fixture(autouse=True)
def _forget_the_plugin():
    yield
    from core.vocab import PLUGIN_COMPONENTS
    from pipeline.registry import unregister_module

    unregister_module("center_l1")
    PLUGIN_COMPONENTS.pop("center_l1", None)
