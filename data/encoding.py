"""Chat encoding of a record: prompt (with expanded image pads) + CoordJSON answer + ``<|im_end|>``.

Everything goes through the checkpoint's own tokenizer, chat template and image processor
(no ``AutoProcessor``: it needs torchvision). The answer is tokenised on its own, with
character offsets, because generation starts right after the prompt's ``assistant\\n`` header:
the training tokens of the answer are exactly what the model would produce.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from core.vocab import EOS, IGNORE, NO_SUBSET
from data.coordjson import (
    COORD_TOKEN_RE,
    IM_END,
    RenderedAnswer,
    find_outermost_closure,
    render_answer,
    render_answer_text,
)
from data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageRefused, open_image, to_rgb
from data.records import DataError
from data.tokens import assign_token_types, char_span_to_tokens
from data.types import BBoxGroup, EncodedSample, GTObject, ObjectSpan, PackedBatch, Record

IMAGE_PAD = "<|image_pad|>"
IMAGE_FIX = ("Fix or replace the image file; with data.skip_invalid: true a training sample whose image fails to "
             "decode is skipped and counted (data/skipped_samples_total).")


def _token_id(tokenizer, text: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(text)
    if tid is None or tid == getattr(tokenizer, "unk_token_id", None) or tokenizer.convert_ids_to_tokens(tid) != text:
        raise ValueError(f"tokenizer has no single token {text!r}; load a Qwen3-VL tokenizer (or add the token)")
    return int(tid)


class ChatEncoder:
    """Encodes ``Record`` -> ``EncodedSample`` for Qwen-VL chat checkpoints.

    tokenizer:       HF tokenizer with a chat template, ``<|image_pad|>``, ``<|im_end|>`` and the coord tokens
    image_processor: Qwen2-VL-style image processor (``merge_size``, returns ``pixel_values``/``image_grid_thw``)
    prompt:          user text after the image; ``system_prompt``: optional system message
    min_pixels/max_pixels: resize budget, passed as ``size={"shortest_edge", "longest_edge"}``
                     (transformers 5 Qwen2VL processors read pixel budgets from these keys)
    check_image_size: the decoded image must be ``record.width x record.height`` (boxes are fractions
                     of that size and ``sample_length`` predicts the image-token count from it)
    max_image_pixels: ``data.max_image_pixels``; images become 8-bit RGB by ``data.images.to_rgb``
    """

    def __init__(
        self,
        tokenizer,
        image_processor,
        *,
        prompt: str,
        system_prompt: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        check_image_size: bool = True,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.tokenizer = tokenizer
        self.max_image_pixels = max_image_pixels
        self.image_processor = image_processor
        self.prompt = prompt
        self.system_prompt = system_prompt
        self.check_image_size = check_image_size
        self.merge_size = int(getattr(image_processor, "merge_size", 2))
        self.image_pad_id = _token_id(tokenizer, IMAGE_PAD)
        self.im_end_id = _token_id(tokenizer, IM_END)
        self.size: dict | None = None
        if min_pixels is not None or max_pixels is not None:
            base = dict(getattr(image_processor, "size", None) or {})
            if min_pixels is not None:
                base["shortest_edge"] = int(min_pixels)
            if max_pixels is not None:
                base["longest_edge"] = int(max_pixels)
            self.size = base

        messages: list[dict] = []
        if system_prompt is not None:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if text.count(IMAGE_PAD) != 1:
            raise ValueError(
                f"chat template rendered {text.count(IMAGE_PAD)} {IMAGE_PAD} for one image (expected 1); "
                "use the checkpoint's Qwen-VL chat template"
            )
        self.prompt_text = text
        self._piecewise: bool | None = None  # answer_token_counts: the pieces between coord tokens add up
        self._piece_tokens: dict[str, int] = {}
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids.count(self.image_pad_id) != 1:
            raise ValueError(f"{IMAGE_PAD} did not tokenise to one token in the prompt")
        pad_at = ids.index(self.image_pad_id)
        # The prompt is constant; only the image-pad run length depends on the image.
        self._prompt_head = list(ids[:pad_at])
        self._prompt_tail = list(ids[pad_at + 1 :])

    # ------------------------------------------------------------------ image
    def load_image(self, record: Record) -> Image.Image:
        try:
            with open_image(record.image_path, self.max_image_pixels) as im:
                img = to_rgb(im)
        except ImageRefused as e:
            raise DataError(record.source, "image", "bad_image", f"{record.image_path}: {e}", fix=IMAGE_FIX) from None
        except (OSError, ValueError) as e:  # a file cut short, a corrupt stream: found only when decoding
            raise DataError(record.source, "image", "bad_image", f"cannot read {record.image_path}: {e}",
                            fix=IMAGE_FIX) from None
        if self.check_image_size and img.size != (record.width, record.height):
            raise DataError(
                record.source,
                "width/height",
                "image_size_mismatch",
                f"record says {record.width}x{record.height} but {record.image_path} is {img.size[0]}x{img.size[1]}",
            )
        return img

    def process_image(self, record: Record) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_values [P, D]`` float and ``image_grid_thw [1, 3]`` long for the record's image."""
        kwargs = {"return_tensors": "pt"}
        if self.size is not None:
            kwargs["size"] = self.size
        out = self.image_processor(images=[self.load_image(record)], **kwargs)
        return out["pixel_values"], out["image_grid_thw"].to(torch.long)

    def num_image_tokens(self, image_grid_thw: torch.Tensor) -> int:
        return int(image_grid_thw[0].prod().item()) // (self.merge_size**2)

    def prompt_ids(self, image_grid_thw: torch.Tensor) -> list[int]:
        """Prompt token ids with the single ``<|image_pad|>`` expanded to ``t*h*w // merge**2`` pads."""
        return self._prompt_head + [self.image_pad_id] * self.num_image_tokens(image_grid_thw) + self._prompt_tail

    # ----------------------------------------------------------------- answer
    def encode_answer_tokens(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and ``(start, end)`` char offsets of answer text (no special tokens added)."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def answer_length(self, record: Record) -> int:
        """Answer tokens including ``<|im_end|>``."""
        return len(self.encode_answer_tokens(render_answer_text(record.objects))[0]) + 1

    def sample_length(self, record: Record) -> int:
        """Length of ``encode(record)`` without decoding the image (for static packing).

        Uses the processor's ``get_number_of_image_patches`` on ``record.width/height``; falls
        back to processing the image when the processor lacks it.
        """
        return len(self._prompt_head) + self.image_tokens(record) + len(self._prompt_tail) + self.answer_length(record)

    def sample_lengths(self, records: Sequence[Record]) -> list[int]:
        """``[sample_length(r) for r in records]`` with the answers tokenised in one batched call and the
        image-token count computed once per image size (what the record cache's length pass runs)."""
        answers = self.answer_token_counts([render_answer_text(r.objects) for r in records])
        prompt = len(self._prompt_head) + len(self._prompt_tail)
        per_size: dict[tuple[int, int], int] = {}
        out = []
        for record, n_answer in zip(records, answers, strict=True):
            if self._patches_getter() is None:  # the count comes from the decoded image itself
                n_img = self.image_tokens(record)
            else:
                size = (record.height, record.width)
                if size not in per_size:
                    per_size[size] = self.image_tokens(record)
                n_img = per_size[size]
            out.append(prompt + n_img + n_answer + 1)
        return out

    def longest_answer(self, records: Sequence[Record], sample_lengths: Sequence[int]) -> int:
        """``max(answer_length(r) for r in records)`` from their ``sample_length`` (what the record cache
        holds): a sample is the prompt, its image tokens and its answer, so the answer is the sample minus
        the prompt and the image tokens, counted once per image size. No answer is tokenised again (a
        :class:`~data.table.RecordTable` gives the sizes as columns); a processor that cannot count
        patches from a size tokenises every answer instead."""
        if not records:
            return 0
        if self._patches_getter() is None:
            return max(self.answer_length(r) for r in records)
        sizes = records.sizes() if hasattr(records, "sizes") else np.array([(r.height, r.width) for r in records])
        unique, inverse = np.unique(sizes[:, 0].astype(np.int64) << 32 | sizes[:, 1], return_inverse=True)
        per_size = np.array([self.image_tokens(Record("", width=int(k & 0xFFFFFFFF), height=int(k >> 32), objects=(),
                                                          image_id="")) for k in unique])
        prompt = len(self._prompt_head) + len(self._prompt_tail)
        return int((np.asarray(sample_lengths, dtype=np.int64) - prompt - per_size[inverse.reshape(-1)]).max())

    def answer_token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each answer text (no ``<|im_end|>``), as ``encode_answer_tokens`` counts them.

        Coord tokens are added tokens: the tokenizer splits them out first and tokenises each piece of
        text between them on its own, so a text's count is its coord tokens plus its pieces' counts.
        The pieces (the JSON around each description) repeat from answer to answer: each distinct piece
        is tokenised once, in one batched call. The first text of every call is also tokenised whole
        and must agree; a tokenizer where it does not gets whole-text counts from then on.
        """
        if not texts:
            return []
        if self._piecewise is not False:
            whole = len(self.encode_answer_tokens(texts[0])[0])
            self._piecewise = self._piecewise_counts(texts[:1]) == [whole]
        if not self._piecewise:
            return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        return self._piecewise_counts(texts)

    def _piecewise_counts(self, texts: Sequence[str]) -> list[int]:
        split = [COORD_TOKEN_RE.split(t)[::2] for t in texts]  # the text between coord tokens (groups dropped)
        new = sorted({p for pieces in split for p in pieces if p and p not in self._piece_tokens})
        if len(self._piece_tokens) + len(new) > 1_000_000:  # distinct descriptions without end: bound the memo
            self._piece_tokens.clear()
            new = sorted({p for pieces in split for p in pieces if p})
        if new:
            for piece, ids in zip(new, self.tokenizer(new, add_special_tokens=False)["input_ids"], strict=True):
                self._piece_tokens[piece] = len(ids)
        return [len(pieces) - 1 + sum(self._piece_tokens[p] for p in pieces if p) for pieces in split]

    def _patches_getter(self):
        return getattr(self.image_processor, "get_number_of_image_patches", None)

    def image_tokens(self, record: Record) -> int:
        """Image tokens of ``record`` in the prompt, from its width/height (or its decoded image when the
        processor cannot count patches from a size)."""
        getter = self._patches_getter()
        if getter is None:
            _, grid = self.process_image(record)
            return self.num_image_tokens(grid)
        kw = {}
        if self.size is not None:
            kw = {"min_pixels": self.size.get("shortest_edge"), "max_pixels": self.size.get("longest_edge")}
            kw = {k: v for k, v in kw.items() if v is not None}
        return int(getter(record.height, record.width, kw)) // (self.merge_size**2)

    # ----------------------------------------------------------------- encode
    def encode_prompt(self, record: Record) -> EncodedSample:
        """Prompt only (ends with the assistant header): what generation starts from."""
        pixel_values, grid = self.process_image(record)
        ids = torch.tensor(self.prompt_ids(grid), dtype=torch.long)
        return _prompt_sample(ids, (ids == self.image_pad_id).long(), pixel_values, grid, record)

    def encode(self, record: Record) -> EncodedSample:
        """Prompt + GT answer + ``<|im_end|>`` with token types, object spans and coord targets (gt context)."""
        prompt = self.encode_prompt(record)
        return self.append_answer(prompt, record.objects, source=record.source)

    def append_answer(
        self, prompt: EncodedSample, objects: Sequence[GTObject], *, source: str = ""
    ) -> EncodedSample:
        """Teacher-forced sample = ``prompt`` + tokens of ``render_answer(objects)`` + ``<|im_end|>``.

        Object ``i`` gets ``object_index == i``, an ``ObjectSpan`` and a ``BBoxGroup`` (subset
        NO_SUBSET, target = its own bins, taken from ``objects``). Coord tokens must each be one token.
        """
        rendered = render_answer(objects)
        text = rendered.text
        ans_ids, offsets = self.encode_answer_tokens(text)
        types = assign_token_types(offsets, rendered.char_types)
        p = prompt.prompt_len
        obj_index, tok_spans = object_token_index(offsets, rendered.object_char_spans)
        coord_targets = [-1] * (len(ans_ids) + 1)  # + <|im_end|>
        spans, groups = place_rendered_objects(
            rendered, objects, offsets, tok_spans, coord_targets, prompt_len=p, where=f"{source}: "
        )
        closure = [False] * (len(ans_ids) + 1)
        c = find_outermost_closure(text)
        if c is not None:
            t0, t1 = char_span_to_tokens(offsets, c, c + 1)
            if t1 > t0:
                closure[t0] = True

        ids = torch.cat([prompt.input_ids, torch.tensor(ans_ids + [self.im_end_id], dtype=torch.long)])
        tt = torch.cat([prompt.token_types, torch.tensor(types + [EOS], dtype=torch.long)])
        return EncodedSample(
            input_ids=ids,
            token_types=tt,
            object_index=torch.cat([prompt.object_index, torch.tensor(obj_index + [-1], dtype=torch.long)]),
            subset=torch.full((ids.shape[0],), NO_SUBSET, dtype=torch.long),
            coord_targets=torch.cat([prompt.coord_targets, torch.tensor(coord_targets, dtype=torch.long)]),
            closure=torch.cat([prompt.closure, torch.tensor(closure, dtype=torch.bool)]),
            mm_token_type_ids=(ids == self.image_pad_id).long(),
            pixel_values=prompt.pixel_values,
            image_grid_thw=prompt.image_grid_thw,
            prompt_len=p,
            objects=spans,
            bbox_groups=groups,
            record=prompt.record,
        )


def object_token_index(
    offsets: Sequence[tuple[int, int]], object_char_spans: Sequence[tuple[int, int]]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Which object each token belongs to, and each object's token range (the one rule for GT and rollouts).

    offsets: ``(start, end)`` chars of each answer token; object_char_spans: each object's ``{...}``.
    Returns ``object_index`` per token (the object whose chars it overlaps most; ties: the earlier
    object; -1 outside every object) and ``[t0, t1)`` per object (tokens overlapping its chars).
    """
    obj_index = [-1] * len(offsets)
    best = [0] * len(offsets)
    tok_spans: list[tuple[int, int]] = []
    for k, (s, e) in enumerate(object_char_spans):
        t0, t1 = char_span_to_tokens(offsets, s, e)
        tok_spans.append((t0, t1))
        for t in range(t0, t1):
            ov = min(e, offsets[t][1]) - max(s, offsets[t][0])
            if ov > best[t]:  # most-overlapped object wins; ties keep the earlier object
                best[t], obj_index[t] = ov, k
    return obj_index, tok_spans


def place_rendered_objects(
    rendered: RenderedAnswer,
    objects: Sequence[GTObject],
    offsets: Sequence[tuple[int, int]],
    tok_spans: Sequence[tuple[int, int]],
    coord_targets: list[int],
    *,
    prompt_len: int,
    char_base: int = 0,
    first_index: int = 0,
    subset: int = NO_SUBSET,
    where: str = "",
) -> tuple[list[ObjectSpan], list[BBoxGroup]]:
    """``ObjectSpan`` + ``BBoxGroup`` of every rendered object, and its coord targets (GT answers, FN tails).

    ``rendered`` renders ``objects`` and starts at answer char ``char_base``; ``offsets`` are the
    answer tokens' char spans; object ``m`` is answer object ``first_index + m`` with token range
    ``tok_spans[first_index + m]``. Writes each object's bins (from ``objects``, never re-read
    from text) into ``coord_targets`` (answer-token positions) at its 4 coord tokens; returned
    positions are sample positions (``prompt_len +`` answer position). Raises when a coord token
    is not one token (``where`` prefixes the message, e.g. the record's ``file:line``).
    """
    start_of = {tuple(o): t for t, o in enumerate(offsets)}
    spans: list[ObjectSpan] = []
    groups: list[BBoxGroup] = []
    P = prompt_len
    for m, (obj, (ds, de), cspans) in enumerate(
        zip(objects, rendered.desc_char_spans, rendered.coord_char_spans, strict=True)
    ):
        k = first_index + m
        t0, t1 = tok_spans[k]
        d0, d1 = char_span_to_tokens(offsets, char_base + ds, char_base + de)
        coord_tok: list[int] = []
        for cs, ce in cspans:
            t = start_of.get((char_base + cs, char_base + ce))
            if t is None:
                raise ValueError(
                    f"{where}coord token {rendered.text[cs:ce]!r} is not a single token; add the 1000 coord "
                    "tokens to the tokenizer (model.vocab.ensure_coord_tokens) before encoding"
                )
            coord_tok.append(t)
        bins = tuple(int(b) for b in obj.bins)
        for t, b in zip(coord_tok, bins, strict=True):
            coord_targets[t] = b
        pos = tuple(P + t for t in coord_tok)
        spans.append(ObjectSpan(k, P + t0, P + t1, P + d0, P + d1, pos, obj.desc, bins))
        groups.append(BBoxGroup(coord_pos=pos, target_bins=bins, subset=subset, object_index=k))
    return spans, groups


class EncodedRecords(Sequence):
    """Lazy ``Sequence[EncodedSample]`` over records: encodes on access, so images stay on disk.

    ``lengths()`` gives every sample's token count without decoding images (static packing).
    """

    def __init__(self, records: Sequence[Record], encoder: ChatEncoder):
        # a data.table.RecordTable stays memory-mapped (decoded per access), never a list of every record
        self.records = records if isinstance(records, Sequence) else list(records)
        self.encoder = encoder
        self._lengths: list[int] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.encoder.encode(self.records[i])

    def lengths(self) -> list[int]:
        if self._lengths is None:
            self._lengths = [self.encoder.sample_length(r) for r in self.records]
        return list(self._lengths)

    def sources(self) -> Sequence[str]:
        table_sources = getattr(self.records, "sources", None)  # RecordTable: a column, read on access
        return table_sources() if table_sources is not None else [r.source for r in self.records]


def prompts_of(batch: PackedBatch, records: Sequence[Record]) -> list[EncodedSample]:
    """The prompt of every sample of a GT ``batch``, in segment order (what a Rollout step generates from).

    Sliced out of the batch's own tensors (prompt tokens at the start of each segment, the
    segment's rows of ``pixel_values`` / ``image_grid_thw``): equal to
    ``ChatEncoder.encode_prompt(record)`` without decoding and processing the image again, and
    without the batch carrying its samples. ``records``: the sequence the batch was drawn from
    (the training set); segment ``k``'s record is ``records[segment.sample_index]``, set as the
    prompt's ``record``.
    """
    prompts: list[EncodedSample] = []
    grid_row = pixel_row = 0
    for seg in batch.segments:
        grid = batch.image_grid_thw[grid_row : grid_row + seg.image_rows]
        n_pixels = int(grid.prod(dim=-1).sum()) if seg.image_rows else 0  # one pixel row per patch (t * h * w)
        tokens = slice(seg.start, seg.start + seg.prompt_len)
        prompts.append(_prompt_sample(
            batch.input_ids[seg.row, tokens], batch.mm_token_type_ids[seg.row, tokens],
            batch.pixel_values[pixel_row : pixel_row + n_pixels], grid, records[seg.sample_index],
        ))
        grid_row, pixel_row = grid_row + seg.image_rows, pixel_row + n_pixels
    return prompts


def _prompt_sample(ids: torch.Tensor, mm_token_type_ids: torch.Tensor, pixel_values, image_grid_thw, record):
    """A prompt-only ``EncodedSample``: ids ``[n]``, nothing supervised (IGNORE / -1 / NO_SUBSET)."""
    n = int(ids.shape[0])
    return EncodedSample(
        input_ids=ids,
        token_types=torch.full((n,), IGNORE, dtype=torch.long),
        object_index=torch.full((n,), -1, dtype=torch.long),
        subset=torch.full((n,), NO_SUBSET, dtype=torch.long),
        coord_targets=torch.full((n,), -1, dtype=torch.long),
        closure=torch.zeros(n, dtype=torch.bool),
        mm_token_type_ids=mm_token_type_ids,
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        prompt_len=n,
        record=record,
    )
