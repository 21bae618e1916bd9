"""Parity: a written-out default pipeline trains exactly like the omitted one.

``configs/stage2_two_channel/smoke_default.yaml`` (pipeline omitted -> default manifest from the
flat knobs) and ``smoke_pipeline.yaml`` (the same manifest written out) must resolve to the same
checksum and give the same ``loss/*`` values from ``pipeline.executor.run_pipeline`` on a fixed
batch of both channels, packed and unpacked:

- Channel-A: ``expectation_forward`` on chat-encoded shapes samples;
- Channel-B: a rollout batch from the real ``rollout.step.prepare_rollout_batches`` with a backend
  that returns hand-written answers holding matched, FP and FN objects.

``stage2_ab.desc_ce_weight: 0.5`` must equal a written pipeline with ``token_ce.desc_ce_weight``
and ``rollout_fn_desc_weight`` 0.5, and the desc CE of the rollout must be 0.5 x the mean CE of
the appended FN desc tokens only (brute-force full-vocabulary logits).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from configs import load_config
from configs.loader import merge_config_tree
from configs.pipeline import FLAT_OBJECTIVE_KNOBS
from core.vocab import DESC, FN, FP, GT, MATCHED, ROLLOUT
from pipeline.executor import run_pipeline
from pipeline.forwards import expectation_forward, rollout_forward
from pipeline.registry import get_module
from tests.test_forwards_fixtures import full_token_ce, loss_metrics, make_env, rollout_batch

REPO = Path(__file__).resolve().parents[1]
TWO_DIR = REPO / "configs" / "stage2_two_channel"
SMOKE_DEFAULT = TWO_DIR / "smoke_default.yaml"
SMOKE_PIPELINE = TWO_DIR / "smoke_pipeline.yaml"
SMOKE_ST = TWO_DIR / "smoke_st.yaml"
SMOKE_RA = REPO / "configs" / "stage2_rollout_aligned" / "smoke_default.yaml"
HALF_DEFAULT = ("stage2_ab.desc_ce_weight=0.5",)
HALF_PIPELINE = (
    "stage2_ab.pipeline.objective[0].config.desc_ce_weight=0.5",
    "stage2_ab.pipeline.objective[0].config.rollout_fn_desc_weight=0.5",
)


@pytest.fixture(scope="module")
def cfgs():
    return {
        "default": load_config(SMOKE_DEFAULT, expect="stage2"),
        "pipeline": load_config(SMOKE_PIPELINE, expect="stage2"),
        "half_default": load_config(SMOKE_DEFAULT, HALF_DEFAULT, expect="stage2"),
        "half_pipeline": load_config(SMOKE_PIPELINE, HALF_PIPELINE, expect="stage2"),
        "st": load_config(SMOKE_ST, expect="stage2"),
        "ra": load_config(SMOKE_RA, expect="stage2"),
    }


# Forwards are shared by every config of a channel (the configs differ only in the objective,
# not in the forward modes); filled lazily for the module's one env.
_HIDDEN: dict = {}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    _HIDDEN.clear()
    yield make_env(tmp_path_factory.mktemp("shapes"))
    _HIDDEN.clear()


def _channel_a(env, cfg, packed: bool):
    key = ("A", packed)
    if key not in _HIDDEN:
        batch = env.batch([[0, 1, 2]] if packed else [[0], [1], [2]])
        sab = cfg.stage2_ab
        with torch.no_grad():
            fwd = expectation_forward(
                env.model, env.vlm, batch, env.coord_ids, n_iter=sab.n_softctx_iter, embed_mode=sab.coord_ctx_embed_mode,
                grad_mode=sab.softctx_grad_mode, temperature=sab.softctx_temperature,
            )
        _HIDDEN[key] = (batch, fwd.hidden)
    return _HIDDEN[key]


def _channel_b(env, packed: bool):
    key = ("B", packed)
    if key not in _HIDDEN:
        rb = rollout_batch(env, [0, 1, 2, 3], packing=packed)
        with torch.no_grad():
            fwd = rollout_forward(env.model, env.vlm, rb.batch)
        _HIDDEN[key] = (rb.batch, fwd.hidden)
    return _HIDDEN[key]


def _metrics(env, cfg, channel: str, packed: bool) -> dict[str, float]:
    batch, hidden = _channel_a(env, cfg, packed) if channel == "A" else _channel_b(env, packed)
    ctx_channel = None if cfg.variant == "stage2_rollout_aligned" else channel
    decode = cfg.rollout_matching.coord_decode_mode if ctx_channel is None else cfg.stage2_ab.coord_decode_mode
    with torch.no_grad():
        result = run_pipeline(cfg.pipeline, env.ctx(ctx_channel, batch, hidden, decode))
    torch.testing.assert_close(float(result.loss), result.metrics["loss/total"])
    return result.metrics


def _assert_same_losses(a: dict, b: dict) -> None:
    la, lb = loss_metrics(a), loss_metrics(b)
    assert sorted(la) == sorted(lb)
    torch.testing.assert_close(la, lb)


# ------------------------------------------------------------------------------- configs


def test_smoke_configs_are_cpu_runs_on_the_tiny_model(cfgs):
    for name in ("default", "pipeline", "st", "ra"):
        cfg = cfgs[name]
        assert cfg.model.tiny.enabled and cfg.model.name_or_path is None, name
        assert cfg.data.synthetic.enabled and cfg.data.train_jsonl is None, name
        assert cfg.training.max_steps <= 10 and cfg.training.mixed_precision == "no", name
        assert cfg.run.tracker.backend == "none", name
    assert cfgs["ra"].variant == "stage2_rollout_aligned"
    assert {cfgs[n].variant for n in ("default", "pipeline", "st")} == {"stage2_two_channel"}


def test_explicit_pipeline_resolves_to_the_default_manifest(cfgs):
    d, p = cfgs["default"].pipeline, cfgs["pipeline"].pipeline
    assert (d.source, p.source) == ("default", "explicit")
    assert p.identity() == d.identity()
    assert p.checksum == d.checksum
    # Same run apart from the run name and the written pipeline.
    dd, pd = cfgs["default"].to_dict(), cfgs["pipeline"].to_dict()
    for tree in (dd, pd):
        tree["run"].pop("name")
        tree["stage2_ab"].pop("pipeline")
    assert dd == pd


def test_smoke_pipeline_is_written_in_full_without_flat_knobs():
    raw = merge_config_tree(SMOKE_PIPELINE)
    for dotted in FLAT_OBJECTIVE_KNOBS["stage2_two_channel"]:
        node = raw
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        assert node is None, f"{dotted} is a flat objective knob"
    assert "coord_soft_ce_w1" not in raw.get("custom", {})
    pipe = raw["stage2_ab"]["pipeline"]
    entries = pipe["objective"] + pipe["diagnostics"]
    assert [e["name"] for e in pipe["objective"]] == ["token_ce", "bbox_geo", "coord_reg"]
    for entry in entries:
        assert set(entry) >= {"name", "enabled", "channels"}, entry["name"]
        assert set(entry.get("config", {})) == set(get_module(entry["name"]).defaults), entry["name"]


def test_st_config_writes_both_modes_and_changes_only_the_mode_checksum_entries(cfgs):
    text = yaml.safe_load(SMOKE_ST.read_text())["stage2_ab"]
    assert text["coord_ctx_embed_mode"] == "st" and text["coord_decode_mode"] == "st"
    st, d = cfgs["st"].pipeline.identity(), cfgs["default"].pipeline.identity()
    assert st["objective"] == d["objective"] and st["diagnostics"] == d["diagnostics"]
    assert st["extra"] == {**d["extra"], "stage2_ab.coord_decode_mode": "st"}
    assert cfgs["st"].pipeline.checksum != cfgs["default"].pipeline.checksum


def test_desc_weight_half_resolves_the_same_either_way(cfgs):
    hd, hp = cfgs["half_default"].pipeline, cfgs["half_pipeline"].pipeline
    assert hp.checksum == hd.checksum != cfgs["default"].pipeline.checksum
    token_ce = next(m for m in hd.objective if m.name == "token_ce").config
    assert token_ce["desc_ce_weight"] == token_ce["rollout_fn_desc_weight"] == 0.5


# ------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("channel", ["A", "B"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_default_and_explicit_pipelines_give_the_same_losses(env, cfgs, channel, packed):
    md = _metrics(env, cfgs["default"], channel, packed)
    mp = _metrics(env, cfgs["pipeline"], channel, packed)
    _assert_same_losses(md, mp)
    assert md == mp  # diagnostics too
    expected = {"loss/total", "loss/struct_ce", "loss/desc_ce", "loss/geo", "loss/coord_token_ce"}
    if channel == "A":
        expected |= {"loss/struct_ce/gt", "loss/struct_ce/self_context", "loss/coord_reg/soft_ce/self_context"}
    assert expected <= set(md)
    hd = _metrics(env, cfgs["half_default"], channel, packed)
    hp = _metrics(env, cfgs["half_pipeline"], channel, packed)
    _assert_same_losses(hd, hp)


@pytest.mark.parametrize("channel", ["A", "B"])
def test_packing_does_not_change_the_losses(env, cfgs, channel):
    packed = loss_metrics(_metrics(env, cfgs["default"], channel, True))
    unpacked = loss_metrics(_metrics(env, cfgs["default"], channel, False))
    assert sorted(packed) == sorted(unpacked)
    torch.testing.assert_close(packed, unpacked, rtol=1e-4, atol=1e-5)


def test_rollout_batch_has_matched_fp_and_fn_objects(env):
    batch, _ = _channel_b(env, True)
    subsets = [g.subset for g in batch.bbox_groups]
    assert {MATCHED, FN} <= set(subsets) and FP not in subsets  # FP boxes feed no geometry
    desc = batch.token_types == DESC
    for code in (MATCHED, FP, FN):
        assert bool((desc & (batch.subset == code)).any()), code


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_half_desc_weight_scales_fn_desc_tokens_only(env, cfgs, packed):
    batch, hidden = _channel_b(env, packed)
    ce = full_token_ce(hidden[ROLLOUT], env.vlm.get_output_embeddings().weight, batch.input_ids)
    desc = batch.token_types == DESC
    fn_desc = desc & (batch.subset == FN)
    fn_mean = float(ce[fn_desc].mean())
    assert abs(fn_mean - float(ce[desc].mean())) > 1e-4  # matched / FP desc tokens would change it
    for name in ("half_default", "half_pipeline"):
        m = _metrics(env, cfgs[name], "B", packed)
        torch.testing.assert_close(m["loss/desc_ce"], 0.5 * fn_mean, rtol=1e-5, atol=1e-6)
    full = _metrics(env, cfgs["default"], "B", packed)
    half = _metrics(env, cfgs["half_default"], "B", packed)
    torch.testing.assert_close(full["loss/desc_ce"], fn_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(half["loss/total"], full["loss/total"] - 0.5 * fn_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(half["loss/struct_ce"], full["loss/struct_ce"])


def test_half_desc_weight_scales_gt_desc_in_channel_a(env, cfgs):
    batch, hidden = _channel_a(env, cfgs["default"], True)
    ce = full_token_ce(hidden[GT], env.vlm.get_output_embeddings().weight, batch.input_ids)
    gt_mean = float(ce[batch.token_types == DESC].mean())
    full = _metrics(env, cfgs["default"], "A", True)
    for name in ("half_default", "half_pipeline"):
        half = _metrics(env, cfgs[name], "A", True)
        torch.testing.assert_close(half["loss/desc_ce"], 0.5 * gt_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(half["loss/total"], full["loss/total"] - 0.5 * gt_mean, rtol=1e-5, atol=1e-5)


def test_rollout_aligned_shares_the_rollout_objective(env, cfgs):
    """Rollout-Aligned's default manifest on the same rollout batch = Channel-B's: token_ce, bbox_geo and
    the coord gate (the only coord_reg term of both defaults in rollout context)."""
    ra = _metrics(env, cfgs["ra"], "B", True)
    b = _metrics(env, cfgs["default"], "B", True)
    assert ra["loss/coord_reg/coord_gate"] > 0
    for key in ("loss/struct_ce", "loss/desc_ce", "loss/geo", "loss/geo/smoothl1", "loss/geo/ciou",
                "loss/coord_reg", "loss/coord_reg/coord_gate", "loss/total"):
        torch.testing.assert_close(ra[key], b[key], msg=key)


# ------------------------------------------------------------------- end to end (slow)


def _train(config: Path, tmp_path: Path) -> list[dict]:
    import json

    import train_stage2

    sets = [f"run.output_dir={tmp_path / 'runs'}", f"model.tiny.dir={tmp_path / 'tiny'}",
            f"data.synthetic.out_dir={tmp_path / 'shapes'}"]
    train_stage2.main(["--config", str(config), *[x for s in sets for x in ("--set", s)]])
    name = load_config(config).run.name
    lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_smoke_configs_train_and_explicit_pipeline_matches_step_by_step(tmp_path):
    """Every smoke config trains; smoke_default and smoke_pipeline log the same loss/* every step."""
    runs = {p.stem if p.parent == TWO_DIR else "ra": _train(p, tmp_path)
            for p in (SMOKE_DEFAULT, SMOKE_PIPELINE, SMOKE_ST, SMOKE_RA)}
    for name, rows in runs.items():
        cfg = load_config({"ra": SMOKE_RA}.get(name, TWO_DIR / f"{name}.yaml"))
        assert [r["step"] for r in rows] == list(range(1, cfg.training.max_steps + 1)), name
        assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows), name
    # b_ratio 0.5: A, B, A, B; rollout-aligned: every step a rollout.
    assert [r["stage2/channel_b_count"] for r in runs["smoke_default"]] == [0.0, 1.0, 0.0, 1.0]
    assert all("rollout/gt_objects_total" in r for r in runs["ra"])
    for d, p in zip(runs["smoke_default"], runs["smoke_pipeline"], strict=True):
        _assert_same_losses(d, p)
