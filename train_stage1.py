"""Stage-1: teacher forcing on ground truth, statically packed, loss from the objective pipeline.

    python train_stage1.py --config configs/demo/stage1_shapes.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml train_stage1.py --config configs/stage1/qwen3vl_2b.yaml

config -> model -> data -> Accelerator loop (pipeline executor in ``gt`` context) -> eval -> save.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from configs import load_config
from configs.loader import add_config_args
from data.packing import collate_rows
from model.forward import HiddenStatesModel
from pipeline.context import TeacherForcingContext
from pipeline.executor import run_pipeline
from pipeline.forwards import gt_forward
from training.aggregator import MetricAggregator
from training.checkpoint import load_training_state, save_training_state
from training.optim import build_optimizer, build_scheduler
from training.progress import TrainProgress
from training.session import (
    batch_metrics,
    encoded,
    forever,
    load_model,
    load_records,
    make_encoder,
    make_tracker,
    make_train_dataset,
    model_saver,
    resolve_checkpoint,
    run_eval,
    should,
    start_run,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_config_args(parser).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run Stage-1; returns the last optimizer step's metrics (for tests)."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides, expect="stage1")
    t = cfg.training
    run = start_run(cfg)
    accelerator = run.accelerator

    # ---- model (a resumed run loads the checkpoint's weights)
    loaded = load_model(cfg, resolve_checkpoint(cfg, resume_model_dir=run.resume_dir / "model" if run.resume_dir else None))
    pad_id = loaded.tokenizer.pad_token_id

    # ---- data: static packing over the whole train set, sharded by rank
    splits = load_records(cfg)
    encoder = make_encoder(cfg, loaded)
    dataset = make_train_dataset(cfg, encoded(splits.train, encoder), accelerator)

    # ---- optimizer, scheduler, prepare
    model = HiddenStatesModel(loaded.model)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, t.adam_betas, t.adam_eps)
    scheduler = build_scheduler(optimizer, t.lr_scheduler, t.warmup_steps, t.warmup_ratio, t.max_steps, t.min_lr_ratio)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    vlm = accelerator.unwrap_model(model).vlm
    coord_ids = loaded.coord_vocab.ids.to(accelerator.device)

    start_step = 0
    if run.resume_dir is not None:
        state = load_training_state(run.resume_dir, optimizer, scheduler, accelerator=accelerator)
        dataset.load_state_dict(state.data_state)
        start_step = state.step
        run.logger.info("resumed from %s at step %d", run.resume_dir, start_step)

    tracker = make_tracker(cfg, run)
    aggregator = MetricAggregator(accelerator)
    progress = TrainProgress(t.max_steps, start_step, accelerator.is_main_process, cfg.run.log_every, desc="stage1")
    save = model_saver(accelerator, model, vlm, loaded)
    data_iter = forever(dataset)
    metrics: dict = {}
    model.train()
    for step in range(start_step, t.max_steps):
        step_start, tokens = time.perf_counter(), 0
        for _ in range(t.gradient_accumulation_steps):
            batch = collate_rows(next(data_iter), pad_id).to(accelerator.device)
            with accelerator.accumulate(model):
                fwd = gt_forward(model, vlm, batch)
                ctx = TeacherForcingContext(channel=None, batch=batch, hidden=fwd.hidden,
                                            lm_head_weight=vlm.get_output_embeddings().weight, coord_token_ids=coord_ids)
                result = run_pipeline(cfg.pipeline, ctx)
                accelerator.backward(result.loss)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    result.metrics["train/grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm))
                optimizer.step()
                if accelerator.sync_gradients:  # the schedule counts optimizer steps, not micro-steps
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            tokens += batch.num_tokens
            aggregator.add({**result.metrics, **batch_metrics(batch)})
        aggregator.add({"time/step_s": time.perf_counter() - step_start})
        metrics = aggregator.reduce({"train/lr": scheduler.get_last_lr()[0]})
        done = step + 1
        progress.update(done, loss=metrics.get("loss/total"), lr=metrics.get("train/lr"), tokens=tokens)

        if should(t.eval_every, done, t.max_steps):
            metrics.update(run_eval(cfg, accelerator=accelerator, vlm=vlm, loaded=loaded, encoder=encoder,
                                    val=splits.val, run_dir=run.run_dir, step=done))
        tracker.log(done, metrics)
        if should(t.save_every, done, t.max_steps):
            save_training_state(run.run_dir, accelerator=accelerator, model_save_fn=save, optimizer=optimizer,
                                scheduler=scheduler, step=done, data_state=dataset.state_dict(),
                                save_total_limit=t.save_total_limit)
    progress.close()
    tracker.finish()
    accelerator.wait_for_everyone()
    return metrics


if __name__ == "__main__":
    main()
