"""``training.sharding``: which engine a launch asked for, the ZeRO-3 refusal, and the no-op paths
(the multi-process paths run in tests/test_recipe_fsdp.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from training.sharding import full_weights, is_sharded, requested_engine


def test_requested_engine_reads_the_launch_env(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert requested_engine() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert requested_engine() == "fsdp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "True")
    assert requested_engine() == "deepspeed"


def _acc(kind, zero_stage=None):
    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage))
    return SimpleNamespace(distributed_type=kind, state=state)


def test_sharded_engines_are_recognised():
    from accelerate.utils import DistributedType as D

    assert is_sharded(_acc(D.FSDP)) and is_sharded(_acc(D.DEEPSPEED, 2)) and is_sharded(_acc(D.DEEPSPEED, 3))
    assert not is_sharded(_acc(D.MULTI_GPU)) and not is_sharded(_acc(D.NO))


def test_full_weights_leaves_an_unsharded_model_alone():
    model = torch.nn.Linear(3, 2)
    params = [(p, p.data_ptr(), p.requires_grad) for p in model.parameters()]
    ran = []
    with full_weights(model):
        ran.append(model(torch.ones(1, 3)))
        # inside the block: the very same parameter tensors (no gathered copies, no cast)
        assert [(p, p.data_ptr(), p.requires_grad) for p in model.parameters()] == params
    assert len(ran) == 1 and torch.equal(ran[0], model(torch.ones(1, 3)))
    assert not model._forward_hooks and not model._forward_pre_hooks
    with pytest.raises(KeyError):  # an error in the block propagates, it is not swallowed
        with full_weights(model):
            raise KeyError("x")


def test_full_weights_keeps_fsdp2_units_gathered_for_the_block(tmp_path):
    """One gloo process: FSDP2 parameters are DTensors (sharded) outside the block; inside it they
    are plain tensors, and stay so after a forward (reshard-after-forward is off); after it they are
    sharded again and a forward reshards as before."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        sharded = lambda: [isinstance(p, DTensor) for p in model.parameters()]  # noqa: E731
        assert all(sharded())
        with full_weights(model):
            assert not any(sharded())
            model(torch.ones(1, 3))
            assert not any(sharded())
        assert all(sharded())
        model(torch.ones(1, 3))
        assert all(sharded())
    finally:
        dist.destroy_process_group()


class _FakeShardedAccelerator:
    """One process that accelerate would call FSDP: ``save_state`` / ``load_state`` write and read the
    optimizer and scheduler state under the given dir, as accelerate's sharded save does per rank."""

    process_index, num_processes, is_main_process = 0, 1, True

    def __init__(self, optimizer, scheduler):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.FSDP
        self.optimizer, self.scheduler, self.loaded = optimizer, scheduler, []

    def save_state(self, path):
        import os

        os.makedirs(path, exist_ok=True)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   os.path.join(path, "shard_0.pt"))  # fmt: skip

    def load_state(self, path):
        import os

        state = torch.load(os.path.join(path, "shard_0.pt"), weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loaded.append(path)

    def wait_for_everyone(self):
        pass


def test_sharded_checkpoint_layout_verification_and_resume(tmp_path):
    """The checkpoint code's sharded branch without a sharded engine (the real FSDP2 / ZeRO runs are
    the slow tests/test_recipe_fsdp.py): shards go to sharded/ through the accelerator (no optimizer.pt),
    the manifest covers them (a damaged shard is named), resume goes through load_state, and a
    sharded checkpoint is refused by a DDP run and the other way round."""
    from training.checkpoint import (
        CheckpointError,
        load_training_state,
        save_training_state,
        verify_checkpoint,
    )

    def setup(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

    def step(model, opt, sched):
        loss = model(torch.ones(4, 3)).pow(2).sum()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        return float(loss.detach())

    model, opt, sched = setup(0)
    for _ in range(2):
        step(model, opt, sched)
    acc = _FakeShardedAccelerator(opt, sched)
    ckpt = save_training_state(tmp_path, accelerator=acc, model_save_fn=lambda d: torch.save(model.state_dict(), d / "w.pt"),
                               optimizer=opt, scheduler=sched, step=2, data_state={"position": 2})  # fmt: skip
    assert sorted(p.name for p in ckpt.iterdir()) == ["manifest.json", "model", "rng_0.pt", "sharded", "trainer_state.json"]
    assert (ckpt / "sharded" / "shard_0.pt").is_file()
    verify_checkpoint(ckpt)
    expected = [step(model, opt, sched) for _ in range(2)]

    model2, opt2, sched2 = setup(1)
    model2.load_state_dict(torch.load(ckpt / "model" / "w.pt"))
    acc2 = _FakeShardedAccelerator(opt2, sched2)
    with pytest.raises(CheckpointError, match="FSDP / DeepSpeed"):
        load_training_state(ckpt, opt2, sched2)  # a DDP / single-process run
    state = load_training_state(ckpt, opt2, sched2, accelerator=acc2)
    assert state.step == 2 and state.data_state == {"position": 2} and acc2.loaded == [str(ckpt / "sharded")]
    assert [step(model2, opt2, sched2) for _ in range(2)] == expected  # optimizer moments and lr restored

    shard = ckpt / "sharded" / "shard_0.pt"
    data = bytearray(shard.read_bytes())
    data[-8:] = b"garbage!"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="shard_0.pt"):
        verify_checkpoint(ckpt)
