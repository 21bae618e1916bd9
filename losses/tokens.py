"""Token-type assignment for BPE tokens over typed characters, and JSON closure finding.

Units: ``offsets`` are end-exclusive character spans ``(start, end)`` of each token inside
one text (the answer, possibly followed by ``<|im_end|>``); ``char_types[i]`` is the
registry token-type code of character ``i``. Results are registry codes per token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from losses.registry import COORD, DESC, EOS, IGNORE, STRUCT, TOKEN_TYPE_NAMES, TOKEN_TYPE_TIE_ORDER

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


def find_outermost_closure(text: str, start: int = 0) -> int | None:
    """Char index of the ``}`` closing the first top-level JSON object in ``text[start:]``.

    String-aware stack scan: braces/brackets inside ``"..."`` do not count, a backslash
    escapes the next character inside a string, and ``<|...|>`` special-token text outside
    strings (coord tokens, ``<|im_end|>``) is skipped whole. A closer that does not match
    the top of the stack is ignored (salvaged rollout text can be malformed; skipping keeps
    the scan from closing the object early). Returns None when the object never closes.
    This is the one brace scan of the code base: the rollout parser uses it to find the end
    of each object, the encoder and the rollout builder to find the closure token.
    """
    stack: list[str] = []
    in_string = False
    escaped = False
    i = start
    n = len(text)
    while i < n:
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
            i += 1
            continue
        if c == "<" and text.startswith("<|", i):
            j = text.find("|>", i + 2)
            if j != -1:
                i = j + 2
                continue
        if c == '"':
            in_string = True
        elif c == "{":
            stack.append("{")
        elif c == "[":
            if stack:
                stack.append("[")
        elif c in "}]":
            want = "{" if c == "}" else "["
            if stack and stack[-1] == want:
                stack.pop()
                if not stack:
                    return i
        i += 1
    return None


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
