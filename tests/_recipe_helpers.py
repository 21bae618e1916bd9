"""Shared pieces of the recipe end-to-end tests (``tests/test_recipe_*.py``).

``RecipeEnv`` is built once per session by the ``recipe_env`` fixture in ``tests/conftest.py``: one
tiny random Qwen3-VL checkpoint and one small synthetic shapes dataset, both under pytest's tmp
dir. ``recipe_argv`` turns a demo config plus small-run overrides into the ``argv`` of
``train_stage1.main`` / ``train_stage2.main``, with every output path under the test's tmp dir.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"
STAGE1_DEMO = DEMO / "stage1_shapes.yaml"
STAGE2_DEMO = DEMO / "stage2_shapes.yaml"
STAGE2_ALIGNED_DEMO = DEMO / "stage2_rollout_aligned_shapes.yaml"

# Small enough for a CPU test, big enough that a micro-batch packs two samples.
SHAPES = {"num_train": 8, "num_val": 2, "image_size": 32, "max_shapes": 3, "seed": 0}


@dataclass(frozen=True)
class RecipeEnv:
    tiny_dir: Path  # complete tiny checkpoint (model + tokenizer + image processor, coord tokens added)
    shapes_dir: Path  # data/shapes dataset made with SHAPES


def build_recipe_env(root: Path) -> RecipeEnv:
    from data.shapes import make_shapes_dataset
    from model.tiny import build_tiny_checkpoint

    tiny = Path(build_tiny_checkpoint(str(root / "tiny_qwen3vl"), seed=0))
    make_shapes_dataset(root / "shapes", **SHAPES)
    return RecipeEnv(tiny_dir=tiny, shapes_dir=root / "shapes")


def recipe_argv(env: RecipeEnv, config: Path, out_dir: Path, *, name: str, max_steps: int, **sets) -> list[str]:
    """``--config config --set ...`` for a short run writing only under ``out_dir``.

    ``sets`` are extra overrides with ``__`` for ``.`` (``training__save_every=2``); they win
    over the defaults below. Values are written as YAML scalars (``True`` -> ``true``).
    """
    overrides = {
        "run.output_dir": str(out_dir),
        "run.name": name,
        # Both stages load the shared tiny checkpoint (the tiny builder is idempotent on a complete dir).
        "model.name_or_path": None,
        "model.tiny.enabled": True,
        "model.tiny.dir": str(env.tiny_dir),
        # the schema defaults, whatever a demo sets: every recipe test shares one checkpoint (a
        # different model.tiny.* would rebuild it between tests)
        "model.tiny.max_pixels": 4096,
        "model.tiny.init_std": 0.02,
        "model.tiny.coord_init": "hf",
        "data.synthetic.enabled": True,
        "data.synthetic.out_dir": str(env.shapes_dir),
        **{f"data.synthetic.{k}": v for k, v in SHAPES.items()},
        "training.max_steps": max_steps,
        "training.warmup_steps": 0,
        "rollout_matching.decoding.max_new_tokens": 8,
        "rollout_matching.decoding.batch_size": 2,
        "eval.max_samples": 1,
        "eval.batch_size": 1,
    }
    overrides.update({k.replace("__", "."): v for k, v in sets.items()})
    argv = ["--config", str(config)]
    for key, value in overrides.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif value is None:
            value = "null"
        argv += ["--set", f"{key}={value}"]
    return argv


def read_rows(run_dir: Path) -> list[dict]:
    """``metrics.jsonl`` of a run, one dict per line."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


ROLLOUT_PAYLOAD = (
    "rollout/gt_objects_total",
    "rollout/valid_pred_objects_total",
    "rollout/fp_total",
    "rollout/fn_total",
    "rollout/matched_total",
    "rollout/gt_per_sample",
    "rollout/pred_per_sample",
    "rollout/precision",
    "rollout/recall",
    "rollout/f1",
    "rollout/parse_valid_rate",
)
STAGE2_ROUTER_KEYS = ("stage2/b_ratio_realized", "stage2/channel_a_count", "stage2/channel_b_count")


def check_log_row(row: Mapping[str, Any]) -> None:
    """Contract check of one emitted row (e.g. a ``metrics.jsonl`` line): every key but ``step``
    passes ``training.aggregator.check_metric_key`` and none is internal. Raises ``ValueError`` naming the key."""
    from training.aggregator import check_metric_key

    for key in row:
        if key == "step":
            continue
        if check_metric_key(key) == "internal":
            raise ValueError(f"metric key {key!r} is internal (last segment starts with '_') and must never be logged")


def assert_metrics_contract(rows: list[dict]) -> None:
    """Every emitted key of every ``metrics.jsonl`` row meets docs/training/METRICS_LOSSES.md naming rules."""
    import re

    from training.aggregator import KEY_CLASSES, check_metric_key

    assert rows, "no metrics rows"
    counter_suffix = re.compile(r"_(total|count|sum|num|den)$")
    for row in rows:
        check_log_row(row)  # raises naming the offending key
        for key, value in row.items():
            if key == "step":
                continue
            assert check_metric_key(key) in KEY_CLASSES
            assert check_metric_key(key) != "internal", key
            assert not key.rsplit("/", 1)[-1].startswith("_"), key
            assert "loss_" not in key and not re.search(r"_loss(/|$)", key), f"alias spelling {key}"
            if key.startswith("loss/"):
                assert not counter_suffix.search(key), f"loss key with a counter suffix: {key}"
            assert finite(value), f"step {row['step']}: {key}={value!r} is not a finite float"
        assert any(k.startswith("time/") for k in row), f"step {row['step']}: no time/* key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, argv: list[str], cwd, *, config_file: Path | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch`` of a recipe on 2 CPU processes (gloo); asserts it exits 0.

    Without ``config_file``: plain DDP (``--multi_gpu``). With one (``configs/accelerate/fsdp.yaml``) the
    file is used as shipped; only the process count and a free rendezvous port are given on the
    command line (``training.mixed_precision`` of the CoordExp config decides the precision).
    """
    engine = ["--config_file", str(config_file)] if config_file is not None else [
        "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_processes", "2",
           "--main_process_port", str(_free_port()), str(REPO / script), *argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    engine_name = config_file.name if config_file is not None else "DDP"
    assert proc.returncode == 0, f"{script} under {engine_name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


class SimulatedCrash(Exception):
    """Stands in for a killed job."""


def crash_on_pipeline_call(monkeypatch, n_call: int, exc: Exception | None = None) -> None:
    """Make the objective pipeline (``PipelineExecutor.run``, one call per micro-step inside the
    TrainingWrapper's forward) raise ``exc`` (default :class:`SimulatedCrash`) on its ``n_call``-th
    call; earlier calls run normally."""
    from pipeline.executor import PipelineExecutor

    calls = {"n": 0}
    real_run = PipelineExecutor.run

    def crashing(self, ctx):
        calls["n"] += 1
        if calls["n"] == n_call:
            raise exc if exc is not None else SimulatedCrash(f"PipelineExecutor.run call {n_call}")
        return real_run(self, ctx)

    monkeypatch.setattr(PipelineExecutor, "run", crashing)
