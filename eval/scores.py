"""Confidence scores of predicted objects for COCO AP (docs/EVAL.md).

COCO AP ranks detections by score, so a generative detector needs one. Two modes:

- ``token_prob`` (default): the mean *probability* (not log-prob) of the object's 4
  coord tokens under the generating distribution, read from the generation's
  per-token log-probs; with ``include_desc=True`` it is multiplied by the mean
  probability of the object's desc tokens.
- ``constant``: every object scores 1.0 (ranking then falls back to output order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

SCORE_MODES = ("token_prob", "constant")


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _as_float_list(token_logprobs: Any) -> list[float]:
    if token_logprobs is None:
        return []
    if hasattr(token_logprobs, "detach"):  # torch tensor
        token_logprobs = token_logprobs.detach().float().cpu().reshape(-1).tolist()
    return [float(x) for x in token_logprobs]


def _mean_prob(positions: Sequence[int], logprobs: list[float], what: str, index: int) -> float:
    probs = []
    for p in positions:
        p = int(p)
        if not 0 <= p < len(logprobs):
            raise IndexError(
                f"object {index}: {what} token position {p} is outside the generated token_logprobs "
                f"(length {len(logprobs)}); positions must index the generated tokens, not the prompt"
            )
        probs.append(math.exp(logprobs[p]))
    return sum(probs) / len(probs)


def score_objects(
    objects: Sequence[Any],
    token_logprobs: Any,
    mode: str = "token_prob",
    include_desc: bool = False,
) -> list[float]:
    """One confidence in [0, 1] per parsed object.

    Args:
        objects: parsed objects (``rollout.types.ParsedObject`` or mappings) with
            ``coord_pos`` (indices of the 4 coord tokens in the *generated* token list)
            and, for ``include_desc``, ``desc_token_span`` ``(start, end)`` (end exclusive).
        token_logprobs: ``[N]`` natural-log probability of each generated token (list or
            tensor), as produced by the generation backend.
        mode: ``"token_prob"`` or ``"constant"``.
        include_desc: multiply by the mean desc-token probability (``token_prob`` only).

    An object without coord positions (cannot happen for a valid object) raises.
    An object whose desc span is empty keeps the coord-only score.
    """
    if mode not in SCORE_MODES:
        raise ValueError(
            f"rollout_matching.eval_detection.score_mode must be one of {SCORE_MODES}, got {mode!r}"
        )
    if mode == "constant":
        return [1.0] * len(objects)
    logprobs = _as_float_list(token_logprobs)
    scores = []
    for i, obj in enumerate(objects):
        coord_pos = list(_field(obj, "coord_pos", ()) or ())
        if not coord_pos:
            raise ValueError(f"object {i} has no coord_pos; token_prob scores need the coord token positions")
        score = _mean_prob(coord_pos, logprobs, "coord", i)
        if include_desc:
            span = _field(obj, "desc_token_span", None)
            if span is not None:
                start, end = int(span[0]), int(span[1])
                if end > start:
                    score *= _mean_prob(range(start, end), logprobs, "desc", i)
        scores.append(float(score))
    return scores
