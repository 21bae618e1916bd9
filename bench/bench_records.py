"""Records at scale: per-rank start-up time and memory of the Arrow record cache vs reading the JSONL.

    python -m bench.bench_records                       # 100,000 synthetic records
    python -m bench.bench_records --records 1000000
    python -m bench.bench_records --quick               # 300 records, seconds
    python -m bench.bench_records --records 1000000 --ways build_serial,build   # only the cache-build ratio

What one training rank does before its first step, each way, in a fresh process (so memory is that
rank's own), on the same synthetic JSONL, the same tiny tokenizer / image processor and the same
``training.max_length``:

- **BASELINE** (``today``): ``data.records.read_jsonl`` into a list of ``Record`` ->
  ``EncodedRecords.lengths()`` (tokenise every answer) -> ``data.packing.pack_lengths``. Every rank
  did all of it and kept every record in Python memory.
- **ours, once per dataset** (``build``): ``data.table.open_records`` + ``cached_packing`` on an empty
  cache: the main process validates the file in parts and tokenises in batches, over every CPU
  (``data.cache_build_procs: 0``), and packs once.
- **BASELINE of the build** (``build_serial``): the same on another empty cache in this process only:
  validation line by line, the length pass one record at a time (``ChatEncoder.sample_length`` per
  row), as the build did before. ``RATIO cache_build`` = its seconds / ``build``'s.
- **ours, per rank** (``rank``): the same two calls on the warm cache: map the Arrow file, read the
  cached lengths and plan.

Reported per way: seconds, the growth of the process's resident memory (``VmRSS`` after minus
before; memory-mapped pages that were touched count, though the OS shares them between ranks) and
its peak growth (``VmHWM``). Importing ``datasets`` (a fixed cost of every process, about a second
on an idle machine) happens before the clock starts in every way and is printed separately. The
RATIO is baseline seconds / per-rank seconds; the memory ratio is printed in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench._common import mib, print_table

WAYS = ("today", "build_serial", "build", "rank")
DESCS = ("red circle", "blue square", "green triangle", "yellow star", "black cat", "white car", "person")


def write_records(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` JSONL records (1..8 objects, pixel boxes, 640x480) that all point at one small PNG."""
    from PIL import Image

    image = path.parent / "img.png"
    Image.new("RGB", (640, 480), (120, 30, 30)).save(image)
    rnd = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            objects = []
            for _ in range(rnd.randint(1, 8)):
                x1, y1 = rnd.randint(0, 600), rnd.randint(0, 440)
                objects.append({"desc": rnd.choice(DESCS),
                                "bbox_2d": [x1, y1, rnd.randint(x1 + 1, 640), rnd.randint(y1 + 1, 480)]})
            fh.write(json.dumps({"image": image.name, "width": 640, "height": 480, "objects": objects,
                                 "image_id": str(i)}) + "\n")
    return path


def _vm(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _child(way: str, jsonl: str, max_length: int) -> dict:
    """One rank's start-up in this (fresh) process; returns seconds, memory growth and a checksum of the plan."""
    from data.encoding import ChatEncoder, EncodedRecords
    from data.packing import pack_lengths
    from data.records import read_jsonl
    from data.table import ReadOptions, cached_packing, open_records
    from model.tiny import build_tiny_image_processor, build_tiny_tokenizer

    encoder = ChatEncoder(build_tiny_tokenizer(), build_tiny_image_processor(), prompt="Detect all objects.")
    # Fixed per-process costs, the same whatever the data size, are kept out of the measurement:
    # importing `datasets` (which a training process pays once) and hashing the tokenizer.
    t_import = time.perf_counter()
    import datasets.arrow_writer  # noqa: F401

    import_seconds = time.perf_counter() - t_import
    before = _vm("VmRSS")
    t0 = time.perf_counter()
    if way == "today":
        records, _ = read_jsonl(jsonl)
        lengths = EncodedRecords(records, encoder).lengths()
        rows = pack_lengths(lengths, max_length)
        n = len(records)
    elif way == "build_serial":  # its own empty cache, so `build` still starts from nothing
        table, _ = open_records(jsonl, ReadOptions(), cache_root=Path(jsonl).parent / "serial", procs=1)
        lengths = [encoder.sample_length(table[i]) for i in range(len(table))]
        rows = pack_lengths(lengths, max_length, sources=table.sources())
        n = len(table)
    else:
        procs = 0 if way == "build" else 1  # `rank` only maps the warm cache
        table, _ = open_records(jsonl, ReadOptions(), procs=procs)
        lengths, rows = cached_packing(table, encoder, max_length, True, procs=procs)
        n = len(table)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "import_seconds": import_seconds, "rss_bytes": _vm("VmRSS") - before, "peak_rss_bytes": _vm("VmHWM") - before,
            "records": n, "rows": len(rows), "tokens": int(sum(lengths)), "plan_checksum": hash(json.dumps(rows))}


def _spawn(way: str, jsonl: Path, max_length: int) -> dict:
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
           "PYTHONHASHSEED": "0"}
    out = subprocess.run([sys.executable, "-m", "bench.bench_records", "--child", way, "--jsonl", str(jsonl),
                          "--max-length", str(max_length)], cwd=repo, env=env, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench child {way} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--max-length", type=int, default=8192, help="training.max_length of the packing plan")
    p.add_argument("--quick", action="store_true", help="300 records: proves the script works, ratios meaningless")
    p.add_argument("--ways", default=",".join(WAYS),
                   help=f"comma-separated subset of {','.join(WAYS)} (at 1e6 each serial way takes tens of minutes)")
    p.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    p.add_argument("--jsonl", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.jsonl, args.max_length)))
        return {}
    ways = [w for w in WAYS if w in args.ways.split(",")]
    if "rank" in ways and "build" not in ways:
        p.error("--ways: rank reads the cache that build makes; list build too")
    n = 300 if args.quick else args.records
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = write_records(Path(tmp) / "records.jsonl", n)
        result = {way: _spawn(way, jsonl, args.max_length) for way in ways}
        result["jsonl_bytes"] = jsonl.stat().st_size
    from data.table import LENGTHS_BATCH, available_cpus

    result["config"] = {"records": n, "max_length": args.max_length, "build_procs": available_cpus()}
    result["same_plan"] = len({result[w]["plan_checksum"] for w in ways}) == 1
    labels = {"today": "read_jsonl + lengths + pack (every rank)",
              "build_serial": "Arrow cache build, lengths one at a time (once)",
              "build": f"Arrow cache build, in parts + batched, <= {available_cpus()} procs (once)",
              "rank": "Arrow cache, per rank"}
    print_table(
        ["way", "records", "seconds", "RSS growth MiB", "peak RSS growth MiB"],
        [[labels[w], result[w]["records"], result[w]["seconds"], mib(result[w]["rss_bytes"]),
          mib(result[w]["peak_rss_bytes"])] for w in ways],
    )
    print(f"import datasets (every process, not timed above): {result[ways[-1]]['import_seconds']:.2f} s; "
          f"JSONL {mib(result['jsonl_bytes']):.1f} MiB; same packing plan each way: {result['same_plan']}")
    if {"build_serial", "build"} <= set(ways):
        result["build_speedup"] = result["build_serial"]["seconds"] / max(result["build"]["seconds"], 1e-9)
        print(f"RATIO cache_build: {result['build_speedup']:.2f}x (Arrow cache build serial, lengths one record at a "
              f"time, over validation in parts + lengths in batches of {LENGTHS_BATCH} on up to {available_cpus()} "
              "processes)")
    if {"today", "rank"} <= set(ways):
        result["speedup"] = result["today"]["seconds"] / max(result["rank"]["seconds"], 1e-9)
        result["memory_ratio"] = result["today"]["rss_bytes"] / max(result["rank"]["rss_bytes"], 1)
        print(f"RSS growth ratio today / per rank: {result['memory_ratio']:.2f}x")
        print(f"RATIO records_startup: {result['speedup']:.2f}x (read_jsonl + lengths + pack per rank over the "
              "cached Arrow table)")
    return result


if __name__ == "__main__":
    main()
