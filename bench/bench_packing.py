"""Static packing vs padded batches: useful tokens/s of forward + backward on the tiny Qwen3-VL.

    python -m bench.bench_packing            # 32 shapes samples, up to 8 objects each
    python -m bench.bench_packing --quick    # 6 samples, tiny LM, a few seconds

Both ways run one epoch over the same encoded samples (``data.encoding.ChatEncoder`` on
``data.shapes`` records) with the same loss (``losses.ce.token_ce`` on the supervised answer tokens)
and the same forward (``model.forward.hidden_states``). Packed: ``data.packing.pack_samples`` rows of
``max_length`` tokens, ``rows_per_batch`` rows per step. Padded (the baseline): ``batch_size``
samples per step, one sample per row, right-padded to the longest. ``rows_per_batch`` defaults to
``batch_size * mean length / max_length`` so both ways carry about the same real tokens per step
and the difference is the padding. Useful tokens = real (non-padding) tokens; both ways process
the same total.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from bench._common import bench_parser, parse_and_run, print_table, ratio_line, time_call, tiny_setup
from core.vocab import COORD, IGNORE
from data.packing import collate_rows, pack_samples
from data.types import EncodedSample, PackedBatch
from losses.ce import token_ce
from model.forward import HiddenStatesModel, hidden_states


def padded_batches(samples: Sequence[EncodedSample], batch_size: int, pad_token_id: int) -> list[PackedBatch]:
    """BASELINE: ``batch_size`` samples per batch in dataset order, one sample per row, right-padded."""
    return [
        collate_rows([[s] for s in samples[i : i + batch_size]], pad_token_id)
        for i in range(0, len(samples), batch_size)
    ]


def packed_batches(
    samples: Sequence[EncodedSample], max_length: int, rows_per_batch: int, pad_token_id: int
) -> list[PackedBatch]:
    """Static packing: ``pack_samples`` bins (rows of <= ``max_length`` tokens), ``rows_per_batch`` rows per batch."""
    rows = [[samples[i] for i in row] for row in pack_samples(samples, max_length)]
    return [collate_rows(rows[i : i + rows_per_batch], pad_token_id) for i in range(0, len(rows), rows_per_batch)]


def train_step(model: HiddenStatesModel, batch: PackedBatch) -> float:
    """Forward + token CE on struct/desc/eos tokens + backward; gradients are dropped afterwards."""
    hidden = hidden_states(model, batch)
    types = batch.token_types
    weights = ((types != IGNORE) & (types != COORD)).float()
    loss, _ = token_ce(hidden, model.lm_head_weight, batch.input_ids, weights)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss.detach())


def _stats(batches: list[PackedBatch]) -> dict:
    real = sum(b.num_tokens for b in batches)
    grid = sum(b.input_ids.numel() for b in batches)
    return {"steps": len(batches), "real_tokens": real, "grid_tokens": grid, "padding_frac": 1 - real / grid}


def main(argv: Sequence[str] | None = None) -> dict:
    p = bench_parser(__doc__, "tiny run: 6 samples, batch 3, tiny LM, one repeat")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--max-shapes", type=int, default=8, help="objects per image are 1..max_shapes")
    p.add_argument("--batch-size", type=int, default=8, help="samples per padded batch")
    # Rows a few samples long: the tiny LM is narrow, and sdpa attends over the whole packed row with
    # a block-diagonal mask, so long rows would spend the step on masked-out attention (real runs
    # have H ~ 2-4k at max_length 4-8k, or flash-attention varlen, where this cost is small).
    p.add_argument("--max-length", type=int, default=512, help="packed row budget in tokens")
    p.add_argument("--rows-per-batch", type=int, default=None, help="packed rows per step (default: same tokens/step)")
    p.add_argument("--repeats", type=int, default=2, help="epochs timed per method (best of)")
    p.add_argument("--hidden", type=int, default=192, help="LM width of the tiny model")
    p.add_argument("--layers", type=int, default=4, help="LM layers of the tiny model")
    return parse_and_run(p, argv, _run)


def _run(args: argparse.Namespace) -> dict:
    if args.quick:
        args.num_samples, args.batch_size, args.repeats, args.hidden, args.layers = 6, 3, 1, 64, 2

    # A wider/deeper LM than the test default so the per-token LM cost dominates the per-image vision
    # cost, as in a real Qwen3-VL (a ~2-8B LM over a ~0.6B vision tower).
    setup = tiny_setup(
        args.num_samples,
        max_shapes=args.max_shapes,
        seed=args.seed,
        hidden=args.hidden,
        layers=args.layers,
        intermediate=3 * args.hidden,
    )
    model = HiddenStatesModel(setup.model)
    model.train()
    samples = setup.samples
    lengths = [len(s) for s in samples]
    max_length = max(args.max_length, max(lengths))
    rows_per_batch = args.rows_per_batch or max(1, round(args.batch_size * sum(lengths) / len(lengths) / max_length))
    pad_id = int(setup.tokenizer.pad_token_id)

    ways = {
        "padded_baseline": padded_batches(samples, args.batch_size, pad_id),
        "packed": packed_batches(samples, max_length, rows_per_batch, pad_id),
    }
    # One untimed step of each first: the first forward pays one-off lazy initialisation.
    for batches in ways.values():
        train_step(model, batches[0])

    results = {}
    for name, batches in ways.items():

        def epoch(batches=batches):
            for b in batches:
                train_step(model, b)

        seconds = time_call(epoch, repeats=args.repeats, warmup=0)
        st = _stats(batches)
        results[name] = {**st, "seconds": seconds, "useful_tokens_per_s": st["real_tokens"] / seconds}

    pad, packed = results["padded_baseline"], results["packed"]
    if pad["real_tokens"] != packed["real_tokens"]:
        raise AssertionError(
            f"packed and padded epochs saw different tokens: {packed['real_tokens']} vs {pad['real_tokens']}"
        )
    print(
        f"fwd+bwd epoch on tiny Qwen3-VL: {len(samples)} samples, lengths {min(lengths)}..{max(lengths)} "
        f"(mean {sum(lengths) / len(lengths):.0f}), padded batch {args.batch_size}, packed {rows_per_batch} rows of <= {max_length}"
    )
    print_table(
        ["method", "steps", "real_tok", "grid_tok", "pad_frac", "time_s", "useful_tok/s"],
        [
            [
                n,
                r["steps"],
                r["real_tokens"],
                r["grid_tokens"],
                r["padding_frac"],
                r["seconds"],
                r["useful_tokens_per_s"],
            ]
            for n, r in results.items()
        ],
    )
    ratio = packed["useful_tokens_per_s"] / pad["useful_tokens_per_s"]
    ratio_line("packing", ratio, "packed useful tokens/s over padded batches")
    return {
        "config": {
            "num_samples": len(samples),
            "batch_size": args.batch_size,
            "max_length": max_length,
            "rows_per_batch": rows_per_batch,
            "min_len": min(lengths),
            "max_len": max(lengths),
            "hidden": args.hidden,
            "layers": args.layers,
        },
        "padded": pad,
        "packed": packed,
        "ratio": ratio,
    }


if __name__ == "__main__":
    main()
