"""Channel-A prefix reuse (``stage2_ab.prefix_reuse``, ``model.prefix_reuse``) against full recomputation.

The reference is the same ``expectation_forward`` with ``prefix_reuse=False`` (every forward runs
the whole batch through the decoder). On the tiny Qwen3-VL, a batch whose row 0 packs two samples
and whose row 1 holds one right-padded sample, for N = 2 and 3, both ``softctx_grad_mode`` values,
``sdpa`` and ``eager``, with and without (non-reentrant) gradient checkpointing:

- the hidden states of every context at every real position, every loss of the default
  Two-Channel pipeline, and the gradient of every parameter (vision tower included) agree;
- forwards 2..N really feed the language model only the suffix positions;
- the suffix layout is the hand-computed one; kernels without an explicit mask and image tokens
  inside a suffix fall back to full recomputation; reentrant checkpointing (which would record keys
  without gradient) is refused with the config key in the message.

A sanity check shows the gradient comparison is sensitive: recording forward 1's keys detached
(gradient through the reused prefix lost) moves the gradients by O(1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import pytest
import torch

from configs.pipeline import resolve_pipeline
from core.vocab import COORD, GT, LOGGER_NAME, SELF_CONTEXT
from data.packing import collate_rows
from model.prefix_reuse import KVRecorder, plan_prefix_reuse
from pipeline.executor import run_pipeline
from pipeline.forwards import expectation_forward
from pipeline.wrapper import ExpectationConfig, TrainingWrapper
from tests.test_forwards_fixtures import make_env


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def batch(env):
    return env.batch([[0, 1], [2]])  # row 0 packs two samples, row 1 holds one and is right-padded


@contextlib.contextmanager
def attn(vlm, kernel: str):
    configs = [vlm.config, vlm.config.text_config]
    before = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = kernel
    try:
        yield
    finally:
        for c, b in zip(configs, before):
            c._attn_implementation = b


@contextlib.contextmanager
def checkpointing(vlm, on: bool):
    if not on:
        yield
        return
    vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vlm.train()  # transformers checkpoints only in training mode (dropout is 0 in the tiny model)
    try:
        yield
    finally:
        vlm.gradient_checkpointing_disable()
        vlm.eval()


def step(env, batch, *, reuse: bool, n_iter: int, grad_mode: str):
    """Hidden states, loss metrics and parameter gradients of one Channel-A step."""
    env.vlm.zero_grad(set_to_none=True)
    fwd = expectation_forward(env.model, env.vlm, batch, env.coord_ids, n_iter=n_iter, grad_mode=grad_mode,
                              prefix_reuse=reuse)
    res = run_pipeline(resolve_pipeline({}, "stage2_two_channel"), env.ctx("A", batch, fwd.hidden))
    res.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in env.vlm.named_parameters() if p.grad is not None}
    env.vlm.zero_grad(set_to_none=True)
    losses = {k: v for k, v in res.metrics.items() if k.startswith("loss/")}
    return {k: v.detach() for k, v in fwd.hidden.items()}, losses, grads


def real_positions(batch) -> torch.Tensor:
    real = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
    for s in batch.segments:
        real[s.row, s.start : s.start + s.length] = True
    return real


def assert_same_step(ref, got, real):
    (h0, l0, g0), (h1, l1, g1) = ref, got
    assert h0.keys() == h1.keys() == {GT, SELF_CONTEXT}
    for k in h0:
        torch.testing.assert_close(h1[k][real], h0[k][real], rtol=1e-5, atol=1e-5)
    assert l0.keys() == l1.keys() and len(l0) > 5
    for k in l0:
        assert l1[k] == pytest.approx(l0[k], rel=1e-5, abs=1e-6), k
    assert g0.keys() == g1.keys()
    assert any(name.startswith("model.visual") for name in g0)  # the vision tower is trained too
    for name in g0:
        scale = float(g0[name].abs().max())
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5 * max(scale, 1e-3), msg=name)


CASES = [(n, g, ckpt, "sdpa") for n in (2, 3) for g in ("unroll", "em_detach") for ckpt in (False, True)]
CASES += [(n, "unroll", False, "eager") for n in (2, 3)]  # eager: the additive float mask


@pytest.mark.parametrize(("n_iter", "grad_mode", "ckpt", "kernel"), CASES,
                         ids=[f"N{n}-{g}-{'ckpt' if c else 'plain'}-{k}" for n, g, c, k in CASES])
def test_reuse_equals_full_recomputation(env, batch, n_iter, grad_mode, ckpt, kernel):
    with attn(env.vlm, kernel), checkpointing(env.vlm, ckpt):
        ref = step(env, batch, reuse=False, n_iter=n_iter, grad_mode=grad_mode)
        got = step(env, batch, reuse=True, n_iter=n_iter, grad_mode=grad_mode)
    assert_same_step(ref, got, real_positions(batch))


def test_later_forwards_run_only_the_suffix(env, batch):
    lm = env.vlm.model.language_model
    shapes = []
    handle = lm.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(k["inputs_embeds"].shape[:2])),
                                          with_kwargs=True)
    try:
        with torch.no_grad():
            fwd = expectation_forward(env.model, env.vlm, batch, env.coord_ids, n_iter=3, prefix_reuse=True)
    finally:
        handle.remove()
    assert (fwd.num_forwards, fwd.suffix_forwards) == (3, 2)  # logged as stage2/suffix_forwards_total
    layout = plan_prefix_reuse(env.vlm, batch)
    width = int(layout.valid.sum(dim=1).max())
    assert shapes == [tuple(batch.input_ids.shape), (2, width), (2, width)]
    assert width < batch.input_ids.shape[1] and 0.3 < layout.reusable < 0.9


def test_layout_is_each_segment_from_its_first_coord_slot(env, batch):
    layout = plan_prefix_reuse(env.vlm, batch)
    types = batch.token_types
    expected: list[list[int]] = [[], []]
    for s in batch.segments:
        coord = [c for c in range(s.start, s.start + s.length) if int(types[s.row, c]) == COORD]
        expected[s.row] += list(range(coord[0], s.start + s.length))
    for row in range(2):
        n = len(expected[row])
        assert layout.cols[row, :n].tolist() == expected[row]
        assert layout.valid[row].tolist() == [True] * n + [False] * (layout.cols.shape[1] - n)
    assert layout.rows.tolist() == [0] * len(expected[0]) + [1] * len(expected[1])
    assert layout.flat_cols.tolist() == expected[0] + expected[1]
    real = sum(s.length for s in batch.segments)
    assert layout.reusable == pytest.approx(1 - (len(expected[0]) + len(expected[1])) / real)


def test_flash_attention_and_images_in_a_suffix_fall_back(env, batch, caplog):
    with attn(env.vlm, "flash_attention_2"):
        assert plan_prefix_reuse(env.vlm, batch) is None
    # an image token after the first coord slot: deepstack adds features there inside the decoder
    seg = batch.segments[0]
    last = seg.start + seg.length - 1
    mm = batch.mm_token_type_ids.clone()
    mm[seg.row, last] = 1
    odd = dataclasses.replace(batch, mm_token_type_ids=mm)
    assert plan_prefix_reuse(env.vlm, odd) is None
    assert plan_prefix_reuse(env.vlm, batch) is not None


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_fallback_is_logged_once_per_run_not_once_per_process(env, batch, monkeypatch):
    """Each run (its ``TrainingWrapper``) logs a refused reuse once, however many steps it takes; a second
    run in the same process logs it again (the set of logged reasons belongs to the run)."""
    import model.prefix_reuse

    monkeypatch.setattr(model.prefix_reuse, "attn_kernel", lambda vlm: "flash_attention_2")  # the forwards stay sdpa
    resolved = resolve_pipeline({}, "stage2_two_channel")
    expectation = ExpectationConfig(n_iter=2, prefix_reuse=True)
    runs = [TrainingWrapper(env.vlm, resolved, env.coord_ids, expectation=expectation) for _ in range(2)]
    handler = _Lines()  # on the project logger itself: a run's setup_logging may have stopped its propagation

    def logged() -> int:
        return sum("prefix_reuse: full recomputation" in line for line in handler.lines)

    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    counts = []
    try:
        with torch.no_grad():
            for run in runs:
                for _ in range(2):
                    assert run(batch, "expectation", "A").suffix_forwards == 0  # full recomputation
                counts.append(logged())
        assert plan_prefix_reuse(env.vlm, batch) is None and plan_prefix_reuse(env.vlm, batch) is None  # no owner
    finally:
        logger.removeHandler(handler)
    assert counts == [1, 2]
    assert logged() == 4


def test_full_recomputation_is_counted(env, batch, monkeypatch):
    """A fallback (no layout) or prefix_reuse off: every forward runs in full and suffix_forwards
    (stage2/suffix_forwards_total) says so."""
    import pipeline.forwards

    with torch.no_grad():
        fwd = expectation_forward(env.model, env.vlm, batch, env.coord_ids, n_iter=3, prefix_reuse=False)
        assert (fwd.num_forwards, fwd.suffix_forwards) == (3, 0)
        monkeypatch.setattr(pipeline.forwards, "plan_prefix_reuse", lambda vlm, b, **kw: None)  # e.g. flash-attention
        fwd = expectation_forward(env.model, env.vlm, batch, env.coord_ids, n_iter=3, prefix_reuse=True)
        assert (fwd.num_forwards, fwd.suffix_forwards) == (3, 0)


def test_batch_without_coord_slots_still_calls_every_layer(env):
    """No suffix at all: forwards 2..N still call the language model (sharded engines gather each
    layer per call, so every rank must call equally often); self_context equals gt."""
    record = dataclasses.replace(env.records[1], objects=())
    batch = collate_rows([[env.encoder.encode(record)]], env.pad_id)
    calls = []
    handle = env.vlm.model.language_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            ex = expectation_forward(env.model, env.vlm, batch, env.coord_ids, n_iter=2, prefix_reuse=True)
    finally:
        handle.remove()
    assert len(calls) == 2
    torch.testing.assert_close(ex.hidden[SELF_CONTEXT], ex.hidden[GT], rtol=0, atol=0)


def test_detached_prefix_keys_would_change_gradients(env, batch, monkeypatch):
    """The comparison above is sensitive: without forward 1's keys in the graph the gradients move."""
    ref = step(env, batch, reuse=True, n_iter=2, grad_mode="em_detach")

    def detached(self, store, index):
        def record(_module, _args, output):
            store[index] = output.detach().requires_grad_()
        return record

    monkeypatch.setattr(KVRecorder, "_hook", detached)
    got = step(env, batch, reuse=True, n_iter=2, grad_mode="em_detach")
    assert got[1] == ref[1]  # same forward values
    worst = max(float((got[2][n] - ref[2][n]).norm() / ref[2][n].norm()) for n in ref[2] if ref[2][n].norm() > 0)
    assert worst > 0.1


def test_reentrant_checkpointing_is_refused(env, batch):
    env.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    env.vlm.train()
    try:
        with pytest.raises(ValueError, match=r"stage2_ab\.prefix_reuse"):
            expectation_forward(env.model, env.vlm, batch, env.coord_ids, n_iter=2, prefix_reuse=True)
    finally:
        env.vlm.gradient_checkpointing_disable()
        env.vlm.eval()


def test_reuse_under_bf16_autocast_matches_full(env, batch):
    """fp32 master weights under bf16 autocast (the GPU recipes' precision): same values to bf16 rounding
    (the suffix matmuls have other shapes than the full row's, so the roundings differ)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = step(env, batch, reuse=False, n_iter=2, grad_mode="unroll")
        got = step(env, batch, reuse=True, n_iter=2, grad_mode="unroll")
    real = real_positions(batch)
    torch.testing.assert_close(got[0][SELF_CONTEXT][real], ref[0][SELF_CONTEXT][real], rtol=0.05, atol=0.05)
    for k in ref[1]:
        assert got[1][k] == pytest.approx(ref[1][k], rel=0.02, abs=1e-3), k
    flat = [torch.cat([g[n].flatten().float() for n in sorted(ref[2])]) for g in (ref[2], got[2])]
    assert torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0) > 0.999
