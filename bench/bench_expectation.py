"""Channel-A Expectation step: vision computed once (``pipeline.forwards.expectation_forward``) vs every forward.

    python -m bench.bench_expectation            # 8 shapes samples in packed rows, n_iter 2 and 3
    python -m bench.bench_expectation --quick    # 2 samples, one repeat

One training step = the N forwards + token CE on the ``gt`` and ``self_context`` hidden states +
backward (vision tower and LM both trainable), on the tiny Qwen3-VL. Ours runs the vision tower
once per step and reuses it (docs/training/STAGE2_RUNBOOK.md). The baseline, written below, runs the same N-forward loop
but hands ``pixel_values`` to every forward, so the vision tower runs N times. Both must give the
same hidden states (checked: max abs diff per context).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from bench._common import bench_parser, parse_and_run, print_table, ratio_line, time_call, tiny_setup
from core.vocab import COORD, EOS, GT, SELF_CONTEXT, STRUCT
from data.packing import collate_rows, pack_samples
from data.types import PackedBatch
from losses.ce import coord_logits, hidden_at_logit_pos, token_ce
from losses.coord import context_embeddings
from model.forward import HiddenStatesModel, embed_tokens, position_ids_for_batch
from model.vocab import coord_vocab_from_tokenizer
from pipeline.forwards import expectation_forward


def baseline_recompute_vision(
    model: HiddenStatesModel, batch: PackedBatch, coord_token_ids: torch.Tensor, n_iter: int, embed_mode: str = "st"
) -> dict[str, torch.Tensor]:
    """BASELINE (naive): the Expectation loop with ``pixel_values`` passed to every forward.

    Same algorithm as ``expectation_forward`` (forward 0 on GT tokens; forwards 1..N-1 put context
    embeddings built from the previous forward's coord distribution at the coord input slots) but the
    vision tower runs inside each of the N forwards. Returns ``{gt, self_context}`` hidden ``[B, T, H]``.
    """
    vlm = model.vlm
    pos = position_ids_for_batch(vlm, batch)
    common = dict(
        position_ids=pos,
        mm_token_type_ids=batch.mm_token_type_ids,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
    )
    hidden = model(input_ids=batch.input_ids, **common)
    out = {GT: hidden}
    T = batch.input_ids.shape[1]
    coord_in = (batch.token_types == COORD).reshape(-1).nonzero(as_tuple=True)[0]
    base = embed_tokens(vlm, batch.input_ids)
    table = vlm.get_input_embeddings().weight.index_select(0, coord_token_ids)
    for _ in range(1, n_iter):
        logits = coord_logits(hidden_at_logit_pos(hidden, coord_in), model.lm_head_weight, coord_token_ids)
        ctx = context_embeddings(logits, table, embed_mode)
        embeds = base.index_put((coord_in // T, coord_in % T), ctx.to(base.dtype))
        hidden = model(inputs_embeds=embeds, **common)
    out[SELF_CONTEXT] = hidden
    return out


def _loss(hidden: dict[str, torch.Tensor], batch: PackedBatch, lm_head_weight: torch.Tensor) -> torch.Tensor:
    """Token CE on gt answer tokens + struct/eos stabiliser on self_context (the Channel-A CE terms)."""
    types = batch.token_types
    gt_w = ((types >= 0) & (types != COORD)).float()
    sc_w = ((types == STRUCT) | (types == EOS)).float() * 0.1
    gt_loss, _ = token_ce(hidden[GT], lm_head_weight, batch.input_ids, gt_w)
    sc_loss, _ = token_ce(hidden[SELF_CONTEXT], lm_head_weight, batch.input_ids, sc_w)
    return gt_loss + sc_loss


def main(argv: Sequence[str] | None = None) -> dict:
    p = bench_parser(__doc__, "tiny run: 2 samples, one repeat")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024, help="packed row budget in tokens")
    p.add_argument("--n-iter", type=int, nargs="+", default=[2, 3], help="forwards per Expectation step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--image-size", type=int, default=192, help="image side in pixels ((side/32)^2 image tokens)")
    return parse_and_run(p, argv, _run)


def _run(args: argparse.Namespace) -> dict:
    warmup = 1
    if args.quick:
        args.num_samples, args.repeats, warmup, args.image_size = 2, 1, 0, 64

    setup = tiny_setup(args.num_samples, max_shapes=3, seed=args.seed, image_size=args.image_size)
    model = HiddenStatesModel(setup.model)
    model.train()
    vlm = setup.model
    coord_ids = coord_vocab_from_tokenizer(setup.tokenizer).ids
    pad_id = int(setup.tokenizer.pad_token_id)
    samples = setup.samples
    batch = collate_rows([[samples[i] for i in row] for row in pack_samples(samples, args.max_length)], pad_id)

    def ours(n: int) -> dict[str, torch.Tensor]:
        # vision once only: prefix reuse (measured by bench_train_step's channel_a vs channel_a_full) stays off
        return expectation_forward(model, vlm, batch, coord_ids, n_iter=n, embed_mode="st", prefix_reuse=False).hidden

    def base(n: int) -> dict[str, torch.Tensor]:
        return baseline_recompute_vision(model, batch, coord_ids, n, embed_mode="st")

    results: dict[int, dict] = {}
    for n in args.n_iter:
        row: dict = {}
        for name, fwd in (("baseline", base), ("vision_once", ours)):

            def step(fwd=fwd, n=n):
                _loss(fwd(n), batch, model.lm_head_weight).backward()
                model.zero_grad(set_to_none=True)

            row[f"{name}_seconds"] = time_call(step, repeats=args.repeats, warmup=warmup)
        with torch.no_grad():
            hb, ho = base(n), ours(n)
        row["hidden_max_abs_diff"] = float(max((hb[c] - ho[c]).abs().max() for c in (GT, SELF_CONTEXT)))
        row["ratio"] = row["baseline_seconds"] / row["vision_once_seconds"]
        results[n] = row

    print(
        f"Expectation step (fwd + token CE + bwd) on tiny Qwen3-VL: {len(samples)} samples in "
        f"{batch.input_ids.shape[0]} packed rows of T={batch.input_ids.shape[1]}, "
        f"{int(batch.image_grid_thw.shape[0])} images, {int((batch.token_types == COORD).sum())} coord slots"
    )
    print_table(
        ["n_iter", "baseline_s", "vision_once_s", "ratio", "hidden_max_abs_diff"],
        [
            [n, r["baseline_seconds"], r["vision_once_seconds"], r["ratio"], r["hidden_max_abs_diff"]]
            for n, r in results.items()
        ],
    )
    head, *rest = args.n_iter
    extra = "".join(f"; n_iter={n}: {results[n]['ratio']:.2f}x" for n in rest)
    ratio_line(
        "expectation", results[head]["ratio"], f"recompute-vision step time over vision-once, n_iter={head}{extra}"
    )
    return {
        "config": {
            "num_samples": len(samples),
            "image_size": args.image_size,
            "shape": list(batch.input_ids.shape),
            "n_iter": list(args.n_iter),
        },
        "results": results,
        "ratio": results[head]["ratio"],
    }


if __name__ == "__main__":
    main()
