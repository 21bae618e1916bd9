"""Multi-node set-up: which rank writes the files a recipe creates on first use (docs/SCALING.md "Multi-node").

The ordering tests run 4 "ranks" as threads of one process (2 nodes x 2 local ranks) around a real
barrier, so the interleaving is the one every process of a launch would see.
"""

from __future__ import annotations

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
    caches = list((runs / "shapes" / ".coordexp_cache").iterdir())
    assert len(caches) == 2 and all((c / "report.json").is_file() for c in caches)  # train + val, built once
    launch("train_stage2.py", ["--config", str(DEMO / "stage2_shapes.yaml"), *_sets(
        *SHORT, "model.name_or_path=runs/demo_stage1/checkpoint-2/model")], tmp_path, config_file=config_file)
    assert [r["step"] for r in read_rows(runs / "demo_stage2")] == [1, 2]
