"""scripts/research_shapes.py --quick: every arm trains, is evaluated on the held-out set, the doc
table is written from the cells, and a rerun skips finished cells (plumbing only)."""

from __future__ import annotations

import json

import pytest

from configs import load_config
from scripts import research_shapes


def test_mean_std_by_hand():
    assert research_shapes._mean_std([1.0, 2.0, 3.0], 2) == "2.00 ± 1.00"  # sample std
    assert research_shapes._mean_std([0.25], 3) == "0.250 ± 0.000"


def test_compare_flags_gaps_inside_the_seed_spread():
    # means 0.5 vs 0.4, stds 0.1 and 0.0: the 0.1 gap is within the spread
    assert research_shapes._compare("(c)", [0.4, 0.5, 0.6], "(d)", [0.4, 0.4, 0.4]) == (
        "(c) higher, within the seed spread (gap 0.100 <= std 0.100)")
    assert research_shapes._compare("(c)", [0.1, 0.1], "(d)", [0.5, 0.5]) == "(d) higher"
    assert research_shapes._compare("(c)", [0.3], "(d)", [0.3]) == "equal"


def _cell(ap50: float, pv: float = 1.0, cpu: float = 600.0) -> dict:
    return {"AP50": ap50, "parse_valid_rate": pv, "coord_err": 0.05, "train_cpu_s": cpu}


def test_verdict_states_the_target_and_the_runbook_conclusion():
    size = {"stage1_steps": 7500}
    results = {"ce": [_cell(0.6, cpu=1500.0), _cell(0.5, cpu=1500.0)], "coordexp": [_cell(0.5), _cell(0.5)],
               "coordexp+stage2": [_cell(0.4, pv=0.9), _cell(0.4, pv=0.9)],
               "coordexp+stage1": [_cell(0.5), _cell(0.5)]}
    text = research_shapes.verdict(results, size)
    assert ("(a) CE-only Stage-1: held-out AP50 0.550 after 7500 steps (25.0 CPU-minutes of training per seed, "
            "at most 25.0): meets the target (AP50 >= 0.5 within 30 CPU-minutes of training)") in text
    assert "(b) CoordExp Stage-1: held-out AP50 0.500 after 7500 steps (10.0 CPU-minutes" in text
    assert "(c) vs (d): AP50 0.400 vs 0.500 ((d) higher)" in text
    assert 'STAGE2_RUNBOOK.md \"Stage-2 vs more Stage-1\"' in text
    assert "kept the parse-valid rate of its Stage-1 start: no (0.90 vs 1.00)" in text
    results["coordexp+stage2"] = [_cell(0.5), _cell(0.6)]
    results["ce"] = [_cell(0.2), _cell(0.3)]
    text = research_shapes.verdict(results, size)
    assert "(a) CE-only Stage-1: held-out AP50 0.250" in text and "below the 0.5 AP50 target." in text
    # the budget holds for every seed, not on average: 24 + 31 minutes is 27.5 on average and still over
    results["coordexp"] = [_cell(0.6, cpu=1440.0), _cell(0.6, cpu=1860.0)]
    text = research_shapes.verdict(results, size)
    assert ("(b) CoordExp Stage-1: held-out AP50 0.600 after 7500 steps (27.5 CPU-minutes of training per seed, "
            "at most 31.0): over the 30 CPU-minute budget.") in text
    results["coordexp"] = [_cell(0.4, cpu=1860.0)] * 2
    text = research_shapes.verdict(results, size)
    assert "below the 0.5 AP50 target and over the 30 CPU-minute budget." in text
    assert "Stage-2 did at least as well as spending its compute on more Stage-1." in text


def test_quick_run_writes_the_table_and_resumes(tmp_path, monkeypatch):
    out, doc = tmp_path / "r", tmp_path / "RESEARCH.md"
    argv = ["--quick", "--seeds", "1", "--out-dir", str(out), "--doc", str(doc)]
    results = research_shapes.main(argv)
    assert list(results) == list(research_shapes.ARMS)
    for arm in research_shapes.ARMS:
        (cell,) = results[arm]
        assert cell == json.loads((out / "seed0" / arm / "cell.json").read_text())
        for key, _, _ in research_shapes.METRICS:
            assert cell[key] >= 0.0, (arm, key)
        assert (out / "seed0" / arm / "heldout_eval" / "predictions.jsonl").is_file()
    # (c) and (d) are cumulative over the (b) run they continue from
    assert results["coordexp+stage2"][0]["train_cpu_s"] > results["coordexp"][0]["train_cpu_s"]
    assert results["coordexp+stage1"][0]["steps"] >= 1
    text = doc.read_text()
    assert "python scripts/research_shapes.py --quick --seeds 1" in text
    # the doc says how every arm's held-out rollouts picked coord tokens: the research config's choice
    pick = load_config(research_shapes.CONFIGS["ce"], expect="stage1").rollout_matching.decoding.coord_pick
    assert research_shapes.COORD_PICK_TEXT[pick] in text
    from rollout.backends import COORD_PICKS

    assert set(research_shapes.COORD_PICK_TEXT) == set(COORD_PICKS)  # every pick the backend knows has its sentence
    for label in research_shapes.ARM_LABELS.values():
        assert sum(line.startswith(f"| {label} |") for line in text.splitlines()) == 1
    # the held-out images come from a generator seed no training run uses
    train = [json.loads(x)["image"] for x in (out / "data_train" / "train.jsonl").read_text().splitlines()]
    assert train and (out / "data_heldout" / "shapes_params.json").read_text().count('"seed": 777')

    # resumable: finished cells are read back, nothing trains again
    def no_training(*a, **k):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(research_shapes, "train_cell", no_training)
    doc.unlink()
    again = research_shapes.main(argv)
    assert again == results and doc.read_text() == text

    # a cell whose recorded key no longer matches is stale and trains again, with whatever depends on it:
    # here (c) lost its key, so (c) and (d) (whose steps are (c)'s compute) retrain, (a) and (b) do not
    monkeypatch.undo()
    train_cell, trained = research_shapes.train_cell, []

    def spy(arm, *a, **k):
        trained.append(arm)
        return train_cell(arm, *a, **k)

    monkeypatch.setattr(research_shapes, "train_cell", spy)
    c_file = out / "seed0" / "coordexp+stage2" / "cell.json"
    c_file.write_text(json.dumps({k: v for k, v in json.loads(c_file.read_text()).items() if k != "cell_key"}))
    research_shapes.main(argv)
    assert trained == ["coordexp+stage2", "coordexp+stage1"]
    # an override changes every arm's config: everything trains again, and the keys differ
    trained.clear()
    keys = {arm: json.loads((out / "seed0" / arm / "cell.json").read_text())["cell_key"] for arm in research_shapes.ARMS}
    research_shapes.main([*argv, "--set", "training.max_grad_norm=0.5"])
    assert sorted(trained) == sorted(research_shapes.ARMS)
    assert all(json.loads((out / "seed0" / arm / "cell.json").read_text())["cell_key"] != keys[arm]
               for arm in research_shapes.ARMS)


def test_jobs_train_seeds_in_worker_processes(tmp_path):
    """--jobs 2: each seed is trained by its own worker process; the parent reads their cells back
    and writes one table over both seeds with the command it was given."""
    out, doc = tmp_path / "r", tmp_path / "RESEARCH.md"
    argv = ["--quick", "--seeds", "2", "--jobs", "2", "--out-dir", str(out), "--doc", str(doc)]
    results = research_shapes.main(argv)
    for seed in (0, 1):
        log = (out / f"seed{seed}" / "worker.log").read_text()
        assert f"seed {seed} coordexp+stage1: training" in log  # trained by the worker, not the parent
        for arm in research_shapes.ARMS:
            cell = json.loads((out / f"seed{seed}" / arm / "cell.json").read_text())
            assert results[arm][seed] == cell
    text = doc.read_text()
    assert "python scripts/research_shapes.py --quick --seeds 2 --jobs 2" in text
    assert "- seed 0:" in text and "- seed 1:" in text


def test_stopping_the_parent_stops_its_workers(tmp_path, monkeypatch):
    """SIGTERM (or Ctrl-C) to the --jobs parent terminates the worker processes instead of leaving them
    training unattended; the parent exits 128 + 15 and its SIGTERM handler is restored."""
    import os
    import signal
    import subprocess
    import sys
    import types

    spawned = []
    real_popen = subprocess.Popen

    def popen(argv, **kwargs):
        proc = real_popen([sys.executable, "-c", "import time; time.sleep(120)"], **kwargs)
        spawned.append(proc)
        return proc

    def sleep(_seconds):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(research_shapes, "time", types.SimpleNamespace(sleep=sleep))  # not the global time.sleep
    monkeypatch.setattr(research_shapes, "_cells_done", lambda *a: False)
    before = signal.getsignal(signal.SIGTERM)
    args = research_shapes.parse_args(["--quick", "--seeds", "2", "--jobs", "2", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as stopped:
        research_shapes.run_seed_workers(args, [], tmp_path, {})
    assert stopped.value.code == 128 + signal.SIGTERM
    assert len(spawned) == 2 and all(p.poll() is not None for p in spawned)
    assert signal.getsignal(signal.SIGTERM) is before


def test_heldout_eval_sees_images_and_decodes_as_the_config_says(tmp_path, monkeypatch):
    """evaluate_cell resizes with the config's data.min_pixels / max_pixels (as training did) and
    decodes with its rollout_matching.decoding (max_new_tokens, coord_pick)."""
    import data.encoding
    import eval.inloop
    from configs import load_config
    from model.tiny import build_tiny_checkpoint
    from tests._data_fixtures import write_png

    seen = {}

    class Stop(Exception):
        pass

    real_encoder = data.encoding.ChatEncoder

    def encoder(*args, **kwargs):
        seen["encoder"] = kwargs
        return real_encoder(*args, **kwargs)

    def rollout_eval(*args, backend_kwargs, **kwargs):
        seen["backend"] = backend_kwargs
        raise Stop

    monkeypatch.setattr(data.encoding, "ChatEncoder", encoder)
    monkeypatch.setattr(eval.inloop, "run_rollout_eval", rollout_eval)
    cfg = load_config(research_shapes.CONFIGS["ce"], ["data.min_pixels=36864", "data.max_pixels=36864",
                                                      "rollout_matching.decoding.coord_pick=expectation"], expect="stage1")
    build_tiny_checkpoint(str(tmp_path / "ckpt"))
    write_png(str(tmp_path / "a.png"), 32, 32)
    heldout = tmp_path / "h.jsonl"
    heldout.write_text('{"image": "a.png", "width": 32, "height": 32, "objects": []}\n')
    try:
        research_shapes.evaluate_cell(tmp_path / "ckpt", heldout, cfg, tmp_path / "eval")
    except Stop:
        pass
    assert (seen["encoder"]["min_pixels"], seen["encoder"]["max_pixels"]) == (36864, 36864)
    assert seen["encoder"]["prompt"] == cfg.data.prompt
    assert seen["backend"]["coord_pick"] == "expectation"
    assert seen["backend"]["max_new_tokens"] == cfg.rollout_matching.decoding.max_new_tokens


def test_rewriting_the_doc_keeps_the_hand_written_notes(tmp_path):
    doc = tmp_path / "RESEARCH.md"
    assert research_shapes.keep_notes(doc, "# table\n") == "# table\n"  # no doc yet
    doc.write_text("# old table\n\n" + research_shapes.NOTES_MARK + "\n\n## Notes\n\n- measured 0.5\n")
    new = research_shapes.keep_notes(doc, "# new table\n")
    assert new == "# new table\n\n" + research_shapes.NOTES_MARK + "\n\n## Notes\n\n- measured 0.5\n"
    doc.write_text("# no notes\n")
    assert research_shapes.keep_notes(doc, "# t\n") == "# t\n"


def test_the_shipped_research_doc_has_its_notes_section():
    text = (research_shapes.REPO / "docs" / "RESEARCH.md").read_text(encoding="utf-8")
    assert text.count(research_shapes.NOTES_MARK) == 1
