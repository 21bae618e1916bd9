"""The researcher's dashboard: an offline wandb run of the demo recipe holds eval images, a predictions
table and the pipeline checksum; every run leaves plots/metrics.png in its run dir."""

from __future__ import annotations

import json

from PIL import Image

import train_stage1
from tests._recipe_helpers import STAGE1_DEMO, read_rows, recipe_argv


def test_offline_wandb_demo_run_holds_images_table_and_checksum(recipe_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    argv = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name="dash", max_steps=2, training__warmup_steps=1,
                       training__eval_every=2, training__save_every=0, eval__max_samples=2,
                       run__tracker__backend="wandb", run__tracker__mode="offline")
    train_stage1.main(argv)
    run_dir = tmp_path / "dash"
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    files = offline / "files"
    images = sorted((files / "media" / "images" / "eval").glob("images_*.png"))
    assert len(images) == 2  # eval.max_samples images, each with its boxes drawn
    assert Image.open(images[0]).size[0] > 0
    (table_file,) = (files / "media" / "table" / "eval").glob("predictions_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"][:4] == ["image_id", "image", "raw_text", "objects"]
    assert len(table["data"]) == 2
    preds = [json.loads(line) for line in (run_dir / "eval" / "step_2" / "predictions.jsonl").read_text().splitlines()]
    assert [row[0] for row in table["data"]] == [p["image_id"] for p in preds]
    assert [row[2] for row in table["data"]] == [p["raw_text"] for p in preds]
    # the run config (resolved config + pipeline identity with its checksum) is in the offline record file
    checksum = json.loads((run_dir / "pipeline.json").read_text())["checksum"]
    (record,) = offline.glob("run-*.wandb")
    assert checksum.encode() in record.read_bytes()
    tracked = json.loads((run_dir / "tracker_config.json").read_text())
    assert tracked["pipeline"]["checksum"] == checksum and tracked["config"]["training"]["max_steps"] == 2
    # the end-of-run plot is in the run dir, with the logged losses
    assert len(read_rows(run_dir)) == 2
    assert Image.open(run_dir / "plots" / "metrics.png").size[0] > 0
