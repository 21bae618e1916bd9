"""scripts/memory_plan.py (docs/SCALING.md): parameter counts from the dimensions agree with the published
model sizes, and the per-GPU terms follow the documented formulas."""

from __future__ import annotations

import pytest

from scripts.memory_plan import GIB, MODELS, activation_bytes, model_state_bytes, table

# Published totals (model cards / safetensors index): 2.13B, 4.44B, 8.77B parameters.
PUBLISHED = {"Qwen3-VL-2B": 2.13e9, "Qwen3-VL-4B": 4.44e9, "Qwen3-VL-8B": 8.77e9}


@pytest.mark.parametrize("dims", MODELS, ids=lambda d: d.name)
def test_parameter_counts_match_the_published_sizes(dims):
    assert dims.params == pytest.approx(PUBLISHED[dims.name], rel=0.005)


def test_formulas_by_hand_for_the_8b():
    d = next(m for m in MODELS if m.name == "Qwen3-VL-8B")
    p, pt = d.params, d.trainable
    assert pt == p - d.vision_params  # the 8B configs freeze the vision tower
    assert model_state_bytes(d, "DDP", 8) == 2 * p + 8 * pt
    # sharded part divides by the GPU count; the working set does not
    one, eight = model_state_bytes(d, "FSDP2", 1), model_state_bytes(d, "FSDP2", 8)
    assert one - eight == pytest.approx((16 * pt + 2 * (p - pt)) * (1 - 1 / 8))
    # one decoder layer of activations at 8192 tokens: 2 bytes x T x (6H + 4q + 4kv + 4I)
    layer = 2 * 8192 * (6 * 4096 + 4 * 4096 + 4 * 1024 + 4 * 12288)
    head = 2 * 2048 * 151936 * 4
    assert activation_bytes(d, 8192, False) == 36 * layer + head
    assert activation_bytes(d, 8192, True) == 36 * 2 * 8192 * 4096 + layer + head
    assert 75 < model_state_bytes(d, "DDP", 8) / GIB < 80  # what makes 8B a FSDP2 config on 80 GB cards


def test_table_has_every_model_and_engine():
    rows = [line for line in table().splitlines()[2:]]
    assert len(rows) == len(MODELS) * 3
