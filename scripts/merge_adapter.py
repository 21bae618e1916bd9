"""Fold an adapter checkpoint (LoRA and/or coord offsets) into its base model and save a plain model.

    python scripts/merge_adapter.py runs/<run>/checkpoint-<step>/model --out runs/<run>/merged [--dtype bfloat16]

The input is the ``model/`` dir of a checkpoint written by a run with ``model.adapter.type`` other than
``none``: ``adapter.json`` names the base checkpoint, ``adapter.safetensors`` holds the adapter. The
output is an ordinary ``save_pretrained`` Qwen3-VL (with tokenizer and image processor) that
``eval/infer.py`` and the recipes (``model.name_or_path``) load like any other checkpoint; the
adapter dir's ``coordexp_settings.json`` (``model.settings``) is copied with it.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.adapters import ADAPTER_CONFIG, is_adapter_dir  # noqa: E402
from model.loading import DTYPES, load_model_and_processors, save_checkpoint_model  # noqa: E402
from model.settings import read_settings, write_settings  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter_dir", help="a checkpoint's model/ dir holding adapter.json + adapter.safetensors")
    ap.add_argument("--out", required=True, help="output dir for the merged model, tokenizer and image processor")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the saved weights")
    args = ap.parse_args(argv)
    if not is_adapter_dir(args.adapter_dir):
        ap.error(f"{args.adapter_dir}: no {ADAPTER_CONFIG} (pass the model/ dir of a checkpoint of an adapter run)")
    if os.path.abspath(args.out) == os.path.abspath(args.adapter_dir):
        ap.error("--out must differ from the adapter dir (the adapter is kept untouched)")
    loaded = load_model_and_processors(args.adapter_dir, dtype=args.dtype)  # merges on load
    save_checkpoint_model(loaded.model, loaded.tokenizer, loaded.image_processor, args.out)
    saved = read_settings(args.adapter_dir)  # the run's prompt / image budget travel with the merged model
    if saved is not None:
        write_settings(args.out, saved)
    print(f"merged {args.adapter_dir} into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
