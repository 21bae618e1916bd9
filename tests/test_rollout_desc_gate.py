"""Stage-2 semantic description gate (rollout_matching.matching.desc_gate): off by default, counted, and the
desc-similarity monitor logged only as a mean of internal sums (the internal sums never reach the log)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from configs.types import MatchingConfig, SemanticConfig
from rollout.matching import desc_similarity_matrix, hungarian_match, iou_matrix
from tests._recipe_helpers import check_log_row
from tests.test_forwards_fixtures import FixedBackend, answer_text, make_env, obj_text, prepare_rollout_batch
from training.aggregator import MetricAggregator

BOXES = [[0, 0, 100, 100], [500, 500, 600, 600]]


def test_gate_refuses_a_pair_whose_descs_differ_and_counts_it():
    sims = [[0.2, 0.0], [0.0, 0.9]]  # pred 0 sits on GT 0 but its desc is unrelated
    off = hungarian_match(BOXES, BOXES)
    on = hungarian_match(BOXES, BOXES, MatchingConfig(desc_gate=0.5), desc_sim=sims)
    assert off.pairs == [(0, 0), (1, 1)] and off.desc_gate_rejected == 0
    assert on.pairs == [(1, 1)] and on.fp == [0] and on.fn == [0] and on.desc_gate_rejected == 1
    assert hungarian_match(BOXES, BOXES, MatchingConfig(desc_gate=0.2), desc_sim=sims).pairs == [(0, 0), (1, 1)]  # inclusive
    with pytest.raises(ValueError, match="desc_sim of shape"):
        hungarian_match(BOXES, BOXES, MatchingConfig(desc_gate=0.5))
    assert MatchingConfig().desc_gate is None  # off by default


def test_similarity_matrix_exact_only_and_with_the_encoder(tmp_path):
    from eval.semantic import load_encoder
    from tests._semantic_fixtures import build_hand_encoder

    exact = desc_similarity_matrix(["cat", "Dog_", None], ["cat", "dog"])
    assert exact.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    enc = load_encoder(SemanticConfig(model=str(build_hand_encoder(tmp_path))))
    sims = desc_similarity_matrix(["kitty", "cat"], ["cat", "truck"], enc)
    assert sims[0, 0] == pytest.approx(2 / (math.sqrt(2) * 2), abs=1e-5)  # 0.7071
    assert sims[0, 1] == pytest.approx(2 / (2 * math.sqrt(2)), abs=1e-5)  # kitty . truck = 0.7071
    assert sims[1].tolist() == pytest.approx([1.0, 0.0], abs=1e-5)


def _texts(records):
    """Every GT object at its own bins; object 0 says "purple star" instead of its desc."""
    return [answer_text([obj_text("purple star" if k == 0 else o.desc, o.bins) for k, o in enumerate(r.objects)])
            for r in records]


def test_rollout_step_with_the_gate_counts_rejections_and_logs_only_the_mean(tmp_path):
    env = make_env(tmp_path, num_train=2)
    records = env.records[:2]
    assert all(r.objects and r.objects[0].desc != "purple star" for r in records)
    kw = dict(encoder=env.encoder, coord_vocab=env.coord_vocab, pad_token_id=env.pad_id, max_length=1024, packing=True)
    off = prepare_rollout_batch(records, backend=FixedBackend(env.tokenizer, _texts(records)), matching=MatchingConfig(), **kw)
    assert not any("desc_gate" in k or "desc_sim" in k for k in off.metrics)  # gate off: no new keys, the logs do not move
    gated = MatchingConfig(desc_gate=0.5)
    on = prepare_rollout_batch(records, backend=FixedBackend(env.tokenizer, _texts(records)), matching=gated, **kw)
    n_gt = sum(len(r.objects) for r in records)
    assert off.metrics["rollout/matched_total"] == n_gt
    assert on.metrics["rollout/matched_total"] == n_gt - 2  # each record's object 0 is refused
    # refused pairs: object 0's box against every GT box of its record at IoU >= the gate whose desc differs
    expected = sum(int(((iou_matrix([r.objects[0].bins], [o.bins for o in r.objects])[0] >= gated.iou_gate)
                        & np.array([o.desc != "purple star" for o in r.objects])).sum()) for r in records)
    assert on.metrics["rollout/desc_gate_rejected_total"] == expected >= 2
    assert on.metrics["rollout/_desc_sim_sum"] == on.metrics["rollout/_desc_sim_den"] == n_gt - 2  # exact pairs: 1 each

    agg = MetricAggregator()
    agg.add(on.metrics)
    agg.add({**on.metrics, "rollout/_desc_sim_sum": 0.0, "rollout/_desc_sim_den": 2.0})  # a second micro-step
    row = agg.reduce()
    assert row["rollout/desc_sim_mean"] == pytest.approx((n_gt - 2) / (n_gt - 2 + 2))  # sum of sums / sum of counts
    assert row["rollout/desc_gate_rejected_total"] == 2 * expected
    assert not any(k.split("/")[-1].startswith("_") for k in row)
    check_log_row({"step": 1, **row})  # the internal sums never reach the log
