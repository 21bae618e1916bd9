"""``training.sharding``: which engine a launch asked for, the ZeRO-3 refusal, and the no-op paths
(the multi-process paths run in tests/test_recipe_fsdp.py)."""

from __future__ import annotations

from types import SimpleNamespace

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
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with full_weights(model):
        out = model(torch.ones(1, 3))
    assert out.shape == (1, 2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
