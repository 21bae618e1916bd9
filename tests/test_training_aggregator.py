"""MetricAggregator (docs/training/METRICS_CONTRACT.md): reduction classes, derived ratios, and the real 2-rank gloo path."""

from __future__ import annotations

import json
import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from tests._dist import spawn_ranks
from tests._recipe_helpers import check_log_row
from training.aggregator import F1, MetricAggregator, Ratio, check_metric_key, classify_key

# ------------------------------------------------------------ classification


@pytest.mark.parametrize(
    ("key", "cls"),
    [
        ("loss/total", "mean"),
        ("loss/geo/ciou", "mean"),
        ("rollout/fp_total", "counter"),
        ("rollout/drop_truncated_count", "counter"),
        ("rollout/_sim_sum", "internal"),
        ("loss/_geo_num", "internal"),
        ("time/_scratch", "internal"),
        ("rollout/matched_sum", "counter"),
        ("x/a_num", "counter"),
        ("x/a_den", "counter"),
        ("time/forward_s", "time"),
        ("time/gen_count", "time"),
        ("rollout/parse_valid_rate", "mean"),
        ("coord_diag/entropy_mean", "mean"),
        ("rollout/gt_per_sample", "mean"),
        ("stage2/b_ratio_realized", "mean"),
        ("lr", "mean"),
    ],
)
def test_classify_key(key, cls):
    assert classify_key(key) == cls


@pytest.mark.parametrize(
    "key",
    [
        "loss/total",
        "loss/struct_ce",
        "loss/geo/ciou",
        "loss/coord_reg/soft_ce/self_context",
        "loss/struct_ce/rollout",
        "loss/coord_token_ce",
        "rollout/drop_bad_bbox_count",
        "eval/rollout/mAP",
        "time/geo",
        "stage2/channel_a_count",
    ],
)
def test_check_metric_key_accepts_contract_keys(key):
    assert check_metric_key(key) == classify_key(key)


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("loss_struct_ce", "alias"),
        ("train/loss_struct_ce", "alias"),
        ("train/struct_loss", "alias"),
        ("train/loss", "alias"),
        ("train/struct_ce", "outside the loss/ namespace"),
        ("loss/total_count", "unknown loss component"),
        ("loss/struct_ce_total", "unknown loss component"),
        ("loss/bbox", "unknown loss component"),
        ("loss/geo/iou", "not a canonical loss key"),
        ("loss/geo/ciou/teacher", "not a canonical loss key"),
        ("loss/geo/ciou/gt/extra", "not a canonical loss key"),
        ("rollout/drop_bad_bbox", "rollout/drop_<reason>_count"),
        ("rollout//fp_total", "path segments"),
        ("rollout/fp total", "path segments"),
    ],
)
def test_check_metric_key_rejects(key, fragment):
    with pytest.raises(ValueError) as info:
        check_metric_key(key)
    assert fragment in str(info.value)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerator state is a process-wide singleton: leave none behind for other test files."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_add_rejects_bad_key_and_non_scalar():
    agg = MetricAggregator()
    with pytest.raises(ValueError):
        agg.add({"loss_struct_ce": 1.0})
    with pytest.raises(ValueError, match="scalar"):
        agg.add({"loss/total": torch.ones(2)})
    with pytest.raises(TypeError, match="number"):
        agg.add({"rollout/fp_total": 1, "loss/total": "1.0"})
    assert agg.reduce() == {}  # nothing of the failed micro-step was kept


def test_check_log_row():
    check_log_row({"step": 3, "loss/total": 1.0, "rollout/fp_total": 2.0})
    with pytest.raises(ValueError, match="internal"):
        check_log_row({"step": 3, "rollout/_sim_sum": 1.0})
    with pytest.raises(ValueError, match="alias"):
        check_log_row({"loss_total": 1.0})


# ------------------------------------------------------------ single process


def test_single_process_accelerator_uses_no_collectives(fresh_accelerate_state):
    from accelerate import Accelerator

    agg = MetricAggregator(accelerator=Accelerator(cpu=True))
    agg.add({"loss/total": 1.0, "time/fwd": 2.0})
    agg.add({"loss/total": 2.0, "time/fwd": 3.0})
    assert agg.reduce() == {"loss/total": 1.5, "time/fwd": 5.0}


def test_counter_sum_mean_no_dilution_time_sum_internal_dropped():
    agg = MetricAggregator(derived={})
    agg.add({"loss/total": torch.tensor(1.0), "rollout/fp_total": 2, "time/fwd": 0.5, "rollout/_sim_sum": 3.0})
    agg.add({"loss/total": 3.0, "rollout/fp_total": 5, "time/fwd": 0.25, "coord_diag/entropy_mean": 7.0})
    agg.add({"loss/total": 5.0})
    out = agg.reduce()
    assert out == {
        "loss/total": 3.0,  # (1+3+5)/3
        "rollout/fp_total": 7.0,  # 2+5
        "time/fwd": 0.75,  # per-rank sum
        "coord_diag/entropy_mean": 7.0,  # present in 1 of 3 micro-steps: not 7/3
    }
    # reduce resets
    assert agg.reduce() == {}
    assert agg.num_micro_steps == 0


def test_derived_ratios_are_exact_over_the_step_not_mean_of_ratios():
    agg = MetricAggregator()  # default ROLLOUT_DERIVED
    # micro-step 1: 1/1 matched; micro-step 2: 1/9 matched. Mean of ratios would be 5/9.
    agg.add({"rollout/matched_total": 1, "rollout/valid_pred_objects_total": 1, "rollout/gt_objects_total": 2})
    agg.add({"rollout/matched_total": 1, "rollout/valid_pred_objects_total": 9, "rollout/gt_objects_total": 3})
    out = agg.reduce()
    assert out["rollout/precision"] == pytest.approx(2 / 10)
    assert out["rollout/recall"] == pytest.approx(2 / 5)
    p, r = 2 / 10, 2 / 5
    assert out["rollout/f1"] == pytest.approx(2 * p * r / (p + r))
    assert out["rollout/matched_total"] == 2.0


def test_per_sample_rates_are_ratios_of_sums_over_uneven_micro_steps():
    # micro-step 1: 1 sample, parse-valid, 3 GT, 2 preds; micro-step 2: 3 samples, none valid, 1 GT, 6 preds.
    # Means of the per-micro-step ratios would give 0.5 / 1.67 / 2.0; the step's true values are below.
    agg = MetricAggregator()
    agg.add({"rollout/parse_valid_rate": 1.0, "rollout/gt_per_sample": 3.0, "rollout/pred_per_sample": 2.0,
             "rollout/_parse_valid_num": 1, "rollout/_samples_den": 1,
             "rollout/gt_objects_total": 3, "rollout/valid_pred_objects_total": 2})  # fmt: skip
    agg.add({"rollout/parse_valid_rate": 0.0, "rollout/gt_per_sample": 1 / 3, "rollout/pred_per_sample": 2.0,
             "rollout/_parse_valid_num": 0, "rollout/_samples_den": 3,
             "rollout/gt_objects_total": 1, "rollout/valid_pred_objects_total": 6})  # fmt: skip
    out = agg.reduce()
    assert out["rollout/parse_valid_rate"] == pytest.approx(1 / 4)
    assert out["rollout/gt_per_sample"] == pytest.approx(4 / 4)
    assert out["rollout/pred_per_sample"] == pytest.approx(8 / 4)


def test_derived_absent_inputs_not_emitted_and_zero_den_gives_empty():
    agg = MetricAggregator()
    agg.add({"loss/total": 1.0})
    assert "rollout/precision" not in agg.reduce()
    agg.add({"rollout/matched_total": 0, "rollout/valid_pred_objects_total": 0, "rollout/gt_objects_total": 4})
    out = agg.reduce()
    assert out["rollout/precision"] == 0.0 and out["rollout/recall"] == 0.0 and out["rollout/f1"] == 0.0


def test_derived_from_internal_keys_and_internal_never_emitted():
    agg = MetricAggregator(derived={"rollout/sim_mean": Ratio("rollout/_sim_sum", "rollout/_sim_n")})
    agg.add({"rollout/_sim_sum": 1.5, "rollout/_sim_n": 3})
    agg.add({"rollout/_sim_sum": 0.5, "rollout/_sim_n": 1})
    assert agg.reduce() == {"rollout/sim_mean": 0.5}


def test_f1_helper_matches_harmonic_mean():
    f1 = F1("m", "p", "g")
    assert f1({"m": 3.0, "p": 4.0, "g": 6.0}) == pytest.approx(2 * (3 / 4) * (3 / 6) / (3 / 4 + 3 / 6))
    assert f1({}) is None


def test_derived_must_be_mean_like():
    with pytest.raises(ValueError, match="mean-like"):
        MetricAggregator(derived={"rollout/matched_ratio_total": Ratio("a_total", "b_total")})


def test_step_values_merged_without_reduction_and_collisions_rejected():
    agg = MetricAggregator(derived={})
    agg.add({"loss/total": 2.0})
    agg.add({"loss/total": 4.0})
    out = agg.reduce(step_values={"stage2/channel_b_count": 1.0, "stage2/b_ratio_realized": 0.25})
    assert out == {"loss/total": 3.0, "stage2/channel_b_count": 1.0, "stage2/b_ratio_realized": 0.25}
    agg.add({"loss/total": 2.0})
    with pytest.raises(ValueError, match="collides"):
        agg.reduce(step_values={"loss/total": 1.0})


def test_nan_is_propagated_not_dropped():
    agg = MetricAggregator(derived={})
    agg.add({"loss/total": float("nan")})
    agg.add({"loss/total": 1.0})
    assert math.isnan(agg.reduce()["loss/total"])


# ------------------------------------------------------------ 2-rank gloo DDP


# Rank-specific micro-steps: different key sets and different micro-step counts.
_RANK_STEPS = {
    0: [
        [  # step 0, 3 micro-steps
            {"loss/total": 1.0, "rollout/matched_total": 2, "rollout/valid_pred_objects_total": 4, "time/gen": 1.0},
            {"loss/total": 2.0, "rollout/matched_total": 1, "rollout/valid_pred_objects_total": 1, "time/gen": 2.0},
            {"loss/total": 3.0, "only0/x_mean": 5.0, "rollout/_sim_sum": 1.0},
        ],
        [{"loss/total": 4.0}],  # step 1: rank 1 has no micro-step with metrics at all
    ],
    1: [
        [  # step 0, 2 micro-steps
            {"loss/total": 10.0, "rollout/matched_total": 3, "rollout/valid_pred_objects_total": 5, "time/gen": 2.5},
            {"loss/total": 20.0, "only1/y_rate": 0.5, "rollout/gt_objects_total": 8, "time/gen": 1.0},
        ],
        [],
    ],
}

_EXPECTED = [
    {
        "loss/total": (2.0 + 15.0) / 2,  # per-rank means 2 and 15, averaged over 2 ranks
        "only0/x_mean": 5.0,  # present on rank 0 only: not halved
        "only1/y_rate": 0.5,
        "rollout/matched_total": 6.0,
        "rollout/valid_pred_objects_total": 10.0,
        "rollout/gt_objects_total": 8.0,
        "rollout/precision": 6 / 10,
        "rollout/recall": 6 / 8,
        "rollout/f1": 2 * 6 / (10 + 8),
        "time/gen": 3.5,  # rank sums 3.0 and 3.5 -> max
    },
    {"loss/total": 4.0},
]


def _ddp_worker(rank: int, world: int, out_dir: str) -> None:
    # A FileStore rendezvous: no TCP port to pick, so no race with other processes on the machine.
    store = f"file://{os.path.join(out_dir, 'pg_store')}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        agg = MetricAggregator()
        results = []
        for micro_steps in _RANK_STEPS[rank]:
            for metrics in micro_steps:
                agg.add(metrics)
            results.append(agg.reduce())
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(results, fh)
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_ranks_different_keys_same_result(tmp_path):
    spawn_ranks(_ddp_worker, (2, str(tmp_path)), what="DDP aggregator")
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == r1
    assert len(r0) == len(_EXPECTED)
    for got, want in zip(r0, _EXPECTED):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key]), key
        check_log_row(got)


def test_fill_and_coord_diag_means_are_ratios_of_sums_over_uneven_micro_steps():
    agg = MetricAggregator()
    # micro-step 1: 3 of 4 slots filled, 1 coord position (entropy 2.0); micro-step 2: 12 of 12, 3 positions
    # (entropy sum 3.0). Means of the micro-step values would give 0.875 and 1.5.
    agg.add({"train/tokens_total": 3, "packing/fill_frac": 0.75, "packing/_slots_den": 4,
             "coord_diag/coord_positions_total": 1, "coord_diag/entropy_mean": 2.0, "coord_diag/_entropy_mean_sum": 2.0,
             "coord_diag/_entropy_mean_den": 1})  # fmt: skip
    agg.add({"train/tokens_total": 12, "packing/fill_frac": 1.0, "packing/_slots_den": 12,
             "coord_diag/coord_positions_total": 3, "coord_diag/entropy_mean": 1.0, "coord_diag/_entropy_mean_sum": 3.0,
             "coord_diag/_entropy_mean_den": 3})  # fmt: skip
    out = agg.reduce()
    assert out["packing/fill_frac"] == pytest.approx(15 / 16)
    assert out["coord_diag/entropy_mean"] == pytest.approx(5.0 / 4)
    # a step without coord positions emits no coord_diag mean (no diluting zero)
    agg.add({"coord_diag/coord_positions_total": 0})
    assert "coord_diag/entropy_mean" not in agg.reduce()
    agg.add({"coord_diag/_entropy_mean_sum": 0.0, "coord_diag/_entropy_mean_den": 0, "coord_diag/entropy_mean": 0.0})
    assert "coord_diag/entropy_mean" not in agg.reduce()  # a zero den: no value, even over a micro-step mean
