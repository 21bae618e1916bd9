"""Channel-A Expectation step (``pipeline.forwards.expectation_forward``) on the tiny Qwen3-VL.

What is checked, each against an independent computation:

- N=1 is plain teacher forcing: same hidden states as ``gt_forward`` and the same pipeline losses
  as a Stage-1 pipeline on the ``gt`` forward (self_context == gt);
- the embeddings fed to the language model at every forward (forward pre-hook on
  ``vlm.model.language_model``): coord input slot ``j`` of forward ``m`` holds
  ``E[argmax coord logits of forward m-1 at j-1]`` (hard), ``softmax(s/τ) @ E`` (soft), the hard
  value (st); every other text slot the GT token embedding; image slots the vision features;
- ST vs soft change the self_context losses but not the gt ones; ``em_detach`` keeps the
  forward values and cuts the gradient that reaches the LM-head coord rows through the context
  embeddings (``unroll`` keeps it; ``hard`` has none by construction);
- the vision tower runs once per step for N = 1, 2, 3 (forward hook on ``vlm.model.visual``);
- a packed row gives the same self_context hidden states as its samples alone.

The tests that read the language model's full-row inputs run with ``prefix_reuse=False`` (every
forward sees the whole row); tests/test_prefix_reuse.py shows reuse gives the same hidden states,
losses and gradients.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from configs.pipeline import resolve_pipeline
from core.vocab import COORD, GT, SELF_CONTEXT
from data.packing import collate_rows
from model.forward import compute_vision
from pipeline.executor import run_pipeline
from pipeline.forwards import expectation_forward, gt_forward, rollout_forward
from tests.test_forwards_fixtures import loss_metrics, make_env

TWO = "stage2_two_channel"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def batch(env):
    # Row 0 packs two samples (segments), row 1 holds one and is right-padded.
    return env.batch([[0, 1], [2]])


class LMInputs:
    """Records ``inputs_embeds`` and final hidden states of every language-model call."""

    def __init__(self, vlm):
        lm = vlm.model.language_model
        self.embeds: list[torch.Tensor] = []
        self.hidden: list[torch.Tensor] = []
        self._handles = [
            lm.register_forward_pre_hook(self._pre, with_kwargs=True),
            lm.register_forward_hook(self._post),
        ]

    def _pre(self, module, args, kwargs):
        assert kwargs.get("input_ids") is None, "the language model is always fed inputs_embeds"
        self.embeds.append(kwargs["inputs_embeds"].detach().clone())

    def _post(self, module, args, output):
        self.hidden.append(output.last_hidden_state.detach().clone())

    def close(self):
        for h in self._handles:
            h.remove()


class CallCounter:
    def __init__(self, module):
        self.calls = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1

    def close(self):
        self._handle.remove()


def _coord_slots(batch):
    """(rows, cols) of coord input slots and the mask of plain text slots (not coord, not image)."""
    coord = batch.token_types == COORD
    image = batch.mm_token_type_ids == 1
    rows, cols = coord.nonzero(as_tuple=True)
    return rows, cols, ~(coord | image), image


def _coord_logits_at(hidden, rows, cols, vlm, coord_ids):
    """Coord logits ``[N, 1000]`` read at ``(row, col - 1)``, by brute force from the LM head rows."""
    w = vlm.get_output_embeddings().weight.detach()[coord_ids]
    return hidden[rows, cols - 1] @ w.T


# --------------------------------------------------------------------------------- N = 1


def test_n1_is_plain_teacher_forcing(env, batch):
    with torch.no_grad():
        gt = gt_forward(env.model, env.vlm, batch)
        ex = expectation_forward(env.model, env.vlm, batch, env.coord_ids, n_iter=1)
    assert ex.num_forwards == 1 and set(ex.hidden) == {GT, SELF_CONTEXT}
    torch.testing.assert_close(ex.hidden[GT], gt.hidden[GT], rtol=0, atol=0)
    torch.testing.assert_close(ex.hidden[SELF_CONTEXT], gt.hidden[GT], rtol=0, atol=0)

    resolved_a = resolve_pipeline({}, TWO)  # default manifest: self_context soft_ce 0.05, struct stabiliser 0.1
    with torch.no_grad():
        a = run_pipeline(resolved_a, env.ctx("A", batch, ex.hidden))
        # Channel-A context filled from the plain gt forward: identical losses.
        a_gt = run_pipeline(resolved_a, env.ctx("A", batch, {GT: gt.hidden[GT], SELF_CONTEXT: gt.hidden[GT]}))
    assert loss_metrics(a.metrics) == loss_metrics(a_gt.metrics)

    # Independent reference: a Stage-1 pipeline on the gt forward with the same terms.
    s1_reg = {"coord_ce_weight": 0.0, "coord_gate_weight": 1.0}  # the Stage-2 default gate runs on gt
    s1_reg["soft_ce_weight"] = 0.05
    resolved_s1 = resolve_pipeline(
        {"stage1": {"pipeline": {"objective": [
            {"name": "token_ce"}, {"name": "bbox_geo"}, {"name": "coord_reg", "config": s1_reg}]}}},
        "stage1",
    )
    with torch.no_grad():
        s1 = run_pipeline(resolved_s1, env.ctx(None, batch, gt.hidden)).metrics
    m = a.metrics
    close = torch.testing.assert_close
    for key_a, key_s1 in (
        ("loss/struct_ce/gt", "loss/struct_ce"),
        ("loss/struct_ce/self_context", "loss/struct_ce"),
        ("loss/desc_ce", "loss/desc_ce"),
        ("loss/geo", "loss/geo"),
        ("loss/geo/smoothl1", "loss/geo/smoothl1"),
        ("loss/geo/ciou", "loss/geo/ciou"),
        ("loss/coord_token_ce", "loss/coord_token_ce"),
        ("loss/coord_reg/soft_ce/self_context", "loss/coord_reg/soft_ce"),
        ("loss/coord_reg", "loss/coord_reg"),
    ):
        close(m[key_a], s1[key_s1], rtol=1e-6, atol=1e-7, msg=f"{key_a} vs stage1 {key_s1}")
    close(m["loss/struct_ce"], 1.1 * s1["loss/struct_ce"], rtol=1e-6, atol=1e-7)
    close(m["loss/total"], s1["loss/total"] + 0.1 * s1["loss/struct_ce"], rtol=1e-6, atol=1e-7)
    close(float(a.loss), m["loss/total"], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------- what the LM is fed


@pytest.mark.parametrize("n_iter", [2, 3])
def test_hard_mode_feeds_argmax_embeddings(env, batch, n_iter):
    E = env.vlm.get_input_embeddings().weight.detach()
    rows, cols, text, image = _coord_slots(batch)
    cap = LMInputs(env.vlm)
    try:
        with torch.no_grad():
            ex = expectation_forward(env.model, env.vlm, batch, env.coord_ids, n_iter=n_iter, embed_mode="hard",
                                     prefix_reuse=False)
            vision = compute_vision(env.vlm, batch.pixel_values, batch.image_grid_thw)
    finally:
        cap.close()
    assert ex.num_forwards == n_iter and len(cap.embeds) == n_iter
    torch.testing.assert_close(cap.hidden[0], ex.hidden[GT], rtol=0, atol=0)
    torch.testing.assert_close(cap.hidden[-1], ex.hidden[SELF_CONTEXT], rtol=0, atol=0)

    gt_embeds = E[batch.input_ids]
    image_features = torch.cat(list(vision.pooler_output))
    assert rows.numel() == 4 * len(batch.bbox_groups) > 0
    for m, fed in enumerate(cap.embeds):
        # Text / struct / padding slots: the GT token embedding, in every forward.
        torch.testing.assert_close(fed[text], gt_embeds[text], rtol=0, atol=0)
        # Image slots: the vision features of the one vision run.
        torch.testing.assert_close(fed[image], image_features, rtol=0, atol=1e-6)
        if m == 0:
            torch.testing.assert_close(fed[rows, cols], gt_embeds[rows, cols], rtol=0, atol=0)
            continue
        argmax = _coord_logits_at(cap.hidden[m - 1], rows, cols, env.vlm, env.coord_ids).argmax(dim=-1)
        torch.testing.assert_close(fed[rows, cols], E[env.coord_ids[argmax]], rtol=0, atol=0)
        # The random model's beliefs differ from GT somewhere, so the check is not vacuous.
        assert (env.coord_ids[argmax] != batch.input_ids[rows, cols]).any()


def test_soft_and_st_embeddings(env, batch):
    E = env.vlm.get_input_embeddings().weight.detach()
    rows, cols, text, _ = _coord_slots(batch)
    tau = 0.7
    fed = {}
    for mode in ("soft", "st", "hard"):
        cap = LMInputs(env.vlm)
        try:
            with torch.no_grad():
                expectation_forward(env.model, env.vlm, batch, env.coord_ids, n_iter=2, embed_mode=mode, temperature=tau,
                                    prefix_reuse=False)
        finally:
            cap.close()
        fed[mode] = cap.embeds[1]
        first_hidden = cap.hidden[0]
    logits = _coord_logits_at(first_hidden, rows, cols, env.vlm, env.coord_ids)
    soft = torch.softmax(logits / tau, dim=-1) @ E[env.coord_ids]
    torch.testing.assert_close(fed["soft"][rows, cols], soft, rtol=1e-5, atol=1e-6)
    # ST: forward value is the hard embedding (the soft part only carries the gradient).
    torch.testing.assert_close(fed["st"], fed["hard"], rtol=0, atol=1e-7)
    assert not torch.allclose(fed["soft"][rows, cols], fed["hard"][rows, cols], atol=1e-4)
    torch.testing.assert_close(fed["soft"][text], fed["hard"][text], rtol=0, atol=0)


# ----------------------------------------------------------------------- losses and grads


def _channel_a(env, batch, resolved, **modes):
    fwd = expectation_forward(env.model, env.vlm, batch, env.coord_ids, n_iter=2, **modes)
    return fwd, run_pipeline(resolved, env.ctx("A", batch, fwd.hidden))


def test_st_and_soft_give_different_self_context_losses(env, batch):
    resolved = resolve_pipeline({}, TWO)
    with torch.no_grad():
        _, st = _channel_a(env, batch, resolved, embed_mode="st")
        _, soft = _channel_a(env, batch, resolved, embed_mode="soft")
        _, st_detach = _channel_a(env, batch, resolved, embed_mode="st", grad_mode="em_detach")
    st, soft = st.metrics, soft.metrics
    for key in ("loss/struct_ce/self_context", "loss/geo", "loss/coord_reg/soft_ce/self_context", "loss/total"):
        assert abs(st[key] - soft[key]) > 1e-5, key
    # The gt forward is the same in both: its losses do not move.
    for key in ("loss/struct_ce/gt", "loss/desc_ce", "loss/coord_token_ce"):
        assert st[key] == soft[key], key
    # em_detach changes gradients only, never the forward values.
    assert loss_metrics(st_detach.metrics) == loss_metrics(st)


def test_untied_tiny_model(env):
    assert env.vlm.config.tie_word_embeddings is False
    assert env.vlm.config.text_config.tie_word_embeddings is False
    w_in, w_out = env.vlm.get_input_embeddings().weight, env.vlm.get_output_embeddings().weight
    assert w_in.data_ptr() != w_out.data_ptr() and not torch.equal(w_in, w_out)


def _geo_only():
    # Loss only from self_context: bbox_geo reads self_context coord logits in Channel-A.
    return resolve_pipeline({"stage2_ab": {"pipeline": {"objective": [{"name": "bbox_geo"}]}}}, TWO)


def _lm_head_grad(env, batch, *, embed_mode, grad_mode, detach_hidden=False):
    """Grad of the geo-only loss on the LM head; ``detach_hidden`` keeps only the final projection path."""
    env.vlm.zero_grad(set_to_none=True)
    fwd = expectation_forward(env.model, env.vlm, batch, env.coord_ids, n_iter=2,
                              embed_mode=embed_mode, grad_mode=grad_mode)
    hidden = {k: v.detach() for k, v in fwd.hidden.items()} if detach_hidden else fwd.hidden
    res = run_pipeline(_geo_only(), env.ctx("A", batch, hidden))
    res.loss.backward()
    grad = env.vlm.get_output_embeddings().weight.grad.detach().clone()
    env.vlm.zero_grad(set_to_none=True)
    return grad, float(res.loss.detach())


def test_unroll_sends_gradient_through_context_embeddings_em_detach_does_not(env):
    batch = env.batch([[1], [3]])  # two short samples (one box each): 9 forward+backward passes below
    coord = env.coord_ids
    non_coord = torch.ones(env.vlm.get_output_embeddings().weight.shape[0], dtype=torch.bool)
    non_coord[coord] = False
    # Direct path only: the final projection of (detached) self_context hidden states.
    direct = {m: _lm_head_grad(env, batch, embed_mode=m, grad_mode="unroll", detach_hidden=True)
              for m in ("st", "soft", "hard")}
    grads = {
        (m, g): _lm_head_grad(env, batch, embed_mode=m, grad_mode=g)
        for m in ("st", "soft", "hard") for g in ("unroll", "em_detach")
    }
    for (m, g), (grad, loss) in grads.items():
        assert loss == direct[m][1], (m, g)
        # Only coord rows of the LM head receive gradient from a coord-only loss.
        assert torch.count_nonzero(grad[non_coord]) == 0, (m, g)
        assert grad[coord].abs().sum() > 0, (m, g)

    def through_embeddings(m, g):
        return grads[(m, g)][0][coord] - direct[m][0][coord]

    scale = direct["st"][0][coord].norm()
    for m in ("st", "soft"):
        # unroll: forward 0's coord distribution builds the context embeddings -> extra gradient
        # (~3e-3 of the direct one for st, ~4e-2 for soft on this near-uniform random model; fp32
        # noise is ~1e-7).
        assert through_embeddings(m, "unroll").norm() > 1e-4 * scale, m
        # em_detach: that distribution is detached -> exactly the direct-path gradient.
        torch.testing.assert_close(grads[(m, "em_detach")][0], direct[m][0], rtol=1e-5, atol=1e-9)
    # hard: argmax has no gradient, so unroll adds nothing either.
    torch.testing.assert_close(grads[("hard", "unroll")][0], direct["hard"][0], rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------ vision once


@pytest.mark.parametrize("n_iter", [1, 2, 3])
def test_vision_tower_runs_once_per_step(env, batch, n_iter):
    visual = CallCounter(env.vlm.model.visual)
    lm = CallCounter(env.vlm.model.language_model)
    try:
        with torch.no_grad():
            ex = expectation_forward(env.model, env.vlm, batch, env.coord_ids, n_iter=n_iter)
    finally:
        visual.close()
        lm.close()
    assert (visual.calls, lm.calls, ex.num_forwards) == (1, n_iter, n_iter)


def test_gt_and_rollout_forward_run_vision_once(env, batch):
    for fn in (gt_forward, rollout_forward):
        visual = CallCounter(env.vlm.model.visual)
        try:
            with torch.no_grad():
                out = fn(env.model, env.vlm, batch)
        finally:
            visual.close()
        assert visual.calls == 1 and out.num_forwards == 1
    with pytest.raises(ValueError, match="gt_forward fills context"):
        gt_forward(env.model, env.vlm, batch, context=SELF_CONTEXT)


# ------------------------------------------------------------------------ packing, errors


def test_sample_without_objects_runs_all_forwards(env):
    """No coord slot to replace: still N forwards (DDP ranks must call the model equally often),
    and self_context equals gt."""
    record = dataclasses.replace(env.records[1], objects=())
    batch = collate_rows([[env.encoder.encode(record)]], env.pad_id)
    assert not bool((batch.token_types == COORD).any())
    lm = CallCounter(env.vlm.model.language_model)
    try:
        with torch.no_grad():
            ex = expectation_forward(env.model, env.vlm, batch, env.coord_ids, n_iter=2)
    finally:
        lm.close()
    assert lm.calls == ex.num_forwards == 2
    torch.testing.assert_close(ex.hidden[SELF_CONTEXT], ex.hidden[GT], rtol=0, atol=1e-6)


def test_packed_row_matches_samples_alone(env):
    packed = env.batch([[0, 1]])
    alone = env.batch([[0], [1]])
    with torch.no_grad():
        hp = expectation_forward(env.model, env.vlm, packed, env.coord_ids, n_iter=2).hidden[SELF_CONTEXT]
        ha = expectation_forward(env.model, env.vlm, alone, env.coord_ids, n_iter=2).hidden[SELF_CONTEXT]
    n0, n1 = len(env.samples[0]), len(env.samples[1])
    torch.testing.assert_close(hp[0, :n0], ha[0, :n0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hp[0, n0 : n0 + n1], ha[1, :n1], rtol=1e-4, atol=1e-5)


def test_a_mistyped_grad_mode_raises_instead_of_unrolling(env, batch):
    """Loaded configs are checked at load; a caller in code that mistypes the mode gets an error, not a
    silent default (the embed mode raises in losses.coord.context_embeddings the same way)."""
    with pytest.raises(ValueError, match=r"stage2_ab\.softctx_grad_mode"):
        expectation_forward(env.model, env.vlm, batch, env.coord_ids, grad_mode="detach")
    with pytest.raises(ValueError, match="argmax"):
        expectation_forward(env.model, env.vlm, batch, env.coord_ids, embed_mode="argmax")
