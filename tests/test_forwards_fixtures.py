"""Shared builders for the Stage-2 forward and parity tests (no tests here).

Everything runs on the tiny random Qwen3-VL of ``model.tiny.build_tiny_in_memory`` (untied, fp32,
eval mode) with synthetic shapes records written to a tmp dir and chat-encoded by
``data.encoding.ChatEncoder``; batches come from ``data.packing.collate_rows``.

``FixedBackend`` is a ``GenerationBackend`` that returns hand-written answers, so a rollout batch
built with ``rollout.step.prepare_rollout_batches`` is deterministic and contains matched, FP and FN
objects (a greedy rollout of a random tiny model is a garbage answer with no container).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from data.coordjson import coord_token
from data.encoding import ChatEncoder
from data.packing import collate_rows
from data.records import read_jsonl
from data.shapes import make_shapes_dataset
from data.types import EncodedSample, PackedBatch, Record
from model.forward import HiddenStatesModel
from model.tiny import build_tiny_in_memory
from model.vocab import CoordVocab, coord_vocab_from_tokenizer
from pipeline.context import TeacherForcingContext
from rollout.backends import GenerationBackend
from rollout.step import MatchingConfig, RolloutBatch, prepare_rollout_batches
from rollout.types import GenerationOutput

PROMPT = "Detect all objects."


@dataclass
class TinyEnv:
    """The tiny model, its processors, and encoded shapes samples (GT context)."""

    vlm: torch.nn.Module
    model: HiddenStatesModel
    tokenizer: object
    coord_vocab: CoordVocab
    encoder: ChatEncoder
    records: list[Record]
    samples: list[EncodedSample]

    @property
    def coord_ids(self) -> torch.Tensor:
        return self.coord_vocab.ids

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def batch(self, rows: Sequence[Sequence[int]]) -> PackedBatch:
        """``collate_rows`` of sample indices, one inner list per packed row."""
        return collate_rows([[self.samples[i] for i in row] for row in rows], self.pad_id)

    def ctx(self, channel, batch: PackedBatch, hidden: dict, decode_mode: str = "exp") -> TeacherForcingContext:
        return TeacherForcingContext(
            channel=channel, batch=batch, hidden=hidden, lm_head_weight=self.vlm.get_output_embeddings().weight,
            coord_token_ids=self.coord_ids, coord_decode_mode=decode_mode,
        )


def make_env(tmp_dir, num_train: int = 4, seed: int = 0) -> TinyEnv:
    """Tiny model (seed ``seed``) + ``num_train`` shapes records (64x64, 1..3 objects) encoded with ``PROMPT``."""
    vlm, tok, proc = build_tiny_in_memory(seed=seed)
    train, _ = make_shapes_dataset(tmp_dir, num_train, 0, image_size=64, max_shapes=3, seed=0)
    records, _ = read_jsonl(train)
    encoder = ChatEncoder(tok, proc, prompt=PROMPT)
    samples = [encoder.encode(r) for r in records]
    return TinyEnv(vlm, HiddenStatesModel(vlm), tok, coord_vocab_from_tokenizer(tok), encoder, records, samples)


# ------------------------------------------------------------------------------------- rollouts


def obj_text(desc: str, bins: Sequence[int]) -> str:
    return '{"desc": "' + desc + '", "bbox_2d": [' + ", ".join(coord_token(b) for b in bins) + "]}"


def answer_text(objects: Sequence[str], close: bool = True) -> str:
    body = '{"objects": [' + ", ".join(objects)
    return body + "]}" if close else body


class FixedBackend(GenerationBackend):
    """Returns ``texts[i]`` (tokenised, ``<|im_end|>`` appended when ``finished``) for the i-th prompt."""

    def __init__(self, tokenizer, texts: Sequence[str], finished: bool = True):
        self.tokenizer = tokenizer
        self.texts = list(texts)
        self.finished = finished
        self.calls = 0

    def derive(self, *, temperature, batch_size):
        return self

    def weights_changed(self):
        """The answers are fixed: no weights to follow."""

    def generate(self, prompts):
        assert len(prompts) == len(self.texts), "one hand-written answer per prompt"
        self.calls += 1
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        outs = []
        for text in self.texts:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if self.finished:
                ids.append(im_end)
            outs.append(GenerationOutput(token_ids=ids, token_logprobs=[0.0] * len(ids), finished=self.finished))
        return outs


def mixed_rollout_texts(records: Sequence[Record]) -> list[str]:
    """Per record: GT object 0 slightly shifted (matched), a far-away box (FP, unless it is the only
    thing left), the remaining GT objects left out (FN). A record with one object gets the FP only,
    so its GT object is FN."""
    texts = []
    for r in records:
        objs = []
        if len(r.objects) >= 2:
            g = r.objects[0]
            shifted = [min(999, b + 3) for b in g.bins]
            objs.append(obj_text(g.desc, shifted))
        objs.append(obj_text("purple star", (990, 990, 999, 999)))
        texts.append(answer_text(objs))
    return texts


def prepare_rollout_batch(
    records: Sequence[Record], *, prompts: Sequence[EncodedSample] | None = None, **kwargs
) -> RolloutBatch:
    """Roll out one micro-batch of ``records``: ``rollout.step.prepare_rollout_batches`` (same keywords) with one group."""
    return prepare_rollout_batches([records], prompts=None if prompts is None else [prompts], **kwargs)[0]


def rollout_batch(env: TinyEnv, record_ids: Sequence[int], *, packing: bool, max_length: int = 1024) -> RolloutBatch:
    """A deterministic Channel-B batch through the real ``prepare_rollout_batch`` (FixedBackend)."""
    records = [env.records[i] for i in record_ids]
    backend = FixedBackend(env.tokenizer, mixed_rollout_texts(records))
    return prepare_rollout_batch(
        records, encoder=env.encoder, backend=backend, coord_vocab=env.coord_vocab, matching=MatchingConfig(),
        max_length=max_length, packing=packing, pad_token_id=env.pad_id,
    )


def full_token_ce(hidden: torch.Tensor, lm_head: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` brute-force CE of token ``j`` from full logits at ``j - 1`` (position 0 gets 0)."""
    logits = hidden.detach() @ lm_head.detach().T
    ce = torch.zeros(input_ids.shape)
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    ce[:, 1:] = -lp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return ce


def loss_metrics(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("loss/")}
