"""The category key of a free-text desc, shared by evaluation (category mapping) and Stage-2's desc gate."""

from __future__ import annotations

import re

_SEPARATORS = re.compile(r"[_/()\[\]{}]")
_WS = re.compile(r"\s+")


def normalize_desc(desc: str) -> str:
    """Category key of a desc: lower-cased, ``_ / ( ) [ ] { }`` -> spaces, whitespace runs collapsed, stripped."""
    return _WS.sub(" ", _SEPARATORS.sub(" ", str(desc).lower())).strip()
