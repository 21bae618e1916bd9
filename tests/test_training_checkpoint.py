"""Checkpoint save / load round trip on a tiny nn.Linear, rotation and latest lookup."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from training.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    get_rng_state,
    list_checkpoints,
    load_training_state,
    resolve_resume,
    save_training_state,
    set_rng_state,
    verify_checkpoint,
)
from training.optim import build_optimizer, build_scheduler
from training.router import ChannelRouter


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, lr=0.1, weight_decay=0.01)
    sched = build_scheduler(opt, "cosine", warmup_steps=2, max_steps=20)
    return model, opt, sched


def _train_step(model, opt, sched):
    """One step whose data comes from all three RNGs, so any unrestored stream changes the loss."""
    x = torch.randn(4, 3) + float(np.random.rand()) + random.random()
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def _saver(model):
    def save(model_dir):
        torch.save(model.state_dict(), model_dir / "weights.pt")

    return save


def test_save_load_resume_is_exact(tmp_path):
    model, opt, sched = _setup()
    router = ChannelRouter(0.5)
    for s in range(3):
        _train_step(model, opt, sched)
        router.record(s, router.channel_for(s))
    ckpt = save_training_state(
        tmp_path,
        model_save_fn=_saver(model),
        optimizer=opt,
        scheduler=sched,
        step=3,
        data_state={"epoch": 0, "position": 12},
        router_state=router.state_dict(),
        extra={"note": "x"},
    )
    assert ckpt == tmp_path / "checkpoint-3"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "manifest.json",
        "model",
        "optimizer.pt",
        "rng_0.pt",
        "scheduler.pt",
        "trainer_state.json",
    ]
    expected_losses = [_train_step(model, opt, sched) for _ in range(3)]
    expected_state = {k: v.clone() for k, v in model.state_dict().items()}

    # mutate everything, then resume into fresh objects
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    model2, opt2, sched2 = _setup(seed=99)
    state = load_training_state(ckpt, opt2, sched2)
    model2.load_state_dict(torch.load(state.model_dir / "weights.pt"))
    assert state.step == 3
    assert state.data_state == {"epoch": 0, "position": 12}
    assert state.extra == {"note": "x"}
    assert state.world_size == 1
    router2 = ChannelRouter(0.5)
    router2.load_state_dict(state.router_state)
    assert router2.state_dict() == router.state_dict()
    assert sched2.last_epoch == 3
    assert opt2.param_groups[0]["lr"] == pytest.approx(sched.lr_lambdas[0](3) * 0.1)

    losses = [_train_step(model2, opt2, sched2) for _ in range(3)]
    assert losses == expected_losses  # bit-exact: optimizer moments, lr and RNG all restored
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected_state[k])


def test_rng_state_round_trip_all_streams():
    state = get_rng_state()
    a = (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(2))
    set_rng_state(state)
    b = (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(2))
    assert a[:3] == b[:3] and torch.equal(a[3], b[3])


def test_rotation_latest_and_incomplete_dirs(tmp_path):
    model, opt, sched = _setup()
    kw = {"model_save_fn": _saver(model), "optimizer": opt, "scheduler": sched, "data_state": {}}
    for step in (2, 4, 10):
        save_training_state(tmp_path, step=step, save_total_limit=2, **kw)
    # numeric order, not string order: 10 > 4
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 10]
    (tmp_path / "checkpoint-20.tmp").mkdir()  # crashed save
    (tmp_path / "checkpoint-30").mkdir()  # no trainer_state.json: incomplete
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert find_latest_checkpoint(tmp_path / "nope") is None
    # re-saving a step replaces it
    save_training_state(tmp_path, step=10, save_total_limit=None, **kw)
    assert json.loads((tmp_path / "checkpoint-10" / "trainer_state.json").read_text())["step"] == 10
    assert not (tmp_path / "checkpoint-10.tmp").exists()


def test_errors(tmp_path):
    model, opt, sched = _setup()
    kw = {"model_save_fn": _saver(model), "optimizer": opt, "scheduler": sched}
    with pytest.raises(TypeError):
        save_training_state(tmp_path, step=1, data_state={"bad": object()}, **kw)
    assert not (tmp_path / "checkpoint-1.tmp").exists()  # failed before touching disk
    with pytest.raises(ValueError, match="save_total_limit"):
        save_training_state(tmp_path, step=1, data_state={}, save_total_limit=0, **kw)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_training_state(tmp_path / "checkpoint-77", opt, sched)
    ckpt = save_training_state(tmp_path, step=2, data_state={}, **kw)
    (ckpt / "rng_0.pt").unlink()
    with pytest.raises(FileNotFoundError, match="restore_rng=False"):
        load_training_state(ckpt, opt, sched)
    assert load_training_state(ckpt, opt, sched, restore_rng=False).step == 2


# ------------------------------------------------------ manifest / corruption


def _two_checkpoints(tmp_path):
    model, opt, sched = _setup()
    kw = {"model_save_fn": _saver(model), "optimizer": opt, "scheduler": sched, "data_state": {}}
    for step in (1, 2):
        _train_step(model, opt, sched)
        save_training_state(tmp_path, step=step, **kw)
    return tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"


def _garbage_in_the_middle(path, n=4096):
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(max(size // 2 - n // 2, 0))
        fh.write(b"\xab" * min(n, size))
    assert path.stat().st_size == size  # same size: only the checksum can tell


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _invalid_json(path):
    path.write_text("{not json")


@pytest.mark.parametrize(
    ("rel", "damage", "says"),
    [
        ("model/weights.pt", _garbage_in_the_middle, "model/weights.pt does not match its SHA-256"),
        ("optimizer.pt", _truncate, "optimizer.pt is .* bytes, .* when saved"),
        ("trainer_state.json", _invalid_json, "trainer_state.json is .* bytes"),
        ("scheduler.pt", lambda p: p.unlink(), "scheduler.pt is missing"),
        ("manifest.json", lambda p: p.unlink(), "manifest.json missing"),
        ("manifest.json", _invalid_json, "manifest.json is not a valid manifest"),
    ],
)
def test_a_damaged_checkpoint_is_named_and_latest_falls_back(tmp_path, capsys, rel, damage, says):
    from training.setup import setup_logging

    setup_logging()
    first, newest = _two_checkpoints(tmp_path)
    manifest = json.loads((newest / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model/weights.pt", "optimizer.pt", "scheduler.pt", "rng_0.pt",
                                      "trainer_state.json"}
    verify_checkpoint(newest)
    damage(newest / rel)
    with pytest.raises(CheckpointError, match=f"checkpoint {newest}: {says}"):
        verify_checkpoint(newest)
    with pytest.raises(CheckpointError, match=str(newest)):
        resolve_resume(tmp_path, str(newest))
    capsys.readouterr()
    assert resolve_resume(tmp_path, "latest") == first
    assert "WARNING coordexp: resume_from=latest: skipping checkpoint-2" in capsys.readouterr().err
    # every checkpoint damaged: the error lists each one's reason
    (first / "optimizer.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no complete checkpoint.*checkpoint-2.*checkpoint-1.*optimizer.pt"):
        resolve_resume(tmp_path, "latest")


def test_unreadable_files_are_named_when_loading(tmp_path):
    _, newest = _two_checkpoints(tmp_path)
    model, opt, sched = _setup()
    (newest / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=f"checkpoint {newest}: optimizer.pt cannot be read"):
        load_training_state(newest, opt, sched)
    (newest / "trainer_state.json").write_text('{"step": ')
    with pytest.raises(CheckpointError, match=f"checkpoint {newest}: trainer_state.json is not valid"):
        load_training_state(newest, opt, sched)


def test_resolve_resume_without_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume_from=latest: no checkpoint"):
        resolve_resume(tmp_path, "latest")
    with pytest.raises(CheckpointError, match="not a directory"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-9"))


# ------------------------------------------------------------ 2-rank gloo


class _StateBox:
    """Duck-typed optimizer / scheduler: a torch optimizer's first call imports torch._dynamo (seconds per process)."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


def _ddp_ckpt_worker(rank: int, world: int, out_dir: str, store: str) -> None:
    import os
    from datetime import timedelta

    import torch.distributed as dist

    # A FileStore rendezvous: no TCP port to pick, so no race with other processes on the machine.
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        torch.manual_seed(rank)  # per-rank RNG streams differ
        opt, sched = _StateBox({"lr": 0.5}), _StateBox({"last_epoch": 1})
        ckpt = save_training_state(
            out_dir,
            model_save_fn=(lambda d: (d / "weights.txt").write_text("w")) if rank == 0 else (lambda d: None),
            optimizer=opt,
            scheduler=sched,
            step=1,
            data_state={"position": 4},
            save_total_limit=1,
        )
        expected = torch.rand(3)  # the draw right after saving, per rank
        torch.manual_seed(1000 + rank)
        opt.state, sched.state = {}, {}
        state = load_training_state(ckpt, opt, sched)
        again = torch.rand(3)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            result = {
                "step": state.step,
                "same": bool(torch.equal(expected, again)),
                "draw": again.tolist(),
                "opt": opt.state,
                "sched": sched.state,
            }
            json.dump(result, fh)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_save_per_rank_rng(tmp_path):
    from tests._dist import spawn_ranks

    spawn_ranks(_ddp_ckpt_worker, (2, str(tmp_path), f"file://{tmp_path / 'pg_store'}"), what="checkpoint save")
    ckpt = tmp_path / "checkpoint-1"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "manifest.json",
        "model",
        "optimizer.pt",
        "rng_0.pt",
        "rng_1.pt",
        "scheduler.pt",
        "trainer_state.json",
    ]
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["step"] == r1["step"] == 1
    assert r0["opt"] == r1["opt"] == {"lr": 0.5} and r0["sched"] == r1["sched"] == {"last_epoch": 1}
    assert (ckpt / "model" / "weights.txt").read_text() == "w"
    assert r0["same"] and r1["same"]
    assert r0["draw"] != r1["draw"]  # each rank got its own stream back, not rank 0's


# ------------------------------------------------------------- disk full


def test_disk_full_during_a_save_is_one_clear_error(tmp_path, monkeypatch):
    """ENOSPC while writing optimizer.pt: one error naming the run dir and the space needed, the
    partial .tmp removed, the previous checkpoint intact (rotation runs only after a complete save)."""
    import errno
    import shutil
    from collections import namedtuple

    import training.checkpoint as ckpt_mod

    model, opt, sched = _setup()
    kw = {"model_save_fn": _saver(model), "optimizer": opt, "scheduler": sched, "data_state": {},
          "save_total_limit": 1}
    first = save_training_state(tmp_path, step=1, **kw)
    size = sum(f["size"] for f in json.loads((first / "manifest.json").read_text())["files"].values())
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(CheckpointError) as info:
        save_training_state(tmp_path, step=2, **kw)
    msg = str(info.value)
    assert f"no space left on the device of {tmp_path}" in msg
    assert "100 B free" in msg and f"needs about {ckpt_mod._human(size)}" in msg
    assert "resume_from=latest" in msg  # checkpoint-1 exists, so resuming can work
    assert not (tmp_path / "checkpoint-2.tmp").exists()
    verify_checkpoint(first)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    # no complete checkpoint: the message does not suggest a resume that cannot work
    shutil.rmtree(first)
    with pytest.raises(CheckpointError) as info:
        save_training_state(tmp_path, step=2, **kw)
    assert "no space left" in str(info.value) and "resume_from" not in str(info.value)


def test_free_space_check_warns_before_a_save(tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    import training.checkpoint as ckpt_mod
    from training.setup import setup_logging

    setup_logging()
    model, opt, sched = _setup()
    kw = {"model_save_fn": _saver(model), "optimizer": opt, "scheduler": sched, "data_state": {}}
    # first save: estimated from the optimized parameters (weights + 2 Adam moments)
    assert ckpt_mod.estimate_checkpoint_bytes(tmp_path, opt) == 3 * 4 * (3 * 2 + 2)
    first = save_training_state(tmp_path, step=1, **kw)
    needed = ckpt_mod.estimate_checkpoint_bytes(tmp_path, opt)
    assert needed == ckpt_mod.checkpoint_size(first) > 0
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: usage(10**12, 0, 10**12))
    capsys.readouterr()
    save_training_state(tmp_path, step=2, **kw)
    assert "free" not in capsys.readouterr().err
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: usage(10**12, 0, needed + 1))
    save_training_state(tmp_path, step=3, **kw)  # still fits: a warning, and the save goes through
    err = capsys.readouterr().err
    assert f"WARNING coordexp: {tmp_path} has" in err and "the save after this one may not fit" in err
    verify_checkpoint(tmp_path / "checkpoint-3")
