"""CoordJSON: render GT objects as the one-line answer of docs/DATA.md.

``{"objects": [{"desc": "black cat", "bbox_2d": [<|coord_110|>, <|coord_310|>, <|coord_410|>, <|coord_705|>]}]}``

Rendering also returns a registry token type per *character* (struct / desc / coord), the
character span of every object's ``{...}``, of its desc value (escaped form, between the quotes)
and of its four coord tokens, so the encoder can map them onto BPE tokens. ``<|im_end|>`` is not
part of the text: the encoder appends it as its own token. ``find_outermost_closure`` is the one
string-aware brace scan of CoordJSON text (parser, encoder and rollout builder use it).
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass

from core.vocab import COORD, DESC, NUM_COORD_BINS, STRUCT
from data.types import GTObject

COORD_TOKEN_FMT = "<|coord_{}|>"
IM_END = "<|im_end|>"  # the end of an answer (Qwen chat); the one spelling of it in code
COORD_TOKEN_RE = re.compile(r"<\|coord_(\d{1,3})\|>")

CONTAINER_OPEN = '{"objects": ['
CONTAINER_CLOSE = "]}"
OBJECT_SEP = ", "
_DESC_KEY = '{"desc": '
_BBOX_KEY = ', "bbox_2d": ['
_OBJ_CLOSE = "]}"

Span = tuple[int, int]


def coord_token(k: int) -> str:
    """The token text of bin ``k`` (0..999): ``<|coord_k|>``."""
    # numbers.Integral admits numpy/torch integer scalars (matching code may hand those over).
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k < NUM_COORD_BINS:
        raise ValueError(f"coord bin must be an integer in 0..{NUM_COORD_BINS - 1}, got {k!r}")
    return COORD_TOKEN_FMT.format(int(k))


def coord_token_texts() -> list[str]:
    """All 1000 coord token texts in bin order."""
    return [COORD_TOKEN_FMT.format(k) for k in range(NUM_COORD_BINS)]


def parse_coord_token(text: str) -> int | None:
    """Bin of a coord token text, ``None`` if ``text`` is not exactly one canonical coord token."""
    m = COORD_TOKEN_RE.fullmatch(text)
    if m is None:
        return None
    k = int(m.group(1))
    return k if COORD_TOKEN_FMT.format(k) == text else None


@dataclass(frozen=True)
class RenderedAnswer:
    """Rendered text plus character-level annotations (all spans are ``[start, end)`` char offsets).

    char_types:        registry token type per character (STRUCT / DESC / COORD), ``len == len(text)``
    object_char_spans: the ``{...}`` of each object
    desc_char_spans:   the desc value inside its quotes, JSON-escaped form
    coord_char_spans:  the four ``<|coord_k|>`` spans of each object
    """

    text: str
    char_types: list[int]
    object_char_spans: list[Span]
    desc_char_spans: list[Span]
    coord_char_spans: list[tuple[Span, Span, Span, Span]]


class _Builder:
    def __init__(self, char_types: bool = True) -> None:
        self.parts: list[str] = []
        self.types: list[int] = []
        self.char_types = char_types  # False: the text only (render_answer_text), a list per char is the cost
        self.pos = 0

    def add(self, s: str, typ: int) -> Span:
        start = self.pos
        self.parts.append(s)
        if self.char_types:
            self.types.extend([typ] * len(s))
        self.pos += len(s)
        return start, self.pos

    def add_objects(self, objects: Sequence[GTObject]) -> tuple[list[Span], list[Span], list[tuple]]:
        obj_spans, desc_spans, coord_spans = [], [], []
        for i, obj in enumerate(objects):
            if i:
                self.add(OBJECT_SEP, STRUCT)
            start = self.pos
            self.add(_DESC_KEY + '"', STRUCT)
            escaped = json.dumps(obj.desc, ensure_ascii=False)[1:-1]
            desc_spans.append(self.add(escaped, DESC))
            self.add('"' + _BBOX_KEY, STRUCT)
            if len(obj.bins) != 4:
                raise ValueError(f"object {i} ({obj.desc!r}) needs 4 bins, got {obj.bins}")
            spans = []
            for c, k in enumerate(obj.bins):
                if c:
                    self.add(", ", STRUCT)
                spans.append(self.add(coord_token(k), COORD))
            coord_spans.append(tuple(spans))
            self.add(_OBJ_CLOSE, STRUCT)
            obj_spans.append((start, self.pos))
        return obj_spans, desc_spans, coord_spans

    def result(self, spans: tuple[list, list, list]) -> RenderedAnswer:
        return RenderedAnswer("".join(self.parts), self.types, *spans)


def render_answer(objects: Sequence[GTObject]) -> RenderedAnswer:
    """Full answer ``{"objects": [...]}`` in the given object order (no ``<|im_end|>``)."""
    b = _Builder()
    b.add(CONTAINER_OPEN, STRUCT)
    spans = b.add_objects(objects)
    b.add(CONTAINER_CLOSE, STRUCT)
    return b.result(spans)


def render_answer_text(objects: Sequence[GTObject]) -> str:
    """``render_answer(objects).text`` without the per-character annotations (token lengths for packing)."""
    b = _Builder(char_types=False)
    b.add(CONTAINER_OPEN, STRUCT)
    b.add_objects(objects)
    b.add(CONTAINER_CLOSE, STRUCT)
    return "".join(b.parts)


def render_objects_fragment(objects: Sequence[GTObject]) -> RenderedAnswer:
    """Objects joined by ``", "`` without container or leading separator (spans relative to the fragment)."""
    b = _Builder()
    spans = b.add_objects(objects)
    return b.result(spans)


def find_outermost_closure(text: str, start: int = 0) -> int | None:
    """Char index of the ``}`` closing the first top-level JSON object in ``text[start:]``.

    String-aware stack scan: braces/brackets inside ``"..."`` do not count, a backslash
    escapes the next character inside a string, and ``<|...|>`` special-token text outside
    strings (coord tokens, ``<|im_end|>``) is skipped whole. A closer that does not match
    the top of the stack is ignored (salvaged rollout text can be malformed; skipping keeps
    the scan from closing the object early). Returns None when the object never closes.
    This is the one brace scan of the code base (CoordJSON text scanning lives here, with
    render/parse): the rollout parser uses it to find the end of each object, the encoder and
    the rollout builder to find the closure token.
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
