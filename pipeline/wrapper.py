"""TrainingWrapper: the one module ``accelerator.prepare`` wraps; one call is one micro-step's loss.

Its forward runs the forward preamble (position ids, vision once), the step's forwards
(``gt``: one teacher-forced forward; ``expectation``: Channel-A's N forwards; ``rollout``: the
Channel-B / Rollout-Aligned forward on a rollout-built batch), builds the
:class:`~pipeline.context.TeacherForcingContext` and runs the objective pipeline (its one
:class:`~pipeline.executor.PipelineExecutor`), whose modules
project hidden states through the LM head / coord rows. Everything that reads a weight therefore
happens inside this one forward, which is what sharded engines need: FSDP2 gathers the root's
parameters (embedding table, LM head, final norm) for the length of the root forward and each
decoder layer's inside that layer's forward. DDP sees every parameter used in one forward.

The context and the modules stay pure (tensors in, loss and metrics out); this wrapper only wires
them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from configs.pipeline import ResolvedPipeline
from data.types import PackedBatch
from model.forward import HiddenStatesModel
from pipeline.context import TeacherForcingContext
from pipeline.executor import PipelineExecutor
from pipeline.forwards import ExpectationConfig, expectation_forward, gt_forward, rollout_forward

STRATEGY_GT = "gt"  # Stage-1: the gt context
STRATEGY_EXPECTATION = "expectation"  # Stage-2 Channel-A: gt + self_context
STRATEGY_ROLLOUT = "rollout"  # Stage-2 Channel-B / Rollout-Aligned: the rollout context
STRATEGIES = (STRATEGY_GT, STRATEGY_EXPECTATION, STRATEGY_ROLLOUT)


class StepOutput(NamedTuple):
    """loss: scalar to back-propagate; metrics: key -> float of this micro-step; num_forwards: model forwards run;
    suffix_forwards: how many of them ran only the suffixes (Channel-A prefix reuse).

    A NamedTuple rather than a dataclass on purpose: it is the prepared module's output, and the
    engines find the output tensors to hook their backward on by walking tuples and dicts
    (DeepSpeed ZeRO-3 re-gathers the wrapper's parameters, the LM head included, from that hook);
    a dataclass would hide the loss from them.
    """

    loss: torch.Tensor
    metrics: dict[str, float]
    num_forwards: int
    suffix_forwards: int = 0


class TrainingWrapper(torch.nn.Module):
    """``forward(batch, strategy, channel) -> StepOutput``; ``.vlm`` is the Qwen3-VL model (state-dict prefix ``vlm.``).

    ``coord_token_ids`` ``[1000]`` long, on the training device; kept as a plain attribute (not a
    buffer) so it is never sharded, cast or saved. ``coord_decode_mode`` is the geometry decode
    (``stage2_ab.coord_decode_mode`` / ``rollout_matching.coord_decode_mode``; "exp" in Stage-1).

    The wrapper deliberately has no ``get_input_embeddings`` / ``get_output_embeddings``: accelerate's
    FSDP2 preparation would then put the embedding table and LM head in FSDP units of their own,
    gathered only when those modules' forwards run, while the losses read the LM head's weight
    directly. Without them they stay in the root unit, gathered for the whole forward.
    """

    def __init__(self, vlm, pipeline: ResolvedPipeline, coord_token_ids: torch.Tensor, *,
                 coord_decode_mode: str = "exp", expectation: ExpectationConfig | None = None):
        super().__init__()
        self.vlm = vlm
        self.pipeline = pipeline
        # The run's one executor: which diagnostics failed lives here, not in the process.
        self.executor = PipelineExecutor(pipeline)
        self.coord_token_ids = coord_token_ids
        self.coord_decode_mode = coord_decode_mode
        self.expectation = expectation or ExpectationConfig()
        self.prefix_reuse_warned: set[str] = set()  # reasons a prefix-reuse fallback was logged for, this run

    def forward(self, batch: PackedBatch, strategy: str = STRATEGY_GT, channel: str | None = None) -> StepOutput:
        """One micro-step: forwards of ``strategy`` on ``batch`` (``[B, T]`` on the model's device), then the
        objective pipeline with ``channel`` ("A" / "B" in Stage-2 Two-Channel, None otherwise)."""
        hidden_model = HiddenStatesModel(self.vlm)  # returns hidden states; a view, owns no parameters
        if strategy == STRATEGY_GT:
            fwd = gt_forward(hidden_model, self.vlm, batch)
        elif strategy == STRATEGY_ROLLOUT:
            fwd = rollout_forward(hidden_model, self.vlm, batch)
        elif strategy == STRATEGY_EXPECTATION:
            e = self.expectation
            fwd = expectation_forward(hidden_model, self.vlm, batch, self.coord_token_ids, n_iter=e.n_iter,
                                      embed_mode=e.embed_mode, grad_mode=e.grad_mode, temperature=e.temperature,
                                      prefix_reuse=e.prefix_reuse, prefix_reuse_warned=self.prefix_reuse_warned)
        else:
            raise ValueError(f"TrainingWrapper strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        ctx = TeacherForcingContext(channel=channel, batch=batch, hidden=fwd.hidden,
                                    lm_head_weight=self.vlm.get_output_embeddings().weight,
                                    coord_token_ids=self.coord_token_ids, coord_decode_mode=self.coord_decode_mode)
        result = self.executor.run(ctx)
        return StepOutput(loss=result.loss, metrics=result.metrics, num_forwards=fwd.num_forwards,
                          suffix_forwards=fwd.suffix_forwards)


__all__ = ["ExpectationConfig", "STRATEGIES", "StepOutput", "TrainingWrapper"]
