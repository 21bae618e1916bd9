"""One Rollout step's data preparation, shared by Channel-B and the Rollout-Aligned trainer.

generate (no grad) -> salvage-parse -> Hungarian match -> build the teacher-forced
sequences (+ rich meta) -> post-rollout packing. The returned batch feeds one
``pipeline.forwards.rollout_forward``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from data.packing import collate_rows
from data.types import EncodedSample, PackedBatch, Record
from rollout.backends import GenerationBackend
from rollout.builder import build_rollout_sample
from rollout.matching import hungarian_match
from rollout.metrics import rollout_counters
from rollout.packing import pack_rollout_samples
from rollout.parser import parse_rollout


@dataclass(frozen=True)
class MatchingConfig:
    """``rollout_matching.matching``: IoU gate and unmatched costs."""

    iou_gate: float = 0.3
    fp_cost: float = 1.0
    fn_cost: float = 1.0


@dataclass
class RolloutBatch:
    """A packed batch of rollout-built sequences and the step's rollout counters (SPEC §9 names)."""

    batch: PackedBatch
    samples: list[EncodedSample]
    metrics: dict[str, float] = field(default_factory=dict)


def prepare_rollout_batch(
    records: Sequence[Record],
    *,
    encoder,
    prompts: Sequence[EncodedSample] | None = None,
    backend: GenerationBackend,
    coord_vocab,
    matching: MatchingConfig,
    drop_invalid_struct_ce_multiplier: float,
    max_length: int,
    packing: bool,
    pad_token_id: int,
) -> RolloutBatch:
    """Roll out ``records`` and build the teacher-forced rollout batch.

    ``prompts``: the records' prompt samples when already encoded (``data.encoding.prompt_of`` of the
    GT micro-batch); otherwise they are encoded here. Packing on: sequences are packed into rows of at most ``max_length`` tokens
    (a longer sequence raises with its length); off: one sequence per row. All
    rows form one ``PackedBatch`` (one forward).
    """
    if not records:
        raise ValueError("prepare_rollout_batch: no records to roll out")
    tokenizer = encoder.tokenizer
    t0 = time.perf_counter()
    if prompts is None:
        prompts = [encoder.encode_prompt(r) for r in records]
    elif len(prompts) != len(records):
        raise ValueError(f"prepare_rollout_batch: {len(prompts)} prompts for {len(records)} records")
    outputs = backend.generate(prompts)
    t1 = time.perf_counter()
    parsed_list, matches, samples = [], [], []
    for record, prompt, out in zip(records, prompts, outputs):
        parsed = parse_rollout(out.token_ids, tokenizer, coord_vocab)
        gt_bins = [o.bins for o in record.objects]
        match = hungarian_match(
            parsed.pred_bins, gt_bins, iou_gate=matching.iou_gate, fp_cost=matching.fp_cost, fn_cost=matching.fn_cost
        )
        sample = build_rollout_sample(
            prompt, out.token_ids, parsed, match, record.objects, tokenizer, coord_vocab,
            drop_invalid_struct_ce_multiplier=drop_invalid_struct_ce_multiplier,
        )
        sample.record = record
        parsed_list.append(parsed)
        matches.append(match)
        samples.append(sample)
    if packing:
        batches = pack_rollout_samples(samples, max_length, pad_token_id, rows_per_batch=len(samples))
        batch = batches[0]
    else:
        for i, s in enumerate(samples):
            if len(s) > max_length:
                raise ValueError(f"rollout sample {i} has {len(s)} tokens > training.max_length={max_length}")
        batch = collate_rows([[s] for s in samples], pad_token_id)
    t2 = time.perf_counter()
    metrics = rollout_counters(parsed_list, matches, [len(r.objects) for r in records])
    metrics["time/rollout_generate_s"] = t1 - t0
    metrics["time/rollout_build_s"] = t2 - t1
    metrics["rollout/generated_tokens_total"] = float(sum(len(o.token_ids) for o in outputs))
    return RolloutBatch(batch=batch, samples=samples, metrics=metrics)
