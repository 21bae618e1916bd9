"""Tracker (metrics.jsonl always, wandb offline), progress bar and set-up helpers."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch

from training.progress import TrainProgress
from training.setup import log_run_header, make_accelerator, make_run_dir, run_dir_in_use, setup_logging
from training.tracking import Tracker, read_metrics


@pytest.fixture
def fresh_accelerate_state():
    """Accelerator state is a process-wide singleton: leave none behind for other test files."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_metrics_jsonl_one_line_per_step(tmp_path):
    tracker = Tracker(tmp_path / "run", backend="none", config={"run": {"seed": 1}})
    tracker.log(1, {"loss/total": torch.tensor(0.5), "rollout/fp_total": 3, "lr": 1e-5})
    tracker.log(2, {"loss/total": float("nan")})
    tracker.log_config({"pipeline": {"checksum": "abc"}})
    tracker.finish()
    tracker.finish()  # idempotent
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "loss/total": 0.5, "lr": 1e-5, "rollout/fp_total": 3}
    assert list(json.loads(lines[0])) == ["step", "loss/total", "lr", "rollout/fp_total"]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[1]["step"] == 2 and math.isnan(rows[1]["loss/total"])  # NaN kept, not dropped
    cfg = json.loads((tmp_path / "run" / "tracker_config.json").read_text())
    assert cfg == {"run": {"seed": 1}, "pipeline": {"checksum": "abc"}}
    with pytest.raises(RuntimeError, match="after finish"):
        tracker.log(3, {"loss/total": 1.0})


def test_resume_appends(tmp_path):
    for step in (1, 2):
        t = Tracker(tmp_path)
        t.log(step, {"loss/total": float(step)})
        t.finish()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_non_main_process_writes_nothing(tmp_path):
    t = Tracker(tmp_path / "r", is_main_process=False, backend="wandb")  # wandb never imported off main
    t.log(1, {"loss/total": 1.0})
    t.log_config({"a": 1})
    t.finish()
    assert not (tmp_path / "r").exists()


def test_tracker_errors(tmp_path):
    t = Tracker(tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        t.log(1, {"step": 1})
    with pytest.raises(TypeError, match="number"):
        t.log(1, {"loss/total": object()})
    t.finish()
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_metrics(tmp_path / "bad.jsonl")


def test_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")  # restored by monkeypatch after the Tracker sets it
    t = Tracker(tmp_path, backend="wandb", mode="offline", project="p", run_name="demo", config={"seed": 3}, tags=["t"])
    calls = []
    real_log = t._wandb_run.log

    def spy(row, step=None):
        calls.append((dict(row), step))
        real_log(row, step=step)

    monkeypatch.setattr(t._wandb_run, "log", spy)
    t.log(1, {"loss/total": 0.25})
    assert calls == [({"loss/total": 0.25}, 1)]
    t.log_config({"pipeline": {"checksum": "abc"}})
    assert t._wandb_run.config["pipeline"] == {"checksum": "abc"}
    assert t._wandb_run.config["seed"] == 3
    assert t._wandb_run.offline
    t.finish()
    # the offline run lives under the run dir (its record file is written asynchronously by wandb's service)
    assert len(list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss/total": 0.25}]
    # a resumed run (same run dir) continues the same wandb run
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    again = Tracker(tmp_path, backend="wandb", mode="offline", project="p", run_name="demo")
    assert again._wandb_run.id == run_id
    again.finish()


def test_wandb_env_wins_over_the_config(tmp_path, monkeypatch):
    """WANDB_MODE=offline runs offline although the config says online (no API key needed)."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    t = Tracker(tmp_path, backend="wandb", mode="online", project="from-config", run_name="demo")
    assert t._wandb_run.offline and t._wandb_run.project == "from-env"
    t.finish()


def test_wandb_init_failure_is_a_user_error_with_the_fix(tmp_path, monkeypatch):
    import wandb

    from configs.errors import UserError

    def no_key(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(wandb, "init", no_key)
    with pytest.raises(UserError, match="mode online.*No API key configured.*WANDB_MODE=offline"):
        Tracker(tmp_path, backend="wandb", mode="online")


# ------------------------------------------------------------------ progress


def test_progress_postfix_and_disabled_off_main(capsys):
    bar = TrainProgress(total=10, initial=2, is_main_process=False)
    postfix = bar.update(3, loss=0.123456, lr=1e-5, tokens=100)
    assert postfix["loss"] == "0.1235" and postfix["lr"] == "1.00e-05"
    assert float(postfix["tok/s"]) > 0
    bar.close()
    assert capsys.readouterr().err == ""
    on_main = TrainProgress(total=3, is_main_process=True, terminal=True)
    on_main.update(1, loss=1.0, lr=0.1, tokens=5)
    on_main.close()
    assert "loss=1.0000" in capsys.readouterr().err


def test_progress_off_a_terminal_prints_one_plain_line_every_log_every_steps(capsys):
    """A log file gets no carriage-return bar frames: one line per run.log_every steps, and the last step."""
    progress = TrainProgress(total=25, is_main_process=True, refresh_every=10, desc="stage1")  # stderr: not a TTY here
    assert progress.terminal is False
    for step in range(1, 26):
        progress.update(step, loss=2.0 / step, lr=1e-4, tokens=10)
    progress.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split()[2] for line in lines] == ["10/25", "20/25", "25/25"]
    assert lines[0].startswith("stage1 step 10/25 loss=0.2000 lr=1.00e-04 tok/s=")


# --------------------------------------------------------------------- setup


def test_make_accelerator_seeds_and_validates(fresh_accelerate_state):
    acc = make_accelerator("no", gradient_accumulation_steps=2, seed=7, cpu=True)
    assert acc.gradient_accumulation_steps == 2 and acc.num_processes == 1
    assert acc.step_scheduler_with_optimizer is False  # schedules count optimizer steps
    a = torch.rand(3)
    make_accelerator("no", 1, seed=7, cpu=True)
    assert torch.equal(a, torch.rand(3))
    with pytest.raises(ValueError, match="training.mixed_precision"):
        make_accelerator("fp8")


@pytest.fixture
def restore_coordexp_logger():
    logger = logging.getLogger("coordexp")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for handler in logger.handlers:
        handler.close()
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_run_dir_and_logging(tmp_path, restore_coordexp_logger):
    run_dir = make_run_dir(tmp_path, "exp1")
    assert run_dir.is_dir() and make_run_dir(tmp_path, "exp1") == run_dir
    (run_dir / "metrics.jsonl").write_text("")  # died before its first logged step: holds no run
    assert run_dir_in_use(run_dir) is None
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    err = run_dir_in_use(run_dir)
    assert isinstance(err, FileExistsError) and "logged steps in metrics.jsonl, no checkpoint" in str(err)
    assert "resume_from" not in str(err)
    (run_dir / "checkpoint-1").mkdir()
    (run_dir / "checkpoint-1" / "trainer_state.json").write_text("{}")
    assert re.search(r"\(checkpoint-1\).*resume it with --set training.resume_from=latest", str(run_dir_in_use(run_dir)))
    logger = setup_logging(run_dir)
    identity = {"objective": [{"name": "token_ce"}], "checksum": "deadbeef"}
    log_run_header(logger, config_path="configs/demo/x.yaml", run_name="exp1", seed=5, pipeline_identity=identity)
    for handler in logger.handlers:
        handler.flush()
    text = (run_dir / "train.log").read_text()
    assert "configs/demo/x.yaml" in text and "exp1" in text and "seed: 5" in text and "deadbeef" in text
    setup_logging(None)  # drop the file handler so tmp_path can be removed cleanly
    assert logging.getLogger("coordexp").handlers and all(
        not isinstance(h, logging.FileHandler) for h in logging.getLogger("coordexp").handlers
    )


def test_prepared_scheduler_counts_optimizer_steps(fresh_accelerate_state):
    from torch import nn

    from training.optim import build_optimizer, build_scheduler

    acc = make_accelerator("no", gradient_accumulation_steps=2, seed=0, cpu=True)
    model = nn.Linear(2, 1)
    opt = build_optimizer(model, lr=1.0)
    sched = build_scheduler(opt, "linear", max_steps=4)
    model, opt, sched = acc.prepare(model, opt, sched)
    for _ in range(4):  # 4 micro-steps = 2 optimizer steps
        with acc.accumulate(model):
            acc.backward(model(torch.ones(1, 2)).sum())
            opt.step()
            opt.zero_grad()
        if acc.sync_gradients:
            sched.step()
    assert sched.scheduler.last_epoch == 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # linear: 1 - 2/4


def _row(step):
    return json.dumps({"step": step, "loss/total": float(step)}) + "\n"


def test_resume_drops_everything_after_the_resume_point_whatever_it_holds(tmp_path, capsys):
    """A torn last line (kill or full disk mid-write) and garbage bytes after the resume point are
    dropped with the lines of the later steps; nothing before it is touched."""
    from training.setup import setup_logging
    from training.tracking import truncate_metrics_after

    setup_logging()
    path = tmp_path / "metrics.jsonl"
    path.write_bytes((_row(1) + _row(2) + _row(3) + _row(4)[:9]).encode() + b"\xff\xfe garbage\n" + b'{"step": 5')
    assert truncate_metrics_after(path, 3) == 2
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert "WARNING" not in capsys.readouterr().err


def test_resume_reports_a_bad_line_before_the_resume_point_and_goes_on(tmp_path, capsys):
    from training.setup import setup_logging
    from training.tracking import truncate_metrics_after

    setup_logging()
    path = tmp_path / "metrics.jsonl"
    path.write_text(_row(1) + '{"step": 2, "loss/tot\n' + _row(3) + _row(4) + _row(5))
    assert truncate_metrics_after(path, 4) == 1
    assert [r["step"] for r in read_metrics(path)] == [1, 3, 4]
    err = capsys.readouterr().err
    assert f"{path}:2: not a metrics row (torn or corrupted line), dropped" in err
    # a resume point whose own line was lost: the gap is reported, later lines dropped
    path.write_text(_row(1) + _row(2) + "{torn\n" + _row(4))
    assert truncate_metrics_after(path, 3) == 2
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert "no line for step(s) 3-3 before the resume point" in capsys.readouterr().err
