"""Packed-row training forward + backward: ``sdpa_packed`` (attention per sample) vs ``sdpa`` (dense block mask).

    python -m bench.bench_packed_attention --threads 1     # CPU: the research config's model, 512-token rows
    python -m bench.bench_packed_attention --quick         # CPU smoke: the demo's tiny model, seconds
    python -m bench.bench_packed_attention --size 2b --image-size 448 --max-length 8192   # one GPU (bf16)

One random Qwen3-VL (``--size``: ``research`` = configs/demo/research_shapes.yaml's tiny model, else the
real dims of ``bench.bench_train_step.SIZES``), one packed batch of shapes samples (``--rows`` rows of
``--max-length`` tokens, encoded by the recipes' ``ChatEncoder`` and packed as ``bench_train_step`` packs them). The same ``HiddenStatesModel``
forward + backward (a fixed random projection of the hidden states as the loss) runs with the
decoder's attention implementation switched between ``sdpa`` (the baseline: transformers' SDPA
with the block-diagonal mask it builds from the packed position ids) and ``sdpa_packed``
(``model/packed_attention.py``). Prints best-of-repeats seconds of each, samples per row, the max
abs difference of the hidden states and of the parameter gradients, and the RATIO
sdpa / sdpa_packed step time (> 1: sdpa_packed is faster).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bench._common import bench_parser, parse_and_run, pick_device, print_table, ratio_line, time_call

RESEARCH = dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=256, vision_depth=2, vision_hidden=64,
                vision_heads=2, init_std=0.1)  # configs/demo/research_shapes.yaml model.tiny


def _run(args) -> dict:
    from transformers import Qwen3VLForConditionalGeneration

    from bench.bench_train_step import SIZES, _micro_batches
    from data.encoding import ChatEncoder
    from model import packed_attention
    from model.forward import HiddenStatesModel, position_ids_for_batch
    from model.tiny import build_tiny_image_processor, build_tiny_tokenizer, tiny_qwen3vl_config

    if args.quick:
        args.size, args.max_length, args.rows, args.repeats = "tiny", 256, 1, 2
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = build_tiny_tokenizer()
    pixels = args.image_size * args.image_size
    proc = build_tiny_image_processor(min_pixels=min(pixels, 64 * 64), max_pixels=pixels)
    encoder = ChatEncoder(tok, proc, prompt="Detect all objects.", min_pixels=min(pixels, 64 * 64), max_pixels=pixels)
    batches, _ = _micro_batches(encoder, int(tok.pad_token_id), image_size=args.image_size, max_length=args.max_length,
                                grad_accum=args.rows, max_shapes=args.max_shapes)  # one packed row each
    per_row = sum(len(b.segments) for b in batches) / len(batches)
    packed_attention.register()
    cfg = tiny_qwen3vl_config(tok, **(RESEARCH if args.size == "research" else SIZES[args.size]))
    torch.manual_seed(args.seed)
    with torch.device(device):
        vlm = Qwen3VLForConditionalGeneration(cfg).to(dtype)
    vlm.train()
    model = HiddenStatesModel(vlm)
    batches = [b.to(device) for b in batches]
    positions = [position_ids_for_batch(vlm, b) for b in batches]
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    weights = [torch.randn(b.input_ids.shape + (cfg.text_config.hidden_size,), generator=g).to(device) for b in batches]

    def step(kernel: str):
        """Forward + backward of every row (accumulated); the rows' hidden states, flattened."""
        vlm.set_attn_implementation(kernel)
        vlm.zero_grad(set_to_none=True)
        out = []
        for batch, pos, weight in zip(batches, positions, weights):
            hidden = model(input_ids=batch.input_ids, position_ids=pos, mm_token_type_ids=batch.mm_token_type_ids,
                           pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw)
            (hidden.float() * weight).sum().backward()
            out.append(hidden.detach().float().reshape(-1))
        return torch.cat(out)

    kernels = ("sdpa", packed_attention.NAME)
    out, grads, secs = {}, {}, {}
    for kernel in kernels:
        out[kernel] = step(kernel)
        grads[kernel] = torch.cat([p.grad.float().reshape(-1) for p in vlm.parameters() if p.grad is not None])
        secs[kernel] = time_call(lambda k=kernel: step(k), repeats=args.repeats)
    scale = grads["sdpa"].abs().max().item()
    result = {
        "size": args.size, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "rows": args.rows, "tokens": sum(b.num_tokens for b in batches), "samples_per_row": per_row,
        "sdpa_s": secs["sdpa"], "sdpa_packed_s": secs[packed_attention.NAME],
        "hidden_max_abs_diff": (out["sdpa"] - out[packed_attention.NAME]).abs().max().item(),
        "grad_max_abs_diff_rel": (grads["sdpa"] - grads[packed_attention.NAME]).abs().max().item() / max(scale, 1e-30),
    }
    result["ratio"] = result["sdpa_s"] / result["sdpa_packed_s"]
    print(f"size {args.size}, {device} {result['dtype']}, {args.rows} x {args.max_length}-token rows "
          f"({result['tokens']} tokens, {per_row:.1f} samples per row)")
    print_table(["kernel", "fwd+bwd s"], [[k, secs[k]] for k in kernels])
    print(f"max |hidden diff| {result['hidden_max_abs_diff']:.3g}; max |grad diff| / max |grad| "
          f"{result['grad_max_abs_diff_rel']:.3g}")
    ratio_line("packed_attention", result["ratio"], "sdpa / sdpa_packed forward+backward time (> 1: faster)")
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    p = bench_parser(__doc__, "demo-size tiny model, one 256-token row, 2 repeats (seconds)")
    p.add_argument("--size", default="research", help="research, or a bench.bench_train_step size (tiny, small, 2b, ...)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--max-shapes", type=int, default=3)
    p.add_argument("--max-length", type=int, default=512, help="tokens per packed row")
    p.add_argument("--rows", type=int, default=1, help="packed rows, one forward + backward each (accumulated)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    return parse_and_run(p, argv, _run)


if __name__ == "__main__":
    main()
