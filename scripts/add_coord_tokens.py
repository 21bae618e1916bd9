"""Add the 1000 coord tokens to a Qwen3-VL checkpoint and save the result.

    python scripts/add_coord_tokens.py CKPT_DIR_OR_HF_ID --out OUT_DIR [--init sincos|mean|random] [--dtype bfloat16]

A checkpoint that already has them is saved unchanged (the script says so). The embedding table and
LM head grow only when the tokenizer outgrows them (never shrink); new coord rows are initialised
smoothly in the bin index (``--init``).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.errors import add_debug_flag, run_cli  # noqa: E402
from model.loading import ATTN_IMPLEMENTATIONS, DTYPES, load_model_and_processors, save_checkpoint_model  # noqa: E402
from model.vocab import COORD_INITS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python scripts/add_coord_tokens.py", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="local checkpoint dir or HF id")
    ap.add_argument("--out", required=True, help="output dir for tokenizer, image processor and model")
    ap.add_argument("--init", default="sincos", choices=COORD_INITS, help="init of new coord rows")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--attn-implementation", default="auto", choices=list(ATTN_IMPLEMENTATIONS))
    return add_debug_flag(ap)


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if os.path.abspath(args.out) == os.path.abspath(args.checkpoint):
        ap.error("--out must differ from the input checkpoint (the original is kept untouched)")
    loaded = load_model_and_processors(
        args.checkpoint,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        add_coord_tokens=True,
        coord_init=args.init,
    )
    save_checkpoint_model(loaded.model, loaded.tokenizer, loaded.image_processor, args.out)
    vocab = loaded.coord_vocab
    rows = loaded.model.get_input_embeddings().weight.shape[0]
    state = "added" if loaded.added_coord_tokens else "already present"
    print(
        f"coord tokens {state}: ids {vocab.first_id}..{vocab.end_id - 1}; tokenizer {len(loaded.tokenizer)} "
        f"entries, embedding rows {rows}; saved to {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
