"""Plot ``metrics.jsonl`` of one or more runs to a PNG (PIL only; matplotlib is not a dependency).

    python scripts/plot_metrics.py runs/a runs/b/metrics.jsonl \
        --keys loss/total eval/rollout/mAP --out plot.png [--smooth 20]

One panel per key, optimizer step on x, one colour per run (labelled with the run folder name).
A key missing from a row is skipped for that row: keys logged on every step are lines, keys
present on only some rows (``eval/*`` on eval steps) are lines with a marker at each point.
Default keys: ``loss/total`` and every other ``loss/*`` key found. Non-finite values (the
tracker writes ``NaN``/``Infinity``) cannot be placed on an axis; they are counted in the panel
title, never dropped silently. ``--smooth N`` draws the trailing mean of the last N points
over the raw curve of dense keys (the raw curve stays visible in a light shade); sparse keys
(eval) are never smoothed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from configs.errors import did_you_mean  # noqa: E402
from training.tracking import read_metrics  # noqa: E402

# tab10: distinct on white; exact RGB values so tests can find each run's pixels.
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
BACKGROUND = (255, 255, 255)
AXIS = (0, 0, 0)
GRID = (225, 225, 225)
# Plot-area margins inside a panel (pixels): room for the title, y tick labels, x tick labels.
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 24, 34
LEGEND_ROW_H = 18


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


def load_run(path: str) -> Run:
    """A run folder (holding metrics.jsonl) or a metrics.jsonl path -> ``Run``."""
    metrics = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(metrics):
        raise FileNotFoundError(f"{path}: no metrics.jsonl found (pass a run folder or a metrics.jsonl file)")
    label = os.path.basename(os.path.dirname(os.path.abspath(metrics))) or metrics
    rows = read_metrics(metrics)
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{metrics}: row {i} has no 'step' (every metrics.jsonl line is {{'step': N, ...}})")
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
            raise ValueError(f"no loss/* key in the metrics; pass --keys (available: {', '.join(avail) or 'none'})")
        return keys
    for k in keys:
        if k not in avail:
            raise ValueError(
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
            raise ValueError(f"{run.path}: row {i}: {key}={v!r} is not a number")
        if not math.isfinite(v):
            nonfinite += 1
            continue
        points.append((float(row["step"]), float(v)))
    points.sort(key=lambda p: p[0])
    return points, nonfinite


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


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering ``[lo, hi]``; about ``target`` of them."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return ticks


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _lighten(c: tuple[int, int, int], f: float = 0.65) -> tuple[int, int, int]:
    return tuple(int(round(x + (255 - x) * f)) for x in c)


def draw_panel(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont,
    box: tuple[int, int, int, int],
    key: str,
    runs: list[Run],
    smooth_n: int,
) -> tuple[tuple[int, int, int, int], int]:
    """Draw one key's panel inside ``box`` (pixels); returns ``(plot area box, non-finite count)``."""
    x0, y0, x1, y1 = box
    px0, py0, px1, py1 = x0 + MARGIN_LEFT, y0 + MARGIN_TOP, x1 - MARGIN_RIGHT, y1 - MARGIN_BOTTOM
    data, nonfinite = [], 0
    for run in runs:
        pts, nf = series(run, key)
        nonfinite += nf
        # Sparse = present on only some rows of the run (eval keys): mark each point.
        data.append((pts, len(pts) < sum(1 for r in run.rows if "step" in r)))
    title = key + (f"  ({nonfinite} non-finite not drawn)" if nonfinite else "")
    draw.text((px0, y0 + 4), title, fill=AXIS, font=font)
    all_pts = [p for pts, _ in data for p in pts]
    draw.rectangle((px0, py0, px1, py1), outline=AXIS)
    if not all_pts:
        draw.text((px0 + 8, py0 + 8), "no finite values", fill=AXIS, font=font)
        return (px0, py0, px1, py1), nonfinite
    xs, ys = [p[0] for p in all_pts], [p[1] for p in all_pts]
    xlo, xhi, ylo, yhi = min(xs), max(xs), min(ys), max(ys)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    if yhi == ylo:
        pad = abs(ylo) * 0.05 or 1.0
        ylo, yhi = ylo - pad, yhi + pad
    ypad = (yhi - ylo) * 0.05  # keep extreme points off the frame
    ylo, yhi = ylo - ypad, yhi + ypad
    # Inner area leaves 4 px so lines and markers do not sit on the frame.
    ix0, iy0, ix1, iy1 = px0 + 4, py0 + 4, px1 - 4, py1 - 4

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (ix0 + (x - xlo) / (xhi - xlo) * (ix1 - ix0), iy1 - (y - ylo) / (yhi - ylo) * (iy1 - iy0))

    for t in nice_ticks(ylo, yhi):
        _, ty = to_px(xlo, t)
        draw.line((px0 + 1, ty, px1 - 1, ty), fill=GRID)
        draw.line((px0 - 4, ty, px0, ty), fill=AXIS)
        label = _fmt(t)
        w = draw.textlength(label, font=font)
        draw.text((px0 - 6 - w, ty - 6), label, fill=AXIS, font=font)
    for t in nice_ticks(xlo, xhi):
        if t != int(t):
            continue  # steps are integers
        tx, _ = to_px(t, ylo)
        draw.line((tx, py1, tx, py1 + 4), fill=AXIS)
        label = str(int(t))
        w = draw.textlength(label, font=font)
        draw.text((tx - w / 2, py1 + 6), label, fill=AXIS, font=font)
    draw.text((px1 - draw.textlength("step", font=font), py1 + 20), "step", fill=AXIS, font=font)
    for i, (pts, sparse) in enumerate(data):
        if not pts:
            continue
        color = PALETTE[i % len(PALETTE)]
        steps, vals = [p[0] for p in pts], [p[1] for p in pts]
        curves = [(vals, color)]
        if smooth_n > 1 and not sparse:  # eval points are few and far apart: never averaged
            curves = [(vals, _lighten(color)), (smooth(vals, smooth_n), color)]
        for cvals, c in curves:
            xy = [to_px(s, v) for s, v in zip(steps, cvals)]
            if len(xy) > 1:
                draw.line(xy, fill=c, width=2)
            if sparse or len(xy) == 1:
                for cx, cy in xy:
                    draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=c)
    return (px0, py0, px1, py1), nonfinite


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
    pw, ph = panel_size
    cols = max(1, min(cols, len(keys)))
    rows = math.ceil(len(keys) / cols)
    legend_h = LEGEND_ROW_H * len(runs) + 8
    size = (cols * pw, rows * ph + legend_h)
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    result = PlotResult(out=out, size=size, keys=list(keys))
    for j, key in enumerate(keys):
        r, c = divmod(j, cols)
        area, nf = draw_panel(draw, font, (c * pw, r * ph, (c + 1) * pw, (r + 1) * ph), key, runs, smooth_n)
        result.panels.append(area)
        result.nonfinite[key] = nf
    ly = rows * ph + 4
    for i, run in enumerate(runs):
        color = PALETTE[i % len(PALETTE)]
        y = ly + i * LEGEND_ROW_H
        draw.line((MARGIN_LEFT, y + 7, MARGIN_LEFT + 24, y + 7), fill=color, width=3)
        draw.text((MARGIN_LEFT + 32, y), f"{run.label}  ({run.path})", fill=AXIS, font=font)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    img.save(out, format="PNG")
    return result


def main(argv: list[str] | None = None) -> PlotResult:
    ap = argparse.ArgumentParser(description="Plot metrics.jsonl of one or more runs to a PNG")
    ap.add_argument("runs", nargs="+", help="run folders (holding metrics.jsonl) or metrics.jsonl files")
    ap.add_argument("--keys", nargs="+", default=None, help="metric keys (default: loss/total + every loss/* key)")
    ap.add_argument("--out", required=True, help="output PNG path")
    ap.add_argument("--smooth", type=int, default=1, help="trailing mean over N points (1 = raw only)")
    ap.add_argument("--panel-size", type=int, nargs=2, default=(480, 300), metavar=("W", "H"), help="pixels")
    ap.add_argument("--cols", type=int, default=2, help="panels per row")
    args = ap.parse_args(argv)
    if args.smooth < 1:
        raise ValueError(f"--smooth must be an integer >= 1, got {args.smooth}")
    pw, ph = args.panel_size
    if pw < MARGIN_LEFT + MARGIN_RIGHT + 40 or ph < MARGIN_TOP + MARGIN_BOTTOM + 40:
        raise ValueError(f"--panel-size {pw} {ph} is too small; use at least 120 x 100 pixels")
    runs = [load_run(p) for p in args.runs]
    keys = resolve_keys(runs, args.keys)
    result = plot(runs, keys, args.out, smooth_n=args.smooth, panel_size=(pw, ph), cols=args.cols)
    print(f"wrote {args.out} ({result.size[0]}x{result.size[1]}): {', '.join(keys)}")
    for key, n in result.nonfinite.items():
        if n:
            print(f"  {key}: {n} non-finite values not drawn")
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as exc:  # a user error: the message, not a traceback
        sys.exit(f"plot_metrics: error: {exc}")
