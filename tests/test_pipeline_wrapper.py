"""``pipeline.wrapper.TrainingWrapper``: one forward gives exactly the loss, metrics and gradients of the
unwrapped path (forward strategy -> TeacherForcingContext -> run_pipeline) for Stage-1, Channel-A,
Channel-B and Rollout-Aligned, on the tiny model and the fixed shapes / rollout batches of the
Stage-2 parity tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from configs import load_config
from pipeline.executor import run_pipeline
from pipeline.forwards import expectation_forward, gt_forward, rollout_forward
from pipeline.wrapper import STRATEGY_EXPECTATION, STRATEGY_GT, STRATEGY_ROLLOUT, ExpectationConfig, TrainingWrapper
from tests.test_forwards_fixtures import make_env, rollout_batch

REPO = Path(__file__).resolve().parents[1]
STAGE1 = REPO / "configs" / "demo" / "stage1_shapes.yaml"
SMOKE_ST = REPO / "configs" / "stage2_two_channel" / "smoke_st.yaml"
SMOKE_RA = REPO / "configs" / "stage2_rollout_aligned" / "smoke_default.yaml"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("shapes"))


def _grads(vlm) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
    vlm.zero_grad(set_to_none=True)
    return out


def _unwrapped(env, cfg, strategy, channel, batch, decode):
    sab = cfg.stage2_ab
    if strategy == STRATEGY_GT:
        fwd = gt_forward(env.model, env.vlm, batch)
    elif strategy == STRATEGY_ROLLOUT:
        fwd = rollout_forward(env.model, env.vlm, batch)
    else:
        fwd = expectation_forward(env.model, env.vlm, batch, env.coord_ids, n_iter=sab.n_softctx_iter,
                                  embed_mode=sab.coord_ctx_embed_mode, grad_mode=sab.softctx_grad_mode,
                                  temperature=sab.softctx_temperature)
    return run_pipeline(cfg.pipeline, env.ctx(channel, batch, fwd.hidden, decode)), fwd.num_forwards


CASES = [  # config, strategy, channel, geometry decode mode
    (STAGE1, "stage1", STRATEGY_GT, None, "exp"),
    (SMOKE_ST, "stage2", STRATEGY_EXPECTATION, "A", "st"),
    (SMOKE_ST, "stage2", STRATEGY_ROLLOUT, "B", "st"),
    (SMOKE_RA, "stage2", STRATEGY_ROLLOUT, None, None),
]


@pytest.mark.parametrize(("config", "expect", "strategy", "channel", "decode"), CASES,
                         ids=["stage1", "channel_a", "channel_b", "rollout_aligned"])
def test_wrapper_matches_the_unwrapped_path(env, config, expect, strategy, channel, decode):
    cfg = load_config(config, expect=expect)
    decode = decode or cfg.rollout_matching.coord_decode_mode
    if strategy == STRATEGY_ROLLOUT:
        batch = rollout_batch(env, [0, 1, 2, 3], packing=True).batch
    else:
        batch = env.batch([[0, 1], [2]])
    sab = cfg.stage2_ab
    wrapper = TrainingWrapper(
        env.vlm, cfg.pipeline, env.coord_ids, coord_decode_mode=decode,
        expectation=ExpectationConfig(sab.n_softctx_iter, sab.coord_ctx_embed_mode, sab.softctx_grad_mode,
                                      sab.softctx_temperature),
    )
    env.vlm.zero_grad(set_to_none=True)
    expected, n_forwards = _unwrapped(env, cfg, strategy, channel, batch, decode)
    expected.loss.backward()
    expected_grads = _grads(env.vlm)

    out = wrapper(batch, strategy, channel)
    out.loss.backward()
    grads = _grads(env.vlm)

    assert out.num_forwards == n_forwards == (sab.n_softctx_iter if strategy == STRATEGY_EXPECTATION else 1)
    assert sorted(out.metrics) == sorted(expected.metrics)
    torch.testing.assert_close(out.metrics, expected.metrics, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)
    assert sorted(grads) == sorted(expected_grads) and "lm_head.weight" in grads
    torch.testing.assert_close(grads, expected_grads, rtol=0, atol=0)


def test_wrapper_owns_the_vlm_state_dict_and_hides_the_embeddings(env):
    """State-dict keys are ``vlm.<Qwen3-VL key>`` (what ``save_pretrained`` strips), the coord ids are no
    buffer, and no ``get_*_embeddings`` (accelerate's FSDP2 would split the LM head into its own unit)."""
    cfg = load_config(STAGE1, expect="stage1")
    wrapper = TrainingWrapper(env.vlm, cfg.pipeline, env.coord_ids)
    assert sorted(wrapper.state_dict()) == sorted(f"vlm.{k}" for k in env.vlm.state_dict())
    assert not hasattr(wrapper, "get_output_embeddings") and not hasattr(wrapper, "get_input_embeddings")
    with pytest.raises(ValueError, match="strategy must be one of gt, expectation, rollout"):
        wrapper(env.batch([[0]]), "teacher")
