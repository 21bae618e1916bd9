"""Executor + modules on hand-built Stage-1, Channel-A, Channel-B and Rollout-Aligned contexts.

Expected values come from brute-force full-vocabulary logits (``hidden @ W.T`` at every
position), independent of the pipeline's position gathering, masks caching and chunking.
"""

from __future__ import annotations

import math
import subprocess
import sys
from types import MappingProxyType

import pytest
import torch

from configs.modules import NoConfig
from configs.pipeline import ModuleSpec, ResolvedPipeline, resolve_pipeline
from core.vocab import DESC, EOS, FN, FP, MATCHED, NO_SUBSET, STRUCT
from losses.geometry import bbox_geo_loss
from pipeline.context import PipelineError, TeacherForcingContext
from pipeline.executor import PipelineExecutor, run_pipeline
from pipeline.registry import DIAGNOSTICS, ModuleOutput, get_module, register_module, unregister_module
from tests.test_pipeline_fixtures import (
    COORD_IDS,
    GT_ROWS,
    ROLLOUT_ROWS,
    V_TEXT,
    duplicate_batch,
    lm_head,
    make_batch,
    random_hidden,
)

TWO, RA, S1 = "stage2_two_channel", "stage2_rollout_aligned", "stage1"
ALL_REG = {
    "coord_ce_weight": 1.0, "soft_ce_weight": 0.3, "w1_weight": 0.2, "coord_entropy_weight": 0.1,
    "coord_el1_weight": 0.4, "coord_ehuber_weight": 0.5, "coord_gate_weight": 1.0, "text_gate_weight": 0.2,
}
MEAN_SUFFIXES = ("_mean", "_rate", "_frac")
COUNTER_SUFFIXES = ("_total", "_count", "_sum", "_num", "_den")


def _explicit(variant: str, objective, diagnostics=(), **sections):
    section = {S1: "stage1", TWO: "stage2_ab", RA: "rollout_matching"}[variant]
    raw = {k: dict(v) for k, v in sections.items()}
    raw.setdefault(section, {})["pipeline"] = {"objective": list(objective), "diagnostics": list(diagnostics)}
    return resolve_pipeline(raw, variant)


def _ctx(batch, channel, hidden, W, mode="exp"):
    return TeacherForcingContext(channel=channel, batch=batch, hidden=hidden, lm_head_weight=W,
                                 coord_token_ids=COORD_IDS, coord_decode_mode=mode, chunk_size=5)


# ------------------------------------------------------------------ brute-force references


def _full_logits(hidden, W):
    """[B, T, V] logits; row j predicts token j + 1."""
    return hidden.detach() @ W.detach().T


def _token_ce(hidden, W, ids):
    """[B, T]: CE of token j from logits at j - 1 (position 0 gets 0)."""
    lg = _full_logits(hidden, W)
    ce = torch.zeros(ids.shape)
    ce[:, 1:] = torch.logsumexp(lg[:, :-1], -1) - lg[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return ce


def _wmean(values, weights):
    return float((values * weights).sum() / weights.sum())


def _coord_logits_at(hidden, W, batch):
    """[N, 1000] coord logits at the positions with coord targets, row-major; and the targets."""
    lg = _full_logits(hidden, W)
    B, T = batch.input_ids.shape
    pos = torch.nonzero(batch.coord_targets.reshape(-1) >= 0).reshape(-1)
    rows = lg.reshape(B * T, -1)[pos - 1]
    return rows[:, V_TEXT:], rows, batch.coord_targets.reshape(-1)[pos]


def _geo_ref(hidden, W, batch, subsets=None, mode="exp"):
    lg = _full_logits(hidden, W)
    B, T = batch.input_ids.shape
    flat = lg.reshape(B * T, -1)
    groups = [g for g in batch.bbox_groups if subsets is None or g.subset in subsets]
    pos = torch.tensor([g.coord_pos for g in groups]).reshape(-1)
    cl = flat[pos - 1][:, V_TEXT:]
    v = torch.arange(1000) / 999
    pred = cl.argmax(-1) / 999 if mode == "st" else torch.softmax(cl, -1) @ v
    target = torch.tensor([g.target_bins for g in groups], dtype=torch.float32) / 999
    return bbox_geo_loss(pred.reshape(-1, 4), target, 1.0, 1.0), len(groups)


def _check_key_classes(metrics):
    from training.aggregator import check_metric_key  # the one metrics-contract checker

    for key in metrics:
        check_metric_key(key)
        if key.split("/", 1)[-1].startswith("_"):  # internal: only the sum / den pairs of step means
            assert key.endswith(("_sum", "_den")) and key.startswith("coord_diag/"), key
            continue
        if key.startswith("loss/"):
            continue
        assert key.endswith(MEAN_SUFFIXES + COUNTER_SUFFIXES), key


# ------------------------------------------------------------------ Stage-1


def test_stage1_total_is_weighted_sum_and_terms_match_brute_force():
    batch = make_batch(GT_ROWS)
    hidden, W = random_hidden(batch, 1), lm_head()
    resolved = _explicit(S1, [
        {"name": "token_ce", "weight": 0.5, "config": {"desc_ce_weight": 0.25}},
        {"name": "bbox_geo", "weight": 2.0},
        {"name": "coord_reg", "weight": 1.5, "config": ALL_REG},
    ], [{"name": "coord_diag"}, {"name": "token_stats"}])
    out = run_pipeline(resolved, _ctx(batch, None, {"gt": hidden}, W))
    m = out.metrics
    _check_key_classes(m)

    ce = _token_ce(hidden, W, batch.input_ids)
    tt = batch.token_types
    struct_ref = _wmean(ce, ((tt == STRUCT) | (tt == EOS)).float())
    desc_ref = 0.25 * _wmean(ce, (tt == DESC).float())
    assert m["loss/struct_ce"] == pytest.approx(struct_ref, rel=1e-5)
    assert m["loss/desc_ce"] == pytest.approx(desc_ref, rel=1e-5)

    cl, full_rows, tgt = _coord_logits_at(hidden, W, batch)
    coord_ce_ref = float((torch.logsumexp(cl, -1) - cl.gather(-1, tgt[:, None]).squeeze(-1)).mean())
    assert m["loss/coord_token_ce"] == pytest.approx(coord_ce_ref, rel=1e-5)
    p_coord = torch.exp(torch.logsumexp(cl, -1) - torch.logsumexp(full_rows, -1))
    assert m["loss/coord_reg/coord_gate"] == pytest.approx(float(-torch.log(p_coord + 1e-6).mean()), rel=1e-5)
    # text gate: struct/desc positions with CE weight > 0 (desc weight 0.25 > 0), never eos
    lg = _full_logits(hidden, W)
    text = ((tt == STRUCT) | (tt == DESC)).reshape(-1)
    text_pos = torch.nonzero(text).reshape(-1)
    rows = lg.reshape(-1, lg.shape[-1])[text_pos - 1]
    p_text = torch.exp(torch.logsumexp(rows[:, V_TEXT:], -1) - torch.logsumexp(rows, -1))
    assert m["loss/coord_reg/text_gate"] == pytest.approx(float(-torch.log(1 - p_text + 1e-6).mean()), rel=1e-5)

    reg = {"soft_ce": 0.3, "w1": 0.2, "entropy": 0.1, "el1": 0.4, "ehuber": 0.5, "coord_gate": 1.0, "text_gate": 0.2}
    reg_ref = m["loss/coord_token_ce"] + sum(w * m[f"loss/coord_reg/{k}"] for k, w in reg.items())
    assert m["loss/coord_reg"] == pytest.approx(reg_ref, rel=1e-5)

    geo, n_boxes = _geo_ref(hidden, W, batch)
    assert n_boxes == 3
    assert m["loss/geo"] == pytest.approx(float(geo.total), rel=1e-5)
    assert m["loss/geo/ciou"] == pytest.approx(float(geo.ciou), rel=1e-5)
    assert m["loss/geo/smoothl1"] == pytest.approx(float(geo.smoothl1), rel=1e-5)

    total_ref = 0.5 * (struct_ref + desc_ref) + 2.0 * float(geo.total) + 1.5 * reg_ref
    assert float(out.loss.detach()) == pytest.approx(total_ref, rel=1e-5)
    assert m["loss/total"] == pytest.approx(total_ref, rel=1e-5)
    out.loss.backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0

    assert m["token_stats/coord_tokens_total"] == 12.0
    assert m["token_stats/eos_tokens_total"] == 2.0
    assert m["token_stats/desc_tokens_total"] == float((tt == DESC).sum())
    assert m["token_stats/struct_tokens_total"] == float((tt == STRUCT).sum())
    assert m["coord_diag/coord_positions_total"] == 12.0
    argmax = cl.argmax(-1)
    assert m["coord_diag/bin_acc_frac"] == pytest.approx(float((argmax == tgt).float().mean()))
    assert m["coord_diag/coord_mass_mean"] == pytest.approx(float(p_coord.mean()), rel=1e-5)


def test_bbox_geo_sub_weights_other_than_one():
    batch = make_batch(GT_ROWS)
    hidden, W = random_hidden(batch, 2), lm_head()
    resolved = _explicit(S1, [{"name": "bbox_geo", "weight": 1.5, "config": {"smoothl1_weight": 0.3, "ciou_weight": 2.5}}])
    out = run_pipeline(resolved, _ctx(batch, None, {"gt": hidden}, W))
    geo, _ = _geo_ref(hidden, W, batch)
    assert out.metrics["loss/geo/smoothl1"] == pytest.approx(float(geo.smoothl1), rel=1e-5)
    assert out.metrics["loss/geo/ciou"] == pytest.approx(float(geo.ciou), rel=1e-5)
    geo_ref = 0.3 * float(geo.smoothl1) + 2.5 * float(geo.ciou)
    assert out.metrics["loss/geo"] == pytest.approx(geo_ref, rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(1.5 * geo_ref, rel=1e-5)


def test_coord_diag_bin_tolerance_counts_a_position_exactly_at_the_tolerance():
    batch = make_batch(GT_ROWS)
    hidden, W = random_hidden(batch, 1), lm_head()
    cl, _, tgt = _coord_logits_at(hidden, W, batch)
    dist = (cl.argmax(-1) - tgt).abs()
    assert len(set(dist.tolist())) > 2
    for tol in sorted(set(dist.tolist())):  # each tolerance puts at least one position on the boundary
        resolved = _explicit(S1, [{"name": "token_ce"}], [{"name": "coord_diag", "config": {"bin_tolerance": tol}}])
        m = run_pipeline(resolved, _ctx(batch, None, {"gt": hidden}, W)).metrics
        assert m["coord_diag/bin_acc_frac"] == pytest.approx(float((dist <= tol).float().mean())), tol

def test_stage1_default_ce_only_coord_terms_equal_full_vocab_ce():
    batch = make_batch(GT_ROWS)
    hidden, W = random_hidden(batch, 2), lm_head()
    m = run_pipeline(resolve_pipeline({}, S1), _ctx(batch, None, {"gt": hidden}, W)).metrics
    assert "loss/geo" not in m  # bbox_geo disabled by default in Stage-1
    ce = _token_ce(hidden, W, batch.input_ids)
    full_ce_coord = float(ce[batch.coord_targets >= 0].mean())
    assert m["loss/coord_token_ce"] + m["loss/coord_reg/coord_gate"] == pytest.approx(full_ce_coord, abs=1e-4)
    assert m["loss/coord_reg"] == pytest.approx(full_ce_coord, abs=1e-4)


def test_text_gate_obeys_the_token_ce_masks_of_the_run():
    batch = make_batch(GT_ROWS)
    hidden, W = random_hidden(batch, 6), lm_head()
    resolved = _explicit(S1, [{"name": "token_ce", "config": {"desc_ce_weight": 0.0}},
                              {"name": "coord_reg", "config": {"text_gate_weight": 1.0}}])
    m = run_pipeline(resolved, _ctx(batch, None, {"gt": hidden}, W)).metrics
    lg = _full_logits(hidden, W).reshape(-1, W.shape[0])
    struct_only = torch.nonzero((batch.token_types == STRUCT).reshape(-1)).reshape(-1)  # desc weight 0: not gated
    rows = lg[struct_only - 1]
    p = torch.exp(torch.logsumexp(rows[:, V_TEXT:], -1) - torch.logsumexp(rows, -1))
    assert m["loss/coord_reg/text_gate"] == pytest.approx(float(-torch.log(1 - p + 1e-6).mean()), rel=1e-5)
    assert "loss/desc_ce" not in m


def test_st_decode_mode_uses_argmax_boxes_in_forward():
    batch = make_batch(GT_ROWS)
    hidden, W = random_hidden(batch, 3), lm_head()
    resolved = _explicit(S1, [{"name": "bbox_geo"}])
    m_st = run_pipeline(resolved, _ctx(batch, None, {"gt": hidden}, W, mode="st")).metrics
    m_exp = run_pipeline(resolved, _ctx(batch, None, {"gt": hidden}, W, mode="exp")).metrics
    geo_st, _ = _geo_ref(hidden, W, batch, mode="st")
    assert m_st["loss/geo"] == pytest.approx(float(geo_st.total), rel=1e-5)
    assert m_st["loss/geo"] != pytest.approx(m_exp["loss/geo"], rel=1e-3)


# ------------------------------------------------------------------ Channel-A


def test_channel_a_contexts_and_weighted_sum():
    batch = make_batch(GT_ROWS)
    h_gt, h_sc, W = random_hidden(batch, 4), random_hidden(batch, 5), lm_head()
    # gate off (default 1): this test sums the other terms by hand; the gate's math is tested in test_losses_coord_reg
    resolved = resolve_pipeline({"stage2_ab": {"desc_ce_weight": 0.5, "coord_ce_weight": 0.3, "coord_gate_weight": 0.0}}, TWO)
    out = run_pipeline(resolved, _ctx(batch, "A", {"gt": h_gt, "self_context": h_sc}, W))
    m = out.metrics
    _check_key_classes(m)
    tt = batch.token_types
    sw = ((tt == STRUCT) | (tt == EOS)).float()
    gt_struct = _wmean(_token_ce(h_gt, W, batch.input_ids), sw)
    sc_struct = _wmean(_token_ce(h_sc, W, batch.input_ids), sw)
    assert m["loss/struct_ce/gt"] == pytest.approx(gt_struct, rel=1e-5)
    assert m["loss/struct_ce/self_context"] == pytest.approx(sc_struct, rel=1e-5)
    assert m["loss/struct_ce"] == pytest.approx(gt_struct + 0.1 * sc_struct, rel=1e-5)
    desc = 0.5 * _wmean(_token_ce(h_gt, W, batch.input_ids), (tt == DESC).float())
    assert m["loss/desc_ce"] == pytest.approx(desc, rel=1e-5)

    geo, _ = _geo_ref(h_sc, W, batch)  # geometry from self_context only
    assert m["loss/geo"] == pytest.approx(float(geo.total), rel=1e-5)

    cl_gt, _, tgt = _coord_logits_at(h_gt, W, batch)
    cl_sc, _, _ = _coord_logits_at(h_sc, W, batch)
    coord_ce = float((torch.logsumexp(cl_gt, -1) - cl_gt.gather(-1, tgt[:, None]).squeeze(-1)).mean())
    assert m["loss/coord_token_ce"] == pytest.approx(coord_ce, rel=1e-5)
    k = torch.arange(1000.0)
    q = torch.softmax(-0.5 * ((k[None] - tgt[:, None].float()) / 2.0) ** 2, -1)
    soft_sc = float(-(q * torch.log_softmax(cl_sc, -1)).sum(-1).mean())
    assert m["loss/coord_reg/soft_ce/self_context"] == pytest.approx(soft_sc, rel=1e-5)
    assert "loss/coord_reg/soft_ce" not in m and "loss/coord_reg/soft_ce/gt" not in m
    assert m["loss/coord_reg"] == pytest.approx(0.3 * coord_ce + 0.05 * soft_sc, rel=1e-5)
    assert m["coord_diag/coord_positions_total"] == 12.0

    total = (gt_struct + 0.1 * sc_struct + desc) + float(geo.total) + 0.3 * coord_ce + 0.05 * soft_sc
    assert float(out.loss.detach()) == pytest.approx(total, rel=1e-5)
    out.loss.backward()
    assert h_gt.grad.abs().sum() > 0 and h_sc.grad.abs().sum() > 0


def test_channel_a_soft_ce_in_both_contexts_gets_context_keys():
    batch = make_batch(GT_ROWS)
    h = {"gt": random_hidden(batch, 4), "self_context": random_hidden(batch, 5)}
    resolved = _explicit(TWO, [{"name": "coord_reg", "config": {"soft_ce_weight": 0.2}}])
    m = run_pipeline(resolved, _ctx(batch, "A", h, lm_head())).metrics
    assert {"loss/coord_reg/soft_ce/gt", "loss/coord_reg/soft_ce/self_context"} <= set(m)
    assert m["loss/coord_reg"] == pytest.approx(
        0.2 * m["loss/coord_reg/soft_ce/gt"] + 0.05 * m["loss/coord_reg/soft_ce/self_context"], rel=1e-5)


def test_channel_scoping_a_only_and_b_only():
    resolved = _explicit(TWO, [
        {"name": "token_ce", "channels": ["A", "B"]},
        {"name": "bbox_geo", "channels": ["A"], "weight": 3.0},
        {"name": "coord_reg", "channels": ["B"], "config": {"coord_ce_weight": 1.0}},
    ], [{"name": "token_stats", "channels": ["B"]}])
    W = lm_head()
    a_batch = make_batch(GT_ROWS)
    a = run_pipeline(resolved, _ctx(a_batch, "A", {"gt": random_hidden(a_batch, 1), "self_context": random_hidden(a_batch, 2)}, W))
    assert "loss/geo" in a.metrics
    assert not any(k.startswith(("loss/coord_reg", "loss/coord_token_ce", "token_stats/")) for k in a.metrics)
    assert float(a.loss.detach()) == pytest.approx(a.metrics["loss/struct_ce"] + a.metrics["loss/desc_ce"] + 3.0 * a.metrics["loss/geo"], rel=1e-5)
    b_batch = make_batch(ROLLOUT_ROWS)
    b = run_pipeline(resolved, _ctx(b_batch, "B", {"rollout": random_hidden(b_batch, 3)}, W))
    assert "loss/geo" not in b.metrics and "loss/coord_reg" in b.metrics and "token_stats/coord_tokens_total" in b.metrics
    assert float(b.loss.detach()) == pytest.approx(
        b.metrics["loss/struct_ce"] + b.metrics["loss/desc_ce"] + b.metrics["loss/coord_reg"], rel=1e-5)


def test_everything_scoped_out_gives_zero_loss_with_graph():
    resolved = _explicit(TWO, [{"name": "token_ce", "channels": ["B"]}])
    batch = make_batch(GT_ROWS)
    h = {"gt": random_hidden(batch, 1), "self_context": random_hidden(batch, 2)}
    out = run_pipeline(resolved, _ctx(batch, "A", h, lm_head()))
    assert float(out.loss.detach()) == 0.0 and out.metrics["loss/total"] == 0.0
    out.loss.backward()
    assert h["gt"].grad is not None


# ------------------------------------------------------------------ rollout context


def _rollout_struct_weights(batch, w_prefix, mult_rows=(), mult=1.0):
    """Per-token struct weights of docs/training/METRICS_LOSSES.md written out from the row layout."""
    tt, sub, clo = batch.token_types, batch.subset, batch.closure
    w = torch.zeros(tt.shape)
    is_struct = tt == STRUCT
    w[is_struct & ((sub == MATCHED) | (sub == NO_SUBSET))] = w_prefix
    w[is_struct & (sub == FN)] = 1.0
    w[is_struct & (sub == FP)] = 0.0
    for r in mult_rows:
        w[r] *= mult
    w[clo | (tt == EOS)] = 1.0
    return w


@pytest.mark.parametrize("channel, variant", [("B", TWO), (None, RA)])
def test_rollout_context_masks_subsets_and_weights(channel, variant):
    batch = make_batch(ROLLOUT_ROWS, dropped_invalid=[True, False])  # row 0 dropped an invalid object
    hidden, W = random_hidden(batch, 8), lm_head()
    token_cfg = {"rollout_matched_prefix_struct_weight": 0.5, "rollout_fn_desc_weight": 0.25,
                 "rollout_drop_invalid_struct_ce_multiplier": 3.0, "desc_ce_weight": 0.0}
    resolved = _explicit(variant, [
        {"name": "token_ce", "config": token_cfg},
        {"name": "bbox_geo", "weight": 0.7},
        {"name": "coord_reg", "weight": 2.0, "config": {"coord_ce_weight": 1.0, "text_gate_weight": 0.5}},
    ], [{"name": "coord_diag", "config": {"bin_tolerance": 1000}}])
    out = run_pipeline(resolved, _ctx(batch, channel, {"rollout": hidden}, W))
    m = out.metrics
    _check_key_classes(m)
    ce = _token_ce(hidden, W, batch.input_ids)
    sw = _rollout_struct_weights(batch, 0.5, mult_rows=[0], mult=3.0)
    struct_ref = _wmean(ce, sw)
    tt, sub = batch.token_types, batch.subset
    fn_desc = ((tt == DESC) & (sub == FN)).float()
    desc_ref = 0.25 * _wmean(ce, fn_desc)
    assert m["loss/struct_ce"] == pytest.approx(struct_ref, rel=1e-5)
    assert m["loss/desc_ce"] == pytest.approx(desc_ref, rel=1e-5)

    geo, n = _geo_ref(hidden, W, batch, subsets=(MATCHED, FN))
    assert n == 3  # matched + 2 FN, the FP box feeds nothing
    assert m["loss/geo"] == pytest.approx(float(geo.total), rel=1e-5)

    cl, _, tgt = _coord_logits_at(hidden, W, batch)
    assert tgt.numel() == 12
    coord_ce = float((torch.logsumexp(cl, -1) - cl.gather(-1, tgt[:, None]).squeeze(-1)).mean())
    assert m["loss/coord_token_ce"] == pytest.approx(coord_ce, rel=1e-5)
    # text gate: struct with weight > 0 (not FP) + FN desc, never eos
    text = ((sw > 0) & (tt == STRUCT)) | (fn_desc > 0)
    lg = _full_logits(hidden, W).reshape(-1, W.shape[0])
    rows = lg[torch.nonzero(text.reshape(-1)).reshape(-1) - 1]
    p = torch.exp(torch.logsumexp(rows[:, V_TEXT:], -1) - torch.logsumexp(rows, -1))
    text_ref = float(-torch.log(1 - p + 1e-6).mean())
    assert m["loss/coord_reg/text_gate"] == pytest.approx(text_ref, rel=1e-5)
    assert m["coord_diag/bin_acc_frac"] == 1.0 and m["coord_diag/coord_positions_total"] == 12.0

    total = struct_ref + desc_ref + 0.7 * float(geo.total) + 2.0 * (coord_ce + 0.5 * text_ref)
    assert float(out.loss.detach()) == pytest.approx(total, rel=1e-5)


def test_rollout_ablations_fn_desc_zero_and_matched_prefix_struct_zero():
    batch = make_batch(ROLLOUT_ROWS)
    hidden, W = random_hidden(batch, 9), lm_head()
    resolved = _explicit(RA, [{"name": "token_ce", "config": {
        "rollout_fn_desc_weight": 0.0, "rollout_matched_prefix_struct_weight": 0.0}}])
    m = run_pipeline(resolved, _ctx(batch, None, {"rollout": hidden}, W)).metrics
    assert "loss/desc_ce" not in m  # no desc token carries weight: nothing to average
    ce = _token_ce(hidden, W, batch.input_ids)
    assert m["loss/struct_ce"] == pytest.approx(_wmean(ce, _rollout_struct_weights(batch, 0.0)), rel=1e-5)
    assert m["loss/total"] == pytest.approx(m["loss/struct_ce"], rel=1e-6)


# ------------------------------------------------------------------ mean-like contract


def _all_setups():
    full = [
        {"name": "token_ce"}, {"name": "bbox_geo"},
        {"name": "coord_reg", "config": {**ALL_REG, "soft_ce_weight": 0.3, "self_context_soft_ce_weight": 0.2}},
    ]
    diags = [{"name": "coord_diag"}, {"name": "token_stats"}]
    yield "stage1", _explicit(S1, full, diags), GT_ROWS, None, ("gt",)
    yield "channel_a", _explicit(TWO, full, diags), GT_ROWS, "A", ("gt", "self_context")
    yield "channel_b", _explicit(TWO, full, diags), ROLLOUT_ROWS, "B", ("rollout",)


@pytest.mark.parametrize("setup", list(_all_setups()), ids=lambda s: s[0])
def test_every_loss_metric_is_mean_like(setup):
    _, resolved, rows, channel, contexts = setup
    batch = make_batch(rows)
    W = lm_head()
    hidden = {c: random_hidden(batch, 20 + i) for i, c in enumerate(contexts)}
    one = run_pipeline(resolved, _ctx(batch, channel, hidden, W)).metrics
    dup_batch = duplicate_batch(batch)
    dup_hidden = {c: torch.cat([h.detach()] * 2) for c, h in hidden.items()}
    two = run_pipeline(resolved, _ctx(dup_batch, channel, dup_hidden, W)).metrics
    assert set(one) == set(two)
    loss_keys = [k for k in one if k.startswith("loss/")]
    assert len(loss_keys) >= 10
    for key in one:
        if key.endswith(COUNTER_SUFFIXES):
            assert two[key] == pytest.approx(2 * one[key]), key
        else:
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
            assert math.isfinite(one[key])


# ------------------------------------------------------------------ failures


def test_diagnostics_failure_warns_once_and_training_continues():
    calls = []

    @register_module("boom_diag", DIAGNOSTICS, NoConfig, "raises on purpose (test)")
    def boom(ctx, spec, settings):
        calls.append(1)
        raise RuntimeError("kaboom")

    try:
        resolved = _explicit(S1, [{"name": "token_ce"}], [{"name": "boom_diag"}, {"name": "coord_diag"}])
        batch = make_batch(GT_ROWS)
        warned = []
        executor = PipelineExecutor(resolved, warn=lambda msg, cat=None: warned.append((msg, cat)))
        for step in range(2):
            hidden = random_hidden(batch, step)
            out = executor.run(_ctx(batch, None, {"gt": hidden}, lm_head()))
            assert torch.isfinite(out.loss) and "loss/total" in out.metrics
            assert "coord_diag/entropy_mean" in out.metrics
            out.loss.backward()
        assert len(warned) == 1 and "boom_diag" in warned[0][0] and "kaboom" in warned[0][0]
        assert warned[0][1] is RuntimeWarning
        assert len(calls) == 1  # skipped after the first failure
        assert executor.failed_diagnostics == {"boom_diag"}
        # the state belongs to the executor: a new run (a new executor) tries the module again
        with pytest.warns(RuntimeWarning, match="boom_diag"):
            run_pipeline(resolved, _ctx(batch, None, {"gt": random_hidden(batch, 5)}, lm_head()))
    finally:
        unregister_module("boom_diag")


def test_missing_self_context_in_channel_a_raises_naming_the_module():
    batch = make_batch(GT_ROWS)
    resolved = resolve_pipeline({}, TWO)
    with pytest.raises(PipelineError, match=r"module 'token_ce'.*self_context"):
        run_pipeline(resolved, _ctx(batch, "A", {"gt": random_hidden(batch, 1)}, lm_head()))
    with pytest.raises(PipelineError, match=r"module 'token_ce'.*'rollout'"):
        run_pipeline(resolved, _ctx(batch, "B", {"gt": random_hidden(batch, 1)}, lm_head()))


def test_missing_bbox_groups_raises_naming_the_module():
    batch = make_batch(GT_ROWS)
    batch.bbox_groups = []
    resolved = _explicit(S1, [{"name": "token_ce"}, {"name": "bbox_geo"}])
    with pytest.raises(PipelineError, match=r"module 'bbox_geo'.*bbox_groups") as err:
        run_pipeline(resolved, _ctx(batch, None, {"gt": random_hidden(batch, 1)}, lm_head()))
    assert any("stage1.pipeline.objective[1]" in note for note in getattr(err.value, "__notes__", []))
    # at weight 0 the module is only monitoring and the missing boxes are not an error
    zero = _explicit(S1, [{"name": "token_ce"}, {"name": "bbox_geo", "weight": 0.0}])
    assert "loss/geo" not in run_pipeline(zero, _ctx(batch, None, {"gt": random_hidden(batch, 1)}, lm_head())).metrics


def test_group_target_disagreeing_with_coord_targets_raises():
    batch = make_batch(GT_ROWS)
    g = batch.bbox_groups[0]
    batch.bbox_groups[0] = type(g)(g.coord_pos, (1, 2, 3, 4), g.subset)
    with pytest.raises(PipelineError, match="disagree with coord_targets"):
        run_pipeline(_explicit(S1, [{"name": "bbox_geo"}]), _ctx(batch, None, {"gt": random_hidden(batch, 1)}, lm_head()))


def test_channel_must_match_variant_and_contexts_must_be_valid():
    batch = make_batch(GT_ROWS)
    h = {"gt": random_hidden(batch, 1)}
    with pytest.raises(PipelineError, match="channel='A' or 'B'"):
        run_pipeline(resolve_pipeline({}, TWO), _ctx(batch, None, h, lm_head()))
    with pytest.raises(PipelineError, match="channel=None"):
        run_pipeline(resolve_pipeline({}, S1), _ctx(batch, "A", h, lm_head()))
    with pytest.raises(ValueError, match="expected one of"):
        _ctx(batch, None, {"gt": h["gt"], "rollout": h["gt"]}, lm_head())
    with pytest.raises(ValueError, match="coord decode mode 'argmax' unknown"):  # the geometry decode refuses it
        run_pipeline(_explicit(S1, [{"name": "bbox_geo"}], []), _ctx(batch, None, h, lm_head(), mode="argmax"))


def test_empty_batch_of_objects_emits_no_diluting_zeros():
    from tests.test_pipeline_fixtures import gt_row

    batch = make_batch([gt_row([])])
    hidden = random_hidden(batch, 1)
    out = run_pipeline(_explicit(S1, [{"name": "token_ce"}, {"name": "bbox_geo"}, {"name": "coord_reg",
                       "config": {"coord_ce_weight": 1.0}}], [{"name": "coord_diag"}]),
                       _ctx(batch, None, {"gt": hidden}, lm_head()))
    assert "loss/geo" not in out.metrics and "loss/coord_reg" not in out.metrics
    assert out.metrics["coord_diag/coord_positions_total"] == 0.0
    assert out.metrics["loss/total"] == pytest.approx(out.metrics["loss/struct_ce"], rel=1e-6)
    out.loss.backward()


def test_resolved_pipeline_built_by_hand_runs():
    spec = ModuleSpec("token_ce", config=MappingProxyType(dict(get_module("token_ce").defaults)))
    resolved = ResolvedPipeline(S1, (spec,), (), MappingProxyType({"variant": S1}), "explicit")
    batch = make_batch(GT_ROWS)
    out = run_pipeline(resolved, _ctx(batch, None, {"gt": random_hidden(batch, 1)}, lm_head()))
    assert set(out.metrics) == {"loss/struct_ce", "loss/desc_ce", "loss/total"}


# ------------------------------------------------------------------ registry and imports


def test_registry_rejects_duplicates_and_lists_known_names():
    with pytest.raises(ValueError, match="already registered"):
        register_module("token_ce", DIAGNOSTICS, NoConfig, "dup")(lambda ctx, spec, settings: ModuleOutput())
    with pytest.raises(KeyError, match="known objective modules: bbox_geo, coord_reg, token_ce"):
        get_module("nope")
    with pytest.raises(ValueError, match="kind"):
        register_module("x", "loss", NoConfig, "bad kind")


def test_importing_losses_and_pipeline_pulls_no_heavy_backends():
    code = (
        "import sys, losses, pipeline, pipeline.executor, configs.pipeline, pipeline.modules;"
        "configs.pipeline.resolve_pipeline({}, 'stage2_two_channel');"
        "bad = [m for m in ('wandb', 'pycocotools', 'vllm') if m in sys.modules or any(k.startswith(m + '.') for k in sys.modules)];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=".", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
