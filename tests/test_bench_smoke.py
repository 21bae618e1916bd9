"""Smoke test of the benchmarks: each ``main(["--quick"])`` runs, prints its RATIO line and returns its numbers.

Only structure and correctness fields are asserted (the two ways agree, token counts add up), never
a time or a ratio: timings on a shared CI machine say nothing about the code.
"""

from __future__ import annotations

import math
import re

import pytest

from bench import bench_expectation, bench_generation, bench_packing, bench_token_ce

RATIO_RE = re.compile(r"^RATIO (\w+): (\d+\.\d\d)x \((.+)\)$")


def _ratio_line(out: str, name: str) -> float:
    last = out.strip().splitlines()[-1]
    m = RATIO_RE.match(last)
    assert m is not None, f"last line is not a RATIO line: {last!r}"
    assert m.group(1) == name
    return float(m.group(2))


def _positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_token_ce_quick(capsys):
    r = bench_token_ce.main(["--quick"])
    printed = _ratio_line(capsys.readouterr().out, "token_ce")
    assert r["config"]["vocab"] == 151_936  # the real Qwen3-VL row count even in the quick run
    assert r["loss_max_abs_diff"] < 1e-4
    assert r["grad_max_abs_diff"] < 1e-4
    assert r["grad_rel_diff"] < 1e-4
    for way in ("baseline", "token_ce"):
        assert _positive(r[way]["seconds"])
        assert r[way]["peak_bytes"] > 0
    # Logits bytes are exact arithmetic: all T positions vs the supervised ones only.
    cfg = r["config"]
    assert r["baseline"]["logits_bytes"] == cfg["batch"] * cfg["seq_len"] * cfg["vocab"] * 4
    assert r["token_ce"]["logits_bytes"] == cfg["supervised"] * cfg["vocab"] * 4
    # The full-logits baseline at least holds its [B, T, V] logits at its peak.
    assert r["baseline"]["peak_bytes"] >= r["baseline"]["logits_bytes"]
    assert printed == pytest.approx(r["speedup"], abs=0.006)


def test_packing_quick(capsys):
    r = bench_packing.main(["--quick"])
    printed = _ratio_line(capsys.readouterr().out, "packing")
    pad, packed = r["padded"], r["packed"]
    assert pad["real_tokens"] == packed["real_tokens"] > 0  # same samples both ways
    for way in (pad, packed):
        assert way["grid_tokens"] >= way["real_tokens"]
        assert way["padding_frac"] == pytest.approx(1 - way["real_tokens"] / way["grid_tokens"])
    # Packed rows hold whole samples only, never more than max_length tokens.
    assert packed["grid_tokens"] <= packed["steps"] * r["config"]["rows_per_batch"] * r["config"]["max_length"]
    assert packed["steps"] >= 1 and pad["steps"] == math.ceil(r["config"]["num_samples"] / r["config"]["batch_size"])
    assert _positive(pad["useful_tokens_per_s"]) and _positive(packed["useful_tokens_per_s"])
    assert printed == pytest.approx(r["ratio"], abs=0.006)


def test_generation_quick(capsys):
    r = bench_generation.main(["--quick", "--threads", "1"])
    printed = _ratio_line(capsys.readouterr().out, "generation")
    assert r["config"]["size"] == "tiny" and r["config"]["backend"] == "hf-static"
    for way in (r["baseline"], r["candidate"]):
        assert 0 < way["tokens"] <= r["num_prompts"] * r["config"]["max_new_tokens"]
        assert _positive(way["tokens_per_s"]) and _positive(way["channel_b_step_s"])
        assert way["b_over_stage1"] == pytest.approx(way["channel_b_step_s"] / r["stage1_step_s"])
        assert way["compiled_graphs"] == 0  # CPU: compile auto stays eager
    # static cache vs the dynamic-cache baseline: the same greedy rollouts
    assert r["identical_generations"] == r["num_prompts"]
    assert r["candidate"]["tokens"] == r["baseline"]["tokens"]
    assert printed == pytest.approx(r["ratio"], abs=0.006)


def test_expectation_quick(capsys):
    r = bench_expectation.main(["--quick"])
    printed = _ratio_line(capsys.readouterr().out, "expectation")
    assert sorted(r["results"]) == [2, 3]
    for row in r["results"].values():
        # The baseline is the same computation with vision recomputed: identical hidden states.
        assert row["hidden_max_abs_diff"] < 1e-5
        assert _positive(row["baseline_seconds"]) and _positive(row["vision_once_seconds"])
    assert printed == pytest.approx(r["ratio"], abs=0.006)
