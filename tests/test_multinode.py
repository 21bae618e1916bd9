"""Multi-node set-up: which rank writes the files a recipe creates on first use (docs/SCALING.md "Multi-node").

The ordering tests run 4 "ranks" as threads of one process (2 nodes x 2 local ranks) around a real
barrier, so the interleaving is the one every process of a launch would see.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from training.setup import each_node_first


@dataclass
class FakeRank:
    """The three facts ``each_node_first`` reads, plus a barrier shared by every rank."""

    process_index: int
    local_process_index: int
    barrier: threading.Barrier
    num_processes: int = 4

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def is_local_main_process(self) -> bool:
        return self.local_process_index == 0

    def wait_for_everyone(self) -> None:
        self.barrier.wait(timeout=30)


def _run_ranks(body, nodes: int = 2, per_node: int = 2) -> None:
    barrier = threading.Barrier(nodes * per_node)
    errors: list[BaseException] = []

    def rank(g: int) -> None:
        acc = FakeRank(g, g % per_node, barrier, nodes * per_node)
        try:
            with each_node_first(acc):
                body(acc)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(g,)) for g in range(nodes * per_node)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]


def _build_once(path: Path, log: list, who: int, lock: threading.Lock) -> None:
    """An idempotent builder (like the tiny checkpoint / shapes data / record cache): build if absent."""
    with lock:
        log.append(("enter", who))
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(who))
        with lock:
            log.append(("built", who))


def test_global_rank_0_first_then_each_nodes_local_rank_0_then_the_rest():
    order, lock = [], threading.Lock()

    def body(acc):
        with lock:
            order.append(acc.process_index)

    _run_ranks(body)
    # ranks (global, local): 0 (0), 1 (1) on node 0; 2 (0), 3 (1) on node 1
    assert order[0] == 0
    assert order[1] == 2
    assert sorted(order[2:]) == [1, 3]


@pytest.mark.parametrize("shared", [True, False])
def test_files_are_built_once_per_filesystem(tmp_path, shared):
    """Shared filesystem: global rank 0 builds, node 1 only reads. Node-local disks: each node's local
    rank 0 builds its own copy. Never two writers of one file."""
    log, lock = [], threading.Lock()

    def body(acc):
        node = acc.process_index // 2
        root = tmp_path / "shared" if shared else tmp_path / f"node{node}"
        _build_once(root / "data.txt", log, acc.process_index, lock)

    _run_ranks(body)
    built = [who for what, who in log if what == "built"]
    assert built == ([0] if shared else [0, 2])
    assert sorted(who for what, who in log if what == "enter") == [0, 1, 2, 3]


def test_one_process_runs_the_body_without_barriers():
    ran = []
    with each_node_first(None):
        ran.append(1)
    assert ran == [1]


# ------------------------------------------------------------------ fresh clone, 2 processes

# The demo configs as shipped (10k shapes images: enough for the two ranks to overlap in writing them
# without the ordering), with a 2-step run: every path stays relative (runs/...) under an empty dir.
SHORT = ("training.max_steps=2",
         "training.warmup_steps=0", "training.save_every=2", "training.eval_every=2", "eval.max_samples=2",
         "eval.batch_size=2", "rollout_matching.decoding.max_new_tokens=8", "rollout_matching.decoding.batch_size=2")


def _sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp.yaml", "fsdp.yaml"])
def test_demo_configs_start_on_two_processes_in_an_empty_directory(tmp_path, engine):
    """A fresh clone: no tiny checkpoint, no shapes data, no cache, no run dir. Stage-1 then Stage-2
    of the demo under `accelerate launch --num_processes 2`; every first-use file is made once."""
    from tests._recipe_helpers import DEMO, REPO, launch, read_rows

    config_file = REPO / "configs" / "accelerate" / engine
    launch("train_stage1.py", ["--config", str(DEMO / "stage1_shapes.yaml"), *_sets(*SHORT)], tmp_path,
           config_file=config_file)
    runs = tmp_path / "runs"
    assert [r["step"] for r in read_rows(runs / "demo_stage1")] == [1, 2]
    assert (runs / "demo_stage1" / "checkpoint-2" / "manifest.json").is_file()
    assert (runs / "demo_stage1" / "eval" / "step_2" / "predictions.jsonl").is_file()
    assert (runs / "tiny_qwen3vl" / "tiny_params.json").is_file()
    assert sorted(p.name for p in (runs / "shapes").iterdir()) == [".coordexp_cache", "images", "shapes_params.json",
                                                                   "train.jsonl", "val.jsonl"]
    leftovers = [p for p in runs.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.suffixes]
    assert leftovers == []
    caches = [c for c in (runs / "shapes" / ".coordexp_cache").iterdir() if c.is_dir()]  # and each one's .lock
    assert len(caches) == 2 and all((c / "report.json").is_file() for c in caches)  # train + val, built once
    launch("train_stage2.py", ["--config", str(DEMO / "stage2_shapes.yaml"), *_sets(
        *SHORT, "model.name_or_path=runs/demo_stage1/checkpoint-2/model")], tmp_path, config_file=config_file)
    assert [r["step"] for r in read_rows(runs / "demo_stage2")] == [1, 2]


# ------------------------------------------------------------------ two nodes, simulated

ENGINES = {"ddp": "ddp.yaml", "fsdp": "fsdp.yaml"}
COMPARED = ("loss/", "train/grad_norm", "train/lr", "coord_diag/", "rollout/", "stage2/channel")


def _compared(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith(COMPARED)}


def _node_argv(config: Path, out_dir: Path, name: str, *, inputs: str = "runs", max_steps: int = 4,
               **sets) -> list[str]:
    """A small recipe run whose tiny checkpoint and shapes data live under ``inputs`` (relative: each
    node's own working directory; absolute: one shared folder) and whose run dir is ``out_dir/name``."""
    from tests._recipe_helpers import SHAPES

    overrides = {
        "run.output_dir": str(out_dir), "run.name": name, "model.name_or_path": "null",
        "model.tiny.enabled": "true", "model.tiny.dir": f"{inputs}/tiny_qwen3vl", "model.tiny.max_pixels": 4096,
        "model.tiny.init_std": 0.02, "model.tiny.coord_init": "hf",
        "data.synthetic.enabled": "true", "data.synthetic.out_dir": f"{inputs}/shapes",
        **{f"data.synthetic.{k}": v for k, v in SHAPES.items()},
        "training.max_steps": max_steps, "training.warmup_steps": 0, "training.save_every": 2,
        "training.eval_every": 0, "rollout_matching.decoding.max_new_tokens": 8,
        "rollout_matching.decoding.batch_size": 2, "eval.max_samples": 1, "eval.batch_size": 1,
    }
    overrides.update({k.replace("__", "."): v for k, v in sets.items()})
    return ["--config", str(config), *_sets(*(f"{k}={v}" for k, v in overrides.items()))]


def launch_two_nodes(script: str, argv: list[str], node_dirs: list[Path], *, config_file: Path,
                     expect_ok: bool = True) -> list[str]:
    """``accelerate launch --num_machines 2 --machine_rank {0,1} --main_process_ip 127.0.0.1`` with one
    process per "node", each in its own working directory; returns each node's output (``<node>-<k>.log``
    beside its directory)."""
    import os
    import subprocess
    import sys

    from tests._recipe_helpers import REPO, _free_port

    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    procs, logs = [], []
    for rank, cwd in enumerate(node_dirs):
        cwd.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
               "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", port, "--num_processes", "2", str(REPO / script), *argv]
        # output to files, not pipes: a node blocked on a full pipe would stall the other in a collective
        logs.append(cwd.parent / f"{cwd.name}-{len(list(cwd.parent.glob(cwd.name + '-*.log')))}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
    try:
        for p in procs:
            p.wait(timeout=900)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = [log.read_text() for log in logs]
    if expect_ok:
        for rank, (p, err) in enumerate(zip(procs, outs)):
            assert p.returncode == 0, f"{script} node {rank} failed:\n{err[-6000:]}"
    return outs


def _assert_equal_runs(single: list[dict], multi: list[dict], resumed: list[dict], *, max_steps: int, at: int):
    import torch

    assert [r["step"] for r in single] == [r["step"] for r in multi] == list(range(1, max_steps + 1))
    assert [r["step"] for r in resumed] == list(range(at + 1, max_steps + 1))
    for a, b in zip(single, multi):
        assert sorted(_compared(a)) == sorted(_compared(b)), a["step"]
        # the same 2 gloo ranks, the same reduce order: only the rendezvous differs
        torch.testing.assert_close(_compared(b), _compared(a), rtol=1e-6, atol=1e-7,
                                   msg=lambda m, step=a["step"]: f"step {step}: {m}")
    for a, b in zip(multi[at:], resumed):
        assert _compared(b) == _compared(a), f"step {a['step']}: resumed run differs from the uninterrupted run"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_nodes_equal_one_node_step_for_step_and_resume_exactly(tmp_path, engine, stage):
    """Two simulated nodes (node-local tiny checkpoint, shapes data and record cache under each node's
    working directory; one shared output dir) give the single-node 2-process losses step for step
    (Stage-2: Two-Channel, both channels), and a two-node resume from checkpoint-2 continues exactly."""
    from tests._recipe_helpers import REPO, STAGE1_DEMO, STAGE2_DEMO, launch, read_rows

    config_file = REPO / "configs" / "accelerate" / ENGINES[engine]
    script, config = ("train_stage1.py", STAGE1_DEMO) if stage == "stage1" else ("train_stage2.py", STAGE2_DEMO)
    shared, nodes = tmp_path / "shared", [tmp_path / "node0", tmp_path / "node1"]
    (tmp_path / "single").mkdir()
    launch(script, _node_argv(config, shared, "single"), tmp_path / "single", config_file=config_file)
    launch_two_nodes(script, _node_argv(config, shared, "multi"), nodes, config_file=config_file)
    multi = read_rows(shared / "multi")
    run = shared / "multi"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in (run / "checkpoint-4").glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]
    # a resume continues in its own run dir: back to checkpoint-2 as if the job had stopped there
    shutil.rmtree(run / "checkpoint-4")
    launch_two_nodes(script, _node_argv(config, shared, "multi", training__resume_from="latest"), nodes,
                     config_file=config_file)
    resumed = read_rows(run)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    _assert_equal_runs(read_rows(shared / "single"), multi, resumed[2:], max_steps=4, at=2)
    # Node-local inputs: each node built its own copy once (its local rank 0); the shared dir holds only runs.
    for node in nodes:
        assert (node / "runs" / "tiny_qwen3vl" / "model.safetensors").is_file()
        assert (node / "runs" / "shapes" / "train.jsonl").is_file()
        assert len(list((node / "runs" / "shapes" / ".coordexp_cache").glob("*/lengths-*.npy"))) == 1
        assert sorted(p.name for p in (node / "runs").iterdir()) == ["shapes", "tiny_qwen3vl"]  # no run dir
    assert sorted(p.name for p in shared.iterdir()) == ["multi", "single"]
    assert not (run / "run.lock").exists()


@pytest.mark.slow
def test_two_nodes_read_shared_inputs_and_honour_the_run_lock(tmp_path):
    """Inputs on a filesystem both nodes see: global rank 0 builds them, node 1 only reads them (no
    copy under either working directory). A run lock held from another host refuses both nodes."""
    import json

    from tests._recipe_helpers import REPO, STAGE1_DEMO, read_rows

    ddp = REPO / "configs" / "accelerate" / "ddp.yaml"
    shared, nodes = tmp_path / "shared", [tmp_path / "node0", tmp_path / "node1"]
    argv = _node_argv(STAGE1_DEMO, shared / "out", "multi", inputs=str(shared / "inputs"), max_steps=2)
    launch_two_nodes("train_stage1.py", argv, nodes, config_file=ddp)
    assert [r["step"] for r in read_rows(shared / "out" / "multi")] == [1, 2]
    assert (shared / "inputs" / "tiny_qwen3vl" / "model.safetensors").is_file()
    assert len(list((shared / "inputs" / "shapes" / ".coordexp_cache").glob("*/lengths-*.npy"))) == 1
    assert [list(node.iterdir()) for node in nodes] == [[], []]

    lock = shared / "out" / "locked" / "run.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": 4242, "host": "another-node", "started": "then", "token": "x"}) + "\n")
    argv = _node_argv(STAGE1_DEMO, shared / "out", "locked", inputs=str(shared / "inputs"), max_steps=2)
    errs = launch_two_nodes("train_stage1.py", argv, nodes, config_file=ddp, expect_ok=False)
    assert "in use by another training run: pid 4242 on host another-node" in errs[0]
    assert json.loads(lock.read_text())["pid"] == 4242  # untouched
    assert sorted(p.name for p in lock.parent.iterdir()) == ["run.lock"]


# ------------------------------------------------------------------ SLURM (fake), two nodes

def _sbatch(stage_script: Path, sets: list[str], tmp_path: Path, *, run_env: dict) -> subprocess.Popen:
    """``bash scripts/slurm/stage1.sbatch --set ...`` under a fake SLURM (tests/fixtures/fake_slurm: srun
    starts one task per node in ``<tmp>/nodes/node<i>``, scontrol requeue is recorded)."""
    import os

    from tests._recipe_helpers import REPO, _free_port

    fixtures = REPO / "tests" / "fixtures"
    env = {**os.environ, "PATH": f"{fixtures / 'fake_slurm'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[0-1]",
           "SLURM_SUBMIT_DIR": str(REPO), "FAKE_SLURM_NODES": str(tmp_path / "nodes"), "GPUS_PER_NODE": "1",
           "MAIN_PORT": str(_free_port()), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **run_env}
    with open(tmp_path / f"job-{len(list(tmp_path.glob('job-*.log')))}.log", "w") as log:
        return subprocess.Popen(["bash", str(stage_script), *sets], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_slurm_template_saves_on_the_warning_requeues_and_resumes_like_the_uninterrupted_run(tmp_path):
    """scripts/slurm/stage1.sbatch on 2 fake nodes: SIGUSR1 (the `--signal=B:USR1@...` warning) while
    step 2 runs -> every rank saves checkpoint-2 and stops, the job requeues itself; the restarted job
    (SLURM_RESTART_COUNT=1) resumes with training.resume_from=latest and equals the uninterrupted run."""
    import os
    import signal
    import time

    from tests._recipe_helpers import REPO, STAGE1_DEMO, read_rows

    sbatch = REPO / "scripts" / "slurm" / "stage1.sbatch"
    shared, gates = tmp_path / "shared", tmp_path / "gates"
    gates.mkdir()
    base = {"CONFIG": str(STAGE1_DEMO)}

    def sets(name):
        return _node_argv(STAGE1_DEMO, shared, name, max_steps=4)[2:]  # the sbatch passes --config itself

    gate_path = os.pathsep.join([str(REPO / "tests" / "fixtures" / "slurm_gate"), str(REPO)])
    job = _sbatch(sbatch, sets("slurm"), tmp_path, run_env={**base, "GATE_DIR": str(gates), "GATE_AT": "2",
                                                             "PYTHONPATH": gate_path})
    try:
        deadline = time.monotonic() + 600
        while not all((gates / f"at-{r}").exists() for r in (0, 1)):
            assert job.poll() is None, (tmp_path / "job-0.log").read_text()[-6000:]
            assert time.monotonic() < deadline, "the ranks never reached step 2"
            time.sleep(0.1)
        job.send_signal(signal.SIGUSR1)  # SLURM signals the batch shell only (B:)
        assert job.wait(timeout=600) == 0, (tmp_path / "job-0.log").read_text()[-6000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    log = (tmp_path / "job-0.log").read_text()
    assert (tmp_path / "nodes" / "requeued").read_text().split() == ["4242"], log[-4000:]
    assert "stopped by SIGTERM after optimizer step 2 of 4: checkpoint-2 saved" in log
    run = shared / "slurm"
    assert [r["step"] for r in read_rows(run)] == [1, 2] and (run / "checkpoint-2" / "manifest.json").is_file()
    assert not (run / "run.lock").exists()

    resumed = _sbatch(sbatch, sets("slurm"), tmp_path, run_env={**base, "SLURM_RESTART_COUNT": "1"})
    assert resumed.wait(timeout=600) == 0, (tmp_path / "job-1.log").read_text()[-6000:]
    assert "resuming from the latest checkpoint" in (tmp_path / "job-1.log").read_text()
    full = _sbatch(sbatch, sets("full"), tmp_path, run_env=base)
    assert full.wait(timeout=600) == 0, (tmp_path / "job-2.log").read_text()[-6000:]
    a, b = read_rows(shared / "full"), read_rows(run)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert _compared(y) == _compared(x), f"step {x['step']}: the requeued run differs from the uninterrupted one"


def test_a_requeued_slurm_job_takes_over_its_earlier_runs_lock_from_another_host(tmp_path, monkeypatch):
    """A job killed at its time limit leaves run.lock naming a host it no longer has; its requeued run
    (same SLURM_JOB_ID, higher SLURM_RESTART_COUNT, any node) takes it over. Another job is refused."""
    import json

    from training.faults import RunLockedError, acquire_run_lock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / "run.lock"

    def held_by(job: str | None, restart: int) -> None:
        slurm = {"slurm_job": job, "slurm_restart": restart} if job else {}
        lock.write_text(json.dumps({"pid": 77, "host": "node-gone", "started": "then", "token": "t", **slurm}))

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    held_by("4242", 0)
    taken = acquire_run_lock(run_dir)
    assert json.loads(lock.read_text())["slurm_restart"] == 1
    taken.release()
    for job, restart in (("999", 0), ("4242", 1), (None, 0)):  # another job, the same run, no SLURM at all
        held_by(job, restart)
        with pytest.raises(RunLockedError, match="pid 77 on host node-gone"):
            acquire_run_lock(run_dir)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_sbatch_templates_warn_requeue_and_run_their_trainer(stage):
    """Both templates: valid bash, one task per node, the early-warning signal to the batch shell, requeue,
    and job.sh with their stage's trainer (the launch logic itself runs in the fake-SLURM test above)."""
    from tests._recipe_helpers import REPO

    slurm = REPO / "scripts" / "slurm"
    text = (slurm / f"{stage}.sbatch").read_text()
    for directive in ("--ntasks-per-node=1", "--signal=B:USR1@", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {directive}" in text, directive
    assert f'scripts/slurm/job.sh" train_{stage}.py --config "$CONFIG" "$@"' in text
    for script in (f"{stage}.sbatch", "job.sh", "node.sh"):
        assert subprocess.run(["bash", "-n", str(slurm / script)]).returncode == 0, script
