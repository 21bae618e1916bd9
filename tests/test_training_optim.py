"""AdamW parameter groups and lr schedules, values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from training.optim import build_optimizer, build_scheduler, resolve_warmup, split_decay_params


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)  # weight decays, bias does not
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: one tensor, no decay
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_decay_groups():
    model = _Toy()
    decay, no_decay = split_decay_params(model)
    assert [id(p) for p in decay] == [id(model.proj.weight)]
    assert {id(p) for p in no_decay} == {
        id(model.embed.weight),
        id(model.proj.bias),
        id(model.norm.weight),
        id(model.norm.bias),
    }
    assert len(no_decay) == 4  # tied head weight counted once


def _partition_like_zero3(param: torch.Tensor) -> None:
    """What DeepSpeed ZeRO-3 does to a parameter outside its module's forward: the local tensor is
    empty and the real size is kept in ``ds_shape`` / ``ds_numel``."""
    param.ds_shape, param.ds_numel = tuple(param.shape), param.numel()
    param.data = torch.empty(0)


def test_decay_groups_and_sizes_are_the_same_for_zero3_partitioned_parameters():
    from model.shapes import logical_numel, logical_shape
    from model.vocab import table_rows

    plain = _Toy()
    decay_plain, no_decay_plain = split_decay_params(plain)
    model = _Toy()
    for p in model.parameters():
        _partition_like_zero3(p)
    assert all(p.ndim == 1 for p in model.parameters())  # what the old `param.ndim < 2` test saw
    decay, no_decay = split_decay_params(model)
    assert [id(p) for p in decay] == [id(model.proj.weight)]
    assert len(decay) == len(decay_plain) and len(no_decay) == len(no_decay_plain)
    assert logical_shape(model.proj.weight) == torch.Size([4, 4]) and logical_numel(model.embed.weight) == 40
    assert table_rows(model.embed) == 10 and table_rows(model.head) == 10  # not weight.shape[0] == 0


def test_adamw_decays_only_decay_group():
    model = _Toy()
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5, betas=(0.9, 0.99), eps=1e-8)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is 0; only decoupled decay acts
    opt.step()
    # AdamW: p <- p * (1 - lr * wd) = p * 0.95 for the decay group
    torch.testing.assert_close(model.proj.weight, before["proj.weight"] * 0.95)
    torch.testing.assert_close(model.proj.bias, before["proj.bias"])
    torch.testing.assert_close(model.embed.weight, before["embed.weight"])
    torch.testing.assert_close(model.norm.weight, before["norm.weight"])


def test_optimizer_errors():
    with pytest.raises(ValueError, match="training.lr"):
        build_optimizer(_Toy(), lr=0.0)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, lr=1e-3)


def _lrs(kind, steps, **kw):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, kind, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_and_floor():
    lrs = _lrs("cosine", 11, warmup_steps=2, max_steps=10, min_lr_ratio=0.1)
    # warmup (s+1)/2; then 0.1 + 0.9 * 0.5 * (1 + cos(pi * (s-2)/8))
    assert lrs[0] == pytest.approx(0.5)
    assert lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[4] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.sqrt(0.5)))  # 0.8681980...
    assert lrs[4] == pytest.approx(0.868198, abs=1e-6)
    assert lrs[6] == pytest.approx(0.55)
    assert lrs[10] == pytest.approx(0.1)


def test_linear_no_warmup():
    assert _lrs("linear", 6, max_steps=4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])


def test_constant_with_warmup_ratio():
    # warmup = ceil(0.25 * 8) = 2
    assert _lrs("constant", 4, warmup_ratio=0.25, max_steps=8) == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert resolve_warmup(0, 0.1, 15) == 2  # ceil(1.5)


def test_scheduler_state_dict_round_trip():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, "cosine", warmup_steps=1, max_steps=5)
    for _ in range(3):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched2 = build_scheduler(opt2, "cosine", warmup_steps=1, max_steps=5)
    sched2.load_state_dict(sched.state_dict())
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    opt.step()
    sched.step()
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    # step 4: progress (4-1)/4 -> 2 * 0.5 * (1 + cos(3pi/4))
    assert opt.param_groups[0]["lr"] == pytest.approx(1 + math.cos(3 * math.pi / 4))


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"kind": "step"}, "training.lr_scheduler"),
    ],
)
def test_scheduler_errors(kw, fragment):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    args = {"kind": "cosine", "max_steps": 10, **kw}
    with pytest.raises(ValueError, match=fragment):
        build_scheduler(opt, **args)


def test_lr_mult_groups_per_part():
    model = _Toy()
    parts = {id(model.embed.weight): "language_model", id(model.proj.weight): "vision",
             id(model.proj.bias): "vision", id(model.norm.weight): "merger", id(model.norm.bias): "merger"}
    mult = {"language_model": 1.0, "merger": 2.0, "vision": 10.0}
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5, lr_mult=mult, parts=parts)
    got = [(g["part"], g["weight_decay"], g["lr"], len(g["params"])) for g in opt.param_groups]
    # language_model has only a no-decay tensor (the tied embedding); empty groups are left out
    assert got == [("language_model", 0.0, 0.1, 1), ("merger", 0.0, pytest.approx(0.2), 2),
                   ("vision", 0.5, pytest.approx(1.0), 1), ("vision", 0.0, pytest.approx(1.0), 1)]
    # the schedule scales every group by the same factor: peak ratios survive warmup
    sched = build_scheduler(opt, "constant", warmup_steps=4, max_steps=10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.025, 0.05, 0.25, 0.25])
    opt.step()  # no grads: nothing moves
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.1, 0.5, 0.5])
    # all multipliers 1 = the plain two groups
    plain = build_optimizer(model, lr=0.1, lr_mult={"language_model": 1, "merger": 1, "vision": 1}, parts=parts)
    assert len(plain.param_groups) == 2


def test_lr_mult_errors():
    model = _Toy()
    parts = {id(p): "language_model" for p in model.parameters()}
    with pytest.raises(ValueError, match="parts="):
        build_optimizer(model, lr=0.1, lr_mult={"language_model": 2.0})
    with pytest.raises(ValueError, match=r"training.lr_mult.vision must be > 0.*model.freeze.vision"):
        build_optimizer(model, lr=0.1, lr_mult={"language_model": 2.0, "vision": 0.0}, parts=parts)
    with pytest.raises(ValueError, match=r"no multiplier for part\(s\) \['language_model'\]"):
        build_optimizer(model, lr=0.1, lr_mult={"vision": 2.0}, parts=parts)


def test_fused_adamw_is_the_default_and_matches_the_loop():
    """Fused AdamW (the default, CPU and CUDA) gives the plain AdamW update; its state dict loads into the other kind."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(8, 4)
    models = {k: torch.nn.Linear(8, 4) for k in (False, True)}
    opts = {}
    for fused, m in models.items():
        m.load_state_dict(ref.state_dict())
        opts[fused] = build_optimizer(m, 1e-2, weight_decay=0.1, fused=fused)
        assert opts[fused].defaults["fused"] is fused
    assert build_optimizer(ref, 1e-3).defaults["fused"] is True
    x = torch.randn(16, 8)
    for _ in range(3):
        for fused, m in models.items():
            m(x).pow(2).mean().backward()
            opts[fused].step()
            opts[fused].zero_grad()
    for a, b in zip(models[False].parameters(), models[True].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    opts[False].load_state_dict(opts[True].state_dict())
