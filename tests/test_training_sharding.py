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
