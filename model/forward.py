"""Shared forward preamble for Stage-1 and both Stage-2 forwards: packed position ids, vision once,
hidden states (never full-vocabulary logits).

Packing is exact: a packed row gives the same per-token hidden states as its samples run
alone, because we pass 4-row position ids — row 0 = text positions restarting at 0 per segment (the
attention-mask builder turns the restarts into a block-diagonal causal mask), rows 1-3 = each
segment's own multimodal (t, h, w) rope positions — with ``attention_mask=None`` and no cache.
"""

from __future__ import annotations

import itertools

import torch

from data.types import PackedBatch
from model import packed_attention


def unwrap_vlm(model):
    """The ``Qwen3VLForConditionalGeneration`` inside ``model`` (DDP ``.module`` and any ``.vlm`` holder unwrapped:
    ``HiddenStatesModel``, ``pipeline.wrapper.TrainingWrapper``)."""
    seen = 0
    while seen < 8:
        if isinstance(model, HiddenStatesModel) or isinstance(getattr(model, "vlm", None), torch.nn.Module):
            model = model.vlm
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model
        seen += 1
    return model


def _image_runs(mm_token_type_ids: torch.Tensor) -> int:
    """Number of contiguous runs of image tokens (value 1) in a 1-D type tensor: one run per image."""
    return sum(1 for key, _ in itertools.groupby(mm_token_type_ids.tolist()) if key == 1)


def position_ids_for_batch(vlm, batch: PackedBatch) -> torch.Tensor:
    """LongTensor ``[4, B, T]`` of position ids for a packed batch.

    Row 0 is ``batch.text_position_ids``; rows 1-3 are ``get_rope_index`` of each segment alone (its
    slice of ``input_ids`` / ``mm_token_type_ids`` and its own ``image_grid_thw`` rows, which are
    consumed in row-major segment order). Padding positions continue each row's last position + 1, ...
    (they attend only to themselves and earlier tokens and are never read).

    Computed on the CPU whatever the batch's device: the per-segment loop reads values back
    (image runs, the last rope position), which on a GPU would be several host<->device syncs
    per segment; here it is one copy of the index tensors to the host and one back.
    """
    core = unwrap_vlm(vlm).model
    device = batch.input_ids.device
    input_ids, mm = batch.input_ids.cpu(), batch.mm_token_type_ids.cpu()
    bsz, seq = input_ids.shape
    pos = torch.zeros(4, bsz, seq, dtype=torch.long)
    pos[0] = batch.text_position_ids.cpu()
    grids = None if batch.image_grid_thw is None else batch.image_grid_thw.cpu()
    n_grids = 0 if grids is None else int(grids.shape[0])
    used = 0
    last = [-1] * bsz
    end = [0] * bsz
    for seg in sorted(batch.segments, key=lambda s: (s.row, s.start)):
        sl = slice(seg.start, seg.start + seg.length)
        seg_ids = input_ids[seg.row, sl].unsqueeze(0)
        seg_mm = mm[seg.row, sl].unsqueeze(0)
        n_img = _image_runs(seg_mm[0])
        if used + n_img > n_grids:
            raise ValueError(
                f"segment {seg} has {n_img} image runs but only {n_grids - used} image_grid_thw rows are left; "
                "PackedBatch.image_grid_thw must list every segment's images in row-major segment order"
            )
        seg_grid = grids[used : used + n_img] if n_img else None
        used += n_img
        rope, _ = core.get_rope_index(seg_ids, mm_token_type_ids=seg_mm, image_grid_thw=seg_grid)
        pos[1:, seg.row, sl] = rope[:, 0]
        last[seg.row] = max(last[seg.row], int(rope.max()))
        end[seg.row] = max(end[seg.row], seg.start + seg.length)
    if used != n_grids:
        raise ValueError(f"PackedBatch has {n_grids} image_grid_thw rows but its segments hold {used} images")
    for row in range(bsz):
        if end[row] < seq:
            pad = torch.arange(seq - end[row]) + last[row] + 1
            pos[1:, row, end[row] :] = pad
    return pos.to(device)


def compute_vision(vlm, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor):
    """Run the vision tower once; pass the result as ``vision=`` (``mm_encoder_outputs={"image": enc}``) to reuse it.

    ``pixel_values`` ``[P, D]`` flattened patches, ``image_grid_thw`` ``[N_img, 3]``. Gradients flow
    through the result when the vision tower is trainable.
    """
    core = unwrap_vlm(vlm).model
    return core.get_image_features(pixel_values, image_grid_thw, return_dict=True)


def embed_tokens(vlm, input_ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings ``[B, T, H]`` of ``input_ids`` ``[B, T]`` (image pads stay pad embeddings)."""
    return unwrap_vlm(vlm).get_input_embeddings()(input_ids)


class HiddenStatesModel(torch.nn.Module):
    """Training-time wrapper returning final normed hidden states, never logits.

    The forward strategies (``pipeline/forwards.py``) call it inside ``pipeline.wrapper.TrainingWrapper``'s
    forward (what the trainer hands to ``accelerator.prepare``); generation and ``save_pretrained`` use
    ``.vlm`` (the ``Qwen3VLForConditionalGeneration``).
    """

    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """LM head weight ``[V_rows, H]`` (rows >= tokenizer size are unused padding rows)."""
        return self.vlm.get_output_embeddings().weight

    @property
    def input_embeddings(self) -> torch.nn.Embedding:
        return self.vlm.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        vision=None,
        prefix=None,
    ) -> torch.Tensor:
        """Final normed hidden states ``[B, T, H]``.

        Give exactly one of ``input_ids`` ``[B, T]`` / ``inputs_embeds`` ``[B, T, H]`` (the latter must keep
        the ``<|image_pad|>`` embedding at image positions: that is how image slots are found).
        ``position_ids`` ``[4, B, T]`` from ``position_ids_for_batch`` (required: 3-D rope cannot be
        recovered from a packed row). Give ``pixel_values`` to run the vision tower here, or ``vision``
        (from ``compute_vision``) to reuse one run; not both.

        ``prefix`` (a ``model.prefix_reuse.PrefixReuse``): run only the language model on
        ``inputs_embeds`` ``[B, S, H]`` (the suffix positions of a Channel-A forward 2..N, position ids
        ``[4, B, S]``) against forward 1's recorded keys/values; returns ``[B, S, H]``. It runs here so
        that it is inside this module's forward like every other forward (autocast and output
        conversion of a prepared model, DDP).
        """
        if prefix is not None:
            if input_ids is not None or inputs_embeds is None or pixel_values is not None or vision is not None:
                raise ValueError("a prefix-reuse forward takes inputs_embeds only (no input_ids, pixel_values, vision)")
            return prefix.decode(self.vlm, inputs_embeds, position_ids)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("HiddenStatesModel.forward needs exactly one of input_ids / inputs_embeds")
        if position_ids is None or position_ids.dim() != 3 or position_ids.shape[0] != 4:
            got = None if position_ids is None else tuple(position_ids.shape)
            raise ValueError(
                f"position_ids must be [4, B, T] from model.forward.position_ids_for_batch (got {got}); "
                "3-row positions let packed segments attend to each other"
            )
        if pixel_values is not None and vision is not None:
            raise ValueError("pass either pixel_values or vision (precomputed by compute_vision), not both")
        if pixel_values is not None and pixel_values.numel() == 0:
            # collate_rows gives an empty tensor for text-only batches
            pixel_values, image_grid_thw = None, None
        kwargs = {}
        if self.vlm.model.language_model.config._attn_implementation == packed_attention.NAME:
            # the samples of each packed row, found once here for every decoder layer (one host copy)
            kwargs[packed_attention.SEGMENTS_KWARG] = packed_attention.packed_segments(position_ids[0])
        if vision is not None:
            # A fresh dict each call: the library writes into the one it is given.
            kwargs["mm_encoder_outputs"] = {"image": vision}
        out = self.vlm.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=None,
            mm_token_type_ids=mm_token_type_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            use_cache=False,
            **kwargs,
        )
        return out.last_hidden_state


def _hidden_states_model(model):
    """``model`` if it is a (possibly accelerate/DDP-wrapped) ``HiddenStatesModel``, else one over its Qwen3-VL."""
    inner = model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model
    return model if isinstance(inner, HiddenStatesModel) else HiddenStatesModel(unwrap_vlm(model))


def hidden_states(
    model,
    batch: PackedBatch,
    inputs_embeds: torch.Tensor | None = None,
    vision=None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final hidden states ``[B, T, H]`` of a packed batch: the one-call form of the preamble.

    ``model`` is the (possibly accelerate/DDP-wrapped) ``HiddenStatesModel``, called through its
    wrapper so DDP sees the forward; a bare Qwen3-VL is wrapped on the fly. ``inputs_embeds``
    ``[B, T, H]`` replaces ``batch.input_ids`` (Channel-A soft coord slots); ``vision`` (from
    ``compute_vision``) replaces running the vision tower on ``batch.pixel_values``;
    ``position_ids`` ``[4, B, T]`` can be passed to reuse them across N forwards.
    """
    model = _hidden_states_model(model)
    pos = position_ids if position_ids is not None else position_ids_for_batch(model, batch)
    has_images = batch.pixel_values is not None and batch.pixel_values.numel() > 0
    kwargs = {"vision": vision} if vision is not None else {"pixel_values": batch.pixel_values if has_images else None}
    return model(
        input_ids=batch.input_ids if inputs_embeds is None else None,
        inputs_embeds=inputs_embeds,
        position_ids=pos,
        mm_token_type_ids=batch.mm_token_type_ids,
        image_grid_thw=batch.image_grid_thw if has_images else None,
        **kwargs,
    )


def suffix_hidden_states(model, inputs_embeds: torch.Tensor, prefix) -> torch.Tensor:
    """Final hidden states ``[B, T, H]`` of a Channel-A forward 2..N with prefix reuse: ``prefix``
    (``model.prefix_reuse.PrefixReuse``) gathers the suffix of ``inputs_embeds`` ``[B, T, H]``, the
    decoder runs on it through ``model`` (as ``hidden_states`` does), and the result is forward 1's
    hidden states with the suffix positions replaced."""
    suffix = prefix.gather(inputs_embeds)
    out = _hidden_states_model(model)(inputs_embeds=suffix, position_ids=prefix.position_ids, prefix=prefix)
    return prefix.scatter(out)
