"""Loader throughput: training samples/s and tokens/s that ``data.num_workers`` loader workers deliver.

    python -m bench.bench_loader                  # 256 photo-sized JPEGs (640x480), workers 0, 1, 2
    python -m bench.bench_loader --quick          # 24 small images, 1024-token rows: proves the script works
    python -m bench.bench_loader --workers 0 4 8  # on a machine with more cores

What the recipes' loader does per micro-batch (``data.packing.iterate_batches`` over a
``PackedDataset`` made from the Arrow record table): decode the image (PIL), run the Qwen3-VL image
processor at the 2B recipe's pixel budget (``configs/stage1/qwen3vl_2b.yaml``: ``data.min_pixels``
65536, ``data.max_pixels`` 1048576; patch 16, merge 2), encode prompt + answer, collate a packed row
of ``training.max_length`` 8192 tokens. The tokenizer is the tiny one (the same BPE machinery, a
smaller vocabulary). One epoch per worker count, timed from the first micro-batch to the last, so
the workers' start-up is left out; the model is not involved.

**BASELINE** is ``data.num_workers: 0`` (everything in the training process, between steps).
``RATIO loader`` is the best worker count's samples/s over the baseline's. The table also prints the
workers one GPU needs to keep up with the 2B step measured on an H200 (3.1 s per 4 x 8192-token
micro-batches, i.e. ~10.6 k tokens/s): ``ceil(10.6 k / tokens/s of one worker)``.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench._common import bench_parser, parse_and_run, print_table, ratio_line

H200_2B_TOKENS_PER_S = 4 * 8192 / 3.1  # the 2B step on an H200 (docs/SCALING.md)
MIN_PIXELS, MAX_PIXELS = 65536, 1048576  # configs/stage1/qwen3vl_2b.yaml
DESCS = ("person", "car", "dog", "traffic light", "chair", "cup", "bicycle", "red umbrella")


def write_images(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``n`` JSONL records, each with its own JPEG (smooth noise + boxes: photo-like decode cost), 1-8 boxes."""
    import json

    import numpy as np
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    w, h = size
    (root / "images").mkdir(parents=True, exist_ok=True)
    path = root / "train.jsonl"
    with open(path, "w") as fh:
        for i in range(n):
            small = nrng.integers(0, 255, size=(h // 8, w // 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
            draw = ImageDraw.Draw(img)
            objects = []
            for _ in range(rng.randint(1, 8)):
                x1, y1 = rng.randint(0, w - 20), rng.randint(0, h - 20)
                box = [x1, y1, rng.randint(x1 + 10, w), rng.randint(y1 + 10, h)]
                draw.rectangle(box, outline=(255, 255, 255), width=2)
                objects.append({"desc": rng.choice(DESCS), "bbox_2d": box})
            img.save(root / "images" / f"{i:06d}.jpg", quality=90)
            fh.write(json.dumps({"image": f"images/{i:06d}.jpg", "width": w, "height": h, "objects": objects,
                                 "image_id": str(i)}) + "\n")
    return path


def one_epoch(dataset, pad_id: int, workers: int) -> dict:
    """Samples, tokens and seconds of one epoch of ``iterate_batches`` with ``workers`` workers (first batch excluded)."""
    from data.packing import iterate_batches

    dataset.load_state_dict({**dataset.state_dict(), "position": 0})
    batches = iterate_batches(dataset, pad_id, num_workers=workers)
    first = next(batches)
    t0 = time.perf_counter()
    samples = tokens = 0
    for _ in range(len(dataset) - 1):
        b = next(batches)
        samples += len(b.segments)
        tokens += b.num_tokens
    seconds = time.perf_counter() - t0
    batches.close()
    return {"workers": workers, "samples": samples, "tokens": tokens, "seconds": seconds,
            "first_batch_tokens": first.num_tokens, "samples_per_s": samples / max(seconds, 1e-9),
            "tokens_per_s": tokens / max(seconds, 1e-9)}


def run(args) -> dict:
    from data.encoding import ChatEncoder, EncodedRecords
    from data.packing import PackedDataset
    from data.table import ReadOptions, cached_packing, open_records
    from model.tiny import build_tiny_image_processor, build_tiny_tokenizer

    n, size = (24, (160, 120)) if args.quick else (args.records, tuple(args.image_size))
    max_length = 1024 if args.quick else args.max_length
    workers: Sequence[int] = [0, 1] if args.quick else args.workers
    tokenizer = build_tiny_tokenizer()
    encoder = ChatEncoder(tokenizer, build_tiny_image_processor(MIN_PIXELS, MAX_PIXELS), prompt="Detect all objects.",
                          min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = write_images(Path(tmp), n, size, seed=args.seed)
        table, _ = open_records(jsonl, ReadOptions())
        lengths, rows = cached_packing(table, encoder, max_length, True)
        dataset = PackedDataset(EncodedRecords(table, encoder), max_length, 1, True, seed=args.seed,
                                lengths=lengths, rows=rows)
        if len(dataset) < 2:
            raise SystemExit(f"{n} records pack into {len(dataset)} row(s) of {max_length} tokens: use more --records")
        results = [one_epoch(dataset, tokenizer.pad_token_id, w) for w in workers]
    base = results[0]
    for r in results:
        per_worker = r["tokens_per_s"] / max(r["workers"], 1)
        r["workers_per_gpu"] = math.ceil(H200_2B_TOKENS_PER_S / max(per_worker, 1e-9))
    print_table(
        ["data.num_workers", "samples/s", "tokens/s", "micro-batches", "workers per H200 at the 2B step"],
        [[r["workers"], r["samples_per_s"], r["tokens_per_s"], len(dataset) - 1, r["workers_per_gpu"]]
         for r in results],
    )
    per_sample = sum(lengths) / len(lengths)
    print(f"{n} images {size[0]}x{size[1]}, {per_sample:.0f} tokens per sample, rows of {max_length} tokens; "
          f"the 2B step on an H200 consumes {H200_2B_TOKENS_PER_S:.0f} tokens/s "
          f"({H200_2B_TOKENS_PER_S / per_sample:.0f} samples/s) per GPU")
    best = max(results, key=lambda r: r["samples_per_s"])
    ratio = best["samples_per_s"] / max(base["samples_per_s"], 1e-9)
    ratio_line("loader", ratio, f"samples/s with {best['workers']} workers over data.num_workers=0")
    return {"results": results, "ratio": ratio, "tokens_per_sample": per_sample,
            "config": {"records": n, "image_size": list(size), "max_length": max_length}}


def main(argv: Sequence[str] | None = None) -> dict:
    p = bench_parser(__doc__, "24 small images, workers 0 and 1: proves the script works, numbers meaningless")
    p.add_argument("--records", type=int, default=256)
    p.add_argument("--image-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-length", type=int, default=8192, help="training.max_length of the packed rows")
    return parse_and_run(p, argv, run)


if __name__ == "__main__":
    main()
