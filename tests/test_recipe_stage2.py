"""End-to-end Stage-2 recipe on the tiny model: both variants, metrics contract, router across a
resume, rollout fallback."""

from __future__ import annotations

import re

import pytest

import rollout.backends
import train_stage2
from tests._recipe_helpers import (
    ROLLOUT_PAYLOAD,
    STAGE2_ALIGNED_DEMO,
    STAGE2_DEMO,
    STAGE2_ROUTER_KEYS,
    SimulatedCrash,
    assert_metrics_contract,
    crash_on_pipeline_call,
    finite,
    read_rows,
    recipe_argv,
)
from training.router import is_rollout_step

TWO_CHANNEL_LOSS_KEYS = ("loss/total", "loss/struct_ce", "loss/desc_ce", "loss/coord_token_ce", "loss/coord_reg",
                         "loss/geo", "loss/geo/ciou", "loss/geo/smoothl1")


@pytest.fixture(scope="module")
def two_channel_runs(recipe_env, tmp_path_factory):
    """b_ratio 0.5 (A, B, A, B, A): 5 uninterrupted steps ("full"), and the same run killed in
    step 4 after checkpoint-3 and resumed with ``training.resume_from=latest`` ("resumed")."""
    out = tmp_path_factory.mktemp("stage2_run")

    def argv(name, **sets):
        return recipe_argv(recipe_env, STAGE2_DEMO, out, name=name, max_steps=5, stage2_ab__schedule__b_ratio=0.5,
                           training__warmup_steps=1, training__eval_every=0, training__save_every=3, **sets)

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out)
        full_last = train_stage2.main(argv("full"))
        with pytest.MonkeyPatch.context() as crash:
            crash_on_pipeline_call(crash, 4)
            with pytest.raises(SimulatedCrash):
                train_stage2.main(argv("resumed"))
        rows_before_resume = read_rows(out / "resumed")
        train_stage2.main(argv("resumed", training__resume_from="latest"))
    return {"full": read_rows(out / "full"), "full_last": full_last, "before": rows_before_resume,
            "resumed": read_rows(out / "resumed"), "run_dir": out / "full"}


def test_two_channel_takes_both_channels_and_emits_contract_keys(two_channel_runs):
    rows = two_channel_runs["full"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert {k: v for k, v in rows[-1].items() if k != "step"} == pytest.approx(two_channel_runs["full_last"])
    assert_metrics_contract(rows)
    channels = ["B" if r["stage2/channel_b_count"] == 1 else "A" for r in rows]
    assert channels == ["A", "B", "A", "B", "A"]
    for row in rows:
        for key in (*TWO_CHANNEL_LOSS_KEYS, *STAGE2_ROUTER_KEYS, "time/step_s", "stage2/rollout_fallback_count"):
            assert finite(row[key]), (row["step"], key)
        assert row["stage2/channel_a_count"] + row["stage2/channel_b_count"] == 1
        rollout_keys = [k for k in row if k.startswith("rollout/")]
        if row["stage2/channel_b_count"] == 1:
            assert row["stage2/forwards_total"] == 1 and row["stage2/rollout_error_count"] == 0
            assert row["stage2/suffix_forwards_total"] == 0
            for key in ROLLOUT_PAYLOAD:
                assert finite(row[key]), (row["step"], key)
            drops = [k for k in rollout_keys if re.fullmatch(r"rollout/drop_[a-z0-9_]+_count", k)]
            assert drops, "no rollout/drop_<reason>_count key"
            assert any(k.startswith("time/rollout") for k in row)
            # Every GT object is either matched or FN (and FN objects are appended).
            assert row["rollout/matched_total"] + row["rollout/fn_total"] == row["rollout/gt_objects_total"]
        else:
            assert row["stage2/forwards_total"] == 2  # n_softctx_iter of the demo config
            assert row["stage2/suffix_forwards_total"] == 1  # forward 2 reused forward 1's prefix
            assert rollout_keys == []
            # Channel-A computes struct CE in two contexts: both are logged per context.
            assert finite(row["loss/struct_ce/gt"]) and finite(row["loss/struct_ce/self_context"])
    assert rows[-1]["stage2/b_ratio_realized"] == pytest.approx(2 / 5)
    # The end-of-run eval emits eval/rollout/mAP as a float.
    assert isinstance(rows[-1]["eval/rollout/mAP"], float)
    assert (two_channel_runs["run_dir"] / "checkpoint-3" / "trainer_state.json").is_file()


def test_two_channel_router_continues_bresenham_after_resume(two_channel_runs):
    rows, before = two_channel_runs["resumed"], two_channel_runs["before"]
    assert [r["step"] for r in before] == [1, 2, 3]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[:3] == before  # the resumed run appends, never rewrites
    b_steps = 0
    for row in rows:
        s = row["step"] - 1  # 0-based optimizer step
        expected_b = is_rollout_step(s, 0.5)
        assert row["stage2/channel_b_count"] == float(expected_b), row["step"]
        assert row["stage2/channel_a_count"] == float(not expected_b), row["step"]
        b_steps += expected_b
        # Cumulative since step 0, across the resume.
        assert row["stage2/b_ratio_realized"] == pytest.approx(b_steps / row["step"])
    assert_metrics_contract(rows[3:])


def test_two_channel_resume_reproduces_uninterrupted_losses(two_channel_runs):
    """Steps 4 (Channel-B) and 5 (Channel-A) after the resume log the uninterrupted run's values (rtol 1e-5)."""
    for a, b in zip(two_channel_runs["full"], two_channel_runs["resumed"]):
        keys = sorted(k for k in a if k.startswith(("loss/", "rollout/", "stage2/")))
        assert keys == sorted(k for k in b if k.startswith(("loss/", "rollout/", "stage2/")))
        assert "loss/total" in keys
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


def test_rollout_aligned_every_step_is_a_rollout_step(recipe_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the start-up warning names the longest GT answer, read off the cached lengths: tokenise every answer here
    from transformers import AutoTokenizer

    from data.encoding import ChatEncoder
    from data.records import read_jsonl
    from model.tiny import build_tiny_image_processor

    records, _ = read_jsonl(recipe_env.shapes_dir / "train.jsonl")
    encoder = ChatEncoder(AutoTokenizer.from_pretrained(recipe_env.tiny_dir), build_tiny_image_processor(), prompt="p")
    longest = max(encoder.answer_length(r) for r in records)
    argv = recipe_argv(recipe_env, STAGE2_ALIGNED_DEMO, tmp_path, name="ra", max_steps=2, training__eval_every=0,
                       training__save_every=0, rollout_matching__decoding__max_new_tokens=2 * longest - 1)
    train_stage2.main(argv)
    log = (tmp_path / "ra" / "train.log").read_text()
    assert f"below 2x the longest GT answer ({longest} tokens incl. <|im_end|>)" in log
    rows = read_rows(tmp_path / "ra")
    assert [r["step"] for r in rows] == [1, 2]
    assert_metrics_contract(rows)
    for row in rows:
        assert row["stage2/channel_b_count"] == 1 and row["stage2/channel_a_count"] == 0
        assert row["stage2/forwards_total"] == 1
        for key in (*ROLLOUT_PAYLOAD, "loss/total", "loss/struct_ce", "loss/geo"):
            assert finite(row[key]), (row["step"], key)
    assert rows[-1]["stage2/b_ratio_realized"] == 1.0


def test_desc_gate_on_a_rollout_aligned_run_is_counted_and_only_the_mean_is_logged(recipe_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = recipe_argv(recipe_env, STAGE2_ALIGNED_DEMO, tmp_path, name="gate", max_steps=2, training__eval_every=0,
                       training__save_every=0, rollout_matching__matching__desc_gate=0.5)
    train_stage2.main(argv)
    rows = read_rows(tmp_path / "gate")
    assert_metrics_contract(rows)  # no internal key (rollout/_desc_sim_*) reaches metrics.jsonl
    for row in rows:
        assert row["rollout/desc_gate_rejected_total"] >= 0
        assert not any(k.split("/")[-1].startswith("_") for k in row)
        # the mean exists exactly when some pair matched (exact descs: similarity 1 each)
        assert row.get("rollout/desc_sim_mean", 1.0) == 1.0
        assert ("rollout/desc_sim_mean" in row) == (row["rollout/matched_total"] > 0)


class RolloutBroken(RuntimeError):
    pass


def _broken_prepare(*args, **kwargs):
    raise RolloutBroken("rollout backend unavailable (test)")


def test_rollout_failure_falls_back_to_expectation_when_configured(recipe_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_stage2, "prepare_rollout_batches", _broken_prepare)
    argv = recipe_argv(recipe_env, STAGE2_DEMO, tmp_path, name="fb", max_steps=2,
                       stage2_ab__schedule__b_ratio=0.5, stage2_ab__fallback__on_rollout_failure="expectation",
                       training__eval_every=0, training__save_every=0)
    train_stage2.main(argv)
    rows = read_rows(tmp_path / "fb")
    assert_metrics_contract(rows)
    step1, step2 = rows
    assert step1["stage2/rollout_fallback_count"] == 0 and step1["stage2/channel_a_count"] == 1
    assert "stage2/rollout_error_count" not in step1  # scheduled A: no rollout was attempted
    assert step2["stage2/rollout_error_count"] == 1
    log = (tmp_path / "fb" / "train.log").read_text()
    assert "trains as an Expectation step" in log and "Traceback" in log and "rollout backend unavailable (test)" in log
    # Step 2 was scheduled on Channel-B; it trained as an Expectation step and says so.
    assert step2["stage2/rollout_fallback_count"] == 1
    assert step2["stage2/channel_a_count"] == 1 and step2["stage2/channel_b_count"] == 0
    assert step2["stage2/forwards_total"] == 2
    assert step2["stage2/b_ratio_realized"] == 0.0
    assert finite(step2["loss/total"]) and not any(k.startswith("rollout/") for k in step2)


def test_rollout_failure_fails_by_default(recipe_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_stage2, "prepare_rollout_batches", _broken_prepare)
    # b_ratio 1.0: the very first step is a Rollout step.
    argv = recipe_argv(recipe_env, STAGE2_DEMO, tmp_path, name="fail", max_steps=2,
                       stage2_ab__schedule__b_ratio=1.0, training__eval_every=0, training__save_every=0)
    with pytest.raises(RuntimeError, match="on_rollout_failure: expectation") as info:
        train_stage2.main(argv)
    assert isinstance(info.value.__cause__, RolloutBroken)
    # No step was logged: the failed step never trained.
    assert not (tmp_path / "fail" / "metrics.jsonl").exists() or read_rows(tmp_path / "fail") == []


@pytest.mark.parametrize(
    ("variant", "cache"),
    [("aligned", "static"), ("aligned", "dynamic"), ("two_channel", "static")],
)  # two_channel + auto (the default; dynamic on CPU) is the two_channel_runs fixture
def test_sampled_rollouts_resume_exactly(recipe_env, tmp_path, monkeypatch, variant, cache):
    """Rollout-Aligned (or Two-Channel with every step a Rollout step) with sampling (temperature 1),
    with either HF cache mode (``rollout_matching.hf.cache``): 2 uninterrupted steps vs. a run
    killed in step 2 and resumed from checkpoint-1. Step 2 samples the same rollout tokens (the
    sampling stream does not restart at resume) and logs the same losses and rollout counters
    (rtol 1e-5).

    The tiny random model rarely writes a parsable container, so losses alone would not notice a
    different rollout; the sampled token ids do.
    """
    monkeypatch.chdir(tmp_path)
    config = STAGE2_ALIGNED_DEMO if variant == "aligned" else STAGE2_DEMO
    extra = {} if variant == "aligned" else {"stage2_ab__schedule__b_ratio": 1.0}
    sampled: list[list[list[int]]] = []

    class RecordingBackend(rollout.backends.HFGenerationBackend):
        def generate(self, prompts):
            outputs = super().generate(prompts)
            if self.temperature > 0:  # rollouts; the end-of-run eval derives a greedy one
                sampled.append([o.token_ids for o in outputs])
            return outputs

    monkeypatch.setattr(rollout.backends, "HFGenerationBackend", RecordingBackend)

    def argv(name, **sets):
        return recipe_argv(recipe_env, config, tmp_path, name=name, max_steps=2,
                           rollout_matching__decoding__temperature=1.0, rollout_matching__hf__cache=cache,
                           training__save_every=1, training__eval_every=0, **extra, **sets)

    train_stage2.main(argv("full"))
    full, full_tokens = read_rows(tmp_path / "full"), list(sampled)
    assert len(full_tokens) == 2 and full_tokens[0] != full_tokens[1]  # sampling really varies per step

    sampled.clear()
    with monkeypatch.context() as mp:
        crash_on_pipeline_call(mp, 2)
        with pytest.raises(SimulatedCrash):
            train_stage2.main(argv("resumed"))
    train_stage2.main(argv("resumed", training__resume_from="latest"))
    assert sampled == [full_tokens[0], full_tokens[1], full_tokens[1]]  # step 1, crashed step 2, resumed step 2

    resumed = read_rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2]
    for a, b in zip(full, resumed):
        keys = sorted(k for k in a if k.startswith(("loss/", "rollout/")))
        assert "loss/total" in keys and "rollout/gt_objects_total" in keys
        assert keys == sorted(k for k in b if k.startswith(("loss/", "rollout/")))
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


def test_stage2_pipeline_without_token_ce_trains(recipe_env, tmp_path, monkeypatch):
    """An objective without token_ce (geometry + coord_reg only) runs; it used to stop with a bare
    StopIteration after the model had loaded."""
    monkeypatch.chdir(tmp_path)
    argv = recipe_argv(recipe_env, STAGE2_ALIGNED_DEMO, tmp_path, name="no_ce", max_steps=1,
                       training__eval_every=0, training__save_every=0,
                       rollout_matching__pipeline="{objective: [{name: bbox_geo}, {name: coord_reg}], diagnostics: []}")
    train_stage2.main(argv)
    (row,) = read_rows(tmp_path / "no_ce")
    assert_metrics_contract([row])
    assert finite(row["loss/total"]) and finite(row["loss/geo"])
    assert not any(k.startswith(("loss/struct_ce", "loss/desc_ce")) for k in row)
