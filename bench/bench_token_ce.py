"""Token CE on supervised positions only (``losses.ce.token_ce``) vs full ``[B, T, V]`` logits.

    python -m bench.bench_token_ce            # V = 151,936 (Qwen3-VL rows), H = 256, T = 1024
    python -m bench.bench_token_ce --quick    # tiny T/H, same V, a few seconds

Measures one loss step (forward + backward into the hidden states and the LM head) of both ways on
the same random hidden states, LM head, targets and weights, and reports best-of-repeats time, peak tensor
memory and the logits bytes each way holds, plus the max abs difference of loss and gradients.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from bench._common import (
    bench_parser,
    mib,
    parse_and_run,
    peak_bytes,
    pick_device,
    print_table,
    ratio_line,
    time_call,
)
from losses.ce import token_ce

QWEN3VL_VOCAB_ROWS = 151_936


def baseline_full_logits_ce(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """BASELINE (naive): project every position to all V logits, then weighted token CE.

    hidden [B, T, H], lm_head_weight [V, H], input_ids / weights [B, T] (token-position aligned:
    the logits of position j - 1 predict token j). Materialises [B, T, V] fp32 logits.
    """
    logits = (hidden @ lm_head_weight.t()).float()  # [B, T, V]
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
    )  # [B * (T - 1)]
    w = weights[:, 1:].reshape(-1).float()
    return (w * ce).sum() / w.sum().clamp_min(1e-8)


def _make_inputs(batch: int, seq_len: int, hidden_size: int, vocab: int, frac: float, seed: int, device, dtype):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq_len, hidden_size, generator=g).to(device=device, dtype=dtype)
    weight = (0.02 * torch.randn(vocab, hidden_size, generator=g)).to(device=device, dtype=dtype)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)
    # Supervised answer tokens (struct/desc/eos) are a minority of a packed row: prompt and image
    # tokens and coord tokens are never in token CE. Position 0 has no logit position.
    sup = torch.rand(batch, seq_len, generator=g) < frac
    sup[:, 0] = False
    weights = torch.where(sup, torch.where(torch.rand(batch, seq_len, generator=g) < 0.2, 0.1, 1.0), 0.0)
    return hidden, weight, input_ids, weights.to(device)


def _loss_and_grads(loss_fn, hidden, weight, input_ids, weights):
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    loss = loss_fn(h, w, input_ids, weights)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), gh, gw


def main(argv: Sequence[str] | None = None) -> dict:
    p = bench_parser(__doc__, "tiny run (T=64, H=32) with the real vocabulary size")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=QWEN3VL_VOCAB_ROWS)
    p.add_argument("--supervised-frac", type=float, default=0.25, help="fraction of positions with CE weight > 0")
    p.add_argument("--chunk-size", type=int, default=2048, help="token_ce rows projected per chunk")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return parse_and_run(p, argv, _run)


def _run(args: argparse.Namespace) -> dict:
    warmup = 1
    if args.quick:
        args.seq_len, args.hidden, args.repeats, warmup = 64, 32, 1, 0
    device = pick_device(args.device)
    dtype = torch.float32

    hidden, weight, input_ids, weights = _make_inputs(
        args.batch, args.seq_len, args.hidden, args.vocab, args.supervised_frac, args.seed, device, dtype
    )
    n_sup = int((weights > 0).sum())

    def ours(h, w, ids, wt):
        return token_ce(h, w, ids, wt, chunk_size=args.chunk_size)[0]

    results = {}
    for name, fn in (("baseline_full_logits", baseline_full_logits_ce), ("token_ce", ours)):

        def step(fn=fn):
            return _loss_and_grads(fn, hidden, weight, input_ids, weights)

        seconds = time_call(step, repeats=args.repeats, warmup=warmup)
        peak = peak_bytes(step, device)
        results[name] = {"seconds": seconds, "peak_bytes": peak}
    results["baseline_full_logits"]["logits_bytes"] = args.batch * args.seq_len * args.vocab * 4
    results["token_ce"]["logits_bytes"] = n_sup * args.vocab * 4  # every chunk is kept for backward

    base_loss, base_gh, base_gw = _loss_and_grads(baseline_full_logits_ce, hidden, weight, input_ids, weights)
    our_loss, our_gh, our_gw = _loss_and_grads(ours, hidden, weight, input_ids, weights)
    loss_diff = float((base_loss - our_loss).abs())
    grad_diff = float(max((base_gh - our_gh).abs().max(), (base_gw - our_gw).abs().max()))
    # Relative to the largest gradient entry: W's gradients are ~1e-5, so an absolute 1e-4 says little.
    grad_scale = float(max(base_gh.abs().max(), base_gw.abs().max()))
    grad_rel_diff = grad_diff / max(grad_scale, 1e-30)

    print(
        f"token CE fwd+bwd: B={args.batch} T={args.seq_len} H={args.hidden} V={args.vocab} "
        f"supervised={n_sup} ({n_sup / (args.batch * args.seq_len):.0%}) device={device}"
    )
    print_table(
        ["method", "time_s", "peak_MiB", "logits_MiB"],
        [[name, r["seconds"], mib(r["peak_bytes"]), mib(r["logits_bytes"])] for name, r in results.items()],
    )
    print(f"loss baseline={float(base_loss):.6f} token_ce={float(our_loss):.6f} max_abs_diff={loss_diff:.3g}")
    print(f"grad max_abs_diff={grad_diff:.3g} (relative to max |grad|: {grad_rel_diff:.3g})")
    b, o = results["baseline_full_logits"], results["token_ce"]
    speedup = b["seconds"] / o["seconds"]
    memory_ratio = b["peak_bytes"] / max(o["peak_bytes"], 1)
    print(f"peak memory ratio (baseline / token_ce): {memory_ratio:.2f}x")
    ratio_line("token_ce", speedup, "token_ce step speed over full-logits baseline")
    return {
        "config": {
            "batch": args.batch,
            "seq_len": args.seq_len,
            "hidden": args.hidden,
            "vocab": args.vocab,
            "supervised": n_sup,
            "device": str(device),
        },
        "baseline": b,
        "token_ce": o,
        "speedup": speedup,
        "memory_ratio": memory_ratio,
        "loss_max_abs_diff": loss_diff,
        "grad_max_abs_diff": grad_diff,
        "grad_rel_diff": grad_rel_diff,
    }


if __name__ == "__main__":
    main()
