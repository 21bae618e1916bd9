"""docs/REAL_RUN.md, run as written: hub-like checkpoint + COCO layout -> coord tokens -> conversion ->
--dry-run -> Stage-1 and Stage-2 under ``accelerate launch`` (2 CPU processes) -> eval.infer ->
eval.evaluate -> eval.visualize, with the shipped real configs and only the overrides the page lists.

The page's ``bash`` blocks are joined into one script in page order; its commented assignment lines
(``# NPROC=2 CPU=...``, ``# TRIAL=...``, ``# STEPS1=5 STEPS2=5``: the CPU overrides and the trial sizes)
are switched on; ``BASE`` and ``COCO`` point at the test's inputs. The script runs in a folder that
links the repo's files, so ``runs/`` lands under the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "REAL_RUN.md"
ASSIGNMENT = re.compile(r"^# ([A-Z][A-Z0-9_]*=.*)$")


def page_script(page: Path = PAGE) -> str:
    """The page's ``bash`` blocks in order, with the commented ``# VAR=...`` lines switched on."""
    blocks = re.findall(r"^```bash\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    lines = []
    for block in blocks:
        for line in block.splitlines():
            m = ASSIGNMENT.match(line)
            lines.append(m.group(1) if m else line)
    return "\n".join(lines) + "\n"


def test_the_page_script_switches_on_exactly_the_cpu_and_trial_lines():
    script = page_script()
    on = [line for line in script.splitlines() if re.match(r"^(NPROC|CPU|TRIAL|STEPS1)=", line)]
    assert on[-3:] == [
        'NPROC=2 CPU="--set training.mixed_precision=no --set run.tracker.backend=none --set data.num_workers=0"',
        'TRIAL="--set training.save_every=5 --set training.eval_every=5 '
        '--set rollout_matching.decoding.max_new_tokens=64"',
        "STEPS1=5 STEPS2=5",
    ]
    assert "configs/stage1/qwen3vl_2b.yaml" in script and "configs/stage2_two_channel/qwen3vl_2b.yaml" in script


def make_coco_layout(root: Path, *, num_train: int = 40, num_val: int = 4) -> Path:
    """``root/{train2017,val2017}/*.png`` and ``root/annotations/instances_{train,val}2017.json``: one
    or two coloured rectangles per 64x48 image, categories ``red box`` / ``blue box``."""
    from PIL import Image, ImageDraw

    cats = [{"id": 1, "name": "red box", "supercategory": "box"}, {"id": 2, "name": "blue box", "supercategory": "box"}]
    colors = {1: (220, 30, 30), 2: (30, 30, 220)}
    (root / "annotations").mkdir(parents=True)
    ann_id = 1
    for split, n in (("train2017", num_train), ("val2017", num_val)):
        (root / split).mkdir()
        images, anns = [], []
        for i in range(n):
            image_id = (1000 if split == "val2017" else 0) + i + 1
            name = f"{image_id:012d}.png"
            img = Image.new("RGB", (64, 48), (235, 235, 235))
            draw = ImageDraw.Draw(img)
            for k in range(1 + i % 2):
                cat = 1 + (i + k) % 2
                x, y, w, h = 4 + 28 * k + i % 5, 6 + (i * 3) % 13, 20 + i % 7, 14 + i % 9
                draw.rectangle((x, y, x + w - 1, y + h - 1), fill=colors[cat])
                anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
                             "area": w * h, "iscrowd": 0})
                ann_id += 1
            img.save(root / split / name)
            images.append({"id": image_id, "file_name": name, "width": 64, "height": 48})
        payload = {"images": images, "annotations": anns, "categories": cats}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload))
    return root


def _linked_checkout(work: Path) -> Path:
    """A folder holding links to every top-level entry of the repo (but runs/): the page's relative paths
    (scripts/, configs/, train_stage1.py) resolve, and what it writes to runs/ stays in ``work``."""
    work.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in ("runs", ".git") and not entry.name.startswith(".coordexp"):
            (work / entry.name).symlink_to(entry)
    return work


@pytest.mark.slow
def test_the_real_run_walkthrough_runs_as_written(tmp_path):
    from model.tiny import build_tiny_checkpoint

    base = build_tiny_checkpoint(str(tmp_path / "models" / "Qwen3-VL-tiny"), seed=0, coord_tokens=False)
    coco = make_coco_layout(tmp_path / "coco")
    work = _linked_checkout(tmp_path / "work")
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "BASE": base, "COCO": str(coco), "PATH": bindir + os.pathsep + os.environ["PATH"],
           "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    for key in ("NPROC", "CPU", "TRIAL", "STEPS1", "STEPS2", "COORDEXP_DEBUG"):
        env.pop(key, None)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", page_script()], cwd=work, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert proc.stdout.count("dry run OK") == 2
    # Stage-2's dry run names the data settings it takes from the Stage-1 checkpoint
    assert proc.stdout.count("  settings       not set in the config, taken from") == 1

    runs = work / "runs"
    s1, s2 = runs / "qwen3vl_2b_stage1_coco", runs / "qwen3vl_2b_stage2_two_channel_coco"
    assert (s1 / "checkpoint-5" / "model" / "coordexp_settings.json").is_file()
    # eval.infer with default flags on the final checkpoint == the in-loop eval of that checkpoint
    inloop = s2 / "eval" / "step_5"
    predictions = runs / "val2017_predictions.jsonl"
    assert len(predictions.read_text().splitlines()) == 4
    assert predictions.read_bytes() == (inloop / "predictions.jsonl").read_bytes()
    # ... and eval.evaluate gives the in-loop metrics
    offline, online = (json.loads(p.read_text()) for p in (runs / "val2017_metrics.json", inloop / "metrics.json"))
    assert offline["metrics"] == online["metrics"] and offline["per_category"] == online["per_category"]
    assert sorted((runs / "val2017_viz").glob("page_*.png"))
    # Stage-2 took the data settings its config leaves unset from the Stage-1 checkpoint, and said so
    log2 = (s2 / "train.log").read_text()
    assert "checkpoint settings: not set in the config, taken from" in log2 and "data.prompt=" in log2
    assert (s2 / "plots" / "metrics.png").is_file()
    rows = [json.loads(line) for line in (s2 / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage2/channel_b_count"] for r in rows] == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_a_wrong_image_root_is_named_first_even_with_skip_invalid_on(recipe_env, tmp_path, monkeypatch, capsys,
                                                                   fresh_coordexp_logger):
    """The COCO-layout detour: data.image_root one level too deep. Without skip_invalid the error names the
    root first; with it on, every line is skipped and the error names the root again (not skip_invalid)."""
    import train_stage1
    from configs.errors import run_cli
    from scripts.coco_to_jsonl import main as convert

    coco = make_coco_layout(tmp_path / "coco", num_train=2, num_val=1)
    convert(["--coco", str(coco / "annotations" / "instances_train2017.json"), "--out", str(coco / "train.jsonl"),
             "--image-prefix", "train2017"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COORDEXP_DEBUG", raising=False)
    argv = ["--config", str(REPO / "configs" / "stage1" / "qwen3vl_2b.yaml"), "--dry-run",
            "--set", f"model.name_or_path={recipe_env.tiny_dir}", "--set", f"data.train_jsonl={coco / 'train.jsonl'}",
            "--set", "data.val_jsonl=null", "--set", f"data.image_root={coco / 'train2017'}",
            "--set", "run.tracker.backend=none", "--set", "training.mixed_precision=no"]
    assert run_cli(train_stage1.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[missing_image]. Check data.image_root first (now " in err
    assert run_cli(train_stage1.main, [*argv, "--set", "data.skip_invalid=true"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the data report the dry run logs
    assert err.startswith("error: ") and "skipped all 2 lines (missing_image=2) [no_records]" in err
    assert "Check data.image_root first" in err and "skip_invalid: true" not in err
