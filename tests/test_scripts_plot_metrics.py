"""training/plots.py (CLI: scripts/plot_metrics.py): matplotlib plots of metrics.jsonl, key checks, smoothing, the end-of-run plot."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from training.plots import PALETTE, main, plot_run, smooth


def _write_run(folder, rows):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _two_runs(tmp_path):
    a_rows, b_rows = [], []
    for step in range(1, 21):
        a = {"step": step, "loss/total": 3.0 / step, "loss/struct_ce": 1.0 / step, "train/lr": 1e-4}
        b = {"step": step, "loss/total": 2.5 / step + 0.1, "loss/struct_ce": 0.8 / step}
        if step % 5 == 0:  # eval keys only on eval steps
            a["eval/rollout/mAP"] = 0.01 * step
            b["eval/rollout/mAP"] = 0.02 * step
        a_rows.append(a)
        b_rows.append(b)
    a_rows[3]["loss/struct_ce"] = float("nan")  # written as NaN by the tracker; counted, not drawn
    run_a = _write_run(tmp_path / "run_a", a_rows)
    run_b = _write_run(tmp_path / "run_b", b_rows)
    return run_a, run_b


def _count(img, box, color, tol: int = 12):
    """Pixels of ``color`` (within ``tol`` per channel: lines are anti-aliased) inside ``box``."""
    return sum(1 for px in img.crop(box).getdata() if all(abs(a - b) <= tol for a, b in zip(px, color)))


def test_plot_two_runs_every_panel_drawn(tmp_path, capsys):
    run_a, run_b = _two_runs(tmp_path)
    out = tmp_path / "plots" / "m.png"
    keys = ["loss/total", "loss/struct_ce", "eval/rollout/mAP"]
    res = main(
        [str(run_a), str(run_b / "metrics.jsonl"), "--keys", *keys, "--out", str(out), "--panel-size", "320", "200"]
    )
    # 3 panels, 2 per row -> 2 rows of 200 px; legend strip = 2 runs x 18 px + 8 px.
    assert res.size == (640, 2 * 200 + 2 * 18 + 8)
    img = Image.open(out).convert("RGB")
    assert img.size == res.size
    assert res.keys == keys and len(res.panels) == 3
    assert res.nonfinite == {"loss/total": 0, "loss/struct_ce": 1, "eval/rollout/mAP": 0}
    for box in res.panels:
        # Each run's curve left its colour inside the plot area of every panel.
        assert _count(img, box, PALETTE[0]) > 20
        assert _count(img, box, PALETTE[1]) > 20
    # The unused 4th grid cell stays blank.
    assert _count(img, (330, 210, 630, 390), (255, 255, 255)) == 300 * 180
    printed = capsys.readouterr().out
    assert "loss/struct_ce: 1 non-finite" in printed


def test_default_keys_are_losses_and_smoothing_draws(tmp_path):
    run_a, run_b = _two_runs(tmp_path)
    out = tmp_path / "d.png"
    res = main([str(run_a), str(run_b), "--out", str(out), "--smooth", "5", "--cols", "1"])
    assert res.keys == ["loss/total", "loss/struct_ce"]
    assert res.size == (480, 2 * 300 + 2 * 18 + 8)
    img = Image.open(out).convert("RGB")
    for box in res.panels:
        assert _count(img, box, PALETTE[0]) > 20 and _count(img, box, PALETTE[1]) > 20


def test_unknown_key_lists_available(tmp_path):
    run_a, _ = _two_runs(tmp_path)
    with pytest.raises(ValueError) as exc:
        main([str(run_a), "--keys", "loss/totl", "--out", str(tmp_path / "x.png")])
    msg = str(exc.value)
    assert "'loss/totl'" in msg and "did you mean 'loss/total'" in msg
    assert "available keys: eval/rollout/mAP, loss/struct_ce, loss/total, train/lr" in msg
    assert not (tmp_path / "x.png").exists()


def test_missing_metrics_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        main([str(tmp_path), "--out", str(tmp_path / "x.png")])


def test_smooth_by_hand():
    # trailing mean over 2: [1, (1+3)/2, (3+5)/2, (5+7)/2]
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([1.0, 3.0], 1) == [1.0, 3.0]


def test_default_out_is_the_run_dir(tmp_path):
    run_a, run_b = _two_runs(tmp_path)
    res = main([str(run_a), str(run_b)])
    assert res.out == str(run_a / "plots" / "metrics.png")
    assert (run_a / "plots" / "metrics.png").is_file()


def test_end_of_run_plot_has_losses_and_eval_panels(tmp_path):
    run_a, _ = _two_runs(tmp_path)
    out = plot_run(run_a)
    assert out == str(run_a / "plots" / "metrics.png")
    img = Image.open(out).convert("RGB")
    # losses first, then the extra keys the run logged (mAP, lr): 4 panels, 3 per row
    assert img.size == (3 * 480, 2 * 300 + 18 + 8)
    boxes = [(64 + c * 480, 24 + r * 300, 64 + c * 480 + 400, 24 + r * 300 + 238) for r, c in ((0, 0), (0, 1), (0, 2), (1, 0))]
    for box in boxes:
        assert _count(img, box, PALETTE[0]) > 20
    # no loss logged yet: nothing to plot, no file
    empty = _write_run(tmp_path / "empty", [{"step": 1, "train/lr": 0.1}])
    assert plot_run(empty) is None and not (empty / "plots").exists()


def test_a_two_channel_run_gets_one_line_per_channel(tmp_path):
    from training.plots import channel_of_step, load_run, series, split_by_channel

    rows = []
    for step in range(1, 11):  # B on steps 2, 5, 8 (b_ratio ~0.3); B losses are ~3x the A losses
        b = step % 3 == 2
        rows.append({"step": step, "loss/total": (3.0 if b else 1.0) / step, "stage2/channel_b_count": float(b),
                     "stage2/channel_a_count": float(not b), **({"eval/rollout/mAP": 0.5} if step == 10 else {})})
    run_dir = _write_run(tmp_path / "s2", rows)
    run = load_run(str(run_dir))
    parts = split_by_channel(series(run, "loss/total")[0], channel_of_step(run))
    assert parts["Channel-B"] == [(2.0, 1.5), (5.0, 0.6), (8.0, 3.0 / 8)]
    assert [s for s, _ in parts["Channel-A"]] == [1.0, 3.0, 4.0, 6.0, 7.0, 9.0, 10.0]
    out = plot_run(run_dir)
    assert Image.open(out).size[0] > 0
    res = main([str(run_dir), "--keys", "loss/total", "eval/rollout/mAP", "--out", str(tmp_path / "p.png")])
    assert res.lines == {"loss/total": ["s2 Channel-A", "s2 Channel-B"], "eval/rollout/mAP": ["s2"]}
    # a Stage-1 run: one line per key
    plain = _write_run(tmp_path / "s1", [{"step": s, "loss/total": 1.0 / s} for s in range(1, 4)])
    assert main([str(plain), "--out", str(tmp_path / "q.png")]).lines == {"loss/total": ["s1"]}


def test_an_axis_multiplier_joins_the_title_instead_of_covering_it(tmp_path):
    """matplotlib writes a "1e-5" multiplier (or a "+1e3" offset) at the top left of the axis, where the
    left-aligned title sits: the plot moves it into the title and hides the one on the axis."""
    rows = [{"step": s, "train/lr": 2e-5 * min(1.0, s / 5), "loss/total": 1000.5 - 5e-4 * s, "loss/geo": 1.0 / s}
            for s in range(1, 30)]
    run = _write_run(tmp_path / "run", rows)
    r = main([str(run), "--keys", "train/lr", "loss/total", "loss/geo", "--out", str(tmp_path / "p.png")])
    assert r.titles["train/lr"].startswith("train/lr  [×1e") and r.titles["train/lr"].endswith("5]")
    assert r.titles["loss/total"].startswith("loss/total  [+")  # an offset: added, not multiplied
    assert r.titles["loss/geo"] == "loss/geo"  # plain ticks: the title alone
