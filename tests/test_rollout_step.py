"""``rollout.step``: a whole accumulation window is rolled out in one generate call and split back
into one teacher-forced rollout batch per micro-batch, identical to rolling each out alone."""

from __future__ import annotations

import torch

from data.encoding import prompts_of
from data.packing import collate_rows
from rollout.step import MatchingConfig, prepare_rollout_batches
from tests.test_forwards_fixtures import FixedBackend, make_env, mixed_rollout_texts, prepare_rollout_batch

KW = dict(matching=MatchingConfig(), max_length=1024, packing=True)


def test_window_in_one_generate_call_equals_micro_batches_alone(tmp_path):
    env = make_env(tmp_path, num_train=4)
    groups = [env.records[:2], env.records[2:]]
    texts = [mixed_rollout_texts(g) for g in groups]

    window_backend = FixedBackend(env.tokenizer, texts[0] + texts[1])
    # the GT micro-batches as the loader hands them over: their prompts are sliced out of the batches
    gt = [collate_rows([[env.samples[i] for i in ids]], env.pad_id, indices=[ids]) for ids in ([0, 1], [2, 3])]
    prompts = [prompts_of(b, env.records) for b in gt]
    assert [[p.record for p in group] for group in prompts] == groups
    window = prepare_rollout_batches(groups, encoder=env.encoder, prompts=prompts, backend=window_backend,
                                     coord_vocab=env.coord_vocab, pad_token_id=env.pad_id, **KW)
    assert window_backend.calls == 1 and len(window) == 2

    for g, (records, got) in enumerate(zip(groups, window)):
        alone = prepare_rollout_batch(records, encoder=env.encoder, backend=FixedBackend(env.tokenizer, texts[g]),
                                      coord_vocab=env.coord_vocab, pad_token_id=env.pad_id, **KW)
        for name in ("input_ids", "token_types", "subset", "coord_targets", "closure", "dropped_invalid",
                     "pixel_values", "image_grid_thw"):
            assert torch.equal(getattr(got.batch, name), getattr(alone.batch, name)), (g, name)
        for key, value in alone.metrics.items():
            if not key.startswith("time/"):
                assert got.metrics[key] == value, (g, key)
    # the builder never had to move a closure (the parser and the closure scan agree), and says so
    assert all(b.metrics["rollout/closure_scan_mismatch_count"] == 0.0 for b in window)
    # the window's generation time is reported once (on the first micro-batch)
    assert window[1].metrics["time/rollout_generate_s"] == 0.0
    assert window[0].metrics["rollout/matched_total"] + window[1].metrics["rollout/matched_total"] > 0
    assert window[0].metrics["rollout/max_new_tokens_hit_count"] == 0.0


def test_rollouts_cut_at_the_budget_are_counted(tmp_path):
    env = make_env(tmp_path, num_train=2)
    cut = FixedBackend(env.tokenizer, mixed_rollout_texts(env.records[:2]), finished=False)
    got = prepare_rollout_batch(env.records[:2], encoder=env.encoder, backend=cut, coord_vocab=env.coord_vocab,
                                pad_token_id=env.pad_id, **KW)
    assert got.metrics["rollout/max_new_tokens_hit_count"] == 2.0


def test_token_budget_warning_from_the_longest_answer():
    from rollout.step import token_budget_warning

    assert token_budget_warning(96, 0) is None  # no training answer
    assert token_budget_warning(96, 48) is None  # 2 x 48 fits exactly
    msg = token_budget_warning(96, 49)
    assert "max_new_tokens=96" in msg and "49 tokens" in msg and ">= 98" in msg


def test_the_budget_hit_advice_only_when_gt_answers_exceed_the_budget():
    import logging

    from rollout.step import budget_hit_message

    level, msg = budget_hit_message(3, 2, 64, 80)  # a GT answer needs 80 > 64: raising helps
    assert level == logging.WARNING and "raise it to >= 80" in msg and "step 3: 2 rollout(s)" in msg
    level, msg = budget_hit_message(3, 2, 64, 64)  # every GT answer fits: the model rambles, no advice
    assert level == logging.INFO and "raise" not in msg and "does not stop yet" in msg
