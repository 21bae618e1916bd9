"""Regenerate model/tiny_tokenizer.json, the committed tiny tokenizer (train the BPE once, load it everywhere).

python scripts/make_tiny_tokenizer.py            # rewrite the file
python scripts/make_tiny_tokenizer.py --check    # exit 1 when the file differs from a fresh training
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.tiny import TINY_TOKENIZER_FILE, tiny_tokenizer_is_current, write_tiny_tokenizer_file  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when the file is stale")
    args = ap.parse_args(argv)
    if args.check:
        current = tiny_tokenizer_is_current()
        print(f"{TINY_TOKENIZER_FILE}: {'up to date' if current else 'STALE (run without --check)'}")
        return 0 if current else 1
    print(write_tiny_tokenizer_file())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
