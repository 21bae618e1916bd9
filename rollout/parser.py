"""Salvage parser: generated token ids -> objects with token spans + an append-ready cut (docs/training/STAGE2_RUNBOOK.md).

The parser works on the generated ids themselves (nothing is stripped or re-encoded): every token
is turned into its own text piece, so a character offset maps to exactly one token index even for
byte-level BPE pieces and fused tokens such as ``}",`` or ``]},``. The text is then scanned as
CoordJSON with salvage rules:

- the container is the first ``{"objects": [`` (JSON whitespace allowed) in the text; text before
  it (a preamble such as ``Answer: ``) is kept as untrained context (IGNORE chars,
  ``container_start > 0``); with no container ``container_found`` is False and nothing else is
  parsed (never raised);
- an object must be exactly ``desc`` then ``bbox_2d``: ``bbox_2d`` first is dropped as
  ``key_order``; a whitespace-only desc is ``missing_desc`` (as in the ground truth contract);
- each array element ``{...}`` is delimited with the same string-aware brace/bracket stack as
  ``data.coordjson.find_outermost_closure`` (so the closure found later on the built answer is the
  container's own ``}``); a complete element is *kept* in the prefix whether it is valid or not
  (invalid ones become FP spans), an element cut off by the end of the text is ``truncated``;
- the scan stops at the container's ``]}`` (anything after it is ignored trailing text), at the end
  of the text, or at something that is neither an object nor a separator (ignored, reported in
  ``stop_reason``/``trailing_text``);
- the cut is the append point after ``[`` or after the last complete object. Only whole tokens that
  end at or before it are kept; the characters of a fused token that straddles it (e.g. ``]}`` of
  ``]},``) are returned as ``cut_suffix`` for the builder to tokenise.
"""

from __future__ import annotations

import codecs
import json
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from core.vocab import COORD, DESC, IGNORE, STRUCT
from data.coordjson import COORD_TOKEN_FMT, IM_END, find_outermost_closure
from data.tokens import char_span_to_tokens
from rollout.types import DROP_REASONS, ParsedObject, ParsedRollout

_WS = " \t\n\r"
_UNKNOWN_PIECE = "\ufffd"  # text of an id the tokenizer does not know (model vocab > tokenizer)
_BYTE_TOKEN_RE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet: byte -> printable char (printable latin-1 bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


class _TokenBytes:
    """id -> raw UTF-8 bytes of one token, cached per tokenizer.

    Added tokens (specials, coord tokens) are their literal content. Byte-level BPE tokens are
    mapped back through the byte alphabet (exact, also for partial UTF-8 characters); other
    tokenizers fall back to ``decode([id])`` (``<0xNN>`` byte-fallback pieces become the byte).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.added = {int(i): t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self.byte_level = _is_byte_level(tokenizer)
        self.cache: dict[int, bytes | None] = {}
        self.size = -1

    def get(self, tid: int) -> bytes | None:
        """Bytes of ``tid``; None for an id the tokenizer does not know."""
        if tid in self.cache:
            return self.cache[tid]
        out: bytes | None
        if tid in self.added:
            out = self.added[tid].encode("utf-8")
        else:
            piece = self.tokenizer.convert_ids_to_tokens(tid) if tid >= 0 else None
            if piece is None:
                out = None
            elif self.byte_level and all(c in _BYTE_DECODER for c in piece):
                out = bytes(_BYTE_DECODER[c] for c in piece)
            elif (m := _BYTE_TOKEN_RE.fullmatch(piece)) is not None:
                out = bytes([int(m.group(1), 16)])
            else:
                out = self.tokenizer.decode([tid], skip_special_tokens=False, clean_up_tokenization_spaces=False).encode(
                    "utf-8"
                )
        self.cache[tid] = out
        return out


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    dec = getattr(backend, "decoder", None)
    if dec is None:
        return False
    try:
        state = json.loads(dec.__getstate__())
    except Exception:  # noqa: BLE001 - any decoder we cannot introspect is treated as not byte-level
        return False
    stack = [state]
    while stack:
        d = stack.pop()
        if d.get("type") == "ByteLevel":
            return True
        stack.extend(d.get("decoders", []) or [])
    return False


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _token_bytes_table(tokenizer) -> _TokenBytes:
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else -1
    try:
        table = _TABLES.get(tokenizer)
        if table is None or table.size != size:  # tokens were added since: rebuild
            table = _TABLES[tokenizer] = _TokenBytes(tokenizer)
            table.size = size
        return table
    except TypeError:  # not weak-referenceable / hashable: no cache
        return _TokenBytes(tokenizer)


def token_pieces(token_ids: Sequence[int], tokenizer, coord_vocab) -> list[str]:
    """Text piece of each token such that ``"".join(pieces)`` is the decoded text.

    Bytes are decoded incrementally as UTF-8, so a character split over several byte-level tokens
    is given to the token that completes it (the others get ``""``); an incomplete character
    before an added token or at the end becomes U+FFFD on the last byte token. Coord ids are
    ``<|coord_k|>``; ids unknown to the tokenizer are one U+FFFD each.
    """
    return _pieces(token_ids, tokenizer, coord_vocab)[0]


def _pieces(token_ids: Sequence[int], tokenizer, coord_vocab) -> tuple[list[str], list[bool]]:
    """``token_pieces`` plus, per token, whether bytes of an unfinished character follow its piece."""
    table = _token_bytes_table(tokenizer)
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces: list[str] = []
    pend: list[bool] = []
    pending = False  # the decoder holds bytes of an incomplete character
    first, end = int(coord_vocab.first_id), int(coord_vocab.end_id)
    for raw in token_ids:
        tid = int(raw)
        k = tid - first if first <= tid < end else -1
        is_added = k >= 0 or tid in table.added
        if (is_added or table.get(tid) is None) and pending:
            # An added/unknown token interrupts a character: flush it (as U+FFFD) into the previous
            # token, so an added token's piece is exactly its own text.
            pieces[-1] += dec.decode(b"", final=True)
            pend[-1] = False
            dec.reset()
            pending = False
        if k >= 0:
            piece = COORD_TOKEN_FMT.format(k)
        elif (b := table.get(tid)) is None:
            piece = _UNKNOWN_PIECE
        elif is_added:
            piece = b.decode("utf-8", errors="replace")
        else:
            piece = dec.decode(b, final=False)
            pending = bool(dec.getstate()[0])
        pieces.append(piece)
        pend.append(pending)
    if pending and pieces:
        pieces[-1] += dec.decode(b"", final=True)
        pend[-1] = False
    return pieces, pend


def default_eos_id(tokenizer) -> int:
    """``<|im_end|>`` when the tokenizer has it as one token (Qwen chat), else ``tokenizer.eos_token_id``."""
    tid = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
        return tid
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither <|im_end|> nor an eos_token_id; pass eos_token_id= to parse_rollout")
    return int(tokenizer.eos_token_id)


class _BadJSON(Exception):
    pass


class _Scanner:
    """Character scanner over the decoded text; ``coord_at[char] = (token index, bin)`` for genuine coord tokens."""

    def __init__(self, text: str, coord_at: dict[int, tuple[int, int]], coord_len: dict[int, int]):
        self.text = text
        self.n = len(text)
        self.coord_at = coord_at
        self.coord_len = coord_len

    def ws(self, p: int, end: int | None = None) -> int:
        end = self.n if end is None else end
        while p < end and self.text[p] in _WS:
            p += 1
        return p

    def match_object(self, start: int) -> int | None:
        """End (exclusive) of the ``{...}`` starting at ``start``; None when the text ends first.

        ``data.coordjson.find_outermost_closure`` from ``start`` (the one brace scan): string-aware,
        ``<|...|>`` outside strings skipped whole, a closer that does not match the top is ignored.
        """
        close = find_outermost_closure(self.text, start)
        return None if close is None else close + 1

    # ---- tolerant JSON pieces inside one complete object [lo, hi); raise _BadJSON when malformed
    def string(self, p: int, hi: int) -> int:
        """End (exclusive, after the closing quote) of the string starting at ``p``."""
        if p >= hi or self.text[p] != '"':
            raise _BadJSON
        i = p + 1
        while i < hi:
            c = self.text[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                return i + 1
            i += 1
        raise _BadJSON

    def value(self, p: int, hi: int) -> int:
        """Skip any JSON-ish value (string, bracketed, or bare literal) starting at ``p``; returns its end."""
        if p >= hi:
            raise _BadJSON
        c = self.text[p]
        if c == '"':
            return self.string(p, hi)
        if c in "[{":
            depth = 0
            i = p
            while i < hi:
                ch = self.text[i]
                if ch == '"':
                    i = self.string(i, hi)
                    continue
                if ch in "[{":
                    depth += 1
                elif ch in "]}":
                    depth -= 1
                    if depth == 0:
                        return i + 1
                i += 1
            raise _BadJSON
        i = p
        while i < hi and self.text[i] not in ',]}' + _WS:
            i += 1
        if i == p:
            raise _BadJSON
        return i


def _decode_json_string(raw: str) -> str:
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise _BadJSON from e
    if not isinstance(value, str):
        raise _BadJSON
    return value


def _parse_object(sc: _Scanner, lo: int, hi: int):
    """Parse the complete object ``text[lo:hi]`` (``{...}``): desc, desc span, coords, reasons."""
    reasons: set[str] = set()
    desc: str | None = None
    desc_span: tuple[int, int] | None = None
    coords: list[tuple[int, int]] = []  # (token index, bin)
    seen: set[str] = set()
    order: list[str] = []  # desc / bbox_2d keys in the order written
    inner_hi = hi - 1  # position of the closing '}'
    text = sc.text
    try:
        p = sc.ws(lo + 1, inner_hi)
        if p < inner_hi:
            while True:
                k_end = sc.string(p, inner_hi)
                key = _decode_json_string(text[p:k_end])
                p = sc.ws(k_end, inner_hi)
                if p >= inner_hi or text[p] != ":":
                    raise _BadJSON
                p = sc.ws(p + 1, inner_hi)
                dup = key in seen
                if dup or key not in ("desc", "bbox_2d"):
                    reasons.add("unexpected_keys")
                else:
                    order.append(key)
                seen.add(key)
                if key == "desc" and not dup:
                    if p < inner_hi and text[p] == '"':
                        v_end = sc.string(p, inner_hi)
                        desc = _decode_json_string(text[p:v_end])
                        desc_span = (p + 1, v_end - 1)
                        if any(lo_c in sc.coord_at for lo_c in range(p + 1, v_end - 1)):
                            reasons.add("coord_in_desc")
                        if not desc.strip():
                            reasons.add("missing_desc")
                        p = v_end
                    else:
                        reasons.add("missing_desc")
                        p = sc.value(p, inner_hi)
                elif key == "bbox_2d" and not dup:
                    if p < inner_hi and text[p] == "[":
                        p = sc.ws(p + 1, inner_hi)
                        if p < inner_hi and text[p] == "]":
                            p += 1
                        else:
                            while True:
                                hit = sc.coord_at.get(p)
                                if hit is not None:
                                    coords.append(hit)
                                    p += sc.coord_len[p]
                                else:
                                    reasons.add("non_coord_token")
                                    p = sc.value(p, inner_hi)
                                p = sc.ws(p, inner_hi)
                                if p < inner_hi and text[p] == ",":
                                    p = sc.ws(p + 1, inner_hi)
                                    continue
                                if p < inner_hi and text[p] == "]":
                                    p += 1
                                    break
                                raise _BadJSON
                    else:
                        reasons.add("missing_bbox")
                        p = sc.value(p, inner_hi)
                else:
                    p = sc.value(p, inner_hi)
                p = sc.ws(p, inner_hi)
                if p >= inner_hi:
                    break
                if text[p] != ",":
                    raise _BadJSON
                p = sc.ws(p + 1, inner_hi)
    except _BadJSON:
        reasons.add("bad_json")
    if order == ["bbox_2d", "desc"]:
        reasons.add("key_order")
    if "desc" not in seen or desc_span is None:
        reasons.add("missing_desc")
    if "bbox_2d" not in seen:
        reasons.add("missing_bbox")
    elif len(coords) != 4:
        reasons.add("wrong_arity")
    else:
        b = [k for _, k in coords]
        if b[2] < b[0] or b[3] < b[1]:
            reasons.add("bbox_invalid")
    reason = next((r for r in DROP_REASONS if r in reasons), None)
    return desc, desc_span, coords, reason


def _opening_end(sc: _Scanner, p: int) -> int | None:
    """End of ``{"objects": [`` (JSON whitespace allowed) when it starts exactly at ``p``, else None."""
    text = sc.text
    if not text.startswith("{", p):
        return None
    p = sc.ws(p + 1)
    if not text.startswith('"objects"', p):
        return None
    p = sc.ws(p + len('"objects"'))
    if not text.startswith(":", p):
        return None
    p = sc.ws(p + 1)
    return p + 1 if text.startswith("[", p) else None


def _find_container(sc: _Scanner) -> tuple[int, int | None]:
    """(char of the first container's ``{``, char after its ``[``), or ``(0, None)`` without one.

    Leading whitespace is not a preamble (the container "starts" at char 0).
    """
    first = sc.ws(0)
    brace = sc.text.find("{", first)
    while brace != -1:
        end = _opening_end(sc, brace)
        if end is not None:
            return (0 if brace == first else brace), end
        brace = sc.text.find("{", brace + 1)
    return 0, None


def _typed_text(text_ids: tuple[int, ...], tokenizer, coord_vocab):
    """The text of ``text_ids`` with each token's char span, the coord tokens by char position and the
    char types (STRUCT, COORD where a coord token stands), and which tokens end mid-character."""
    pieces, pending = _pieces(text_ids, tokenizer, coord_vocab)
    offsets: list[tuple[int, int]] = []
    coord_at: dict[int, tuple[int, int]] = {}
    coord_len: dict[int, int] = {}
    first, end = int(coord_vocab.first_id), int(coord_vocab.end_id)
    pos = 0
    for t, piece in enumerate(pieces):
        if first <= text_ids[t] < end:
            coord_at[pos] = (t, text_ids[t] - first)
            coord_len[pos] = len(piece)
        offsets.append((pos, pos + len(piece)))
        pos += len(piece)
    text = "".join(pieces)
    char_types = [STRUCT] * len(text)
    for c, ln in coord_len.items():
        char_types[c : c + ln] = [COORD] * ln
    return text, offsets, coord_at, coord_len, char_types, pending


@dataclass
class _Scan:
    """What the scan of the container's elements found (``parse_rollout``)."""

    objects: list[ParsedObject] = field(default_factory=list)
    closed: bool = False
    cut_char: int = 0
    stop: str = "no_container"
    stop_at: int = 0


def _close_or_stop(sc: _Scanner, p: int) -> tuple[bool, str, int]:
    """At a ``]``: ``]}`` closes (so does ``, ]}``: the comma lies after the cut and is never kept).
    Returns (closed, stop reason, stop char)."""
    n = len(sc.text)
    q = sc.ws(p + 1)
    if q < n and sc.text[q] == "}":
        return True, "closed", q + 1
    if q >= n:
        return False, "end_of_text", n
    return False, "bad_container_close", p


def _scan_elements(sc: _Scanner, p: int, off_arr: np.ndarray, char_types: list[int]) -> _Scan:
    """Objects of the container from char ``p`` (just after ``[``) until it closes or the text breaks."""
    text, n = sc.text, len(sc.text)
    out = _Scan(cut_char=p)
    while True:
        p = sc.ws(p)
        if p >= n:
            out.stop, out.stop_at = "end_of_text", n
            return out
        if text[p] == "]":
            out.closed, out.stop, out.stop_at = _close_or_stop(sc, p)
            return out
        if text[p] != "{":
            out.stop, out.stop_at = "bad_element", p
            return out
        e = sc.match_object(p)
        tok = char_span_to_tokens(off_arr, p, e if e is not None else n)
        if e is None:
            out.objects.append(ParsedObject(len(out.objects), tok[0], tok[1], p, n, None, None, None, (), (), False,
                                            "truncated", False))
            out.stop, out.stop_at = "end_of_text", n
            return out
        desc, desc_span, coords, reason = _parse_object(sc, p, e)
        if desc_span is not None:
            for i in range(*desc_span):
                if char_types[i] != COORD:
                    char_types[i] = DESC
        out.objects.append(ParsedObject(
            index=len(out.objects), token_start=tok[0], token_end=tok[1], char_start=p, char_end=e, desc=desc,
            desc_char_span=desc_span,
            desc_token_span=char_span_to_tokens(off_arr, *desc_span) if desc_span is not None else None,
            coord_pos=tuple(t for t, _ in coords), bins=tuple(k for _, k in coords), valid=reason is None,
            drop_reason=reason, kept=True,
        ))
        out.cut_char = e
        p = sc.ws(e)
        if p >= n:
            out.stop, out.stop_at = "end_of_text", n
            return out
        if text[p] == ",":
            p += 1
        elif text[p] != "]":
            out.stop, out.stop_at = "bad_separator", p
            return out


def _cut_tokens(offsets: list[tuple[int, int]], pending: list[bool], cut_char: int) -> int:
    """Whole tokens ending at or before ``cut_char``; a zero-width token sitting exactly at the cut holds
    bytes of the next character and is not kept, nor a token ending with bytes a later token completes."""
    cut = 0
    while cut < len(offsets) and offsets[cut][1] <= cut_char and offsets[cut][0] != cut_char:
        cut += 1
    while cut > 0 and pending[cut - 1]:
        cut -= 1
    return cut


def parse_rollout(
    token_ids: Sequence[int], tokenizer, coord_vocab, *, eos_token_id: int | None = None
) -> ParsedRollout:
    """Salvage-parse one generated sequence (generated tokens only, no prompt).

    token_ids:    generated ids as produced (eos and anything after it may be present)
    tokenizer:    the HF tokenizer of the model
    coord_vocab:  ``model.vocab.CoordVocab`` (coord ids ``[first_id, end_id)``, bin = id - first_id)
    eos_token_id: end of the answer; default ``<|im_end|>`` (see ``default_eos_id``)

    Never raises on model output; see ``ParsedRollout`` for the fields and the module docstring
    for the rules.
    """
    ids = tuple(int(t) for t in token_ids)
    eos = default_eos_id(tokenizer) if eos_token_id is None else int(eos_token_id)
    eos_pos = ids.index(eos) if eos in ids else None
    text, offsets, coord_at, coord_len, char_types, pending = _typed_text(
        ids if eos_pos is None else ids[:eos_pos], tokenizer, coord_vocab)
    sc = _Scanner(text, coord_at, coord_len)
    container_start, p = _find_container(sc)
    if p is not None:
        for i in range(container_start):  # a preamble is context, never a training target
            char_types[i] = IGNORE
        scan = _scan_elements(sc, p, np.asarray(offsets, dtype=np.int64).reshape(-1, 2), char_types)
    else:
        scan = _Scan()
    cut = _cut_tokens(offsets, pending, scan.cut_char)
    kept_end = offsets[cut - 1][1] if cut > 0 else 0
    return ParsedRollout(
        token_ids=ids,
        text=text,
        token_offsets=offsets,
        char_types=char_types,
        container_found=p is not None,
        closed=scan.closed,
        eos_found=eos_pos is not None,
        eos_pos=eos_pos,
        objects=scan.objects,
        cut=cut,
        cut_char=scan.cut_char,
        cut_suffix=text[kept_end:scan.cut_char],
        stop_reason=scan.stop,
        trailing_text=text[scan.stop_at:],
        container_start=container_start if p is not None else 0,
    )


__all__ = ["parse_rollout", "token_pieces", "default_eos_id"]
