"""What a checkpoint carries for inference (model/settings.py) and the coord-token refusal.

A trained checkpoint's model dir holds ``coordexp_settings.json``; ``eval.infer`` with default flags
reproduces the in-loop eval of that checkpoint byte for byte; Stage-2 takes the data settings its
config leaves unset from it; Stage-2 and ``eval.infer`` refuse a model without coord tokens.
"""

from __future__ import annotations

import json
import logging

import pytest

import train_stage1
import train_stage2
from configs import load_config
from configs.errors import UserError
from eval import infer
from model.settings import (
    DATA_KEYS,
    EVAL_KEYS,
    SETTINGS_FILE,
    CheckpointSettings,
    read_settings,
    resolve,
    write_settings,
)
from model.tiny import build_tiny_checkpoint
from tests._recipe_helpers import STAGE1_DEMO, STAGE2_DEMO, recipe_argv

# Not the defaults: the tiny checkpoint's image processor has shortest_edge 1024 (a 32-px shape image
# is 1 image token); 4096 makes it 64x64 px, 4 image tokens.
RECIPE = {"data.min_pixels": 4096, "data.max_pixels": 8192, "data.prompt": "Find every shape.",
          "data.system_prompt": "You are a detector."}


def test_write_read_round_trip_and_resolve(tmp_path):
    values = {k: None for k in (*DATA_KEYS, *EVAL_KEYS)} | {"data.prompt": "P", "data.min_pixels": 4096,
                                                             "rollout_matching.decoding.max_new_tokens": 64}
    write_settings(tmp_path, CheckpointSettings(values))
    saved = read_settings(tmp_path)
    assert dict(saved.values) == values and saved.source == str(tmp_path / SETTINGS_FILE)
    assert saved.coord_format["num_bins"] == 1000
    assert read_settings(tmp_path / "nothing_here") is None

    defaults = {"data.prompt": "D", "data.min_pixels": None, "data.max_pixels": None, "data.coords": "pixel"}
    got, notes = resolve({"data.prompt": None, "data.min_pixels": 1024, "data.max_pixels": None, "data.coords": None},
                         saved, defaults, {"data.min_pixels": "--min-pixels"})
    # left out -> saved (P; max_pixels saved as None -> None); given -> given (and noted); not saved -> saved None
    assert got == {"data.prompt": "P", "data.min_pixels": 1024, "data.max_pixels": None, "data.coords": None}
    assert notes == [f"--min-pixels 1024 differs from data.min_pixels=4096 saved with the checkpoint "
                     f"({saved.source}); using 1024"]
    # a given value equal to the saved one is no difference; without saved settings: the defaults
    assert resolve({"data.prompt": "P"}, saved, {"data.prompt": "D"}, {})[1] == []
    assert resolve({}, None, defaults, {}) == (defaults, [])

    (tmp_path / SETTINGS_FILE).write_text("{")
    with pytest.raises(UserError, match=f"{SETTINGS_FILE}: not a CoordExp settings file"):
        read_settings(tmp_path)


@pytest.fixture(scope="module")
def trained(recipe_env, tmp_path_factory):
    """2 Stage-1 steps with a non-default image budget, prompt and system prompt; eval of both val
    images at the end, 24 new tokens each, one image per generate call."""
    out = tmp_path_factory.mktemp("settings_run")
    argv = recipe_argv(recipe_env, STAGE1_DEMO, out, name="s1", max_steps=2, training__eval_every=2,
                       training__save_every=2, eval__max_samples=None,
                       rollout_matching__decoding__max_new_tokens=24,
                       **{k.replace(".", "__"): v for k, v in RECIPE.items()})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out)
        train_stage1.main(argv)
    return out / "s1"


def test_every_checkpoint_saves_the_settings_of_its_run(trained):
    saved = read_settings(trained / "checkpoint-2" / "model")
    for key, value in RECIPE.items():
        assert saved.get(key) == value, key
    assert saved.get("rollout_matching.decoding.max_new_tokens") == 24
    assert saved.get("data.coords") == "pixel" and saved.get("data.object_order") == "yx"


def test_infer_with_default_flags_writes_the_in_loop_eval_byte_for_byte(trained, recipe_env, tmp_path, capsys,
                                                                        monkeypatch):
    import data.encoding

    encoders = []

    class Spy(data.encoding.ChatEncoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            encoders.append(kwargs)

    monkeypatch.setattr(data.encoding, "ChatEncoder", Spy)
    inloop = trained / "eval" / "step_2" / "predictions.jsonl"
    out = tmp_path / "preds.jsonl"
    # the training checkpoint dir itself (its model/ is used), every setting flag left out
    assert infer.main(["--checkpoint", str(trained / "checkpoint-2"), "--jsonl",
                       str(recipe_env.shapes_dir / "val.jsonl"), "--out", str(out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert f"settings: {trained / 'checkpoint-2' / 'model' / SETTINGS_FILE}" in err and "warning:" not in err
    assert len(inloop.read_text().splitlines()) == 2
    assert out.read_bytes() == inloop.read_bytes()
    assert encoders[0] == {"prompt": "Find every shape.", "system_prompt": "You are a detector.",
                           "min_pixels": 4096, "max_pixels": 8192}  # the recipe's, not the processor's / defaults

    # An explicit flag that differs is used and reported; the prompt then has another length.
    out2 = tmp_path / "preds2.jsonl"
    assert infer.main(["--checkpoint", str(trained / "checkpoint-2" / "model"), "--jsonl",
                       str(recipe_env.shapes_dir / "val.jsonl"), "--out", str(out2), "--device", "cpu",
                       "--min-pixels", "1024", "--max-pixels", "1024", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "warning: --min-pixels 1024 differs from data.min_pixels=4096 saved with the checkpoint" in err
    assert "warning: --max-new-tokens 2 differs from rollout_matching.decoding.max_new_tokens=24" in err
    assert out2.read_bytes() != inloop.read_bytes()


def test_stage2_takes_the_data_settings_its_config_leaves_unset(trained):
    model_dir = str(trained / "checkpoint-2" / "model")
    cfg = load_config(STAGE2_DEMO, [f"model.name_or_path={model_dir}", "model.tiny.enabled=false",
                                    "data.max_pixels=16384"], expect="stage2")
    from training.session import with_checkpoint_settings

    assert cfg.data.prompt == "Detect all objects."  # the demo's own (it sets data.prompt)
    got, notes = with_checkpoint_settings(cfg)
    assert got.data.min_pixels == 4096 and got.data.system_prompt == "You are a detector."  # taken
    assert got.data.max_pixels == 16384 and got.data.prompt == "Detect all objects."  # the config's own
    assert got.raw["data"]["min_pixels"] == 4096  # config.merged.yaml reproduces the run
    levels = [level for level, _ in notes]
    assert levels == [logging.INFO, logging.WARNING, logging.WARNING]
    assert "data.min_pixels=4096" in notes[0][1] and "data.system_prompt='You are a detector.'" in notes[0][1]
    assert notes[1][1].startswith("the config's data.prompt 'Detect all objects.' differs from "
                                  "data.prompt='Find every shape.' saved with the checkpoint")
    assert notes[2][1].startswith("the config's data.max_pixels 16384 differs from data.max_pixels=8192")
    # the tiny builder / a hub checkpoint: nothing to take
    tiny_cfg = load_config(STAGE2_DEMO, [], expect="stage2")
    assert with_checkpoint_settings(tiny_cfg) == (tiny_cfg, ())


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A hub-like checkpoint: save_pretrained layout, no coord tokens."""
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("hub") / "Qwen3-VL-tiny"), seed=0, coord_tokens=False)


def test_stage2_and_infer_refuse_a_model_without_coord_tokens(bare, recipe_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = recipe_argv(recipe_env, STAGE2_DEMO, tmp_path, name="s2", max_steps=1,
                       model__tiny__enabled=False, model__name_or_path=bare)
    fix = (rf"model.name_or_path='{bare}' has no coord tokens <\|coord_0\|>..<\|coord_999\|>: point it at a "
           r"Stage-1 output \(<stage-1 run dir>/checkpoint-<step>/model\).*"
           rf"`python scripts/add_coord_tokens.py {bare} --out DIR`")
    with pytest.raises(UserError, match=fix):
        train_stage2.main([*argv, "--dry-run"])
    with pytest.raises(UserError, match=fix):
        train_stage2.main(argv)
    assert not list((tmp_path / "s2").glob("checkpoint-*"))
    with pytest.raises(UserError, match=fix.replace("model.name_or_path", "--checkpoint")):
        infer.main(["--checkpoint", bare, "--jsonl", str(recipe_env.shapes_dir / "val.jsonl"),
                    "--out", str(tmp_path / "p.jsonl")])


def test_stage1_logs_the_coord_rows_it_adds(bare, recipe_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name="s1", max_steps=1, model__tiny__enabled=False,
                       model__name_or_path=bare, model__coord_tokens__init="mean", training__eval_every=0)
    train_stage1.main(argv)
    log = (tmp_path / "s1" / "train.log").read_text()
    assert (f"model.name_or_path={bare} has no coord tokens: added the 1000 coord tokens "
            "<|coord_0|>..<|coord_999|> with fresh rows initialised by model.coord_tokens.init=mean") in log
    saved = json.loads((tmp_path / "s1" / "checkpoint-1" / "model" / SETTINGS_FILE).read_text())
    assert saved["settings"]["data.prompt"] == "Detect all objects."


def test_a_training_checkpoint_dir_is_taken_by_infer_and_named_by_the_recipes(trained):
    from model.loading import check_checkpoint_path, model_dir_of

    ckpt = trained / "checkpoint-2"
    assert model_dir_of(str(ckpt)) == str(ckpt / "model")
    assert model_dir_of(str(ckpt / "model")) == str(ckpt / "model")  # a model dir is kept
    assert model_dir_of(str(trained)) == str(trained)  # a run dir is no checkpoint: left to the error below
    with pytest.raises(UserError, match=rf"no config.json in this directory; .*this is a training checkpoint: its "
                                        rf"model is {ckpt}/model$"):
        check_checkpoint_path(str(ckpt), "model.name_or_path")
    with pytest.raises(UserError, match=r"\(config.json, tokenizer files, weights\)$"):
        check_checkpoint_path(str(trained), "model.name_or_path")


def test_matching_knobs_reach_infer_and_the_saved_settings_from_the_one_declaration():
    """A new field of MatchingConfig needs no edit elsewhere: the eval.infer flags, the saved settings
    and the eval's matching are made from MatchingConfig's own field list."""
    import dataclasses

    from configs.types import MatchingConfig

    names = [f.name for f in dataclasses.fields(MatchingConfig)]
    assert MatchingConfig.eval_fields() == tuple(n for n in names if n not in MatchingConfig.TRAINING_ONLY)
    assert set(MatchingConfig.eval_fields()) >= {"iou_gate", "fp_cost", "fn_cost"}
    assert "desc_gate" in names and "desc_gate" not in MatchingConfig.eval_fields()
    matching_keys = [k for k in EVAL_KEYS if k.startswith("rollout_matching.matching.")]
    assert matching_keys == [f"rollout_matching.matching.{n}" for n in MatchingConfig.eval_fields()]
    parser = infer.build_parser()
    flags = {a.dest: a for a in parser._actions}
    for name in MatchingConfig.eval_fields():
        assert flags[name].option_strings == ["--" + name.replace("_", "-")] and flags[name].default is None
    args = parser.parse_args(["--checkpoint", "c", "--jsonl", "j", "--out", "o", "--iou-gate", "1", "--fn-cost", "0.5"])
    assert (args.iou_gate, type(args.iou_gate), args.fn_cost) == (1.0, float, 0.5)  # the declared type
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint", "c", "--jsonl", "j", "--out", "o", "--iou-gate", "1.5"])  # over its maximum
    gated = MatchingConfig(iou_gate=0.4, desc_gate=0.8)
    assert gated.for_eval() == MatchingConfig(iou_gate=0.4)  # eval keeps the box knobs, drops the desc gate
