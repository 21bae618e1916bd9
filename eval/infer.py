"""Inference CLI: checkpoint + JSONL -> predictions.jsonl (the in-loop eval's format).

    python -m eval.infer --checkpoint runs/x/checkpoint-1000 --jsonl data/val.jsonl --out preds.jsonl \\
        [--batch-size 8|auto] [--max-new-tokens 512] [--limit 100] [--backend hf|vllm] [--cache static|dynamic]
        [--num-samples K --temperature 1.0 --seed 0]   # Oracle-K: K sampled rollouts per image as well

Greedy batched generation with the training's generation backends (``rollout_matching.backend``,
``rollout_matching.hf.*``; ``rollout.backends.make_generation_backend``) and a progress bar; every answer is salvage-parsed, matched to GT
(rollout Hungarian matching, printed as ``eval/rollout/*``) and written with its confidence
(``--score-mode``). Score it with ``python -m eval.evaluate --predictions preds.jsonl``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from configs.errors import InputError, add_debug_flag, run_cli
from configs.types import MatchingConfig
from eval.detection import read_lvis_lists, write_predictions_jsonl
from eval.inloop import add_sampled_rollouts, predict_records, rollout_metrics
from eval.scores import SCORE_MODES


def _default(key: str):
    """Default of a config key from its declaration (configs/types.py), so the CLI behaves like training."""
    from configs.validation import declared_default

    return declared_default(key)


def _enum(key: str) -> tuple:
    from configs.validation import declared_enum

    return declared_enum(key)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.infer", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="model dir (save_pretrained layout with the coord tokens)")
    p.add_argument("--jsonl", required=True, help="records in the data contract (docs/DATA.md)")
    p.add_argument("--out", required=True, help="predictions.jsonl to write")
    p.add_argument("--batch-size", type=_batch_size, default=_default("eval.batch_size"),
                   help="prompts per generate call, or auto (free GPU memory); eval.batch_size")
    p.add_argument("--max-new-tokens", type=int, default=_default("rollout_matching.decoding.max_new_tokens"))
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--image-root", default=None, help="base of relative image paths (default: the JSONL folder)")
    p.add_argument("--coords", default=_default("data.coords"), choices=_enum("data.coords"), help="box unit of the JSONL (data.coords)")
    p.add_argument("--prompt", default=None, help="user prompt (default: the declared data.prompt)")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--min-pixels", type=int, default=None, help="image resize budget (data.min_pixels)")
    p.add_argument("--max-pixels", type=int, default=None, help="image resize budget (data.max_pixels)")
    p.add_argument("--coord-pick", default=_default("rollout_matching.decoding.coord_pick"),
                   choices=_enum("rollout_matching.decoding.coord_pick"),
                   help="coord token choice (rollout_matching.decoding.coord_pick): argmax or expectation")
    p.add_argument("--score-mode", default=_default("rollout_matching.eval_detection.score_mode"), choices=SCORE_MODES)
    p.add_argument("--score-include-desc", action="store_true", help="token_prob also times the desc tokens' mean prob")
    p.add_argument("--iou-gate", type=float, default=_default("rollout_matching.matching.iou_gate"),
                   help="matching gate of the printed precision/recall (rollout_matching.matching.iou_gate)")
    p.add_argument("--dtype", default=_default("model.dtype"), choices=_enum("model.dtype"))
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", default=_default("rollout_matching.backend"), choices=_enum("rollout_matching.backend"),
                   help="rollout_matching.backend (vllm: requirements-vllm.txt, a GPU)")
    p.add_argument("--cache", default=_default("rollout_matching.hf.cache"), choices=_enum("rollout_matching.hf.cache"),
                   help="rollout_matching.hf.cache")
    p.add_argument("--compile", default=_default("rollout_matching.hf.compile"), choices=_enum("rollout_matching.hf.compile"),
                   help="rollout_matching.hf.compile")
    p.add_argument("--num-samples", type=int, default=0,
                   help="Oracle-K: also write K sampled rollouts per image (samples: [{pred}]); eval.evaluate reports "
                   "the recall / F1 any of them reaches")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the --num-samples rollouts")
    p.add_argument("--seed", type=int, default=0, help="sampled rollout k uses seed + k (reproducible)")
    return add_debug_flag(p)


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def backend_config(args: argparse.Namespace):
    """The ``rollout_matching`` fields ``make_generation_backend`` reads, from the CLI and the declared defaults."""
    from types import SimpleNamespace

    from configs.types import HFBackendConfig, VLLMBackendConfig

    return SimpleNamespace(
        backend=args.backend,
        hf=HFBackendConfig(cache=args.cache, compile=args.compile),
        vllm=VLLMBackendConfig(),  # every key at its declared default
        decoding=SimpleNamespace(max_new_tokens=args.max_new_tokens, temperature=0.0, top_p=1.0, top_k=0,
                                 batch_size=args.batch_size, seed=0, coord_pick=args.coord_pick),
    )


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from data.encoding import ChatEncoder
    from data.records import read_jsonl
    from model.loading import load_model_and_processors
    from rollout.backends import AUTO, AUTO_BATCH_CAP, make_generation_backend

    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if args.num_samples < 0 or (args.num_samples and not args.temperature > 0):
        raise InputError(f"--num-samples must be >= 0 and --temperature > 0, got {args.num_samples}, {args.temperature}")
    records, data_report = read_jsonl(args.jsonl, image_root=args.image_root, coords=args.coords)
    if args.limit is not None:
        records = records[: args.limit]
    # Inference must not invent coord rows: a checkpoint without them was never trained to emit them.
    loaded = load_model_and_processors(args.checkpoint, dtype=args.dtype, add_coord_tokens=False)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = loaded.model.to(device)
    prompt = args.prompt if args.prompt is not None else _default("data.prompt")
    encoder = ChatEncoder(
        loaded.tokenizer, loaded.image_processor, prompt=prompt, system_prompt=args.system_prompt,
        min_pixels=args.min_pixels, max_pixels=args.max_pixels,
    )  # fmt: skip
    backend = make_generation_backend(backend_config(args), model, loaded.tokenizer, encoder=encoder,
                                      work_dir=Path(args.out).parent)
    # auto: hand the backend many prompts per call; it splits them by the memory estimate
    chunk = args.batch_size if args.batch_size != AUTO else AUTO_BATCH_CAP
    results = predict_records(
        model, loaded.tokenizer, loaded.coord_vocab, encoder, records,
        backend=backend, batch_size=chunk, matching=MatchingConfig(iou_gate=args.iou_gate),
        score_mode=args.score_mode, score_include_desc=args.score_include_desc, progress=True,
    )  # fmt: skip
    if args.num_samples:
        add_sampled_rollouts(
            results, model, loaded.tokenizer, loaded.coord_vocab, encoder, records, backend=backend,
            num_samples=args.num_samples, temperature=args.temperature, seed=args.seed, batch_size=chunk,
            matching=MatchingConfig(iou_gate=args.iou_gate), score_mode=args.score_mode, score_include_desc=args.score_include_desc,
        )  # fmt: skip
    lists = read_lvis_lists(args.jsonl)
    path = write_predictions_jsonl(args.out, [{**r.detection_record(), **lists.get(r.image_id, {})} for r in results],
                                   extra=[r.extra() for r in results])
    print(f"{data_report.records} records read from {args.jsonl}; {len(results)} predicted")
    for k, v in rollout_metrics(results).items():
        print(f"  {k:<40} {v:.4f}" if not k.endswith(("_total", "_count")) else f"  {k:<40} {int(v)}")
    print(f"wrote {path}; score it with: python -m eval.evaluate --predictions {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
