"""Training steps at real Qwen3-VL shapes: Stage-1, Channel-A (N=2) and Channel-B, through the recipes' code.

    python -m bench.bench_train_step --quick                 # CPU smoke: tiny shapes, seconds
    python -m bench.bench_train_step --size tiny             # CPU profile-sized run
    python -m bench.bench_train_step --size small --clock cpu --threads 1 --image-size 448 --max-length 2048 \
        --grad-accum 1 --kinds stage1 channel_a channel_a_full   # CPU: prefix reuse where the decoder dominates
    python -m bench.bench_train_step --size 2b --out bench_2b.json   # one H100/H200 (bench/README.md)

The model is a random Qwen3-VL built by ``model.tiny.tiny_qwen3vl_config`` with the real dims of
``--size`` (no download) and the tiny tokenizer; the data is synthetic shapes at ``--image-size``
pixels, encoded by the recipes' ``ChatEncoder`` and packed into ``--grad-accum`` rows of
``--max-length`` tokens (one packed row per micro-step, ``training.batch_size: 1`` as shipped). The
parameters are stored in ``--param-dtype`` (float32: the recipes' fp32 master weights) and run
under ``--mixed-precision`` autocast (bf16 on CUDA), through ``accelerate`` exactly as the recipes
prepare them. Each step kind runs the same calls as ``train_stage1.py`` / ``train_stage2.py``:

- stage1:    ``gt_forward`` -> ``run_pipeline`` (configs/stage1 objective) -> backward -> AdamW
- channel_a: ``expectation_forward`` (N=2, the config's embed / grad modes and prefix reuse) -> Channel-A pipeline
- channel_a_full: the same with ``prefix_reuse=False`` (forward 2 recomputes every position)
- channel_b: ``prepare_rollout_batches`` (HF generate, ``--new-tokens`` new tokens per prompt, no
             early stop: a random model rarely says ``<|im_end|>``) -> ``rollout_forward`` -> pipeline

Printed per kind: seconds per optimizer step (median of ``--steps`` after ``--warmup``), tokens/s
(real tokens, padding excluded), MFU = 6 * N_LM * tokens / step_s / peak with N_LM = language-model
parameters without the input embedding table (the LM head counted as V x H even when tied), and a
second MFU adding the vision tower's 6 * N_vision * patches (attention FLOPs never counted: a lower
bound); peak memory; and the per-phase split (vision tower, LM forward, losses, backward,
optimizer, generation; each phase is timed with a device synchronise at its edges, so the split is
from separate timed steps). On CUDA the host<->device syncs of one step are counted
(``torch.cuda.set_sync_debug_mode``). Then ``RATIO`` lines: Channel-A / Stage-1 and Channel-B /
Stage-1 step time (``--clock cpu``: this process's CPU seconds instead of wall seconds, for CPU runs
on a shared machine). ``--out`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from bench._common import bench_parser, mib, parse_and_run, pick_device, print_table, ratio_line

REPO = Path(__file__).resolve().parents[1]

# Real Qwen3-VL text / vision dims (the Hugging Face configs of Qwen3-VL-{2B,4B,8B}-Instruct).
# vocab_size 152,704: 151,936 rows + the coord tokens' growth, rounded to a multiple of 64.
SIZES: dict[str, dict] = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_depth=2, vision_hidden=32,
                 vision_heads=2),
    # CPU-sized: the 2B layout scaled down so a step takes seconds on one core and the decoder, not
    # the losses or the vision tower, dominates (the prefix-reuse numbers in bench/README.md)
    "small": dict(hidden=512, layers=4, heads=8, kv_heads=4, head_dim=64, intermediate=1536, vision_depth=2,
                  vision_hidden=64, vision_heads=2, vision_position_embeddings=256),
    "2b": dict(hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=6144,
               vision_depth=24, vision_hidden=1024, vision_heads=16, vision_intermediate=4096,
               deepstack_indexes=[5, 11, 17], vision_position_embeddings=2304, vocab_size=152_704,
               tie_word_embeddings=True, max_position_embeddings=262_144),
    "4b": dict(hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=9728,
               vision_depth=24, vision_hidden=1024, vision_heads=16, vision_intermediate=4096,
               deepstack_indexes=[5, 11, 17], vision_position_embeddings=2304, vocab_size=152_704,
               tie_word_embeddings=True, max_position_embeddings=262_144),
    "8b": dict(hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=12288,
               vision_depth=27, vision_hidden=1152, vision_heads=16, vision_intermediate=4304,
               deepstack_indexes=[8, 16, 24], vision_position_embeddings=2304, vocab_size=152_704,
               tie_word_embeddings=False, max_position_embeddings=262_144),
}
# step clock: wall seconds (the GPU measure), or this process's CPU seconds (time.process_time) for CPU
# runs on a shared machine, where other processes' load lengthens wall time but not our CPU time
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
KINDS = ("stage1", "channel_a", "channel_a_full", "channel_b")
PHASES = ("vision", "lm_forward", "losses", "backward", "optimizer", "generation")


class PhaseTimer:
    """Wall seconds per phase; with ``sync`` every edge synchronises the device so GPU work is attributed."""

    def __init__(self, device: torch.device, sync: bool, clock=time.perf_counter):
        self.device, self.sync, self.clock = device, sync, clock
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.forward_s = 0.0  # vision + LM forward; LM forward = forward - vision

    def _sync(self) -> None:
        if self.sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str):
        self._sync()
        t0 = self.clock()
        yield
        self._sync()
        if name == "forward":
            self.forward_s += self.clock() - t0
        else:
            self.seconds[name] += self.clock() - t0

    def vision_hooks(self, visual: torch.nn.Module):
        """Forward hooks timing the vision tower (it runs inside the forward phase)."""
        start: list[float] = []

        def pre(_module, _args):
            self._sync()
            start.append(self.clock())

        def post(_module, _args, _out):
            self._sync()
            self.seconds["vision"] += self.clock() - start.pop()

        return [visual.register_forward_pre_hook(pre), visual.register_forward_hook(post)]

    def split(self) -> dict[str, float]:
        out = dict(self.seconds)
        out["lm_forward"] = max(self.forward_s - out["vision"], 0.0)
        return out


def _model_config(size: str, tokenizer):
    from model.tiny import tiny_qwen3vl_config

    return tiny_qwen3vl_config(tokenizer, **SIZES[size])


def _param_counts(vlm) -> dict[str, int]:
    """N_LM (decoder + LM head as V x H, no input embedding table) and N_vision (tower + mergers)."""
    core = vlm.model
    embed = core.language_model.get_input_embeddings().weight
    decoder = sum(p.numel() for p in core.language_model.parameters()) - embed.numel()
    head = vlm.get_output_embeddings().weight
    return {
        "n_lm": int(decoder + head.numel()),
        "n_vision": int(sum(p.numel() for p in core.visual.parameters())),
        "n_total": int(sum(p.numel() for p in vlm.parameters())),
    }


def _configs(size: str):
    """The shipped Stage-1 and Two-Channel configs of this size (2B for tiny and small): their pipelines and modes."""
    from configs import load_config

    name = "qwen3vl_2b.yaml" if size in ("tiny", "small") else f"qwen3vl_{size}.yaml"
    s1 = load_config(REPO / "configs" / "stage1" / name, expect="stage1")
    s2 = load_config(REPO / "configs" / "stage2_two_channel" / name, expect="stage2")
    return s1, s2


def _micro_batches(encoder, pad_id: int, *, image_size: int, max_length: int, grad_accum: int, max_shapes: int):
    """``grad_accum`` packed rows of at most ``max_length`` tokens of encoded shapes samples, and their records."""
    from data.packing import collate_rows, pack_samples
    from data.records import read_jsonl
    from data.shapes import make_shapes_dataset

    need = max_length * grad_accum
    with tempfile.TemporaryDirectory(prefix="coordexp_bench_step_") as tmp:
        train, _ = make_shapes_dataset(Path(tmp) / "probe", 4, 0, image_size=image_size, max_shapes=max_shapes, seed=1)
        mean_len = sum(len(encoder.encode(r)) for r in read_jsonl(train)[0]) / 4
        n = int(1.2 * need / mean_len) + 2 * grad_accum  # enough that every row fills up
        train, _ = make_shapes_dataset(Path(tmp) / "data", n, 0, image_size=image_size, max_shapes=max_shapes, seed=0)
        records = read_jsonl(train)[0]
        samples = [encoder.encode(r) for r in records]
    rows = pack_samples(samples, max_length)
    rows = sorted(rows, key=lambda r: -sum(len(samples[i]) for i in r))[:grad_accum]
    return [collate_rows([[samples[i] for i in r]], pad_id, indices=[r]) for r in rows], records


def memory_estimate(size: str, tokens: int = 8192, image_size: int = 448, sample_tokens: int = 370) -> dict:
    """Estimated training memory (GB) of one rank at ``tokens`` per packed row, recipe precision.

    Model states are exact arithmetic: fp32 master weights under bf16 autocast keep 16 bytes per
    trainable parameter (fp32 weight 4 + fp32 grad 4 + AdamW m, v 8). Activations are an estimate
    of what autograd saves per token per decoder layer under bf16 autocast with a memory-efficient
    attention kernel (no T^2 term), fp32 residual stream (fp32 parameters): RMSNorm fp32 input +
    bf16 output twice (12 H), q/k RMSNorm and RoPE (8 (n_h + n_kv) d), attention q, k, v, out
    (2 (2 n_h + 2 n_kv) d), SwiGLU (8 I); the vision tower per patch likewise (LayerNorm, attention,
    GELU MLP: 28 H_v + 6 I_v). With gradient checkpointing a layer keeps only its fp32 input (4 H)
    plus one layer's activations during recompute. The image count per row assumes samples of
    ``sample_tokens`` tokens each with one ``image_size`` image ((image_size / 16)^2 patches).
    """
    d = SIZES[size]
    h, i, layers = d["hidden"], d["intermediate"], d["layers"]
    hd = d.get("head_dim", h // d["heads"])
    nh, nkv = d["heads"] * hd, d["kv_heads"] * hd
    vh, vi, vdepth = d["vision_hidden"], d.get("vision_intermediate", 2 * d["vision_hidden"]), d["vision_depth"]
    lm_layer = 12 * h + 8 * (nh + nkv) + 2 * (2 * nh + 2 * nkv) + 8 * i  # bytes per token
    vis_layer = 28 * vh + 6 * vi  # bytes per patch
    patches = (tokens // sample_tokens) * (image_size // 16) ** 2
    with torch.device("meta"):
        from transformers import Qwen3VLForConditionalGeneration

        from model.tiny import build_tiny_tokenizer

        counts = _param_counts(Qwen3VLForConditionalGeneration(_model_config(size, build_tiny_tokenizer())))
    gb = 1e9
    states = 16 * counts["n_total"] / gb
    full = (tokens * lm_layer * layers + patches * vis_layer * vdepth) / gb
    ckpt = (tokens * 4 * h * layers + tokens * lm_layer + patches * 4 * vh * vdepth + patches * vis_layer) / gb
    # The LM head on supervised rows: one 2048-row chunk of fp32 logits + its softmax grad at a time.
    head = 2 * 2048 * d.get("vocab_size", 2048) * 4 / gb
    return {"size": size, "params_b": counts["n_total"] / 1e9, "states_gb": states, "activations_gb": full,
            "activations_ckpt_gb": ckpt, "head_chunk_gb": head, "total_gb": states + full + head,
            "total_ckpt_gb": states + ckpt + head, "patches": patches}


# Calls that read a tensor's value on the host: on a GPU each one waits for the device (a sync).
HOST_READS = frozenset({"__bool__", "tolist", "__int__", "__float__", "__index__", "item", "nonzero", "cpu",
                        "masked_select", "unique", "argwhere", "nonzero_static"})


class HostReadCounter(TorchFunctionMode):
    """Counts host reads of values of tensors that live on the training device, per call site.

    Device-independent, so it runs on CPU. "On the device" is tracked by taint: the parameters,
    buffers and batch tensors given at construction are on it; so is every result of an op with
    such an input and of a ``.to(<device>)`` written in this repository (libraries move their own
    index tensors to wherever their inputs are); ``.cpu()`` results are on the host. Factories called
    with ``device=`` are not followed (on CPU the device says nothing), so the count is a lower
    bound where code reads a fresh device tensor that no device input fed. A read (``HOST_READS``, or
    boolean-mask indexing) of a device tensor is a host<->device sync on a GPU. The site is the
    first stack frame in this repository outside ``bench/`` (else the library's file), as
    ``path:function``.
    """

    def __init__(self, device_tensors):
        super().__init__()
        self.sites: dict[str, int] = {}
        self._on_device: dict[int, weakref.ref] = {}
        self.mark_all(device_tensors)

    def mark_all(self, tensors) -> None:
        for t in tensors:
            self._mark(t)

    def _mark(self, t) -> None:
        if isinstance(t, torch.Tensor):
            key = id(t)
            self._on_device[key] = weakref.ref(t, lambda _ref, key=key: self._on_device.pop(key, None))

    def _is_on_device(self, t) -> bool:
        ref = self._on_device.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        leaves = tree_leaves((args, kwargs))
        on_device = any(self._is_on_device(t) for t in leaves)
        if on_device and (name in HOST_READS or (name == "__getitem__" and len(args) > 1 and _bool_index(args[1]))):
            site = _call_site()
            self.sites[site] = self.sites.get(site, 0) + 1
        out = func(*args, **kwargs)
        if name == "cpu" and on_device and out is args[0]:
            out = out.clone()  # on CPU .cpu() is the same tensor; on a GPU it is a host copy
        moved = name == "to" and any(isinstance(a, (torch.device, str)) and a != "cpu" for a in args[1:]) \
            and _in_repo(sys._getframe(1).f_code.co_filename)
        if (on_device or moved) and name not in ("cpu", "tolist", "item", "numpy"):
            for t in tree_leaves(out):
                self._mark(t)
        return out

    @property
    def total(self) -> int:
        return sum(self.sites.values())


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _in_repo(filename: str) -> bool:
    path = Path(filename)
    return path.is_absolute() and REPO in path.resolve().parents


def _call_site() -> str:
    frame, fallback = sys._getframe(2), None
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_absolute() and path.is_file():
            try:
                rel = path.resolve().relative_to(REPO)
            except ValueError:
                rel = None
            if rel is not None and rel.parts[0] != "bench":
                return f"{rel.as_posix()}:{frame.f_code.co_name}"
            if fallback is None and "site-packages" in path.parts:
                lib = path.parts[path.parts.index("site-packages") + 1]
                if lib != "torch" or "overrides" not in path.name:
                    fallback = f"{lib}/{path.name}:{frame.f_code.co_name}"
        frame = frame.f_back
    return fallback or "other"


def _prefix_fraction(batches) -> float:
    """Fraction of real tokens before each segment's first coord slot: what Channel-A forwards 2..N
    could reuse from forward 1 (their inputs and, with block-diagonal attention, their hidden states
    are identical there): what ``stage2_ab.prefix_reuse`` skips in those forwards."""
    from core.vocab import COORD

    before = total = 0
    for b in batches:
        for seg in b.segments:
            types = b.token_types[seg.row, seg.start : seg.start + seg.length]
            coord = (types == COORD).nonzero()
            before += int(coord[0]) if coord.numel() else seg.length
            total += seg.length
    return before / max(total, 1)


def _sync_counter(device: torch.device):
    """Context manager counting synchronising CUDA calls (``set_sync_debug_mode('warn')``); None on CPU."""
    if device.type != "cuda":
        return None

    @contextmanager
    def count():
        box = {"n": 0}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield box
            finally:
                torch.cuda.set_sync_debug_mode(0)
        box["n"] = sum("synchroniz" in str(w.message).lower() for w in caught)

    return count


def main(argv: Sequence[str] | None = None) -> dict:
    p = bench_parser(__doc__, "CPU smoke: tiny shapes, 64 px, 2 x 384 tokens, 1 step")
    p.add_argument("--size", choices=tuple(SIZES), default="2b")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--max-shapes", type=int, default=8)
    p.add_argument("--max-length", type=int, default=8192, help="tokens per packed row (one row per micro-step)")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-steps per optimizer step")
    p.add_argument("--new-tokens", type=int, default=256, help="Channel-B generation length per prompt")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="step time: wall seconds, or this process's CPU seconds (shared CPU machines; with --threads 1)")
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps per kind (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured optimizer steps per kind first")
    p.add_argument("--device", default="auto")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter storage (model.dtype); float32 = the recipes' fp32 master weights")
    p.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                   help="training.mixed_precision; auto = bf16 on CUDA, no on CPU")
    p.add_argument("--attn", default="auto",
                   help="model.attn_implementation (auto | sdpa_packed | sdpa | flash_attention_2 | eager)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device peak (H100/H200 dense bf16: 989)")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--profile", default=None, help="write a torch.profiler table of one --profile-kind step here")
    p.add_argument("--profile-kind", choices=KINDS, default="stage1", help="the step kind --profile profiles")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--memory-table", action="store_true",
                   help="print the estimated per-rank memory of 2b/4b/8b at --max-length tokens and exit")
    return parse_and_run(p, argv, _main)


def _main(args: argparse.Namespace) -> dict:
    if args.memory_table:
        rows = [memory_estimate(size, args.max_length, args.image_size) for size in ("2b", "4b", "8b")]
        print(f"estimated per-rank training memory (GB) at {args.max_length} tokens per row, {args.image_size} px images, "
              "fp32 master weights + bf16 autocast, all parameters trainable")
        print_table(["size", "params_B", "states", "activations", "act_ckpt", "lm_head_chunk", "total", "total_ckpt"],
                    [[r["size"], r["params_b"], r["states_gb"], r["activations_gb"], r["activations_ckpt_gb"],
                      r["head_chunk_gb"], r["total_gb"], r["total_ckpt_gb"]] for r in rows])
        return {"memory": rows}
    if args.quick:
        args.size, args.image_size, args.max_shapes = "tiny", 64, 3
        args.max_length, args.grad_accum, args.new_tokens, args.steps, args.warmup = 384, 2, 8, 1, 0
    return _run(args)


def _run(args: argparse.Namespace) -> dict:
    from accelerate.state import AcceleratorState

    from data.encoding import ChatEncoder
    from model.forward import HiddenStatesModel
    from model.loading import _ensure_generation_ids
    from model.tiny import build_tiny_image_processor, build_tiny_tokenizer
    from model.vocab import coord_vocab_from_tokenizer
    from training.optim import build_optimizer
    from training.setup import make_accelerator

    device = pick_device(args.device)
    mixed = args.mixed_precision if args.mixed_precision != "auto" else ("bf16" if device.type == "cuda" else "no")
    s1_cfg, s2_cfg = _configs(args.size)
    tok = build_tiny_tokenizer()
    pixels = args.image_size * args.image_size
    proc = build_tiny_image_processor(min_pixels=min(pixels, 64 * 64), max_pixels=pixels)
    encoder = ChatEncoder(tok, proc, prompt=s1_cfg.data.prompt, system_prompt=s1_cfg.data.system_prompt,
                          min_pixels=min(pixels, 64 * 64), max_pixels=pixels)
    pad_id = int(tok.pad_token_id)
    coord_ids = coord_vocab_from_tokenizer(tok).ids.to(device)

    from transformers import Qwen3VLForConditionalGeneration

    from model.loading import resolve_attn

    cfg = _model_config(args.size, tok)
    cfg._attn_implementation = args.attn = resolve_attn(args.attn)  # auto -> its choice; registers sdpa_packed
    torch.manual_seed(args.seed)
    with torch.device(device):
        vlm = Qwen3VLForConditionalGeneration(cfg).to(getattr(torch, args.param_dtype))
    from model.tiny import _tiny_generation_config

    vlm.generation_config = _tiny_generation_config(tok)
    _ensure_generation_ids(vlm, tok)
    if args.gradient_checkpointing:
        vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vlm.config.use_cache = False
    vlm.train()
    counts = _param_counts(vlm)

    batches, records = _micro_batches(encoder, pad_id, image_size=args.image_size, max_length=args.max_length,
                             grad_accum=args.grad_accum, max_shapes=args.max_shapes)
    tokens = sum(b.num_tokens for b in batches)
    patches = sum(int(b.pixel_values.shape[0]) for b in batches)

    prefix = _prefix_fraction(batches)
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh Accelerator with this precision
    accelerator = make_accelerator(mixed, args.grad_accum, args.seed, **({"cpu": True} if device.type == "cpu" else {}))
    model = HiddenStatesModel(vlm)
    optimizer = build_optimizer(model, args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = [b.to(accelerator.device) for b in batches]

    results: dict = {
        "config": {**{k: v for k, v in vars(args).items() if k not in ("profile", "out")}, "mixed_precision": mixed,
                   "device": str(device), "device_name": _device_name(device), "torch": torch.__version__,
                   **counts, "tokens_per_step": tokens, "patches_per_step": patches,
                   "rows": [int(b.num_tokens) for b in batches], "channel_a_prefix_fraction": prefix},
        "kinds": {},
    }
    print(f"bench_train_step: size {args.size} ({counts['n_total'] / 1e9:.3f} B params; N_LM {counts['n_lm'] / 1e9:.3f} B, "
          f"N_vision {counts['n_vision'] / 1e9:.3f} B) on {results['config']['device_name']}, params {args.param_dtype}, "
          f"mixed {mixed}, attn {args.attn}, grad ckpt {args.gradient_checkpointing}, clock {args.clock}; {args.grad_accum} x "
          f"{args.max_length}-token rows = {tokens} tokens, {patches} patches per step")

    print(f"Channel-A: {100 * prefix:.0f}% of the tokens lie before their segment's first coord slot "
          "(identical in forwards 1..N; channel_a reuses them from forward 1, channel_a_full recomputes them)")
    step = _StepRunner(args, accelerator, model, vlm, optimizer, batches, records, coord_ids, s1_cfg, s2_cfg, encoder,
                       tok)
    for kind in args.kinds:
        results["kinds"][kind] = step.measure(kind, counts, device)
    if args.profile:
        _write_profile(step, device, args.profile, args.profile_kind)

    rows = []
    for kind, r in results["kinds"].items():
        rows.append([kind, r["step_s"], r["tokens_per_s"], 100 * r["mfu_lm"], 100 * r["mfu_with_vision"],
                     mib(r["peak_bytes"]) if r["peak_bytes"] is not None else "n/a",
                     *(r["phases"][ph] for ph in PHASES), r["syncs"] if r["syncs"] is not None else "n/a",
                     r["host_reads"]])
    print_table(["kind", "step_s", "tokens/s", "MFU_LM%", "MFU+vis%", "peak_MiB", *[f"{p}_s" for p in PHASES],
                 "cuda_syncs", "host_reads"], rows)
    for kind, r in results["kinds"].items():
        top = ", ".join(f"{site} {n}" for site, n in list(r["host_reads_by_site"].items())[:6])
        print(f"host reads per {kind} step by site: {top}")
    base = results["kinds"].get("stage1")
    if base:
        whats = {"channel_a": "Channel-A N=2 step time over Stage-1 (prefix reuse)",
                 "channel_a_full": "Channel-A N=2 step time over Stage-1 (forward 2 recomputed in full)",
                 "channel_b": f"Channel-B step time (generation of {args.new_tokens} tokens included) over Stage-1"}
        for kind, what in whats.items():
            if kind in results["kinds"]:
                r = results["kinds"][kind]["step_s"] / base["step_s"]
                results[f"ratio_{kind}_over_stage1"] = r
                ratio_line(f"{kind}_over_stage1", r, what)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class _StepRunner:
    """One optimizer step of each kind, written as the recipes write it (accumulate, forward, pipeline,
    backward, clip, step), with phase timers around the calls."""

    def __init__(self, args, accelerator, model, vlm, optimizer, batches, records, coord_ids, s1_cfg, s2_cfg, encoder,
                 tok):
        self.args, self.accelerator, self.model, self.vlm = args, accelerator, model, vlm
        self.optimizer, self.batches, self.records, self.coord_ids = optimizer, batches, records, coord_ids
        self.s1, self.s2, self.encoder, self.tok = s1_cfg, s2_cfg, encoder, tok
        self.lm_head = vlm.get_output_embeddings().weight
        self.backend = None
        self.counter: HostReadCounter | None = None
        self.prefix_reuse_warned: set[str] = set()  # a prefix-reuse fallback is logged once per reason

    def _rollouts(self, timer: PhaseTimer):
        from data.encoding import prompts_of
        from rollout.backends import HFGenerationBackend
        from rollout.step import prepare_rollout_batches

        rm = self.s2.rollout_matching
        if self.backend is None:
            # No early stop: the last LM-head row (no tokenizer entry) as the only eos keeps rollouts --new-tokens long.
            self.backend = HFGenerationBackend(self.vlm, self.tok, max_new_tokens=self.args.new_tokens,
                                               temperature=0.0, batch_size=rm.decoding.batch_size,
                                               seed=rm.decoding.seed,
                                               eos_token_ids=[self.lm_head.shape[0] - 1])
        with timer.phase("generation"), self.accelerator.autocast():
            prompts = [prompts_of(b, self.records) for b in self.batches]
            return prepare_rollout_batches(
                [[p.record for p in group] for group in prompts], encoder=self.encoder, prompts=prompts,
                backend=self.backend,
                coord_vocab=coord_vocab_of(self.tok),
                matching=rm.matching,
                max_length=self.args.max_length, packing=True, pad_token_id=int(self.tok.pad_token_id),
            )

    def run(self, kind: str, timer: PhaseTimer) -> int:
        """One optimizer step of ``kind``; returns the real tokens trained on."""
        from pipeline.context import TeacherForcingContext
        from pipeline.executor import run_pipeline
        from pipeline.forwards import expectation_forward, gt_forward, rollout_forward

        acc, sab = self.accelerator, self.s2.stage2_ab
        batches = self.batches
        if kind == "channel_b":
            batches = [rb.batch.to(acc.device) for rb in self._rollouts(timer)]
            if self.counter is not None:  # on CPU .to() may return the same tensors: mark them as on the device
                self.counter.mark_all(v for b in batches for v in vars(b).values())
        cfg = self.s1 if kind == "stage1" else self.s2
        channel = {"stage1": None, "channel_a": "A", "channel_a_full": "A", "channel_b": "B"}[kind]
        tokens = 0
        for batch in batches:
            with acc.accumulate(self.model):
                with acc.autocast():  # as the recipes: vision, embeddings and losses in the training precision
                    with timer.phase("forward"):
                        if kind == "stage1":
                            fwd = gt_forward(self.model, self.vlm, batch)
                        elif kind in ("channel_a", "channel_a_full"):
                            fwd = expectation_forward(self.model, self.vlm, batch, self.coord_ids, n_iter=sab.n_softctx_iter,
                                                      embed_mode=sab.coord_ctx_embed_mode, grad_mode=sab.softctx_grad_mode,
                                                      temperature=sab.softctx_temperature,
                                                      prefix_reuse=sab.prefix_reuse and kind == "channel_a",
                                                      prefix_reuse_warned=self.prefix_reuse_warned)
                        else:
                            fwd = rollout_forward(self.model, self.vlm, batch)
                    with timer.phase("losses"):
                        ctx = TeacherForcingContext(channel=channel, batch=batch, hidden=fwd.hidden,
                                                    lm_head_weight=self.lm_head, coord_token_ids=self.coord_ids,
                                                    coord_decode_mode=sab.coord_decode_mode if channel else "exp")
                        result = run_pipeline(cfg.pipeline, ctx)
                with timer.phase("backward"):
                    acc.backward(result.loss)
                with timer.phase("optimizer"):
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(self.model.parameters(), cfg.training.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            tokens += batch.num_tokens
        return tokens

    def measure(self, kind: str, counts: dict, device: torch.device) -> dict:
        from bench._common import _sync

        args = self.args
        plain = PhaseTimer(device, sync=False)
        for _ in range(args.warmup):
            self.run(kind, plain)
        times, tokens = [], 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        clock = CLOCKS[args.clock]
        for _ in range(args.steps):
            _sync()
            t0 = clock()
            tokens = self.run(kind, PhaseTimer(device, sync=False))
            _sync()
            times.append(clock() - t0)
        peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
        timed = PhaseTimer(device, sync=True, clock=clock)
        hooks = timed.vision_hooks(self.vlm.model.visual)
        counter = _sync_counter(device)
        try:
            if counter is None:
                self.run(kind, timed)
                syncs = None
            else:
                with counter() as box:
                    self.run(kind, timed)
                syncs = box["n"]
        finally:
            for h in hooks:
                h.remove()
        seeds = [*self.vlm.parameters(), *self.vlm.buffers(), self.coord_ids,
                 *(v for b in self.batches for v in vars(b).values() if isinstance(v, torch.Tensor))]
        host_reads = HostReadCounter(seeds)
        previous = os.environ.get("COORDEXP_CHECKS")
        os.environ["COORDEXP_CHECKS"] = "0"  # count the GPU path: content checks off, as on an accelerator
        try:
            self.counter = host_reads
            with host_reads:
                self.run(kind, PhaseTimer(device, sync=False))
        finally:
            self.counter = None
            if previous is None:
                os.environ.pop("COORDEXP_CHECKS")
            else:
                os.environ["COORDEXP_CHECKS"] = previous
        step_s = statistics.median(times)
        peak_flops = args.peak_tflops * 1e12
        lm_flops = 6.0 * counts["n_lm"] * tokens
        vis_flops = 6.0 * counts["n_vision"] * sum(int(b.pixel_values.shape[0]) for b in self.batches)
        return {
            "step_s": step_s, "step_s_all": times, "tokens": tokens, "tokens_per_s": tokens / step_s,
            "mfu_lm": lm_flops / step_s / peak_flops, "mfu_with_vision": (lm_flops + vis_flops) / step_s / peak_flops,
            "peak_bytes": peak, "phases": timed.split(), "syncs": syncs, "host_reads": host_reads.total,
            "host_reads_by_site": dict(sorted(host_reads.sites.items(), key=lambda kv: -kv[1])),
        }


def coord_vocab_of(tok):
    from model.vocab import coord_vocab_from_tokenizer

    return coord_vocab_from_tokenizer(tok)


def _write_profile(step: _StepRunner, device: torch.device, path: str, kind: str = "stage1") -> None:
    """torch.profiler table (top ops by self time) of one optimizer step of ``kind``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        step.run(kind, PhaseTimer(device, sync=False))
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    Path(path).write_text(prof.key_averages().table(sort_by=key, row_limit=40) + "\n")
    print(f"profile of one {kind} step: {path}")


if __name__ == "__main__":
    main()
