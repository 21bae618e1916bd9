"""Inference CLI: checkpoint + JSONL -> predictions.jsonl (the in-loop eval's format).

    python -m eval.infer --checkpoint runs/x/checkpoint-1000 --jsonl data/val.jsonl --out preds.jsonl \\
        [--batch-size 8|auto] [--max-new-tokens 512] [--limit 100] [--backend hf|vllm] [--cache static|dynamic]
        [--num-samples K --temperature 1.0 --seed 0]   # Oracle-K: K sampled rollouts per image as well

``--checkpoint`` is a model dir, or a training checkpoint ``<run dir>/checkpoint-<step>`` (its
``model/`` is used). Every flag of :data:`SETTING_FLAGS` left out takes the value saved with the
checkpoint (``model.settings``: the run's prompt, system prompt, image budget, data conventions and
in-loop eval decoding), else the declared default; a flag given with another value than the saved
one is used and printed as a difference. So with default flags the raw answers are those of the
run's in-loop eval of that checkpoint.

Greedy batched generation with the training's generation backends (``rollout_matching.backend``,
``rollout_matching.hf.*``; ``rollout.backends.make_generation_backend``) and a progress bar; every answer is salvage-parsed, matched to GT
(rollout Hungarian matching, printed as ``eval/rollout/*``) and written with its confidence
(``--score-mode``). Score it with ``python -m eval.evaluate --predictions preds.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from configs.declare import doc_of
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


# CLI flag (argparse dest) -> the config key it stands for; left out, the checkpoint's saved value is used.
SETTING_FLAGS = {
    "prompt": "data.prompt",
    "system_prompt": "data.system_prompt",
    "min_pixels": "data.min_pixels",
    "max_pixels": "data.max_pixels",
    "coords": "data.coords",
    "object_order": "data.object_order",
    "max_objects": "data.max_objects",
    "max_new_tokens": "rollout_matching.decoding.max_new_tokens",
    "coord_pick": "rollout_matching.decoding.coord_pick",
    "score_mode": "rollout_matching.eval_detection.score_mode",
    "score_include_desc": "rollout_matching.eval_detection.score_include_desc",
    **{name: f"rollout_matching.matching.{name}" for name in MatchingConfig.eval_fields()},
}
SAVED = " (default: the checkpoint's saved {key}, else the declared default)"


def _knob_type(cls: type, name: str, key: str):
    """argparse ``type`` of a flag standing for the config knob ``key`` (field ``name`` of ``cls``): the text
    read as a YAML value, checked against the key's declaration and returned in its declared type."""
    from configs.declare import coerce_scalar, hints
    from configs.loader import parse_yaml_value
    from configs.validation import check_value

    def convert(text: str):
        value = parse_yaml_value(text)
        check_value(key, value)  # a ValueError: argparse reports the flag and the text
        return coerce_scalar(hints(cls)[name], value)

    convert.__name__ = name  # argparse names the flag's type in its "invalid ... value" message
    return convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.infer", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="model dir (save_pretrained layout with the coord tokens), or a training checkpoint dir "
                        "<run dir>/checkpoint-<step> (its model/ is used)")
    p.add_argument("--jsonl", required=True, help="records in the data contract (docs/DATA.md)")
    p.add_argument("--out", required=True, help="predictions.jsonl to write")
    p.add_argument("--batch-size", type=_batch_size, default=_default("eval.batch_size"),
                   help="prompts per generate call, or auto (free GPU memory); eval.batch_size")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--image-root", default=None, help="base of relative image paths (default: the JSONL folder)")

    def setting(flag: str, dest: str, **kw) -> None:
        key = SETTING_FLAGS[dest]
        p.add_argument(flag, dest=dest, default=None, help=kw.pop("help", key) + SAVED.format(key=key), **kw)

    setting("--max-new-tokens", "max_new_tokens", type=int)
    setting("--coords", "coords", choices=_enum("data.coords"), help="box unit of the JSONL (data.coords)")
    setting("--object-order", "object_order", choices=_enum("data.object_order"), help="GT object order (data.object_order)")
    setting("--max-objects", "max_objects", type=int, help="GT objects kept per record (data.max_objects)")
    setting("--prompt", "prompt", help="user prompt (data.prompt)")
    setting("--system-prompt", "system_prompt", help="system message (data.system_prompt)")
    setting("--min-pixels", "min_pixels", type=int, help="image resize budget (data.min_pixels)")
    setting("--max-pixels", "max_pixels", type=int, help="image resize budget (data.max_pixels)")
    setting("--coord-pick", "coord_pick", choices=_enum("rollout_matching.decoding.coord_pick"),
            help="coord token choice (rollout_matching.decoding.coord_pick): argmax or expectation")
    setting("--score-mode", "score_mode", choices=SCORE_MODES, help="confidence of each box")
    setting("--score-include-desc", "score_include_desc", action=argparse.BooleanOptionalAction,
            help="token_prob also times the desc tokens' mean prob")
    for name in MatchingConfig.eval_fields():  # the printed precision/recall's matching, one flag per knob
        setting("--" + name.replace("_", "-"), name, type=_knob_type(MatchingConfig, name, SETTING_FLAGS[name]),
                help=doc_of(MatchingConfig, name))
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


def resolve_settings(args: argparse.Namespace, model_dir: str) -> tuple[argparse.Namespace, list[str]]:
    """``args`` with every :data:`SETTING_FLAGS` flag left out filled from the checkpoint's saved settings
    (``model.settings.read_settings``), else from the declared default; and the lines to print: where the
    settings came from, and each given flag that differs from the saved value."""
    from model.settings import read_settings, resolve

    saved = read_settings(model_dir)
    explicit = {key: getattr(args, dest) for dest, key in SETTING_FLAGS.items()}
    defaults = {key: _default(key) for key in SETTING_FLAGS.values()}
    flags = {key: "--" + dest.replace("_", "-") for dest, key in SETTING_FLAGS.items()}
    values, differences = resolve(explicit, saved, defaults, flags)
    filled = argparse.Namespace(**vars(args))
    for dest, key in SETTING_FLAGS.items():
        setattr(filled, dest, values[key])
    source = (f"settings: {saved.source} (flags left out take its values)" if saved is not None else
              f"settings: {model_dir} has no saved settings (not a CoordExp checkpoint?): flags left out take the "
              "declared defaults, the image budget the checkpoint's preprocessor_config.json")
    return filled, [source, *(f"warning: {d}" for d in differences)]


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
    from model.loading import check_checkpoint_path, load_model_and_processors, model_dir_of
    from rollout.backends import AUTO, AUTO_BATCH_CAP, make_generation_backend

    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if args.num_samples < 0 or (args.num_samples and not args.temperature > 0):
        raise InputError(f"--num-samples must be >= 0 and --temperature > 0, got {args.num_samples}, {args.temperature}")
    model_dir = model_dir_of(args.checkpoint)
    check_checkpoint_path(model_dir, "--checkpoint")
    args, lines = resolve_settings(args, model_dir)
    for line in lines:
        print(line, file=sys.stderr)
    records, data_report = read_jsonl(args.jsonl, image_root=args.image_root, coords=args.coords,
                                      object_order=args.object_order, max_objects=args.max_objects)
    if args.limit is not None:
        records = records[: args.limit]
    # Inference must not invent coord rows: a checkpoint without them was never trained to emit them.
    loaded = load_model_and_processors(model_dir, dtype=args.dtype, add_coord_tokens=False, key="--checkpoint")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = loaded.model.to(device)
    encoder = ChatEncoder(
        loaded.tokenizer, loaded.image_processor, prompt=args.prompt, system_prompt=args.system_prompt,
        min_pixels=args.min_pixels, max_pixels=args.max_pixels,
    )  # fmt: skip
    backend = make_generation_backend(backend_config(args), model, loaded.tokenizer, encoder=encoder,
                                      work_dir=Path(args.out).parent)
    # auto: hand the backend many prompts per call; it splits them by the memory estimate
    chunk = args.batch_size if args.batch_size != AUTO else AUTO_BATCH_CAP
    matching = MatchingConfig(**{name: getattr(args, name) for name in MatchingConfig.eval_fields()})
    results = predict_records(
        model, loaded.tokenizer, loaded.coord_vocab, encoder, records,
        backend=backend, batch_size=chunk, matching=matching,
        score_mode=args.score_mode, score_include_desc=args.score_include_desc, progress=True,
    )  # fmt: skip
    if args.num_samples:
        add_sampled_rollouts(
            results, model, loaded.tokenizer, loaded.coord_vocab, encoder, records, backend=backend,
            num_samples=args.num_samples, temperature=args.temperature, seed=args.seed, batch_size=chunk,
            matching=matching, score_mode=args.score_mode, score_include_desc=args.score_include_desc,
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
