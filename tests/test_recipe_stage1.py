"""End-to-end Stage-1 recipe on the tiny model: run dir layout, checkpoints, eval, metrics, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train_stage1
from configs.errors import UserError
from pipeline.executor import PipelineExecutor
from tests._recipe_helpers import (
    STAGE1_DEMO,
    SimulatedCrash,
    assert_metrics_contract,
    crash_on_pipeline_call,
    finite,
    read_rows,
    recipe_argv,
)

STAGE1_LOSS_KEYS = ("loss/total", "loss/struct_ce", "loss/desc_ce", "loss/coord_token_ce", "loss/coord_reg")


@pytest.fixture(scope="module")
def stage1_run(recipe_env, tmp_path_factory):
    """4 optimizer steps, eval at step 2 and at the end, a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("stage1_run")
    argv = recipe_argv(recipe_env, STAGE1_DEMO, out, name="s1", max_steps=4,
                       training__eval_every=2, training__save_every=2, training__warmup_steps=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out)  # anything written to a relative path lands in tmp, never in the repo
        last = train_stage1.main(argv)
    return out / "s1", last


def test_stage1_run_dir_layout(stage1_run):
    run_dir, _ = stage1_run
    for name in ("config.resolved.yaml", "pipeline.json", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    for step in (2, 4):
        ev = run_dir / "eval" / f"step_{step}"
        preds = [json.loads(line) for line in (ev / "predictions.jsonl").read_text().splitlines() if line.strip()]
        assert len(preds) == 1  # eval.max_samples=1
        assert json.loads((ev / "metrics.json").read_text())["step"] == step  # the real step, not null
        for name in ("per_image.json", "matches.jsonl", "per_class.csv", "coco_gt.json", "coco_preds.json"):
            assert (ev / name).is_file(), name  # the eval artifacts (docs/EVAL.md "Artifacts")
        ckpt = run_dir / f"checkpoint-{step}"
        assert (ckpt / "trainer_state.json").is_file()
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
        assert (ckpt / "model" / "config.json").is_file()
    assert not (run_dir / "eval" / "step_1").exists() and not (run_dir / "checkpoint-1").exists()


def test_stage1_metrics_one_line_per_step(stage1_run):
    run_dir, last = stage1_run
    rows = read_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        for key in STAGE1_LOSS_KEYS:
            assert finite(row[key]), (row["step"], key)
        has_eval = row["step"] in (2, 4)
        assert ("eval/rollout/mAP" in row) == has_eval
        if has_eval:
            assert isinstance(row["eval/rollout/mAP"], float)
            assert 0.0 <= row["eval/rollout/mAP"] <= 1.0
    # main() returns what was logged for the last step.
    assert {k: v for k, v in rows[-1].items() if k != "step"} == pytest.approx(last)


def test_stage1_metrics_contract(stage1_run):
    rows = read_rows(stage1_run[0])
    assert_metrics_contract(rows)
    for row in rows:
        assert row["loss/total"] > 0
        assert "train/lr" in row and "time/step_s" in row


def test_stage1_checkpoint_loads_with_transformers_and_generates(stage1_run, recipe_env):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from data.encoding import ChatEncoder
    from data.records import read_jsonl
    from model.loading import load_model_and_processors

    model_dir = stage1_run[0] / "checkpoint-4" / "model"
    hf_model = AutoModelForImageTextToText.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok.convert_tokens_to_ids(["<|coord_0|>", "<|coord_999|>"])
    assert ids[1] - ids[0] == 999  # coord tokens saved with the checkpoint, contiguous
    assert hf_model.get_input_embeddings().weight.shape[0] >= len(tok)

    # Training changed the weights: the checkpoint is not the untouched tiny init.
    init = AutoModelForImageTextToText.from_pretrained(str(recipe_env.tiny_dir))
    trained, start = hf_model.get_output_embeddings().weight, init.get_output_embeddings().weight
    assert trained.shape == start.shape and not torch.equal(trained, start)

    model, tokenizer, image_processor, coord_vocab = load_model_and_processors(str(model_dir), add_coord_tokens=False)
    assert len(coord_vocab.ids) == 1000
    encoder = ChatEncoder(tokenizer, image_processor, prompt="Detect all objects.")
    records, _ = read_jsonl(recipe_env.shapes_dir / "val.jsonl")
    prompt = encoder.encode_prompt(records[0])
    n = prompt.input_ids.shape[0]
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt.input_ids[None],
            attention_mask=torch.ones(1, n, dtype=torch.long),
            mm_token_type_ids=prompt.mm_token_type_ids[None],
            pixel_values=prompt.pixel_values,
            image_grid_thw=prompt.image_grid_thw.reshape(-1, 3),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert torch.equal(out[0, :n], prompt.input_ids)
    assert n < out.shape[1] <= n + 4


def test_stage1_lr_schedule_counts_optimizer_steps_under_accumulation(recipe_env, tmp_path, monkeypatch):
    """With gradient accumulation the scheduler steps once per optimizer step, not per micro-step.

    linear, warmup 0, max_steps 2, lr 1e-3: after optimizer step 1 the factor is 1 - 1/2, so
    ``train/lr`` (the lr of the next step) is 5e-4; stepping per micro-step would give 0.
    """
    monkeypatch.chdir(tmp_path)
    argv = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name="ga", max_steps=2,
                       training__gradient_accumulation_steps=2, training__lr_scheduler="linear",
                       training__lr=1e-3, training__min_lr_ratio=0.0, training__eval_every=0,
                       training__save_every=0)
    train_stage1.main(argv)
    rows = read_rows(tmp_path / "ga")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["train/lr"] == pytest.approx(5e-4, rel=1e-9)
    assert rows[1]["train/lr"] == pytest.approx(0.0, abs=1e-12)
    # Counters sum over the 2 micro-steps; with the demo's short prompt the 8 training samples pack
    # into 2 rows (the log says so), so the 2 micro-steps hold all 8.
    assert rows[0]["packing/segments_total"] == 8


def test_stage1_resume_reproduces_uninterrupted_losses(recipe_env, tmp_path, monkeypatch):
    """6 uninterrupted steps vs. the same run killed after step 3 (checkpoint-3) and resumed
    with ``training.resume_from=latest``: steps 4-6 log the same losses (rtol 1e-5).

    The interruption is a crash in step 4's pipeline call, so both runs have the same
    config (cosine schedule over 6 steps) and the epoch boundary (4 micro-batches per epoch)
    falls inside the resumed part.
    """
    monkeypatch.chdir(tmp_path)

    def argv(name, **sets):
        return recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name=name, max_steps=6, training__warmup_steps=1,
                           training__save_every=3, training__eval_every=0, **sets)

    train_stage1.main(argv("full"))
    full = read_rows(tmp_path / "full")

    with monkeypatch.context() as mp:
        crash_on_pipeline_call(mp, 4)
        with pytest.raises(SimulatedCrash):
            train_stage1.main(argv("resumed"))
    assert [r["step"] for r in read_rows(tmp_path / "resumed")] == [1, 2, 3]
    assert (tmp_path / "resumed" / "checkpoint-3" / "trainer_state.json").is_file()

    train_stage1.main(argv("resumed", training__resume_from="latest"))
    resumed = read_rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    loss_keys = sorted(k for k in full[0] if k.startswith("loss/"))
    assert "loss/total" in loss_keys
    for a, b in zip(full, resumed):
        assert a["step"] == b["step"]
        assert a["train/lr"] == pytest.approx(b["train/lr"], rel=1e-12)
        assert a["train/tokens_total"] == b["train/tokens_total"]
        for key in loss_keys:
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


def test_stage1_resume_latest_without_checkpoint_fails(recipe_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name="empty", max_steps=2,
                       training__resume_from="latest")
    with pytest.raises(FileNotFoundError, match="no checkpoint-<step> .* drop training.resume_from to start afresh"):
        train_stage1.main(argv)
    assert not Path(tmp_path / "empty" / "metrics.jsonl").exists()


def test_resume_with_nothing_left_to_train_fails_and_keeps_the_run_dir(recipe_env, tmp_path, monkeypatch):
    """max_steps <= the checkpoint's step: a clear error naming the fix, config.merged.yaml untouched."""
    monkeypatch.chdir(tmp_path)
    argv = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name="done", max_steps=2, training__warmup_steps=1,
                       training__eval_every=0, training__save_every=2)
    train_stage1.main(argv)
    merged = (tmp_path / "done" / "config.merged.yaml").read_text()
    for max_steps in (2, 1):
        with pytest.raises(UserError, match=rf"training.max_steps={max_steps} but .*checkpoint-2 is already at step 2.*"
                                            r"--set training.max_steps=4"):
            train_stage1.main([*argv, "--set", "training.resume_from=latest", "--set", f"training.max_steps={max_steps}",
                               "--set", "training.lr=0.5"])
    assert (tmp_path / "done" / "config.merged.yaml").read_text() == merged


def test_a_run_that_died_before_its_first_step_does_not_block_the_rerun(recipe_env, tmp_path, monkeypatch):
    """Empty metrics.jsonl and no checkpoint: the dir holds no run, the plain rerun is accepted."""
    monkeypatch.chdir(tmp_path)
    argv = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name="died", max_steps=1, training__warmup_steps=0,
                       training__eval_every=0, training__save_every=0)

    def crash(self, ctx):
        raise RuntimeError("died in the first step")


    with monkeypatch.context() as mp:
        mp.setattr(PipelineExecutor, "run", crash)  # the objective runs inside the wrapped forward
        with pytest.raises(RuntimeError, match="first step"):
            train_stage1.main(argv)
    assert (tmp_path / "died" / "metrics.jsonl").read_text() == ""
    train_stage1.main(argv)
    assert [r["step"] for r in read_rows(tmp_path / "died")] == [1]


def test_stage1_coco_failure_logs_zero_map_and_training_goes_on(recipe_env, tmp_path, monkeypatch, caplog):
    """A COCO failure inside the in-loop eval gives ``eval/rollout/mAP == 0.0`` plus a
    warning, and the run continues past that eval to its last step."""

    import eval.inloop

    def boom(*args, **kwargs):
        raise RuntimeError("pycocotools exploded")

    monkeypatch.setattr(eval.inloop, "evaluate_detection", boom)
    monkeypatch.chdir(tmp_path)
    argv = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name="coco_fail", max_steps=3,
                       training__eval_every=1, training__save_every=0, training__warmup_steps=1)
    train_stage1.main(argv)
    rows = read_rows(tmp_path / "coco_fail")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["eval/rollout/mAP"] == 0.0 and isinstance(row["eval/rollout/mAP"], float)
        assert finite(row["loss/total"])
    log = (tmp_path / "coco_fail" / "train.log").read_text()  # the warning reaches the run's log
    assert log.count("COCO evaluation failed (RuntimeError: pycocotools exploded)") >= 3


def test_stage1_resume_drops_lines_logged_after_the_checkpoint(recipe_env, tmp_path, monkeypatch):
    """A run killed in step 6 logged steps 4-5 past checkpoint-3; the resumed run re-logs them once."""
    monkeypatch.chdir(tmp_path)
    argv = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name="dup", max_steps=6, training__warmup_steps=1,
                       training__save_every=3, training__eval_every=0)
    with monkeypatch.context() as mp:
        crash_on_pipeline_call(mp, 6)
        with pytest.raises(SimulatedCrash):
            train_stage1.main(argv)
    assert [r["step"] for r in read_rows(tmp_path / "dup")] == [1, 2, 3, 4, 5]
    train_stage1.main([*argv, "--set", "training.resume_from=latest"])
    assert [r["step"] for r in read_rows(tmp_path / "dup")] == [1, 2, 3, 4, 5, 6]


def test_stage1_loader_workers_give_the_same_run(recipe_env, tmp_path, monkeypatch):
    """data.num_workers moves encoding + collation into DataLoader workers without changing the run."""
    monkeypatch.chdir(tmp_path)

    def run(name, workers):
        argv = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name=name, max_steps=3, training__warmup_steps=1,
                           training__eval_every=0, training__save_every=0, data__num_workers=workers)
        train_stage1.main(argv)
        return read_rows(tmp_path / name)

    inline, workers = run("w0", 0), run("w2", 2)
    for a, b in zip(inline, workers, strict=True):
        assert a["train/tokens_total"] == b["train/tokens_total"]
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=1e-6)


def test_a_used_run_dir_is_refused_unless_resuming_or_overwriting(recipe_env, tmp_path, monkeypatch):
    """Two runs never interleave in one run dir: the second is refused with the fix, or replaces it."""
    monkeypatch.chdir(tmp_path)
    argv = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name="again", max_steps=2, training__warmup_steps=1,
                       training__eval_every=0, training__save_every=0)
    train_stage1.main(argv)
    with pytest.raises(FileExistsError, match="run.overwrite=true") as exc:
        train_stage1.main(argv)
    # resuming is offered exactly when there is a checkpoint to resume from (the end of a run saves one)
    assert ("--set training.resume_from=latest" in str(exc.value)) == any((tmp_path / "again").glob("checkpoint-*"))
    (tmp_path / "again" / "stale.txt").write_text("from the first run")
    train_stage1.main([*argv, "--set", "run.overwrite=true"])
    assert [r["step"] for r in read_rows(tmp_path / "again")] == [1, 2]
    assert not (tmp_path / "again" / "stale.txt").exists()
