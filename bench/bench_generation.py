"""Batched vs one-at-a-time greedy generation with ``rollout.backends.HFGenerationBackend`` on the tiny Qwen3-VL.

    python -m bench.bench_generation            # 16 prompts, max_new_tokens 48
    python -m bench.bench_generation --quick    # 8 prompts, max_new_tokens 4

The same backend class runs the same prompts (``ChatEncoder.encode_prompt`` of shapes records) with
``batch_size=8`` (left-padded batches, KV cache) and, as the baseline, ``batch_size=1``. Reported:
generated tokens/s (tokens up to and including each prompt's end token), and how many generations
are identical both ways (greedy; left padding may flip a near-tie on a random model).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from bench._common import add_threads_arg, print_table, ratio_line, time_call, tiny_setup, torch_threads
from rollout.backends import HFGenerationBackend


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run: 8 prompts, 4 new tokens, one repeat")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48, help="cap; keeps the whole run under a minute on CPU")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    add_threads_arg(p)
    args = p.parse_args(argv)
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    if args.quick:
        args.num_prompts, args.max_new_tokens, args.repeats = 8, 4, 1

    setup = tiny_setup(args.num_prompts, max_shapes=3, seed=args.seed)
    prompts = setup.prompts

    outputs, results = {}, {}
    for name, bs in (("batch1_baseline", 1), (f"batch{args.batch_size}", args.batch_size)):
        backend = HFGenerationBackend(
            setup.model, setup.tokenizer, max_new_tokens=args.max_new_tokens, temperature=0.0, batch_size=bs
        )
        backend.generate(prompts[: min(bs, len(prompts))])  # untimed: one-off lazy initialisation

        def run(backend=backend, name=name):
            outputs[name] = backend.generate(prompts)

        seconds = time_call(run, repeats=args.repeats, warmup=0)
        n_tokens = sum(len(o.token_ids) for o in outputs[name])
        results[name] = {"batch_size": bs, "seconds": seconds, "tokens": n_tokens, "tokens_per_s": n_tokens / seconds}

    base_name, batched_name = "batch1_baseline", f"batch{args.batch_size}"
    same = sum(a.token_ids == b.token_ids for a, b in zip(outputs[base_name], outputs[batched_name]))
    print(f"greedy generation on tiny Qwen3-VL: {len(prompts)} prompts, max_new_tokens {args.max_new_tokens}")
    print_table(
        ["method", "batch", "tokens", "time_s", "tokens/s"],
        [[n, r["batch_size"], r["tokens"], r["seconds"], r["tokens_per_s"]] for n, r in results.items()],
    )
    print(f"identical generations batched vs batch 1: {same}/{len(prompts)}")
    ratio = results[batched_name]["tokens_per_s"] / results[base_name]["tokens_per_s"]
    ratio_line("generation", ratio, f"batch {args.batch_size} generated tokens/s over batch 1")
    return {
        "config": {"num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size},
        "baseline": results[base_name],
        "batched": results[batched_name],
        "identical_generations": same,
        "num_prompts": len(prompts),
        "ratio": ratio,
    }


if __name__ == "__main__":
    main()
