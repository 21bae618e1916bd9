"""Stage-2's default objective keeps coord slots' mass on the coord tokens (the guard metric
``coord_diag/coord_mass_mean`` of docs/training/STAGE2_RUNBOOK.md, "Guard metrics").

Fast proxy of "Stage-2 does not break the format": a few Expectation (Channel-A) steps from the
tiny model at lr 5e-4 (10x the shipped Stage-2 demo's 5e-5, so that the mass moves measurably in
6 steps). With the default objective the coord mass never falls
below its first value and rises; with the coord gate off (the old default) it barely moves. The
end-to-end check (Stage-2 on the demo keeps the eval parse-valid rate at Stage-1's) is the slow
``tests/test_recipe_slow.py::test_demo_configs_end_to_end``.
"""

from __future__ import annotations

import pytest

import train_stage2
from tests._recipe_helpers import STAGE2_DEMO, read_rows, recipe_argv

STEPS = 6


def _coord_mass(recipe_env, tmp_path, name, **sets) -> list[float]:
    argv = recipe_argv(recipe_env, STAGE2_DEMO, tmp_path, name=name, max_steps=STEPS,
                       stage2_ab__schedule__b_ratio=0.0, training__eval_every=0, training__save_every=0,
                       training__lr=5e-4, **sets)
    train_stage2.main(argv)
    return [row["coord_diag/coord_mass_mean"] for row in read_rows(tmp_path / name)]


@pytest.fixture(scope="module")
def runs(recipe_env, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guard")
    return {"default": _coord_mass(recipe_env, tmp, "default"),
            "gate_off": _coord_mass(recipe_env, tmp, "gate_off", stage2_ab__coord_gate_weight=0.0)}


def test_default_stage2_keeps_coord_mass(runs):
    mass = runs["default"]
    assert len(mass) == STEPS
    assert min(mass) >= mass[0] - 1e-6, f"coord mass fell under the default Stage-2 objective: {mass}"


def test_coord_gate_is_what_holds_the_mass(runs):
    on, off = runs["default"], runs["gate_off"]
    assert on[0] == pytest.approx(off[0])  # same model, same first batch
    gain_on, gain_off = on[-1] - on[0], off[-1] - off[0]
    # measured: +0.010 with the gate, +0.001 without (nothing else pushes mass onto coord tokens)
    assert gain_on > 0.005 and gain_on > 3 * gain_off, f"gate on {on} vs off {off}"
