"""Shared helpers of the benchmarks: timing, peak-memory measurement, the table and the RATIO line.

Every benchmark measures its baseline in the same process, on the same inputs, right next to the
code under test, and reports a ratio: absolute times depend on the machine, ratios much less.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from data.encoding import ChatEncoder
from data.records import read_jsonl
from data.shapes import make_shapes_dataset
from data.types import EncodedSample
from model.tiny import TINY_MAX_PIXELS, build_tiny_in_memory


def time_call(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> float:
    """Best (minimum) wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` unmeasured runs.

    The minimum, not the mean: on a shared machine other processes only ever add time, so the
    fastest run is the least disturbed estimate of the code's own cost. CUDA work is synchronised
    before the clock stops so asynchronous kernels are counted.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensor memory ``fn()`` holds at once on ``device``, above what was allocated before.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: tracemalloc cannot see torch's
    allocator, so we record every allocation/free with the torch profiler (``profile_memory=True``)
    and take the maximum of the running sum in time order. The profiler slows ``fn`` down, so time
    it separately with ``time_call``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return int(peak)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (``n <= 0``: leave torch's default), then restore.

    On a machine shared with other jobs, fewer intra-op threads than cores keeps OpenMP workers from
    spinning against each other, which otherwise makes timings swing by several x.
    """
    if n <= 0:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def bench_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The parser every benchmark starts from: the docstring's first paragraph and ``--quick``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    return p


def parse_and_run(parser: argparse.ArgumentParser, argv: Sequence[str] | None, run: Callable[..., dict]) -> dict:
    """Add ``--seed`` and ``--threads``, parse ``argv`` and return ``run(args)`` under that many torch threads."""
    parser.add_argument("--seed", type=int, default=0)
    add_threads_arg(parser)
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def add_threads_arg(parser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0 = torch default); 1 is steadiest on a busy box",
    )


def mib(nbytes: float) -> float:
    return nbytes / 2**20


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a fixed-width table; floats with 4 significant digits."""

    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def ratio_line(name: str, ratio: float, what: str) -> str:
    """Print and return the final ``RATIO <name>: <x.xx>x (<what>)`` line every benchmark ends with."""
    line = f"RATIO {name}: {ratio:.2f}x ({what})"
    print(line)
    return line


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


BENCH_PROMPT = "Detect all objects in the image. Answer with one line of JSON."


@dataclass
class TinySetup:
    """The tiny random Qwen3-VL (fp32, eval mode), its tokenizer / image processor, and shapes data.

    samples: ``ChatEncoder.encode`` of each record (prompt + GT answer, gt context)
    prompts: ``ChatEncoder.encode_prompt`` of each record (what generation starts from)
    """

    model: object
    tokenizer: object
    image_processor: object
    encoder: ChatEncoder
    records: list
    samples: list[EncodedSample]
    prompts: list[EncodedSample]


def tiny_setup(num_samples: int, *, max_shapes: int, seed: int = 0, image_size: int = 64, **model_kwargs) -> TinySetup:
    """Build the tiny model (``model.tiny.build_tiny_in_memory``) and encode ``num_samples`` shapes records.

    The shapes JSONL + PNGs (``data.shapes.make_shapes_dataset``, ``image_size`` pixels square) live
    in a temporary directory only while the images are encoded; everything returned is in memory.
    The pixel budget is raised to ``image_size**2`` so a larger image gives more image tokens
    (``(image_size / 32)**2`` after the 2x2 merge of 16 px patches). ``max_shapes`` bounds the
    objects per image, so it sets the spread of sample lengths.
    """
    model, tok, proc = build_tiny_in_memory(seed=seed, **model_kwargs)
    encoder = ChatEncoder(tok, proc, prompt=BENCH_PROMPT, max_pixels=max(image_size * image_size, TINY_MAX_PIXELS))
    with tempfile.TemporaryDirectory(prefix="coordexp_bench_") as tmp:
        train, _ = make_shapes_dataset(tmp, num_samples, 0, image_size=image_size, max_shapes=max_shapes, seed=seed)
        records, _ = read_jsonl(train)
        samples = [encoder.encode(r) for r in records]
        prompts = [encoder.encode_prompt(r) for r in records]
    return TinySetup(model, tok, proc, encoder, records, samples, prompts)
