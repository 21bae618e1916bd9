"""Inference CLI: checkpoint + JSONL -> predictions.jsonl (the in-loop eval's format).

    python -m eval.infer --checkpoint runs/x/checkpoint-1000 --jsonl data/val.jsonl --out preds.jsonl \\
        [--batch-size 8] [--max-new-tokens 512] [--limit 100]

Greedy batched generation with a progress bar; every answer is salvage-parsed, matched to GT
(rollout Hungarian matching, printed as ``eval/rollout/*``) and written with its confidence
(``--score-mode``). Score it with ``python -m eval.evaluate --predictions preds.jsonl``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from eval.detection import write_predictions_jsonl
from eval.inloop import predict_records, rollout_metrics
from eval.scores import SCORE_MODES


def _schema_default(*parts: str):
    """Default of a config key from the JSON Schema, so the CLI prompts exactly like training does."""
    from configs.loader import schema_at

    node = schema_at(list(parts)) or {}
    return node.get("default")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.infer", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="model dir (save_pretrained layout with the coord tokens)")
    p.add_argument("--jsonl", required=True, help="records in the data contract (docs/DATA.md)")
    p.add_argument("--out", required=True, help="predictions.jsonl to write")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--image-root", default=None, help="base of relative image paths (default: the JSONL folder)")
    p.add_argument("--coords", default="pixel", choices=("pixel", "bins"), help="box unit of the JSONL (data.coords)")
    p.add_argument("--prompt", default=None, help="user prompt (default: data.prompt of the config schema)")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--min-pixels", type=int, default=None, help="image resize budget (data.min_pixels)")
    p.add_argument("--max-pixels", type=int, default=None, help="image resize budget (data.max_pixels)")
    p.add_argument("--score-mode", default="token_prob", choices=SCORE_MODES)
    p.add_argument("--score-include-desc", action="store_true", help="token_prob also times the desc tokens' mean prob")
    p.add_argument("--iou-gate", type=float, default=0.3, help="matching gate of the printed precision/recall")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from data.encoding import ChatEncoder
    from data.records import read_jsonl
    from model.loading import load_model_and_processors
    from rollout.backends import HFGenerationBackend

    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit must be >= 1, got {args.limit}")
    records, data_report = read_jsonl(args.jsonl, image_root=args.image_root, coords=args.coords)
    if args.limit is not None:
        records = records[: args.limit]
    # Inference must not invent coord rows: a checkpoint without them was never trained to emit them.
    loaded = load_model_and_processors(args.checkpoint, dtype=args.dtype, add_coord_tokens=False)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = loaded.model.to(device)
    prompt = args.prompt if args.prompt is not None else _schema_default("data", "prompt")
    encoder = ChatEncoder(
        loaded.tokenizer, loaded.image_processor, prompt=prompt, system_prompt=args.system_prompt,
        min_pixels=args.min_pixels, max_pixels=args.max_pixels,
    )  # fmt: skip
    backend = HFGenerationBackend(
        model, loaded.tokenizer, max_new_tokens=args.max_new_tokens, temperature=0.0, batch_size=args.batch_size
    )
    results = predict_records(
        model, loaded.tokenizer, loaded.coord_vocab, encoder, records,
        backend=backend, batch_size=args.batch_size, matching={"iou_gate": args.iou_gate},
        score_mode=args.score_mode, score_include_desc=args.score_include_desc, progress=True,
    )  # fmt: skip
    path = write_predictions_jsonl(args.out, [r.detection_record() for r in results], extra=[r.extra() for r in results])
    print(f"{data_report.records} records read from {args.jsonl}; {len(results)} predicted")
    for k, v in rollout_metrics(results).items():
        print(f"  {k:<40} {v:.4f}" if not k.endswith(("_total", "_count")) else f"  {k:<40} {int(v)}")
    print(f"wrote {path}; score it with: python -m eval.evaluate --predictions {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
