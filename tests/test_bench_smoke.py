"""Smoke test of the benchmarks: each ``main(["--quick"])`` runs, prints its RATIO line and returns its numbers.

Only structure and correctness fields are asserted (the two ways agree, token counts add up), never
a time or a ratio: timings on a shared CI machine say nothing about the code.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from bench import bench_expectation, bench_generation, bench_packing, bench_records, bench_token_ce

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
    # the printed ratio is the measured seconds' ratio (baseline over token_ce), to 2 decimals
    assert printed == pytest.approx(r["baseline"]["seconds"] / r["token_ce"]["seconds"], abs=0.006)


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
    assert printed == pytest.approx(packed["useful_tokens_per_s"] / pad["useful_tokens_per_s"], abs=0.006)


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
    assert printed == pytest.approx(r["candidate"]["tokens_per_s"] / r["baseline"]["tokens_per_s"], abs=0.006)


def test_expectation_quick(capsys):
    r = bench_expectation.main(["--quick"])
    printed = _ratio_line(capsys.readouterr().out, "expectation")
    assert sorted(r["results"]) == [2, 3]
    for row in r["results"].values():
        # The baseline is the same computation with vision recomputed: identical hidden states.
        assert row["hidden_max_abs_diff"] < 1e-5
        assert _positive(row["baseline_seconds"]) and _positive(row["vision_once_seconds"])
    head = r["config"]["n_iter"][0]  # the ratio line reports the first n_iter
    row = r["results"][head]
    assert printed == pytest.approx(row["baseline_seconds"] / row["vision_once_seconds"], abs=0.006)


def test_train_step_quick(capsys, tmp_path):
    from bench import bench_train_step

    out = tmp_path / "train_step.json"
    r = bench_train_step.main(["--quick", "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    a_line, full_line, b_line = lines[-3], lines[-2], lines[-1]
    assert RATIO_RE.match(a_line).group(1) == "channel_a_over_stage1"
    assert RATIO_RE.match(full_line).group(1) == "channel_a_full_over_stage1"
    assert RATIO_RE.match(b_line).group(1) == "channel_b_over_stage1"
    assert float(RATIO_RE.match(a_line).group(2)) == pytest.approx(r["ratio_channel_a_over_stage1"], abs=0.006)
    assert json.loads(out.read_text())["kinds"].keys() == r["kinds"].keys() == set(bench_train_step.KINDS)
    assert set(bench_train_step.KINDS) == {"stage1", "channel_a", "channel_a_full", "channel_b"}
    cfg = r["config"]
    assert cfg["size"] == "tiny" and cfg["n_lm"] > 0 and cfg["n_vision"] > 0
    assert 0 < cfg["channel_a_prefix_fraction"] < 1
    assert cfg["tokens_per_step"] == sum(cfg["rows"]) and all(0 < n <= cfg["max_length"] for n in cfg["rows"])
    for kind, k in r["kinds"].items():
        assert _positive(k["step_s"]) and _positive(k["tokens_per_s"]), kind
        assert 0 < k["mfu_lm"] < k["mfu_with_vision"] < 1, kind
        assert set(k["phases"]) == set(bench_train_step.PHASES)
        assert all(v >= 0 for v in k["phases"].values())
        assert (k["phases"]["generation"] > 0) == (kind == "channel_b")
        assert k["host_reads"] == sum(k["host_reads_by_site"].values()) > 0
        assert k["phases"]["vision"] > 0 and k["phases"]["backward"] > 0
    # MFU is exact arithmetic on the counted tokens: 6 * N_LM * tokens / step_s / peak.
    s1 = r["kinds"]["stage1"]
    assert s1["mfu_lm"] == pytest.approx(6 * cfg["n_lm"] * s1["tokens"] / s1["step_s"] / (cfg["peak_tflops"] * 1e12))
    assert s1["tokens"] == cfg["tokens_per_step"]


def test_train_step_real_shapes_match_qwen3vl_2b():
    """The 2B shape has the parameter count of the issue's measured model (2.44 B untied, 2.13 B tied)."""
    from transformers import Qwen3VLForConditionalGeneration

    from bench.bench_train_step import SIZES, _model_config, _param_counts
    from model.tiny import build_tiny_tokenizer

    with torch.device("meta"):
        vlm = Qwen3VLForConditionalGeneration(_model_config("2b", build_tiny_tokenizer()))
    counts = _param_counts(vlm)
    emb = SIZES["2b"]["vocab_size"] * SIZES["2b"]["hidden"]
    assert counts["n_total"] + emb == pytest.approx(2.44e9, rel=0.01)  # tied: the build was untied
    assert counts["n_lm"] == pytest.approx(1.72e9, rel=0.02)


def test_records_ways_agree_in_process(tmp_path):
    """The fast check of bench_records (the --quick run below spawns three fresh processes, ~80 s):
    each way's start-up code on 40 records gives the same records, tokens and packing plan."""
    jsonl = bench_records.write_records(tmp_path / "records.jsonl", 40)
    ways = {way: bench_records._child(way, str(jsonl), 512) for way in ("today", "build", "rank")}
    assert {w["records"] for w in ways.values()} == {40}
    assert len({(w["tokens"], w["rows"], w["plan_checksum"]) for w in ways.values()}) == 1
    assert ways["today"]["tokens"] > 0 and ways["today"]["rows"] >= 1
    assert len(list(tmp_path.rglob("records.arrow"))) == 1  # "build" made the cache that "rank" read


@pytest.mark.slow
def test_records_quick(capsys):
    r = bench_records.main(["--quick"])
    out = capsys.readouterr().out
    printed = _ratio_line(out, "records_startup")
    assert r["same_plan"]  # the cached plan is the plan today's path computes, built either way
    ways = bench_records.WAYS
    assert {r[w]["records"] for w in ways} == {r["config"]["records"]} == {300}
    assert r["today"]["tokens"] == r["rank"]["tokens"] == r["build_serial"]["tokens"] > 0
    assert r["today"]["rows"] == r["rank"]["rows"] >= 1
    for way in ways:
        assert _positive(r[way]["seconds"])
    # the printed ratio is the measured seconds' ratio (today's path over the per-rank read)
    assert printed == pytest.approx(r["today"]["seconds"] / r["rank"]["seconds"], abs=0.006)
    build_line = [line for line in out.splitlines() if line.startswith("RATIO cache_build:")]
    assert len(build_line) == 1  # the serial build's seconds over the parallel build's
    assert _ratio_line(build_line[0], "cache_build") == pytest.approx(
        r["build_serial"]["seconds"] / r["build"]["seconds"], abs=0.006)


def test_packed_attention_quick(capsys):
    from bench import bench_packed_attention

    r = bench_packed_attention.main(["--quick", "--threads", "1"])
    printed = _ratio_line(capsys.readouterr().out, "packed_attention")
    assert r["samples_per_row"] > 1  # a packed row: the two kernels differ in what they compute
    assert r["hidden_max_abs_diff"] < 1e-4 and r["grad_max_abs_diff_rel"] < 1e-4
    assert _positive(r["sdpa_s"]) and _positive(r["sdpa_packed_s"])
    assert printed == pytest.approx(r["sdpa_s"] / r["sdpa_packed_s"], abs=0.006)


def test_loader_quick(capsys):
    from bench import bench_loader

    r = bench_loader.main(["--quick", "--threads", "1"])
    printed = _ratio_line(capsys.readouterr().out, "loader")
    assert [x["workers"] for x in r["results"]] == [0, 1]
    # every worker count delivers the same epoch (first micro-batch excluded from the clock)
    assert len({(x["samples"], x["tokens"]) for x in r["results"]}) == 1 and r["results"][0]["samples"] > 0
    for x in r["results"]:
        assert _positive(x["samples_per_s"]) and x["workers_per_gpu"] >= 1
    # the printed ratio is the measured one: the best worker count's samples/s over 0 workers
    best = max(x["samples_per_s"] for x in r["results"])
    assert printed == pytest.approx(best / r["results"][0]["samples_per_s"], abs=0.006)
