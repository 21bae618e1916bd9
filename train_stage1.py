"""Stage-1: teacher forcing on ground truth, statically packed, loss from the objective pipeline.

    python train_stage1.py --config configs/demo/stage1_shapes.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml train_stage1.py --config configs/stage1/qwen3vl_2b.yaml

config -> model -> data -> Accelerator loop (one wrapped forward: gt forward + pipeline executor in ``gt``
context) -> eval -> save.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from configs import load_config
from configs.loader import add_config_args
from pipeline.wrapper import STRATEGY_GT
from training.faults import run_recipe_cli
from training.preflight import dry_run
from training.session import (
    batch_metrics,
    begin_step,
    end_step,
    eval_due,
    finish_run,
    micro_batches,
    micro_step_boundary,
    optimizer_step,
    reduce_step,
    save_checkpoint,
    save_due,
    setup_training,
    start_run,
    step_eval,
    with_checkpoint_settings,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_config_args(parser, "--set training.lr=2e-5 --set data.train_jsonl=/data/train.jsonl").parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run Stage-1; returns the last optimizer step's metrics (for tests)."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides, expect="stage1")
    # data settings the config leaves unset come from the checkpoint's saved settings (model.settings)
    cfg, settings_notes = with_checkpoint_settings(cfg)
    if args.dry_run:  # paths, tokenizer, every record, pipeline, packing plan; no weights
        return dry_run(cfg, notes=[line for _, line in settings_notes])
    t = cfg.training
    run = start_run(cfg, settings_notes)  # accelerator, run dir, resolved config, pipeline identity, resume point
    accelerator = run.accelerator
    # model -> data (static packing over the whole train set, sharded by rank) -> optimizer -> prepare -> resume
    s = setup_training(cfg, run, desc="stage1")

    data_iter = micro_batches(cfg, s)
    metrics: dict = {}
    try:
        for step in range(s.start_step, t.max_steps):
            started, tokens = time.perf_counter(), 0
            begin_step(s)  # data position + RNG: what a checkpoint of the last completed step needs mid-step
            for _ in range(t.gradient_accumulation_steps):
                # a signal (SIGTERM / SIGINT / SIGUSR1) on any rank: save the last completed step here, not
                # after the whole step (stop: the partial accumulation is dropped and replayed on resume)
                micro_step_boundary(cfg, run, s, step)
                batch = next(data_iter).to(accelerator.device)
                with accelerator.accumulate(s.model):
                    # forward: the prepared TrainingWrapper, gt forward + objective pipeline in one wrapped
                    # forward (autocast: the training precision throughout, docs/MODEL.md)
                    with accelerator.autocast():
                        result = s.model(batch, STRATEGY_GT)
                    accelerator.backward(result.loss)
                    # on the last micro-step of the window: clip, step if finite on every rank, schedule
                    optim_metrics = optimizer_step(run, s, result.loss, t.max_grad_norm)
                tokens += batch.num_tokens
                s.aggregator.add({**result.metrics, **optim_metrics, **batch_metrics(batch)})
            done = step + 1
            metrics = reduce_step(cfg, s, done, started=started, tokens=tokens)  # over micro-steps and ranks
            if eval_due(cfg, s, done):
                metrics.update(step_eval(cfg, run, s, done))
            s.tracker.log(done, metrics)
            if save_due(cfg, s, done):
                save_checkpoint(cfg, run, s, done, data_state=s.dataset.state_dict())
            end_step(cfg, run, s, done)  # non-finite streak; stop here after a signal
    finally:  # close the progress bar and the metrics file even when a step raises
        finish_run(run, s)
    run.accelerator.wait_for_everyone()
    return metrics


if __name__ == "__main__":
    raise SystemExit(run_recipe_cli(main))  # one error: line under a launcher, whichever rank
