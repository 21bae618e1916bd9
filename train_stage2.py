"""Stage-2: Two-Channel Teacher Forcing (Expectation/Rollout) or Rollout-Aligned Teacher Forcing.

    python train_stage2.py --config configs/demo/stage2_shapes.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml train_stage2.py --config configs/stage2_two_channel/qwen3vl_2b.yaml

``custom.trainer_variant`` picks the variant:
- ``stage2_two_channel``: the router (docs/training/STAGE2_RUNBOOK.md, Bresenham on the optimizer step) makes each
  optimizer step an Expectation step (Channel-A: N forwards feeding the model its own coord
  beliefs, vision once) or a Rollout step (Channel-B: generate, parse, match, append missed GT,
  one teacher-forced forward);
- ``stage2_rollout_aligned``: every step is a Rollout step.
Both run the same objective modules through the same executor; only the contexts differ.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from configs import load_config
from configs.loader import add_config_args
from configs.types import Config
from core.vocab import STAGE2_TWO_CHANNEL
from data.encoding import prompts_of
from data.types import PackedBatch
from eval.semantic import load_encoder
from pipeline.wrapper import STRATEGY_EXPECTATION, STRATEGY_ROLLOUT
from rollout.backends import GenerationBackend
from rollout.step import budget_hit_message, prepare_rollout_batches, token_budget_warning
from training.faults import any_rank, run_recipe_cli
from training.preflight import dry_run
from training.router import CHANNEL_A, CHANNEL_B, ChannelRouter
from training.session import (
    RunContext,
    TrainingSetup,
    batch_metrics,
    begin_step,
    end_step,
    eval_due,
    finish_run,
    micro_batches,
    micro_step_boundary,
    optimizer_step,
    reduce_step,
    rollout_backend_for,
    save_checkpoint,
    save_due,
    setup_training,
    start_run,
    step_eval,
    with_checkpoint_settings,
)
from training.sharding import full_weights

TWO_CHANNEL = STAGE2_TWO_CHANNEL


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_config_args(parser, "--set training.lr=5e-6 --set stage2_ab.schedule.b_ratio=0.5").parse_args(argv)


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """Sampling seed of one rank's rollouts at optimizer step ``step`` (0-based).

    A pure function of ``(rollout_matching.decoding.seed, step, rank)``: a resumed run samples
    exactly the rollouts the uninterrupted run would have, with no generator state to checkpoint,
    and ranks never share a stream.
    """
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def roll_out(cfg: Config, run: RunContext, s: TrainingSetup, backend: GenerationBackend, window: list[PackedBatch], step: int,
             desc_encoder) -> tuple[list, Exception | None]:
    """Channel-B's rollouts of an accumulation window: every micro-batch's records in one generate call (records
    from the training set by each segment's sample index, prompts sliced out of the GT batches), parsed,
    matched and built into teacher-forced batches. Returns them, or the error that the router's fallback
    decides about."""
    t, rm, accelerator = cfg.training, cfg.rollout_matching, run.accelerator
    backend.generator.manual_seed(rollout_seed(rm.decoding.seed, step, accelerator.process_index))
    try:
        # generate in the training precision; sharded engines gather the weights once for the call
        with accelerator.autocast(), full_weights(s.model):
            prompts = [prompts_of(gt, s.splits.train) for gt in window]
            return prepare_rollout_batches(
                [[p.record for p in group] for group in prompts], encoder=s.encoder, prompts=prompts,
                backend=backend, coord_vocab=s.loaded.coord_vocab, matching=rm.matching,
                max_length=t.max_length, packing=t.packing, pad_token_id=s.pad_id, desc_encoder=desc_encoder,
            ), None
    except Exception as exc:  # noqa: BLE001 - routed to the configured fallback (default: re-raise)
        return [], exc


def main(argv: Sequence[str] | None = None) -> dict:
    """Run Stage-2; returns the last optimizer step's metrics (for tests)."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides, expect="stage2")
    # data settings the config leaves unset come from the checkpoint's saved settings (model.settings)
    cfg, settings_notes = with_checkpoint_settings(cfg)
    if args.dry_run:  # paths, tokenizer, every record, pipeline, packing plan; no weights
        return dry_run(cfg, notes=[line for _, line in settings_notes])
    t, sab, rm = cfg.training, cfg.stage2_ab, cfg.rollout_matching
    two_channel = cfg.variant == TWO_CHANNEL
    run = start_run(cfg, settings_notes)  # accelerator, run dir, resolved config, pipeline identity, resume point
    accelerator = run.accelerator
    # model (normally the Stage-1 output) -> GT data (Rollout steps roll out the same micro-batches'
    # records) -> optimizer -> prepare -> resume
    s = setup_training(cfg, run, desc=cfg.variant)

    # ---- channel router, rollout backend
    router = ChannelRouter(sab.schedule.b_ratio if two_channel else 1.0,
                           sab.fallback.on_rollout_failure if two_channel else "fail")
    if s.resume_state is not None:
        router.load_state_dict(s.resume_state.router_state)
    backend = rollout_backend_for(cfg, run, s)  # rollout_matching.backend; in-loop eval derives from it
    # the token budget a full answer needs, from the data (rollouts cut at the budget lose objects and their eos)
    longest_answer = s.encoder.longest_answer(s.splits.train, s.dataset.lengths)  # from the cached lengths
    budget_warning = token_budget_warning(rm.decoding.max_new_tokens, longest_answer)
    if budget_warning:
        run.logger.warning(budget_warning)
    # the Stage-2 desc gate uses the one semantic encoder of eval.semantic (None: exact desc equality)
    desc_encoder = load_encoder(cfg.eval.semantic) if rm.matching.desc_gate is not None else None

    data_iter = micro_batches(cfg, s)
    metrics: dict = {}
    hit_budget_warned = False  # warn on the first rollout cut at max_new_tokens; the counter counts the rest
    try:
        for step in range(s.start_step, t.max_steps):
            started, tokens = time.perf_counter(), 0
            # what a checkpoint of the last completed step needs mid-step; a signal before the rollouts or
            # any micro-step saves it there (docs/RELIABILITY.md)
            begin_step(s, router_state=router.state_dict())
            micro_step_boundary(cfg, run, s, step)
            # One channel for the whole accumulation window, the same on every rank.
            channel, rerouted = router.channel_for(step), False
            window = [next(data_iter) for _ in range(t.gradient_accumulation_steps)]
            rollouts, error = [], None
            if channel == CHANNEL_B:
                rollouts, error = roll_out(cfg, run, s, backend, window, step, desc_encoder)
                if any_rank(accelerator, error is not None)[0]:
                    channel, rerouted = router.fallback_channel(step, error), True

            for i, gt in enumerate(window):
                micro_step_boundary(cfg, run, s, step)
                with accelerator.accumulate(s.model):
                    forward_start = time.perf_counter()
                    if channel == CHANNEL_A:
                        batch, strategy, step_metrics = gt.to(accelerator.device), STRATEGY_EXPECTATION, {}
                    else:
                        batch, strategy = rollouts[i].batch.to(accelerator.device), STRATEGY_ROLLOUT
                        step_metrics = dict(rollouts[i].metrics)
                        if step_metrics["rollout/max_new_tokens_hit_count"] and not hit_budget_warned:
                            hit_budget_warned = True
                            # advice to raise the budget only when GT answers need more, not when the model rambles
                            run.logger.log(*budget_hit_message(step, int(step_metrics["rollout/max_new_tokens_hit_count"]),
                                                               rm.decoding.max_new_tokens, longest_answer))
                    # The prepared TrainingWrapper: the channel's forwards (Channel-A: N forwards, vision once) +
                    # the objective pipeline in one wrapped forward. Rollout-Aligned has no channels (None).
                    with accelerator.autocast():  # the training precision throughout (docs/MODEL.md)
                        result = s.model(batch, strategy, channel if two_channel else None)
                    accelerator.backward(result.loss)
                    # on the last micro-step of the window: clip, step if finite on every rank, schedule
                    step_metrics.update(optimizer_step(run, s, result.loss, t.max_grad_norm))
                    step_metrics["time/forward_backward_s"] = time.perf_counter() - forward_start
                    if i == 0 and (channel == CHANNEL_B or rerouted):  # ranks whose rollouts raised, summed
                        step_metrics["stage2/rollout_error_count"] = float(error is not None)
                    step_metrics["stage2/forwards_total"] = float(result.num_forwards)
                    step_metrics["stage2/suffix_forwards_total"] = float(result.suffix_forwards)
                tokens += batch.num_tokens
                s.aggregator.add({**result.metrics, **step_metrics, **batch_metrics(batch)})
            router.record(step, channel, rerouted)
            done = step + 1
            metrics = reduce_step(cfg, s, done, started=started, tokens=tokens, step_values=router.metrics())
            if eval_due(cfg, s, done):
                metrics.update(step_eval(cfg, run, s, done))
            s.tracker.log(done, metrics)
            if save_due(cfg, s, done):
                save_checkpoint(cfg, run, s, done, data_state=s.dataset.state_dict(), router_state=router.state_dict())
            end_step(cfg, run, s, done)  # non-finite streak; stop here after a signal
    finally:  # close the progress bar and the metrics file even when a step raises
        finish_run(run, s)
    run.accelerator.wait_for_everyone()
    return metrics


if __name__ == "__main__":
    raise SystemExit(run_recipe_cli(main))  # one error: line under a launcher, whichever rank
