"""Ablation on held-out shapes: does CoordExp help, and does Stage-2 beat more Stage-1?

    python scripts/research_shapes.py                       # default size: 3 seeds, configs/demo/research_shapes*.yaml
    python scripts/research_shapes.py --seeds 1 --stage1-steps 600 --stage2-steps 60 --num-train 2000
    python scripts/research_shapes.py --quick --out-dir /tmp/rq --doc /tmp/rq/RESEARCH.md   # plumbing only, seconds

For each seed (the tiny model's init and the run seed) it trains four arms on the same training
images and evaluates each on one held-out shapes set generated with a seed no training run uses:

    ce               (a) CE-only Stage-1            configs/demo/research_shapes.yaml
    coordexp         (b) CoordExp Stage-1           configs/demo/research_shapes_coordexp.yaml (soft-CE + W1 + gate + geometry)
    coordexp+stage2  (c) (b) + Stage-2 Two-Channel  configs/demo/research_shapes_stage2.yaml, from (b)'s checkpoint
    coordexp+stage1  (d) (b) + more Stage-1 with the CPU time (c) spent, from (b)'s checkpoint

(c) and (d) restart the optimizer from (b)'s weights with the same lr and warmup; (d)'s step count
is (c)'s steps × (c)'s mean step time / (b)'s mean step time (``time/step_s`` of their
metrics.jsonl, setup and eval excluded), so both get the same extra compute (their CPU columns
show how close that came on a machine whose load changes).

Each cell writes ``<out-dir>/seed<k>/<arm>/cell.json`` when done; a rerun skips finished cells
(resumable) whose recorded ``cell_key`` still matches (the arm's config after ``--set`` overrides, the
run size and the seed; (c) and (d) also (b)'s key): after a config edit the stale cells train again.
A seed trains (b) first, then (c), (d) and (a) (``TRAIN_ORDER``). Then the table of
mean ± std over seeds (mAP, AP50, AP75, F1@0.5, expected-coordinate error, distinct answers,
training CPU and wall time, cumulative for c and d) is written to ``--doc`` with the command that produced it. Evaluation: greedy rollouts on the held-out images,
coords picked as the research config's ``rollout_matching.decoding.coord_pick`` says, the same for every arm
(COCO AP via ``eval.detection``; F1 at IoU 0.5), and the teacher-forced expected-coordinate error
``|Σ p_k·k/999 − target/999|`` (fractions of the image side) over the held-out GT coord tokens.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from configs.types import Config

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

ARMS = ("ce", "coordexp", "coordexp+stage2", "coordexp+stage1")  # table order
# Training order within a seed: (b) first, so a run stopped early (the cells are resumable) already has
# the CoordExp Stage-1 result of every seed it started; (c) and (d) need (b)'s checkpoint.
TRAIN_ORDER = ("coordexp", "coordexp+stage2", "coordexp+stage1", "ce")
ARM_LABELS = {
    "ce": "(a) CE-only Stage-1",
    "coordexp": "(b) CoordExp Stage-1",
    "coordexp+stage2": "(c) (b) + Stage-2 Two-Channel",
    "coordexp+stage1": "(d) (b) + equal-compute Stage-1",
}
CONFIGS = {
    "ce": REPO / "configs/demo/research_shapes.yaml",
    "coordexp": REPO / "configs/demo/research_shapes_coordexp.yaml",
    "coordexp+stage2": REPO / "configs/demo/research_shapes_stage2.yaml",
    "coordexp+stage1": REPO / "configs/demo/research_shapes_coordexp.yaml",
}
TRAIN_DATA_SEED = 0
HELDOUT_SEED = 777  # never a training data seed: the held-out images share no generator stream with training
METRICS = (
    ("mAP", "mAP", 3),
    ("AP50", "AP50", 3),
    ("AP75", "AP75", 3),
    ("F1@0.5", "F1@0.5", 3),
    ("coord_err", "exp. coord err", 4),
    ("distinct_frac", "distinct answers", 2),
    ("parse_valid_rate", "parse-valid", 2),
    ("train_cpu_s", "train CPU s", 0),
    ("train_wall_s", "train wall s", 0),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (first-seed .. first-seed+k-1)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="run seeds from here (e.g. one process per seed into the same --out-dir; then one run with "
                        "every seed reads the finished cells back and writes the doc)")
    p.add_argument("--out-dir", default="runs/research", help="cells, data and tiny checkpoints (resumable)")
    p.add_argument("--doc", default=str(REPO / "docs" / "RESEARCH.md"), help="the table is written here")
    p.add_argument("--stage1-steps", type=int, default=None, help="Stage-1 steps of (a) and (b) (default: the config's)")
    p.add_argument("--stage2-steps", type=int, default=None, help="Stage-2 steps of (c) (default: the config's)")
    p.add_argument("--num-train", type=int, default=None, help="training images (default: the config's)")
    p.add_argument("--num-heldout", type=int, default=None, help="held-out images (default: the config's data.synthetic.num_val)")
    p.add_argument("--quick", action="store_true", help="plumbing only: tiny data, 2 steps per run (seconds)")
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds trained side by side, one worker process each (OMP_NUM_THREADS=cores/jobs unless set); "
                        "2 on a 2-core machine halves the wall time")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for every run (e.g. model.tiny.max_pixels=4096); recorded in the doc")
    return p.parse_args(argv)


def _size(args: argparse.Namespace) -> dict:
    """The run size: explicit flags, else --quick's, else the configs'."""
    from configs import load_config

    base = load_config(CONFIGS["ce"], args.overrides, expect="stage1")
    stage2 = load_config(CONFIGS["coordexp+stage2"], args.overrides, expect="stage2")
    syn = base.data.synthetic
    size = {"stage1_steps": base.training.max_steps, "stage2_steps": stage2.training.max_steps,
            "num_train": syn.num_train, "num_heldout": syn.num_val, "image_size": syn.image_size,
            "max_shapes": syn.max_shapes, "supersample": syn.supersample}
    if args.quick:
        size.update(stage1_steps=2, stage2_steps=2, num_train=6, num_heldout=2, image_size=32)
    for key in ("stage1_steps", "stage2_steps", "num_train", "num_heldout"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    return size


def _quick_overrides() -> list[str]:
    return ["training.warmup_steps=0", "rollout_matching.decoding.max_new_tokens=8", "model.tiny.max_pixels=4096"]


def make_data(out: Path, size: dict) -> tuple[Path, Path]:
    """(train.jsonl, held-out.jsonl): training images from TRAIN_DATA_SEED, held-out from HELDOUT_SEED."""
    from data.shapes import make_shapes_dataset

    shape = {"image_size": size["image_size"], "max_shapes": size["max_shapes"], "supersample": size["supersample"]}
    train, _ = make_shapes_dataset(out / "data_train", size["num_train"], 0, seed=TRAIN_DATA_SEED, **shape)
    _, heldout = make_shapes_dataset(out / "data_heldout", 0, size["num_heldout"], seed=HELDOUT_SEED, **shape)
    return Path(train), Path(heldout)


def _timed(fn, argv: list[str]) -> tuple[float, float]:
    """(CPU seconds of this process incl. all its threads, wall seconds) of ``fn(argv)``."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn(argv)
    return time.process_time() - cpu, time.perf_counter() - wall


def _argv(config: Path, sets: dict, extra: Sequence[str]) -> list[str]:
    argv = ["--config", str(config)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={'null' if value is None else value}"]
    for item in extra:
        argv += ["--set", item]
    return argv


def _checkpoint(run_dir: Path) -> Path:
    from training.checkpoint import find_latest_checkpoint

    ckpt = find_latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint-<step> under {run_dir}")
    return ckpt / "model"


def _mean_step_s(run_dir: Path) -> float:
    from training.setup import METRICS_FILE

    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    return statistics.fmean(r["time/step_s"] for r in rows)


def train_cell(arm: str, seed: int, out: Path, size: dict, train: Path, extra: Sequence[str],
               cells: dict[str, dict]) -> dict:
    """Train one arm for one seed; returns its timing (and, for (d), its step count)."""
    import train_stage1
    import train_stage2

    seed_dir = out / f"seed{seed}"
    common = {"run.output_dir": seed_dir, "run.name": arm, "run.seed": seed, "run.overwrite": "true",
              "data.synthetic.enabled": "false", "data.train_jsonl": train, "data.val_jsonl": None,
              "training.save_every": 0, "training.eval_every": 0}
    if arm in ("ce", "coordexp"):
        sets = {**common, "model.tiny.dir": out / f"tiny_seed{seed}", "model.tiny.seed": seed,
                "training.max_steps": size["stage1_steps"]}
        cpu, wall = _timed(train_stage1.main, _argv(CONFIGS[arm], sets, extra))
        return {"train_cpu_s": cpu, "train_wall_s": wall, "steps": size["stage1_steps"],
                "step_s": _mean_step_s(seed_dir / arm)}
    b = cells["coordexp"]
    start = {"model.tiny.enabled": "false", "model.name_or_path": _checkpoint(seed_dir / "coordexp")}
    if arm == "coordexp+stage2":
        sets = {**common, **start, "training.max_steps": size["stage2_steps"]}
        cpu, wall = _timed(train_stage2.main, _argv(CONFIGS[arm], sets, extra))
        steps = size["stage2_steps"]
    else:  # (d): (c)'s extra compute spent on Stage-1 steps at (b)'s cost per step
        from configs import load_config

        c = cells["coordexp+stage2"]
        steps = max(1, round(c["steps"] * c["step_s"] / b["step_s"]))
        stage2 = load_config(CONFIGS["coordexp+stage2"], extra, expect="stage2").training
        sets = {**common, **start, "training.max_steps": steps, "training.lr": stage2.lr,
                "training.warmup_steps": min(stage2.warmup_steps, steps)}
        cpu, wall = _timed(train_stage1.main, _argv(CONFIGS[arm], sets, extra))
    # cumulative: the (b) run these continue from is part of their cost
    return {"train_cpu_s": b["train_cpu_s"] + cpu, "train_wall_s": b["train_wall_s"] + wall,
            "extra_cpu_s": cpu, "steps": steps, "step_s": _mean_step_s(seed_dir / arm)}


def evaluate_cell(model_dir: Path, heldout: Path, cfg: Config, out_dir: Path) -> dict:
    """Held-out metrics of one checkpoint: greedy-rollout detection metrics + teacher-forced coord error.

    ``cfg``: the research config; its ``data`` prompt and image budget (``min_pixels`` / ``max_pixels``,
    as in training), ``rollout_matching.decoding`` (``max_new_tokens``, ``coord_pick``),
    ``rollout_matching.eval_detection`` scores and ``eval.batch_size`` are used.
    """
    from dataclasses import replace

    import torch

    from configs.types import MatchingConfig
    from data.encoding import ChatEncoder
    from data.records import read_jsonl
    from eval.inloop import run_rollout_eval
    from model.loading import load_model_and_processors

    loaded = load_model_and_processors(str(model_dir))
    records, _ = read_jsonl(heldout)
    encoder = ChatEncoder(loaded.tokenizer, loaded.image_processor, prompt=cfg.data.prompt,
                          min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    decoding, detection = cfg.rollout_matching.decoding, cfg.rollout_matching.eval_detection
    with torch.no_grad():
        payload = run_rollout_eval(
            loaded.model, loaded.tokenizer, loaded.coord_vocab, encoder, records,
            backend_kwargs={"max_new_tokens": decoding.max_new_tokens, "temperature": 0.0,
                            "batch_size": cfg.eval.batch_size, "coord_pick": decoding.coord_pick},
            matching=MatchingConfig(iou_gate=0.5), eval_detection=replace(detection, enabled=True, metrics="coco"),
            out_dir=out_dir,
        )
    report = json.loads((out_dir / "metrics.json").read_text())
    answers = [json.loads(line)["raw_text"] for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
    return {
        "mAP": report["metrics"]["AP"], "AP50": report["metrics"]["AP50"], "AP75": report["metrics"]["AP75"],
        "F1@0.5": report["metrics"]["F1@0.5"],
        "parse_valid_rate": payload["eval/rollout/parse_valid_rate"],
        "distinct_frac": len(set(answers)) / max(len(answers), 1),
        "coord_err": heldout_coord_error(loaded, encoder, records),
    }


def heldout_coord_error(loaded, encoder, records) -> float:
    """Mean |expected coordinate − GT| (fractions of the image side) over every held-out GT coord token,
    teacher-forced on the GT answer (``coord_diag/exp_abs_err_mean`` of the Stage-1 pipeline)."""
    import torch

    from configs.pipeline import resolve_pipeline
    from data.packing import collate_rows
    from model.forward import HiddenStatesModel
    from pipeline.context import TeacherForcingContext
    from pipeline.executor import run_pipeline
    from pipeline.forwards import gt_forward

    pipeline = resolve_pipeline({}, "stage1")
    model = HiddenStatesModel(loaded.model).eval()
    lm_head = loaded.model.get_output_embeddings().weight
    total, count = 0.0, 0
    with torch.no_grad():
        for record in records:
            batch = collate_rows([[encoder.encode(record)]], loaded.tokenizer.pad_token_id)
            fwd = gt_forward(model, loaded.model, batch)
            ctx = TeacherForcingContext(channel=None, batch=batch, hidden=fwd.hidden, lm_head_weight=lm_head,
                                        coord_token_ids=loaded.coord_vocab.ids)
            err = float(run_pipeline(pipeline, ctx).metrics["coord_diag/exp_abs_err_mean"])
            n = 4 * len(record.objects)  # the per-sample mean is over its 4 coords per object
            total, count = total + err * n, count + n
    return total / max(count, 1)


def _mean_std(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def render_table(results: dict[str, list[dict]]) -> str:
    head = "| arm | " + " | ".join(label for _, label, _ in METRICS) + " |"
    lines = [head, "|" + " --- |" * (len(METRICS) + 1)]
    for arm in ARMS:
        rows = results.get(arm, [])
        if not rows:
            continue
        cells = [_mean_std([r[key] for r in rows], digits) for key, _, digits in METRICS]
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


AP50_TARGET = 0.5  # what the research config must reach on the held-out set (mean over seeds) ...
CPU_MINUTES_TARGET = 30.0  # ... within this much Stage-1 training CPU time (every seed)


def _target_status(ap50: float, cpu_minutes: list[float]) -> str:
    """Whether a Stage-1 arm meets the research target: mean AP50 and every seed's training CPU time."""
    misses = []
    if ap50 < AP50_TARGET:
        misses.append(f"below the {AP50_TARGET} AP50 target")
    if max(cpu_minutes) > CPU_MINUTES_TARGET:
        misses.append(f"over the {CPU_MINUTES_TARGET:.0f} CPU-minute budget")
    if misses:
        return " and ".join(misses)
    return f"meets the target (AP50 >= {AP50_TARGET} within {CPU_MINUTES_TARGET:.0f} CPU-minutes of training)"


def _compare(x: str, xs: list[float], y: str, ys: list[float]) -> str:
    """'x higher' / 'y higher' / 'equal', flagged when the gap is inside the seed spread (max std)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    if mx == my:
        return "equal"
    spread = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in (xs, ys))
    word = f"{x} higher" if mx > my else f"{y} higher"
    if abs(mx - my) <= spread:
        word += f", within the seed spread (gap {abs(mx - my):.3f} <= std {spread:.3f})"
    return word


def verdict(results: dict[str, list[dict]], size: dict) -> str:
    """The table's questions, answered from its cells (no hand-written numbers)."""
    def vals(arm: str, key: str) -> list[float]:
        return [r[key] for r in results[arm]]

    def mean(arm: str, key: str) -> float:
        return statistics.fmean(vals(arm, key))

    a_ap = mean("ce", "AP50")
    c_ap, d_ap = mean("coordexp+stage2", "AP50"), mean("coordexp+stage1", "AP50")
    b_pv, c_pv = mean("coordexp", "parse_valid_rate"), mean("coordexp+stage2", "parse_valid_rate")
    c_vs_d = _compare("(c)", vals("coordexp+stage2", "AP50"), "(d)", vals("coordexp+stage1", "AP50"))
    if c_ap >= d_ap:
        conclusion = "Stage-2 did at least as well as spending its compute on more Stage-1."
    else:
        conclusion = ("Stage-2 did not beat spending its compute on more Stage-1 at this size; "
                      "docs/training/STAGE2_RUNBOOK.md \"Stage-2 vs more Stage-1\" says what the runbook concludes.")
    lines = [
        f"- Research config, {ARM_LABELS[arm]}: held-out AP50 {mean(arm, 'AP50'):.3f} after {size['stage1_steps']} "
        f"steps ({mean(arm, 'train_cpu_s') / 60:.1f} CPU-minutes of training per seed, at most "
        f"{max(vals(arm, 'train_cpu_s')) / 60:.1f}): "
        f"{_target_status(mean(arm, 'AP50'), [c / 60 for c in vals(arm, 'train_cpu_s')])}."
        for arm in ("ce", "coordexp")
    ] + [
        f"- CoordExp vs CE-only Stage-1, (b) vs (a): AP50 {mean('coordexp', 'AP50'):.3f} vs {a_ap:.3f} "
        f"({_compare('(b)', vals('coordexp', 'AP50'), '(a)', vals('ce', 'AP50'))}); "
        f"exp. coord err {mean('coordexp', 'coord_err'):.4f} vs {mean('ce', 'coord_err'):.4f}.",
        f"- Stage-2 vs equal-compute Stage-1, (c) vs (d): AP50 {c_ap:.3f} vs {d_ap:.3f} ({c_vs_d}). {conclusion}",
        f"- Stage-2 kept the parse-valid rate of its Stage-1 start: {'yes' if c_pv >= b_pv else 'no'} "
        f"({c_pv:.2f} vs {b_pv:.2f}); docs/training/STAGE2_RUNBOOK.md \"Guard metrics\" says what to watch and what "
        "holds the format.",
    ]
    return "\n".join(lines)


def _drawn(size: dict) -> str:
    s = size["supersample"]
    if s == 1:
        return ", integer pixel boxes"
    return f", drawn at {s}x and area-averaged (box edges on 1/{s}-pixel positions)"


# How the held-out rollouts choose a coord token, for the doc: one entry per rollout.backends.COORD_PICKS.
COORD_PICK_TEXT = {
    "argmax": "coord tokens as the decoder picks them (`rollout_matching.decoding.coord_pick: argmax`)",
    "expectation": "each coord token the bin nearest the expected value of its coord distribution "
                   "(`rollout_matching.decoding.coord_pick: expectation`)",
}


NOTES_MARK = "<!-- Hand-written notes below: scripts/research_shapes.py keeps everything from this line on. -->"


def keep_notes(doc: Path, text: str) -> str:
    """``text`` followed by the hand-written notes of the existing ``doc`` (from ``NOTES_MARK`` on)."""
    old = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    if NOTES_MARK not in old:
        return text
    return text.rstrip("\n") + "\n\n" + old[old.index(NOTES_MARK):]


def write_doc(doc: Path, command: str, size: dict, seeds: int, results: dict[str, list[dict]],
              per_seed: dict[int, dict[str, dict]], extra: Sequence[str], coord_pick: str) -> None:
    steps_d = [per_seed[s]["coordexp+stage1"]["steps"] for s in sorted(per_seed)]
    text = f"""# Research: CoordExp on held-out shapes

Written by `scripts/research_shapes.py` (do not edit the table by hand; rerun the command below; the
notes at the end are hand-written and kept).

Command: `{command}`

Size: {seeds} seed(s); {size['num_train']} training images and {size['num_heldout']} held-out images of
{size['image_size']} px with 1–{size['max_shapes']} shapes each{_drawn(size)} (training data seed {TRAIN_DATA_SEED}, held-out seed
{HELDOUT_SEED}, never trained on); Stage-1 {size['stage1_steps']} steps for (a) and (b); Stage-2
{size['stage2_steps']} steps for (c); (d) {steps_d} extra Stage-1 steps per seed (the CPU time (c) spent).
Overrides for every run: {', '.join(f'`{o}`' for o in extra) if extra else 'none'}.

Mean ± std over seeds. mAP = COCO AP@[.5:.95], AP50/AP75, F1@0.5 (greedy, per image and
description) from greedy rollouts on the held-out images, {COORD_PICK_TEXT[coord_pick]}, the
same for every arm; exp. coord err = teacher-forced
|expected coordinate − GT| in fractions of the image side; distinct answers = different generated
answers / held-out images (1.00: every image gets its own answer); parse-valid = rollouts whose
CoordJSON parsed with nothing dropped; CPU/wall = training only,
cumulative for (c) and (d) (they include the (b) run they continue), measured on whatever the
machine's load was.

{render_table(results)}

{verdict(results, size)}

Per seed (arm: AP50 / mAP):

"""
    for s in sorted(per_seed):
        text += f"- seed {s}: " + "; ".join(
            f"{arm} {per_seed[s][arm]['AP50']:.3f} / {per_seed[s][arm]['mAP']:.3f}" for arm in ARMS if arm in per_seed[s]
        ) + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(keep_notes(doc, text), encoding="utf-8")


def cell_key(arm: str, seed: int, size: dict, extra: Sequence[str], out: Path) -> str:
    """What a cell's result depends on, hashed: the arm's merged config tree (its yaml chain + ``extra``),
    the run size and the seed. (c) and (d) continue from (b)'s checkpoint and (d) spends the compute (c)
    measured, so they include the recorded key and timing of the (b) (and (d) of the (c)) run they used:
    a rerun of (b) reruns (c) and (d), a rerun of (c) reruns (d)."""
    import hashlib

    from configs.loader import merge_config_tree

    parts = {"arm": arm, "seed": seed, "size": size, "config": merge_config_tree(CONFIGS[arm], extra)}
    if arm in ("coordexp+stage2", "coordexp+stage1"):
        parts["start"] = _recorded(out, seed, "coordexp", ("cell_key", "train_cpu_s", "step_s"))
    if arm == "coordexp+stage1":
        parts["matches"] = _recorded(out, seed, "coordexp+stage2", ("cell_key", "steps", "step_s"))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _recorded(out: Path, seed: int, arm: str, keys: Sequence[str]) -> list:
    """These fields of the arm's cell.json as recorded (None where absent): which run of it a later cell used."""
    path = out / f"seed{seed}" / arm / "cell.json"
    cell = json.loads(path.read_text()) if path.is_file() else {}
    return [cell.get(k) for k in keys]


def _finished_cell(out: Path, arm: str, seed: int, size: dict, extra: Sequence[str]) -> dict | None:
    """The cell's recorded result when it exists and its key still matches, else None."""
    path = out / f"seed{seed}" / arm / "cell.json"
    if not path.is_file():
        return None
    cell = json.loads(path.read_text())
    return cell if cell.get("cell_key") == cell_key(arm, seed, size, extra, out) else None


def _cells_done(out: Path, seed: int, size: dict, extra: Sequence[str]) -> bool:
    return all(_finished_cell(out, arm, seed, size, extra) is not None for arm in ARMS)


def run_seed_workers(args: argparse.Namespace, user_sets: Sequence[str], out: Path, size: dict) -> None:
    """Train the unfinished seeds in ``args.jobs`` worker processes (this script, one seed each, same
    size and overrides); the caller then reads their cells back like any finished cell."""
    import os
    import subprocess

    todo = [s for s in range(args.first_seed, args.first_seed + args.seeds)
            if not _cells_done(out, s, size, args.overrides)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    shared = ["--out-dir", str(out)] + (["--quick"] if args.quick else [])
    for key in ("stage1_steps", "stage2_steps", "num_train", "num_heldout"):
        if getattr(args, key) is not None:
            shared += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for item in user_sets:
        shared += ["--set", item]
    running: list[tuple[int, subprocess.Popen, Path]] = []
    failed: list[str] = []

    def stop(signum, frame):  # a plain SIGTERM would end this process and leave the workers training
        raise SystemExit(128 + signum)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if in_main else None
    try:
        while todo or running:
            while todo and len(running) < args.jobs:
                seed = todo.pop(0)
                log = out / f"seed{seed}" / "worker.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                argv = [sys.executable, str(Path(__file__).resolve()), *shared, "--first-seed", str(seed),
                        "--seeds", "1", "--doc", str(out / f"seed{seed}" / "RESEARCH.seed.md")]
                print(f"[research] seed {seed}: worker started, log {log}", flush=True)
                with open(log, "w", encoding="utf-8") as fh:
                    running.append((seed, subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env), log))
            time.sleep(0.5)
            for entry in [e for e in running if e[1].poll() is not None]:
                seed, proc, log = entry
                if proc.returncode != 0:
                    failed.append(f"seed {seed} (exit {proc.returncode}, log {log})")
                running.remove(entry)
    finally:
        # stopped (Ctrl-C, SIGTERM, an error): stop the workers too; their finished cells stay, a rerun resumes
        for _, proc, _ in running:
            proc.terminate()
        for _, proc, _ in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    if failed:
        raise SystemExit("error: research worker failed: " + "; ".join(failed))


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Run (or resume) every cell, write the doc; returns ``{arm: [cell result per seed]}``."""
    args = parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs must be >= 1, got {args.jobs}")
    user_sets = list(args.overrides)
    extra = list(args.overrides) + (_quick_overrides() if args.quick else [])
    args.overrides = extra
    size = _size(args)
    out = Path(args.out_dir)
    train, heldout = make_data(out, size)
    from configs import load_config

    base = load_config(CONFIGS["ce"], extra, expect="stage1")
    if args.jobs > 1:
        run_seed_workers(args, user_sets, out, size)
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    per_seed: dict[int, dict[str, dict]] = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        cells: dict[str, dict] = {}
        for arm in TRAIN_ORDER:
            cell_file = out / f"seed{seed}" / arm / "cell.json"
            done = _finished_cell(out, arm, seed, size, extra)
            if done is not None:
                cells[arm] = done
                print(f"[research] seed {seed} {arm}: done, skipped", flush=True)
            else:
                why = "stale (config, size or its start changed), training again" if cell_file.is_file() else "training"
                print(f"[research] seed {seed} {arm}: {why}", flush=True)
                cell = train_cell(arm, seed, out, size, train, extra, cells)
                cell.update(evaluate_cell(_checkpoint(out / f"seed{seed}" / arm), heldout, base,
                                          out / f"seed{seed}" / arm / "heldout_eval"))
                cell["cell_key"] = cell_key(arm, seed, size, extra, out)
                cell_file.write_text(json.dumps(cell, indent=2, sort_keys=True) + "\n")
                cells[arm] = cell
        for arm in ARMS:
            results[arm].append(cells[arm])
        per_seed[seed] = cells
    command = " ".join(["python scripts/research_shapes.py", *map(shlex.quote, argv if argv is not None else sys.argv[1:])])
    write_doc(Path(args.doc), command, size, args.seeds, results, per_seed, extra,
              base.rollout_matching.decoding.coord_pick)
    print(render_table(results))
    return results


if __name__ == "__main__":
    main()
