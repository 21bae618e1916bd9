"""Rollout generation: a generation backend vs the dynamic-cache HF backend, and Channel-B vs Stage-1 step time.

    python -m bench.bench_generation                                    # tiny model, CPU, hf-static
    python -m bench.bench_generation --quick                            # smoke run
    python -m bench.bench_generation --size 2b --device cuda --backend hf-static   # the GPU figure

BASELINE: ``HFGenerationBackend(cache="dynamic")`` (transformers ``generate`` with a cache that
grows every step, eager), the backend every run used before static caches. The candidate
(``--backend``) runs the same greedy rollouts of the same prompts in the same process:
``hf`` = the baseline again, ``hf-static`` = static KV cache + the compiled decode step
(``rollout_matching.hf.compile: auto``: compiled on CUDA, eager elsewhere; ``--compile`` overrides),
``vllm`` = the colocated vLLM engine (GPU, requirements-vllm.txt).

Reported per backend: generated tokens (up to each end token) and tokens/s, and one Channel-B step
(``rollout.step.prepare_rollout_batches``: generate, parse, match, build, pack; then forward + token
CE + backward of the built rows) next to one Stage-1 step (forward + token CE + backward of the same
records' GT rows, packed the same way), as the ratio Channel-B / Stage-1. Also: how many greedy
generations are identical to the baseline's and how many graphs torch.compile built.

``--size tiny``: the tiny random Qwen3-VL on shapes images. ``--size 2b``: a random-weight Qwen3-VL
at the real 2B shape (2.4 B parameters: LM 28 x 2048, 16/8 heads, MLP 6144, 151,936 rows tied;
vision 24 x 1024), bf16, built directly on ``--device``. A random model never writes
``<|im_end|>``: every prompt runs to ``--max-new-tokens``, the worst case.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from bench._common import bench_parser, parse_and_run, pick_device, print_table, ratio_line, time_call, tiny_setup
from bench.bench_packing import packed_batches, train_step
from model.forward import HiddenStatesModel
from model.vocab import coord_vocab_from_tokenizer
from rollout.backends import make_generation_backend
from rollout.step import MatchingConfig, prepare_rollout_batches

BACKENDS = ("hf", "hf-static", "vllm")

# Qwen3-VL-2B (text + vision) shape for --size 2b, in model.tiny.tiny_qwen3vl_config's terms.
SHAPE_2B = dict(hidden=2048, layers=28, heads=16, kv_heads=8, intermediate=6144, vocab_size=151_936,
                tie_word_embeddings=True, vision_depth=24, vision_hidden=1024, vision_heads=16)
SIZES = {
    # size: (model kwargs, image px, max_shapes, packed row length, max_new_tokens, prompts, batch size)
    "tiny": (dict(), 64, 3, 512, 48, 16, 8),
    "2b": (SHAPE_2B, 448, 8, 4096, 256, 12, 16),
}


def main(argv: Sequence[str] | None = None) -> dict:
    p = bench_parser(__doc__, "smoke run: 4 prompts, 4 new tokens, one repeat")
    p.add_argument("--size", choices=tuple(SIZES), default="tiny")
    p.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    p.add_argument("--backend", choices=BACKENDS, default="hf-static", help="the candidate; the baseline is always hf")
    p.add_argument("--compile", choices=("auto", "always", "never"), default="auto", help="hf-static: rollout_matching.hf.compile")
    p.add_argument("--num-prompts", type=int, default=None, help="default: 16 (tiny), 12 (2b)")
    p.add_argument("--batch-size", default=None, help="decoding.batch_size (int or auto); default 8 (tiny), 16 (2b)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 48 (tiny, under a minute on CPU), 256 (2b)")
    p.add_argument("--repeats", type=int, default=2)
    return parse_and_run(p, argv, _run)


def _build(args: argparse.Namespace, device: torch.device):
    model_kwargs, image_size, max_shapes, max_length, max_new, n_prompts, batch = SIZES[args.size]
    args.num_prompts = args.num_prompts or n_prompts
    args.max_new_tokens = args.max_new_tokens or max_new
    if args.batch_size is None:
        args.batch_size = batch
    elif args.batch_size != "auto":
        args.batch_size = int(args.batch_size)
    if args.quick:
        args.num_prompts, args.max_new_tokens, args.repeats = 4, 4, 1
    # Records, prompts and GT samples come from the tiny setup (the tokenizer and image processor
    # are the same for every size); --size 2b then swaps in the large random model.
    setup = tiny_setup(args.num_prompts, max_shapes=max_shapes, seed=args.seed, image_size=image_size)
    if model_kwargs:
        from transformers import Qwen3VLForConditionalGeneration

        from model.tiny import tiny_qwen3vl_config

        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):  # a 2.4 B model is built where it runs, not on the host first
                torch.manual_seed(args.seed)
                model = Qwen3VLForConditionalGeneration(tiny_qwen3vl_config(setup.tokenizer, **model_kwargs))
        finally:
            torch.set_default_dtype(old)
        model.generation_config = setup.model.generation_config
        setup.model = model.eval()
    setup.model.to(device)
    return setup, max_length


def _backend(name: str, args, setup, work_dir):
    """The backend ``name`` as ``make_generation_backend`` builds it from a ``rollout_matching`` section."""
    from types import SimpleNamespace

    from configs.types import HFBackendConfig, VLLMBackendConfig

    cache = "dynamic" if name == "hf" else "static"
    rm = SimpleNamespace(
        backend="vllm" if name == "vllm" else "hf",
        hf=HFBackendConfig(cache=cache, compile="never" if name == "hf" else args.compile),
        vllm=VLLMBackendConfig(gpu_memory_utilization=0.3, sleep_mode=True, max_model_len=None, enforce_eager=False),
        decoding=SimpleNamespace(max_new_tokens=args.max_new_tokens, temperature=0.0, top_p=1.0, top_k=0,
                                 batch_size=args.batch_size, seed=args.seed, coord_pick="argmax"),
    )
    return make_generation_backend(rm, setup.model, setup.tokenizer, encoder=setup.encoder, work_dir=work_dir)


def _run(args: argparse.Namespace) -> dict:
    import tempfile

    device = pick_device(args.device)
    setup, max_length = _build(args, device)
    prompts, records = setup.prompts, setup.records
    max_length = max(max_length, max(len(s) for s in setup.samples) + args.max_new_tokens + 8)
    pad_id = int(setup.tokenizer.pad_token_id)
    coord_vocab = coord_vocab_from_tokenizer(setup.tokenizer)
    trainable = HiddenStatesModel(setup.model)

    # Stage-1 step on the same records: their GT rows, packed into one batch like a rollout batch.
    gt_batch = packed_batches(setup.samples, max_length, len(setup.samples), pad_id)[0].to(device)
    trainable.train()
    train_step(trainable, gt_batch)  # untimed: lazy initialisation
    stage1_s = time_call(lambda: train_step(trainable, gt_batch), repeats=args.repeats, warmup=0)

    names = ["hf"] + ([args.backend] if args.backend != "hf" else [])
    outputs, results = {}, {}
    from torch._dynamo.utils import counters

    with tempfile.TemporaryDirectory(prefix="coordexp_bench_gen_") as work_dir:
        for name in names:
            backend = _backend(name, args, setup, work_dir)
            graphs_before = counters["stats"]["unique_graphs"]
            backend.generate(prompts)  # untimed: lazy initialisation, compilation, CUDA graph capture

            def generate(backend=backend, name=name):
                outputs[name] = backend.generate(prompts)

            seconds = time_call(generate, repeats=args.repeats, warmup=0)
            tokens = sum(len(o.token_ids) for o in outputs[name])

            def channel_b(backend=backend):
                rb = prepare_rollout_batches(
                    [records], encoder=setup.encoder, prompts=[prompts], backend=backend,
                    coord_vocab=coord_vocab, matching=MatchingConfig(),
                    max_length=max_length, packing=True, pad_token_id=pad_id,
                )[0]
                train_step(trainable, rb.batch.to(device))

            step_s = time_call(channel_b, repeats=args.repeats, warmup=0)
            results[name] = {
                "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "channel_b_step_s": step_s,
                "b_over_stage1": step_s / stage1_s, "compiled_graphs": counters["stats"]["unique_graphs"] - graphs_before,
                "batch_size": getattr(backend, "last_stats", {}).get("batch_size", args.batch_size),
            }  # fmt: skip

    cand = names[-1]
    same = sum(a.token_ids == b.token_ids for a, b in zip(outputs["hf"], outputs[cand]))
    print(f"greedy rollouts, {args.size} Qwen3-VL on {device}: {len(prompts)} prompts, max_new_tokens "
          f"{args.max_new_tokens}, decoding.batch_size {args.batch_size}; Stage-1 step {stage1_s:.4g} s")
    print_table(
        ["backend", "batch", "tokens", "gen_s", "tokens/s", "B_step_s", "B/Stage-1", "graphs"],
        [[("hf (baseline)" if n == "hf" else n), r["batch_size"], r["tokens"], r["seconds"], r["tokens_per_s"],
          r["channel_b_step_s"], r["b_over_stage1"], r["compiled_graphs"]] for n, r in results.items()],
    )  # fmt: skip
    print(f"identical greedy generations {cand} vs hf: {same}/{len(prompts)}")
    ratio = results[cand]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    ratio_line("generation", ratio, f"{cand} generated tokens/s over the dynamic-cache hf backend")
    return {
        "config": {"size": args.size, "device": str(device), "backend": cand, "num_prompts": len(prompts),
                   "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size},
        "stage1_step_s": stage1_s,
        "baseline": results["hf"],
        "candidate": results[cand],
        "identical_generations": same,
        "num_prompts": len(prompts),
        "ratio": ratio,
    }  # fmt: skip


if __name__ == "__main__":
    main()
