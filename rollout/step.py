"""One Rollout step's data preparation, shared by Channel-B and the Rollout-Aligned trainer.

generate (no grad) -> salvage-parse -> Hungarian match -> build the teacher-forced
sequences (+ rich meta) -> post-rollout packing. The returned batch feeds one
``pipeline.forwards.rollout_forward``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from configs.types import MatchingConfig  # rollout_matching.matching (re-exported for callers)
from data.packing import collate_rows
from data.types import EncodedSample, PackedBatch, Record
from rollout.backends import GenerationBackend
from rollout.builder import build_rollout_sample
from rollout.matching import desc_similarity_matrix, hungarian_match
from rollout.metrics import rollout_counters
from rollout.packing import pack_rollout_samples
from rollout.parser import parse_rollout


@dataclass
class RolloutBatch:
    """A packed batch of rollout-built sequences and the step's rollout counters (docs/training/METRICS_CONTRACT.md names)."""

    batch: PackedBatch
    metrics: dict[str, float] = field(default_factory=dict)


def prepare_rollout_batches(
    groups: Sequence[Sequence[Record]],
    *,
    encoder,
    prompts: Sequence[Sequence[EncodedSample]] | None = None,
    backend: GenerationBackend,
    coord_vocab,
    matching: MatchingConfig,
    max_length: int,
    packing: bool,
    pad_token_id: int,
    desc_encoder=None,
) -> list[RolloutBatch]:
    """Roll out every micro-batch (``groups``) of an accumulation window and build one teacher-forced
    rollout batch per micro-batch.

    All prompts of the window go to the backend in one ``generate`` call (it batches them by
    ``rollout_matching.decoding.batch_size``), so small micro-batches still fill generation
    batches. ``prompts``: the groups' prompt samples when already encoded (``data.encoding.prompts_of``
    of the GT micro-batches); otherwise they are encoded here. Packing on: each micro-batch's
    sequences are packed into rows of at most ``max_length`` tokens (a longer sequence raises with
    its length); off: one sequence per row. Each micro-batch's rows form one ``PackedBatch`` (one
    forward). The window's generation time is reported on the first micro-batch.

    With ``matching.desc_gate`` set, a pair also needs desc similarity >= the gate
    (``rollout.matching.desc_similarity_matrix`` with ``desc_encoder``, an ``eval.semantic.DescEncoder`` or
    None for exact matching only); ``rollout/desc_gate_rejected_total`` counts the refused pairs and
    ``rollout/desc_sim_mean`` (the matched pairs' mean similarity) is derived from internal sums.
    """
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("prepare_rollout_batches: every micro-batch needs at least one record to roll out")
    tokenizer = encoder.tokenizer
    t0 = time.perf_counter()
    if prompts is None:
        prompts = [[encoder.encode_prompt(r) for r in g] for g in groups]
    elif [len(p) for p in prompts] != [len(g) for g in groups]:
        raise ValueError(
            f"prepare_rollout_batches: prompt counts {[len(p) for p in prompts]} != record counts {[len(g) for g in groups]}"
        )
    flat_outputs = backend.generate([p for group in prompts for p in group])
    generate_s = time.perf_counter() - t0

    results, start = [], 0
    for g, (records, group_prompts) in enumerate(zip(groups, prompts)):
        t1 = time.perf_counter()
        outputs = flat_outputs[start : start + len(records)]
        start += len(records)
        parsed_list, matches, samples = [], [], []
        gate_sums = [0, 0.0, 0]  # desc gate: rejected pairs, similarity sum and count of the matched pairs
        for record, prompt, out in zip(records, group_prompts, outputs):
            parsed = parse_rollout(out.token_ids, tokenizer, coord_vocab)
            gt_bins = [o.bins for o in record.objects]
            sims = None if matching.desc_gate is None else desc_similarity_matrix(
                [o.desc for o in parsed.valid_objects], [o.desc for o in record.objects], desc_encoder)
            match = hungarian_match(parsed.pred_bins, gt_bins, matching, desc_sim=sims)
            if sims is not None:
                gate_sums[0] += match.desc_gate_rejected
                gate_sums[1] += float(sum(sims[i, j] for i, j in match.pairs))
                gate_sums[2] += len(match.pairs)
            sample = build_rollout_sample(prompt, out.token_ids, parsed, match, record.objects, tokenizer, coord_vocab)
            sample.record = record
            parsed_list.append(parsed)
            matches.append(match)
            samples.append(sample)
        if packing:
            batch = pack_rollout_samples(samples, max_length, pad_token_id, rows_per_batch=len(samples))[0]
        else:
            for i, s in enumerate(samples):
                if len(s) > max_length:
                    raise ValueError(f"rollout sample {i} has {len(s)} tokens > training.max_length={max_length}")
            batch = collate_rows([[s] for s in samples], pad_token_id)
        metrics = rollout_counters(parsed_list, matches, [len(r.objects) for r in records])
        # The builder moves a closure its string-aware scan places elsewhere onto the last answer
        # character; count it (a parser/builder disagreement worth seeing, never silent).
        metrics["rollout/closure_scan_mismatch_count"] = float(
            sum(s.meta.counters.get("closure_scan_mismatch", 0) for s in samples)
        )
        if getattr(matching, "desc_gate", None) is not None:
            metrics["rollout/desc_gate_rejected_total"] = float(gate_sums[0])
            metrics["rollout/_desc_sim_sum"] = gate_sums[1]  # internal: only rollout/desc_sim_mean is logged
            metrics["rollout/_desc_sim_den"] = float(gate_sums[2])
        metrics["time/rollout_generate_s"] = generate_s if g == 0 else 0.0
        metrics["time/rollout_build_s"] = time.perf_counter() - t1
        metrics["rollout/generated_tokens_total"] = float(sum(len(o.token_ids) for o in outputs))
        metrics["rollout/max_new_tokens_hit_count"] = float(sum(1 for o in outputs if not o.finished))
        results.append(RolloutBatch(batch=batch, metrics=metrics))
    return results


def budget_hit_message(step: int, hits: int, max_new_tokens: int, longest_answer: int) -> tuple[int, str]:
    """``(logging level, line)`` for the first rollouts cut at ``max_new_tokens`` (before their eos).

    Raising the budget helps only when GT answers need more (``longest_answer``, tokens incl.
    ``<|im_end|>``, is above it): a warning then. When every GT answer fits, the model simply does not
    stop yet (an untrained or early model repeats itself until the budget): an info line, no advice.
    """
    import logging

    if longest_answer > max_new_tokens:
        return logging.WARNING, (
            f"step {step}: {hits} rollout(s) hit rollout_matching.decoding.max_new_tokens={max_new_tokens} (cut "
            f"before their eos) and the longest GT answer needs {longest_answer} tokens: raise it to >= "
            f"{longest_answer} (rollout/max_new_tokens_hit_count counts every hit)")
    return logging.INFO, (
        f"step {step}: {hits} rollout(s) hit rollout_matching.decoding.max_new_tokens={max_new_tokens} although "
        f"every GT answer fits (longest {longest_answer} tokens): the model does not stop yet, usual early in "
        "training; rollout/max_new_tokens_hit_count counts every hit")


def token_budget_warning(max_new_tokens: int, longest: int) -> str | None:
    """A warning when ``rollout_matching.decoding.max_new_tokens`` cannot hold the longest GT answer.

    ``longest``: tokens of the training set's longest GT answer including ``<|im_end|>``
    (``ChatEncoder.longest_answer``). A rollout that lists every object needs about that many
    tokens (objects × tokens per object + the container); Stage-2 (Rollout-Aligned above all:
    appended FN objects teach the model to list more) pushes rollouts towards it, and a rollout cut
    at the budget loses its last objects and its eos. ``None`` when the budget holds 2× the longest
    answer (room for as many false positives as true objects), or there is no answer (``longest`` 0).
    """
    if not longest or max_new_tokens >= 2 * longest:
        return None
    return (
        f"rollout_matching.decoding.max_new_tokens={max_new_tokens} is below 2x the longest GT answer "
        f"({longest} tokens incl. <|im_end|>): rollouts that list every object plus a few false positives are "
        f"cut (counted as rollout/max_new_tokens_hit_count); set it to >= {2 * longest}"
    )
