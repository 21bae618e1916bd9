"""A strict reference parser of CoordJSON for the render tests: the inverse of ``data.coordjson.render_answer``
on canonical text only (``render_answer(parse_answer(t)).text == t``). Production never parses canonical
answers (tolerant parsing of model output with token spans is ``rollout.parser``), so this lives in tests/."""

from __future__ import annotations

import json

from data.coordjson import (
    _BBOX_KEY,
    _DESC_KEY,
    _OBJ_CLOSE,
    CONTAINER_CLOSE,
    CONTAINER_OPEN,
    COORD_TOKEN_RE,
    OBJECT_SEP,
    parse_coord_token,
)
from data.types import GTObject


class CoordJSONError(ValueError):
    """Text is not canonical CoordJSON. ``offset`` is the character offset of the problem."""

    def __init__(self, offset: int, expected: str, text: str):
        self.offset = offset
        self.expected = expected
        snippet = text[max(0, offset - 20) : offset + 20]
        super().__init__(f"CoordJSON parse error at char {offset}: expected {expected}; near {snippet!r}")


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def expect(self, lit: str, what: str | None = None) -> None:
        if not self.text.startswith(lit, self.pos):
            raise CoordJSONError(self.pos, what or repr(lit), self.text)
        self.pos += len(lit)

    def peek(self, lit: str) -> bool:
        return self.text.startswith(lit, self.pos)

    def string_value(self) -> str:
        start = self.pos
        self.expect('"', "'\"' opening the desc value")
        i = self.pos
        while True:
            if i >= len(self.text):
                raise CoordJSONError(start, "a closing '\"' of the desc value", self.text)
            ch = self.text[i]
            if ch == "\\":
                i += 2
                continue
            if ch == '"':
                break
            i += 1
        raw = self.text[start : i + 1]
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CoordJSONError(start + e.pos, f"a valid JSON string ({e.msg})", self.text) from None
        if json.dumps(value, ensure_ascii=False) != raw:
            raise CoordJSONError(start, "a canonically escaped desc (json.dumps(ensure_ascii=False))", self.text)
        self.pos = i + 1
        return value

    def coord(self) -> int:
        m = COORD_TOKEN_RE.match(self.text, self.pos)
        k = parse_coord_token(m.group(0)) if m else None
        if k is None:
            raise CoordJSONError(self.pos, "a coord token <|coord_K|> with K in 0..999", self.text)
        self.pos = m.end()
        return k

    def obj(self) -> GTObject:
        self.expect(_DESC_KEY, repr(_DESC_KEY) + " starting an object")
        desc = self.string_value()
        self.expect(_BBOX_KEY)
        bins = [self.coord()]
        for _ in range(3):
            self.expect(", ", "', ' between coord tokens")
            bins.append(self.coord())
        self.expect(_OBJ_CLOSE, "']}' closing the object (bbox_2d has exactly 4 coords)")
        return GTObject(desc=desc, bins=tuple(bins))


def parse_answer(text: str) -> list[GTObject]:
    """Strict inverse of ``render_answer``: canonical text only (``render_answer(parse_answer(t)).text == t``).

    Raises ``CoordJSONError`` with the char offset and what was expected there. Tolerant parsing of
    model output with token spans is the rollout parser's job, not this one.
    """
    p = _Parser(text)
    p.expect(CONTAINER_OPEN)
    objects: list[GTObject] = []
    if not p.peek(CONTAINER_CLOSE):
        objects.append(p.obj())
        while p.peek(OBJECT_SEP):
            p.expect(OBJECT_SEP)
            objects.append(p.obj())
    p.expect(CONTAINER_CLOSE, "', ' before the next object or ']}' closing the answer")
    if p.pos != len(text):
        raise CoordJSONError(p.pos, "end of text after the closing ']}'", text)
    return objects
