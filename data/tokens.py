"""Token-type assignment for BPE tokens over typed characters, and char spans -> token ranges.

(CoordJSON text scanning, e.g. the closure scan, lives in ``data.coordjson``.)

Units: ``offsets`` are end-exclusive character spans ``(start, end)`` of each token inside
one text (the answer, possibly followed by ``<|im_end|>``); ``char_types[i]`` is the
registry token-type code of character ``i``. Results are registry codes per token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.vocab import COORD, DESC, EOS, IGNORE, STRUCT, TOKEN_TYPE_NAMES, TOKEN_TYPE_TIE_ORDER

_VALID_CHAR_TYPES = (IGNORE, STRUCT, DESC, COORD, EOS)


def assign_token_types(offsets: Sequence[tuple[int, int]], char_types: Sequence[int]) -> list[int]:
    """Type of each token = the type covering most of its characters.

    offsets     [n_tokens] of (start, end) char spans, end-exclusive
    char_types  [n_chars] registry codes (STRUCT/DESC/COORD/EOS; IGNORE allowed for untyped chars)

    Ties between types are broken by ``registry.TOKEN_TYPE_TIE_ORDER`` (earlier wins).
    Characters typed IGNORE do not vote; a token whose covered characters are all IGNORE
    is IGNORE. A zero-width token, or one lying outside the text, is STRUCT (it carries
    no desc/coord/eos characters, so the only thing it can be is format).
    Vectorised with prefix sums: O(n_chars + n_tokens).
    """
    n_tok = len(offsets)
    if n_tok == 0:
        return []
    ct = np.asarray(char_types, dtype=np.int64).reshape(-1)
    bad = ~np.isin(ct, _VALID_CHAR_TYPES)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"char_types[{i}] = {int(ct[i])} is not a registry token type; allowed: "
            f"{sorted(TOKEN_TYPE_NAMES)} or IGNORE={IGNORE}"
        )
    n_chars = ct.shape[0]
    off = np.asarray(offsets, dtype=np.int64).reshape(n_tok, 2)
    start = np.clip(off[:, 0], 0, n_chars)
    end = np.clip(off[:, 1], 0, n_chars)
    end = np.maximum(end, start)

    # counts[:, j] = number of chars of type TOKEN_TYPE_TIE_ORDER[j]; argmax returns the first
    # maximum, so column order *is* the tie-break.
    counts = np.empty((n_tok, len(TOKEN_TYPE_TIE_ORDER)), dtype=np.int64)
    for j, code in enumerate(TOKEN_TYPE_TIE_ORDER):
        csum = np.concatenate(([0], np.cumsum(ct == code)))
        counts[:, j] = csum[end] - csum[start]
    order = np.asarray(TOKEN_TYPE_TIE_ORDER, dtype=np.int64)
    types = order[counts.argmax(axis=1)]
    typed = counts.sum(axis=1)
    width = end - start
    types = np.where(typed == 0, np.where(width == 0, STRUCT, IGNORE), types)
    return [int(t) for t in types]


def char_span_to_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """Token range ``[first, last + 1)`` of the tokens overlapping chars ``[start, end)``.

    A token overlaps when ``tok_start < end`` and ``tok_end > start`` (zero-width tokens
    never overlap). For an empty char span (``start == end``, e.g. an empty desc) or a
    span no token covers, returns the empty range ``(k, k)`` with ``k`` the first token
    whose span ends after ``start`` (``len(offsets)`` if none), so callers can still
    slice with it.
    """
    if end < start:
        raise ValueError(f"char span [{start}, {end}) has end < start")
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if off.shape[0] == 0:
        return (0, 0)
    s, e = off[:, 0], off[:, 1]
    hit = np.flatnonzero((s < end) & (e > start) & (e > s))
    if hit.size == 0 or start == end:
        after = np.flatnonzero(e > start)
        k = int(after[0]) if after.size else int(off.shape[0])
        return (k, k)
    return (int(hit[0]), int(hit[-1]) + 1)
