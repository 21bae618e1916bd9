"""What the recipes do differently under sharded engines (FSDP2, DeepSpeed ZeRO); see docs/SCALING.md.

The engine is chosen by the accelerate launch config (``configs/accelerate/*.yaml``), never by the
CoordExp config. Three places care:

- start-up (:func:`prepare_cpu_sharding`): accelerate only selects FSDP on an accelerator device;
  multi-process CPU runs (the tests) are made to take the same FSDP code path over gloo;
- generation (:func:`full_weights`): rollouts and in-loop eval call ``generate`` on the unwrapped
  Qwen3-VL, outside the prepared module's forward, where sharded weights are not materialised;
  the weights are gathered once for the whole generate call and released after it;
- checkpoints (:func:`is_sharded`): optimizer state lives in shards, so the training state goes
  through ``accelerator.save_state`` / ``load_state`` (the engine's own sharded format).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

ENGINE_ENV = {"fsdp": "ACCELERATE_USE_FSDP", "deepspeed": "ACCELERATE_USE_DEEPSPEED"}


def requested_engine() -> str | None:
    """"fsdp" / "deepspeed" when ``accelerate launch`` was given such a config (its env vars), else None."""
    for engine, var in ENGINE_ENV.items():
        if os.environ.get(var, "false").lower() == "true":
            return engine
    return None


def prepare_cpu_sharding(init_kwargs: dict | None = None) -> bool:
    """Let a multi-process CPU run (gloo) use accelerate's FSDP / DeepSpeed path; returns the ``cpu``
    flag to build ``Accelerator`` with.

    accelerate turns ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED`` into
    ``DistributedType.FSDP`` / ``DEEPSPEED`` only off CPU; on CPU it silently falls back to plain
    multi-process DDP (``MULTI_CPU``), so a sharded launch config would be ignored. The process
    group is set up here first (gloo, device cpu); FSDP is then presented to accelerate's
    accelerator-device branch, which builds the FSDP2 plugin from the launch config as it does on
    GPUs (``fully_shard`` runs on CPU tensors over gloo), and DeepSpeed gets an ``Accelerator`` built
    without ``cpu=True`` (DeepSpeed then runs on its own CPU accelerator, where it has one).
    ``init_kwargs``: ``init_process_group`` arguments (``InitProcessGroupKwargs.to_kwargs()``, e.g. the
    collective timeout).
    """
    engine = requested_engine()
    if engine is None:
        return True
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True, **(init_kwargs or {}))
    if engine == "deepspeed":
        return False
    if state.distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    return True


def configure_engine(accelerator: Any, micro_batch_size: int) -> None:
    """Engine settings that depend on the run, before ``accelerator.prepare``.

    DeepSpeed needs ``train_micro_batch_size_per_gpu`` (accelerate reads it from a prepared
    dataloader, and the recipes have none): one micro-batch is ``training.batch_size`` packed rows.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds.get("train_micro_batch_size_per_gpu") in (None, "auto"):
            ds["train_micro_batch_size_per_gpu"] = int(micro_batch_size)


def register_direct_weights(accelerator: Any, wrapper: Any) -> None:
    """ZeRO-3: gather the LM head for the whole wrapped forward (after ``accelerator.prepare``).

    ZeRO-3 gathers a module's parameters around that module's own forward; the losses read the
    LM head's weight directly inside ``TrainingWrapper.forward`` without calling the head, so it is
    registered as an external parameter of the wrapper. (The embedding table is only used through
    its module's forward.)
    """
    weight = wrapper.vlm.get_output_embeddings().weight
    if hasattr(weight, "ds_id"):
        import deepspeed

        deepspeed.zero.register_external_parameter(wrapper, weight)


def is_sharded(accelerator: Any) -> bool:
    """True under FSDP or DeepSpeed: parameters and/or optimizer state are split across ranks."""
    from accelerate.utils import DistributedType

    return getattr(accelerator, "distributed_type", None) in (DistributedType.FSDP, DistributedType.DEEPSPEED)


@contextlib.contextmanager
def full_weights(model: Any) -> Iterator[None]:
    """Materialise every weight of the prepared ``model`` once for the block (a ``generate`` call).

    - FSDP2: every FSDP unit is all-gathered once and kept gathered across the generate loop's
      forwards (their reshard-after-forward is switched off for the block, then restored), and
      resharded at the end. Costs one full copy of the weights in ``param_dtype`` for the block.
    - DeepSpeed ZeRO-3: ``deepspeed.zero.GatheredParameters`` over all parameters (read-only), with the
      engine's ZeRO-3 module hooks removed for the block and restored after it (DeepSpeed's own
      ``unwrap_model_for_generation``), so the generate loop runs no collectives and ranks may
      generate different amounts.
    - DDP / single process / ZeRO-1/2: nothing to do.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if units:
        with _fsdp2_gathered(model, units):
            yield
        return
    zero3 = [p for p in model.parameters() if hasattr(p, "ds_status")]
    if zero3:
        import deepspeed

        if getattr(model, "optimizer", None) is not None and hasattr(model, "zero_optimization_stage"):
            # The DeepSpeed engine: gather once AND lift ZeRO-3's module hooks for the block. With the
            # hooks left on, each forward of the generate loop re-partitions and re-gathers the
            # weights: a collective per forward, which deadlocks as soon as ranks generate different
            # numbers of tokens or batches (the eval split gives them different record counts).
            from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

            with unwrap_model_for_generation(model):
                yield
            return
        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            yield
        return
    yield


@contextlib.contextmanager
def _fsdp2_gathered(root, units) -> Iterator[None]:
    # A root that has not run a forward yet (a Rollout step before any training forward) must be
    # made the root now; otherwise the first decoder layer to run would claim to be the root.
    root._get_fsdp_state()._lazy_init()
    groups = [g for unit in units for g in unit._get_fsdp_state()._fsdp_param_groups]
    saved = [g.post_forward_mesh_info for g in groups]
    for unit in units:
        unit.unshard()
    for g in groups:
        g.post_forward_mesh_info = None  # no reshard after each forward of the generate loop
    try:
        yield
    finally:
        for g, info in zip(groups, saved):
            g.post_forward_mesh_info = info
        for unit in units:
            unit.reshard()
