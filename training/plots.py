"""Plot ``metrics.jsonl`` of one or more runs to a PNG (matplotlib, Agg backend); the CLI is scripts/plot_metrics.py.

    python scripts/plot_metrics.py runs/a runs/b/metrics.jsonl \
        --keys loss/total eval/rollout/mAP [--out plot.png] [--smooth 20]

One panel per key, optimizer step on x, one colour per run (labelled with the run folder name).
A key missing from a row is skipped for that row: keys logged on every step are lines, keys
present on only some rows (``eval/*`` on eval steps) are lines with a marker at each point.
Default keys: ``loss/total`` and every other ``loss/*`` key found. Non-finite values (the
tracker writes ``NaN``/``Infinity``) cannot be placed on an axis; they are counted in the panel
title, never dropped silently. ``--smooth N`` draws the trailing mean of the last N points
over the raw curve of dense keys (the raw curve stays visible in a light shade); sparse keys
(eval) are never smoothed. A Stage-2 Two-Channel run (its rows log ``stage2/channel_b_count``) gets
one line per channel for every per-step key: Channel-A steps solid, Channel-B steps dashed (the two
channels' losses differ in size; one line through both zig-zags like an instability).
Without ``--out`` the PNG goes to ``<first run dir>/plots/metrics.png``.
The recipes call :func:`plot_run` at the end of every run, which writes that file.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field

from configs.errors import InputError, add_debug_flag, did_you_mean
from training.setup import METRICS_FILE
from training.tracking import read_metrics

# matplotlib's tab10 as RGB: one colour per run, in this order.
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
DPI = 100
LEGEND_ROW_H = 18  # pixels per run in the legend strip under the panels
# Keys the end-of-run plot adds to the losses when the run logged them.
RUN_PLOT_EXTRA_KEYS = ("eval/rollout/mAP", "eval/rollout/parse_valid_rate", "coord_diag/coord_mass_mean", "train/lr")


@dataclass
class Run:
    """One run's rows: ``label`` is the run folder name, ``rows`` the parsed metrics.jsonl lines."""

    label: str
    path: str
    rows: list[dict]


@dataclass
class PlotResult:
    """What ``main`` drew: the PNG path, its size in pixels, and each panel's box ``(x0, y0, x1, y1)``."""

    out: str
    size: tuple[int, int]
    keys: list[str]
    panels: list[tuple[int, int, int, int]] = field(default_factory=list)  # plot areas, one per key
    nonfinite: dict[str, int] = field(default_factory=dict)  # key -> values not drawn (NaN/inf)
    lines: dict[str, list[str]] = field(default_factory=dict)  # key -> the lines drawn ("run", "run Channel-B")
    titles: dict[str, str] = field(default_factory=dict)  # key -> its panel's title as drawn


def load_run(path: str) -> Run:
    """A run folder (holding metrics.jsonl) or a metrics.jsonl path -> ``Run``."""
    metrics = os.path.join(path, METRICS_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(metrics):
        raise FileNotFoundError(f"{path}: no metrics.jsonl found (pass a run folder or a metrics.jsonl file)")
    label = os.path.basename(os.path.dirname(os.path.abspath(metrics))) or metrics
    rows = read_metrics(metrics)
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "step" not in row:
            raise InputError(f"{metrics}: row {i} has no 'step' (every metrics.jsonl line is {{'step': N, ...}})")
    return Run(label=label, path=metrics, rows=rows)


def available_keys(runs: list[Run]) -> list[str]:
    """Every metric key found in any run (sorted; ``step`` excluded)."""
    return sorted({k for r in runs for row in r.rows for k in row if k != "step"})


def resolve_keys(runs: list[Run], keys: list[str] | None) -> list[str]:
    """Check ``keys`` against the runs; ``None`` -> ``loss/total`` + every other ``loss/*`` key present."""
    avail = available_keys(runs)
    if keys is None:
        losses = [k for k in avail if k.startswith("loss/") and k != "loss/total"]
        keys = (["loss/total"] if "loss/total" in avail else []) + losses
        if not keys:
            raise InputError(f"no loss/* key in the metrics; pass --keys (available: {', '.join(avail) or 'none'})")
        return keys
    for k in keys:
        if k not in avail:
            raise InputError(
                f"--keys: {k!r} is in no metrics.jsonl{did_you_mean(k, avail)}; available keys: "
                f"{', '.join(avail) or 'none'}"
            )
    return list(keys)


def series(run: Run, key: str) -> tuple[list[tuple[float, float]], int]:
    """``(points sorted by step, number of non-finite values left out)`` of ``key`` in ``run``."""
    points, nonfinite = [], 0
    for i, row in enumerate(run.rows, 1):
        if key not in row:
            continue
        v = row[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InputError(f"{run.path}: row {i}: {key}={v!r} is not a number")
        if not math.isfinite(v):
            nonfinite += 1
            continue
        points.append((float(row["step"]), float(v)))
    points.sort(key=lambda p: p[0])
    return points, nonfinite


CHANNEL_KEY = "stage2/channel_b_count"  # 1 on a Channel-B step, 0 on a Channel-A step (training.router)
CHANNEL_STYLES = {"Channel-A": "-", "Channel-B": "--"}


def channel_of_step(run: Run) -> dict[float, str]:
    """``step -> "Channel-A" | "Channel-B"`` for a Stage-2 Two-Channel run; empty for any other run."""
    return {float(r["step"]): "Channel-B" if r[CHANNEL_KEY] else "Channel-A"
            for r in run.rows if isinstance(r.get(CHANNEL_KEY), (int, float))}


def split_by_channel(points: list[tuple[float, float]], channels: dict[float, str]) -> dict[str, list]:
    """``points`` of a per-step key as one list per channel (``{"": points}`` without channel info)."""
    if not channels:
        return {"": points}
    out: dict[str, list] = {}
    for step, value in points:
        out.setdefault(channels.get(step, "Channel-A"), []).append((step, value))
    return out


def smooth(values: list[float], n: int) -> list[float]:
    """Trailing mean over the last ``n`` values (fewer at the start); ``n <= 1`` returns a copy."""
    if n <= 1:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= n:
            acc -= values[i - n]
        out.append(acc / min(i + 1, n))
    return out


def _rgb(c: tuple[int, int, int], lighten: float = 0.0) -> tuple[float, float, float]:
    return tuple((x + (255 - x) * lighten) / 255 for x in c)


def draw_panel(ax, key: str, runs: list[Run], smooth_n: int, lines: list[str] | None = None) -> int:
    """Draw one key's curves on ``ax`` (their labels appended to ``lines``); returns the number of
    non-finite values left out."""
    nonfinite, drawn = 0, False
    for i, run in enumerate(runs):
        pts, nf = series(run, key)
        nonfinite += nf
        if not pts:
            continue
        drawn = True
        # Sparse = present on only some rows of the run (eval keys): mark each point.
        sparse = len(pts) < sum(1 for r in run.rows if "step" in r)
        color = PALETTE[i % len(PALETTE)]
        parts = {"": pts} if sparse else split_by_channel(pts, channel_of_step(run))
        for channel, part in parts.items():
            steps, vals = [p[0] for p in part], [p[1] for p in part]
            marker = "o" if sparse or len(part) == 1 else None
            style = CHANNEL_STYLES.get(channel, "-")
            if smooth_n > 1 and not sparse:  # eval points are few and far apart: never averaged
                ax.plot(steps, vals, color=_rgb(color, 0.65), linewidth=1.5, linestyle=style)
                vals = smooth(vals, smooth_n)
            ax.plot(steps, vals, color=_rgb(color), linewidth=2, marker=marker, markersize=4, linestyle=style)
            if lines is not None:
                lines.append(f"{run.label} {channel}".strip())
    ax.set_title(key + (f"  ({nonfinite} non-finite not drawn)" if nonfinite else ""), fontsize=9, loc="left")
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(True, color="0.88", linewidth=0.8)
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps are integers
    if not drawn:
        ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", va="center")
    return nonfinite


def plot(
    runs: list[Run],
    keys: list[str],
    out: str,
    *,
    smooth_n: int = 1,
    panel_size: tuple[int, int] = (480, 300),
    cols: int = 2,
) -> PlotResult:
    """Draw ``keys`` (one panel each, ``cols`` per row, ``panel_size`` pixels) + a legend strip; save PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    pw, ph = panel_size
    cols = max(1, min(cols, len(keys)))
    rows = math.ceil(len(keys) / cols)
    legend_h = LEGEND_ROW_H * len(runs) + 8
    size = (cols * pw, rows * ph + legend_h)
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    result = PlotResult(out=out, size=size, keys=list(keys))
    W, H = size
    # Axes placed in pixels: each grid cell keeps room for the title, tick labels and the x label.
    ml, mr, mt, mb = 64, 16, 24, 38
    axes = []
    for j, key in enumerate(keys):
        r, c = divmod(j, cols)
        x0, y0 = c * pw + ml, r * ph + mt
        w, h = pw - ml - mr, ph - mt - mb
        ax = fig.add_axes((x0 / W, 1 - (y0 + h) / H, w / W, h / H))
        result.lines[key] = []
        result.nonfinite[key] = draw_panel(ax, key, runs, smooth_n, result.lines[key])
        result.panels.append((x0, y0, x0 + w, y0 + h))
        axes.append(ax)
    fig.canvas.draw()  # tick labels are chosen at draw time: only then is an axis multiplier known
    for ax in axes:  # matplotlib puts a "1e-5" / "+1e3" multiplier at the top left, over the title: join them
        offset = ax.yaxis.get_offset_text()
        if offset.get_text():
            text = offset.get_text()
            text = text if text[0] in "+-−" else "×" + text  # an offset is added, a multiplier multiplies
            ax.set_title(f"{ax.get_title(loc='left')}  [{text}]", fontsize=9, loc="left")
            offset.set_visible(False)
    result.titles = {key: ax.get_title(loc="left") for key, ax in zip(keys, axes, strict=True)}
    handles = [Line2D([], [], color=_rgb(PALETTE[i % len(PALETTE)]), linewidth=3) for i in range(len(runs))]
    fig.legend(handles, [f"{run.label}  ({run.path})" for run in runs], loc="lower left", fontsize=8,
               frameon=False, bbox_to_anchor=(ml / W, 0), borderaxespad=0.2, handlelength=2.5)
    if any(channel_of_step(run) for run in runs):  # which line style is which channel
        styles = [Line2D([], [], color="0.3", linewidth=2, linestyle=ls) for ls in CHANNEL_STYLES.values()]
        fig.legend(styles, [f"{name} steps" for name in CHANNEL_STYLES], loc="lower right", fontsize=8,
                   frameon=False, bbox_to_anchor=(1 - mr / W, 0), borderaxespad=0.2, handlelength=2.5)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, format="png", dpi=DPI)
    return result


def plot_run(run_dir: str | os.PathLike) -> str | None:
    """The end-of-run plot: ``<run_dir>/plots/metrics.png`` with the losses and, when logged, eval mAP,
    parse-valid rate, coord mass and lr. Returns the path, or None when the run logged no loss."""
    run = load_run(str(run_dir))
    avail = set(available_keys([run]))
    if not any(k.startswith("loss/") for k in avail):
        return None
    keys = resolve_keys([run], None) + [k for k in RUN_PLOT_EXTRA_KEYS if k in avail]
    out = os.path.join(str(run_dir), "plots", "metrics.png")
    plot([run], keys, out, smooth_n=1, cols=3)
    return out


def main(argv: list[str] | None = None) -> PlotResult:
    ap = argparse.ArgumentParser(description="Plot metrics.jsonl of one or more runs to a PNG")
    ap.add_argument("runs", nargs="+", help="run folders (holding metrics.jsonl) or metrics.jsonl files")
    ap.add_argument("--keys", nargs="+", default=None, help="metric keys (default: loss/total + every loss/* key)")
    ap.add_argument("--out", default=None, help="output PNG path (default: <first run dir>/plots/metrics.png)")
    ap.add_argument("--smooth", type=int, default=1, help="trailing mean over N points (1 = raw only)")
    ap.add_argument("--panel-size", type=int, nargs=2, default=(480, 300), metavar=("W", "H"), help="pixels")
    ap.add_argument("--cols", type=int, default=2, help="panels per row")
    args = add_debug_flag(ap).parse_args(argv)
    if args.smooth < 1:
        raise InputError(f"--smooth must be an integer >= 1, got {args.smooth}")
    pw, ph = args.panel_size
    if pw < 120 or ph < 100:
        raise InputError(f"--panel-size {pw} {ph} is too small; use at least 120 x 100 pixels")
    runs = [load_run(p) for p in args.runs]
    keys = resolve_keys(runs, args.keys)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(runs[0].path)), "plots", "metrics.png")
    result = plot(runs, keys, out, smooth_n=args.smooth, panel_size=(pw, ph), cols=args.cols)
    print(f"wrote {out} ({result.size[0]}x{result.size[1]}): {', '.join(keys)}")
    for key, n in result.nonfinite.items():
        if n:
            print(f"  {key}: {n} non-finite values not drawn")
    return result

