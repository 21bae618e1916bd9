"""Long end-to-end runs (``pytest -m slow tests/test_recipe_slow.py``): the real demo configs, and
2-process DDP (CPU gloo through ``accelerate launch``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import train_stage1
import train_stage2
from configs import load_config
from tests._recipe_helpers import (
    REPO,
    ROLLOUT_PAYLOAD,
    STAGE1_DEMO,
    STAGE2_ALIGNED_DEMO,
    STAGE2_DEMO,
    _free_port,
    assert_metrics_contract,
    finite,
    launch,
    read_rows,
    recipe_argv,
)
from training.checkpoint import list_checkpoints
from training.router import is_rollout_step


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.slow
def test_demo_configs_end_to_end(tmp_path, monkeypatch):
    """configs/demo/stage1_shapes.yaml, then both Stage-2 demos from its checkpoint.

    Only paths are overridden (all under tmp); every training knob is the demo's own.
    """
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    paths = ["--set", f"run.output_dir={runs}", "--set", f"data.synthetic.out_dir={tmp_path / 'shapes'}"]
    train_stage1.main(["--config", str(STAGE1_DEMO), *paths, "--set", f"model.tiny.dir={tmp_path / 'tiny'}"])
    rows = read_rows(runs / "demo_stage1")
    demo = load_config(STAGE1_DEMO).training
    assert [r["step"] for r in rows] == list(range(1, demo.max_steps + 1))
    assert_metrics_contract(rows)
    k = len(rows) // 10
    first, last = _mean([r["loss/total"] for r in rows[:k]]), _mean([r["loss/total"] for r in rows[-k:]])
    assert last < first, f"Stage-1 demo did not learn: mean loss/total first 10% {first:.4f}, last 10% {last:.4f}"
    evals = list(range(demo.eval_every, demo.max_steps + 1, demo.eval_every))
    assert [r["step"] for r in rows if "eval/rollout/mAP" in r] == evals
    ckpt = runs / "demo_stage1" / f"checkpoint-{demo.max_steps}" / "model"
    assert (ckpt / "config.json").is_file()

    stage2_paths = [*paths, "--set", f"model.name_or_path={ckpt}"]
    train_stage2.main(["--config", str(STAGE2_DEMO), *stage2_paths])
    rows2 = read_rows(runs / "demo_stage2")
    assert [r["step"] for r in rows2] == list(range(1, 21))
    assert_metrics_contract(rows2)
    for row in rows2:
        assert row["stage2/channel_b_count"] == float(is_rollout_step(row["step"] - 1, 0.5))
        assert finite(row["loss/total"])
    assert rows2[-1]["stage2/b_ratio_realized"] == pytest.approx(0.5)
    assert [r["step"] for r in rows2 if "eval/rollout/mAP" in r] == [10, 20]
    # the guard of docs/training/STAGE2_RUNBOOK.md: Stage-2 never writes less valid CoordJSON than Stage-1
    stage1_valid = rows[-1]["eval/rollout/parse_valid_rate"]
    for row in rows2:
        if "eval/rollout/parse_valid_rate" in row:
            assert row["eval/rollout/parse_valid_rate"] >= stage1_valid, (row["step"], stage1_valid)

    train_stage2.main(["--config", str(STAGE2_ALIGNED_DEMO), *stage2_paths])
    rows3 = read_rows(runs / "demo_stage2_rollout_aligned")
    assert [r["step"] for r in rows3] == list(range(1, 11))
    assert_metrics_contract(rows3)
    for row in rows3:
        assert row["stage2/channel_b_count"] == 1
        for key in ROLLOUT_PAYLOAD:
            assert finite(row[key]), (row["step"], key)
    print(f"stage1 demo mean loss/total: first 10% {first:.4f} -> last 10% {last:.4f}")


@pytest.mark.slow
def test_ddp_two_processes_stage1_and_stage2(recipe_env, tmp_path):
    """2 CPU processes (gloo): both recipes finish; metrics.jsonl has exactly one line per step."""
    s1 = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name="ddp_s1", max_steps=3,
                     training__eval_every=0, training__save_every=0)
    launch("train_stage1.py", s1, tmp_path)
    rows = read_rows(tmp_path / "ddp_s1")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert_metrics_contract(rows)
    # Each rank packs its own half of the 8 training records (4 short demo-prompt samples fit one
    # 512-token row, as in the single-process test); counters are summed over the 2 ranks.
    assert all(r["packing/segments_total"] == 8 for r in rows)
    assert (tmp_path / "ddp_s1" / "checkpoint-3" / "rng_1.pt").is_file()

    s2 = recipe_argv(recipe_env, STAGE2_DEMO, tmp_path, name="ddp_s2", max_steps=3,
                     stage2_ab__schedule__b_ratio=0.5, training__eval_every=0, training__save_every=0)
    launch("train_stage2.py", s2, tmp_path)
    rows2 = read_rows(tmp_path / "ddp_s2")
    assert [r["step"] for r in rows2] == [1, 2, 3]
    assert_metrics_contract(rows2)
    assert [r["stage2/channel_b_count"] for r in rows2] == [0.0, 1.0, 0.0]
    for key in ROLLOUT_PAYLOAD:
        assert finite(rows2[1][key]), key


@pytest.mark.slow
def test_ddp_two_processes_lora_stage1(recipe_env, tmp_path):
    """LoRA + coord offsets under 2-process DDP: the run finishes, the checkpoint holds only the adapter,
    and it merges into a model that loads like any other."""
    from model.loading import load_model_and_processors

    argv = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name="ddp_lora", max_steps=2, model__adapter__type="lora",
                       model__adapter__lora__r=4, training__eval_every=0, training__save_every=2)
    launch("train_stage1.py", argv, tmp_path)
    assert [r["step"] for r in read_rows(tmp_path / "ddp_lora")] == [1, 2]
    model_dir = tmp_path / "ddp_lora" / "checkpoint-2" / "model"
    assert (model_dir / "adapter.safetensors").is_file() and not (model_dir / "model.safetensors").exists()
    merged = load_model_and_processors(str(model_dir))
    assert not any("lora_" in n for n, _ in merged.model.named_parameters())


@pytest.mark.slow
def test_ddp_sigterm_to_the_launcher_saves_one_checkpoint_on_both_ranks(recipe_env, tmp_path):
    """SIGTERM to `accelerate launch` (what a scheduler sends) while step 2 of 4 runs on 2 gloo ranks:
    the launcher forwards it, both ranks finish step 2, write checkpoint-2 together (both RNG files,
    a verified manifest) and exit 143."""
    from tests.test_recipe_faults import GATED_CHILD, sigterm_in_step_2
    from training.checkpoint import verify_checkpoint

    script = tmp_path / "gated_stage1.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + GATED_CHILD)
    gates = tmp_path / "gates"
    gates.mkdir()
    argv = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name="ddp_term", max_steps=4,
                       training__eval_every=0, training__save_every=0)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(script), *argv,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "GATE_DIR": str(gates)}
    (gates / "go-1").touch()
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = sigterm_in_step_2(proc, gates, timeout=600)
    assert proc.returncode != 0
    assert "stopped by SIGTERM after optimizer step 2 of 4: checkpoint-2 saved" in err, err[-6000:]
    run_dir = tmp_path / "ddp_term"
    assert [r["step"] for r in read_rows(run_dir)] == [1, 2]
    ckpt = run_dir / "checkpoint-2"
    verify_checkpoint(ckpt)
    assert (ckpt / "rng_0.pt").is_file() and (ckpt / "rng_1.pt").is_file()
    assert not (run_dir / "run.lock").exists()


# A rank whose micro-steps after the first optimizer step sleep <GATE_DIR>/sleep seconds (a step made
# slow; the test changes it while the run goes on) and touch <GATE_DIR>/at-<rank>-<call> holding the pid.
SLOW_CHILD = """
import os, sys, time, pathlib
import train_stage1
from pipeline.executor import PipelineExecutor
real = PipelineExecutor.run
gates, rank, accum = pathlib.Path(os.environ["GATE_DIR"]), os.environ["RANK"], int(os.environ["ACCUM"])
calls = [0]
def slow(*args, **kwargs):
    calls[0] += 1
    (gates / f"at-{rank}-{calls[0]}").write_text(str(os.getpid()))
    if calls[0] > accum and (gates / "sleep").exists():
        time.sleep(float((gates / "sleep").read_text()))
    return real(*args, **kwargs)
PipelineExecutor.run = slow
train_stage1.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_ddp_signals_mid_step_save_the_last_completed_step_and_resume_bit_exact(recipe_env, tmp_path):
    """2 gloo ranks under `accelerate launch`, 12 micro-steps per optimizer step. SIGUSR1 to both ranks in
    step 2 (training.on_sigusr1=save_and_continue): checkpoint-1 is written mid-step and training goes on.
    Step 3 is then made slower than the launcher's 30 s SIGTERM->SIGKILL grace (5 s per micro-step);
    SIGTERM to the launcher in it: both ranks drop the partial accumulation, write checkpoint-2 and
    exit before the launcher kills them. Both checkpoints equal the uninterrupted run's bit for bit,
    and resuming from checkpoint-2 ends where the uninterrupted run ends."""
    import signal

    from tests.test_recipe_faults import _wait_for
    from tests.test_recipe_interrupts import same_checkpoint

    accum = 12
    sets = dict(training__eval_every=0, training__save_every=0, training__gradient_accumulation_steps=accum,
                training__on_sigusr1="save_and_continue")
    argv = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name="sig", max_steps=4, **sets)
    script, gates, run_dir = tmp_path / "slow_stage1.py", tmp_path / "gates", tmp_path / "sig"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + SLOW_CHILD)
    gates.mkdir()
    (gates / "sleep").write_text("0.5")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), *argv]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "GATE_DIR": str(gates), "ACCUM": str(accum)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def at(call):
            return all((gates / f"at-{r}-{call}").exists() for r in (0, 1)) or proc.poll() is not None

        _wait_for(lambda: at(accum + 2), "micro-step 2 of step 2", 600)
        for r in (0, 1):  # a scheduler's early warning goes to the ranks themselves
            os.kill(int((gates / f"at-{r}-{accum + 2}").read_text()), signal.SIGUSR1)
        _wait_for(lambda: (run_dir / "checkpoint-1").is_dir() or proc.poll() is not None, "checkpoint-1", 300)
        (gates / "sleep").write_text("5")  # step 3: 12 x 5 s, longer than the launcher's grace
        _wait_for(lambda: at(2 * accum + 2), "micro-step 2 of step 3", 600)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "checkpoint-1 of the last completed optimizer step saved on SIGUSR1; training goes on" in err, err[-6000:]
    assert "stopped by SIGTERM during optimizer step 3 of 4" in err, err[-6000:]
    assert "forcefully exiting" not in err  # the launcher did not have to SIGKILL a rank
    assert [s for s, _ in list_checkpoints(run_dir)] == [1, 2]
    assert not (run_dir / "run.lock").exists()

    launch("train_stage1.py", [*argv, "--set", "training.resume_from=latest"], tmp_path)
    full = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name="full", max_steps=4,
                       **{**sets, "training__save_every": 1})
    launch("train_stage1.py", full, tmp_path)
    for step in (1, 2, 4):
        same_checkpoint(run_dir / f"checkpoint-{step}", tmp_path / "full" / f"checkpoint-{step}")
    untimed = [[{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_rows(d)]
               for d in (run_dir, tmp_path / "full")]
    assert untimed[0] == untimed[1]


# A rank 1 that alone meets a user error in optimizer step 2 (rank 0 then waits in a collective for it).
RANK1_USER_ERROR_CHILD = """
import os, sys
import train_stage1
from configs.errors import ConfigError
from pipeline.executor import PipelineExecutor
from training.faults import run_recipe_cli
real, calls = PipelineExecutor.run, [0]
def failing(*args, **kwargs):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 2:
        raise ConfigError("data.train_jsonl", "rank 1 only: a bad record")
    return real(*args, **kwargs)
PipelineExecutor.run = failing
raise SystemExit(run_recipe_cli(train_stage1.main))
"""


def _launch_raw(script, argv, cwd):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), *argv]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _recipe_lines(err: str) -> list[str]:
    """stderr without the launcher's own lines: its log lines and its final ChildFailedError block."""
    import re

    lines = err.splitlines()
    block = next((i for i, line in enumerate(lines) if line.startswith("Traceback")), len(lines))
    launcher = re.compile(r"^[WEI]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ .*torch/distributed/")
    return [line for line in lines[:block] if line.strip() and not launcher.match(line)]


@pytest.mark.slow
def test_ddp_a_user_error_on_one_rank_is_one_line_and_every_rank_exits_2(recipe_env, tmp_path):
    """Rank 1 alone raises a ConfigError in step 2 while rank 0 waits for it in a collective: the error: line
    is printed once, as the last line of the recipe, no rank prints a traceback (no gloo "Connection closed"),
    both ranks exit 2 (the launcher's report shows it, with our line as the root cause). A config error on
    every rank (before any model load) is printed once too."""
    script = tmp_path / "rank1_user_error.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + RANK1_USER_ERROR_CHILD)
    argv = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name="err", max_steps=3, training__eval_every=0)
    for proc in (_launch_raw(script, argv, tmp_path),
                 _launch_raw(script, [*argv, "--set", "training.lr=-1", "--set", "run.name=cfg"], tmp_path)):
        err = proc.stderr
        assert proc.returncode != 0
        lines = _recipe_lines(err)
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], err[-6000:]
        assert "Traceback" not in "\n".join(lines) and "Connection closed" not in err, err[-6000:]
        assert err.count("Traceback") == 1 and "ChildFailedError" in err  # the launcher's own report, last
        assert err.count("exitcode  : 2 ") == 2, err[-3000:]  # both ranks exit 2
        assert f"traceback : {errors[0]}" in err  # the report's root cause is our line
    assert "rank 1 only: a bad record" in errors[0] or "training.lr" in errors[0]
    assert not (tmp_path / "err" / "run.lock").exists()
