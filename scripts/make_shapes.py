"""Write the synthetic shapes dataset (train/val JSONL + PNGs) used by the CPU demo.

python scripts/make_shapes.py --out runs/data/shapes --num-train 64 --num-val 16
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.errors import add_debug_flag, run_cli  # noqa: E402
from data.shapes import make_shapes_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> tuple[str, str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (train.jsonl, val.jsonl, images/)")
    ap.add_argument("--num-train", type=int, default=64)
    ap.add_argument("--num-val", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=64, help="square image side in pixels")
    ap.add_argument("--max-shapes", type=int, default=3, help="at most this many shapes per image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--supersample", type=int, default=1,
                    help="draw at this many times the side and area-average down (fractional pixel boxes)")
    args = add_debug_flag(ap).parse_args(argv)
    train, val = make_shapes_dataset(
        args.out, args.num_train, args.num_val, image_size=args.image_size, max_shapes=args.max_shapes, seed=args.seed,
        supersample=args.supersample,
    )
    print(f"train: {train}\nval:   {val}")
    return train, val


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
