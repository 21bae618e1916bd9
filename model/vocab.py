"""Coord-token vocabulary: the 1000 added tokens ``<|coord_0|>`` .. ``<|coord_999|>`` (docs/DATA.md).

Three jobs: describe where the coord tokens sit (``CoordVocab``), check a tokenizer has them as
single contiguous tokens (``coord_vocab_from_tokenizer``), and add them to a tokenizer + model when
missing (``ensure_coord_tokens``), growing the embedding / LM-head tables only when needed (never
shrinking: real Qwen checkpoints ship more rows than tokenizer entries) and initialising the new
rows smoothly in the bin index ``k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from configs.validation import declared_enum
from data.coordjson import NUM_COORD_BINS, coord_token_texts
from model.shapes import gathered_for_write, logical_shape

COORD_INITS = declared_enum("model.coord_tokens.init")


@dataclass(frozen=True)
class CoordVocab:
    """Coord tokens occupy the contiguous ids ``[first_id, first_id + num_bins)``; bin ``k`` is ``first_id + k``."""

    first_id: int
    num_bins: int = NUM_COORD_BINS

    @property
    def end_id(self) -> int:
        """One past the last coord id."""
        return self.first_id + self.num_bins

    @property
    def ids(self) -> torch.Tensor:
        """LongTensor ``[num_bins]`` of coord token ids in bin order."""
        return torch.arange(self.first_id, self.end_id, dtype=torch.long)

    def token_id(self, k: int) -> int:
        """Token id of bin ``k`` (0..num_bins-1)."""
        if isinstance(k, bool) or not 0 <= int(k) < self.num_bins:
            raise ValueError(f"coord bin must be in 0..{self.num_bins - 1}, got {k!r}")
        return self.first_id + int(k)

    def bin_of(self, token_id: int) -> int:
        """Bin of ``token_id``, or -1 when it is not a coord token."""
        t = int(token_id)
        return t - self.first_id if self.first_id <= t < self.end_id else -1

    def is_coord(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor (same shape as ``ids``): True where the id is a coord token."""
        return (ids >= self.first_id) & (ids < self.end_id)

    def bins(self, ids: torch.Tensor) -> torch.Tensor:
        """Long tensor (same shape as ``ids``): bin 0..999 at coord tokens, -1 elsewhere."""
        return torch.where(self.is_coord(ids), ids - self.first_id, torch.full_like(ids, -1))


def coord_vocab_from_tokenizer(tokenizer) -> CoordVocab:
    """Check that every ``<|coord_k|>`` encodes to ONE token and that the ids are contiguous in k.

    Raises ValueError naming the first offending bin and the fix (``ensure_coord_tokens`` or
    ``scripts/add_coord_tokens.py``).
    """
    texts = coord_token_texts()
    fix = "add them with model.vocab.ensure_coord_tokens(...) or `python scripts/add_coord_tokens.py CKPT --out DIR`"
    unk = getattr(tokenizer, "unk_token_id", None)
    vocab_ids = tokenizer.convert_tokens_to_ids(texts)
    missing = [k for k, i in enumerate(vocab_ids) if i is None or (unk is not None and i == unk)]
    if missing:
        raise ValueError(
            f"tokenizer lacks {len(missing)} of the {len(texts)} coord tokens (first missing: {texts[missing[0]]}); {fix}"
        )
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for k, (enc, vid) in enumerate(zip(encoded, vocab_ids)):
        if list(enc) != [vid]:
            raise ValueError(
                f"{texts[k]} encodes to {len(enc)} tokens {list(enc)} instead of the single token {vid}; the coord "
                f"tokens must be added as special (never-split) tokens: {fix}"
            )
    first = vocab_ids[0]
    for k, vid in enumerate(vocab_ids):
        if vid != first + k:
            raise ValueError(
                f"coord token ids are not contiguous: {texts[k]} has id {vid}, expected {first + k} "
                f"(<|coord_0|> = {first}); rebuild the tokenizer so the 1000 coord tokens are added in bin order"
            )
    return CoordVocab(first_id=int(first), num_bins=len(texts))


def has_any_coord_token(tokenizer) -> bool:
    vocab = tokenizer.get_vocab()
    return any(t in vocab for t in coord_token_texts())


def ensure_coord_tokens(tokenizer, model=None, init: str = "sincos", seed: int = 0) -> tuple[CoordVocab, bool]:
    """Make sure ``tokenizer`` (and ``model``) carry the 1000 coord tokens; returns ``(CoordVocab, added)``.

    * Tokenizer: when none of the coord tokens is present, exactly the 1000 are appended as special
      tokens (never split, contiguous ids starting at ``len(tokenizer)``). A partial set is an error.
    * Model: the input-embedding table (and an untied LM head) grows to ``len(tokenizer)`` rows only
      when the tokenizer has outgrown it; a table that is already larger keeps all its rows.
    * Init: when tokens were added or rows were grown, the coord rows ``[first_id, first_id+1000)``
      are initialised with ``init`` (see ``init_coord_rows``); an already-prepared checkpoint is left alone.
    """
    added = False
    if not has_any_coord_token(tokenizer):
        from tokenizers import AddedToken

        before = len(tokenizer)
        tokens = [AddedToken(t, special=True, normalized=False, single_word=False) for t in coord_token_texts()]
        n = tokenizer.add_tokens(tokens, special_tokens=True)
        if n != NUM_COORD_BINS or len(tokenizer) != before + NUM_COORD_BINS:
            raise RuntimeError(
                f"adding coord tokens grew the tokenizer by {len(tokenizer) - before}, expected {NUM_COORD_BINS}"
            )
        added = True
    vocab = coord_vocab_from_tokenizer(tokenizer)
    if model is None:
        return vocab, added

    grown = False
    rows = table_rows(model.get_input_embeddings())
    needed = max(len(tokenizer), vocab.end_id)
    if needed > rows:
        # mean_resizing=False: the coord rows get our own init below; other grown rows (none in
        # practice) keep the library default.
        model.resize_token_embeddings(needed, mean_resizing=False)
        grown = True
    out = model.get_output_embeddings()
    if out is not None and table_rows(out) < vocab.end_id:
        raise RuntimeError(f"LM head has {table_rows(out)} rows after resize; coord ids need {vocab.end_id}")
    if added or grown:
        init_coord_rows(model, vocab, init=init, seed=seed)
    return vocab, added


def _sincos_features(num_bins: int, num_freq: int) -> torch.Tensor:
    """``[num_bins, 2*num_freq]`` float64 features ``sin(pi m t), cos(pi m t)`` of ``t = k/(num_bins-1)``, m=1..num_freq.

    Low frequencies only, so distance between bins grows with |k - k'| over most of the range.
    """
    t = torch.arange(num_bins, dtype=torch.float64) / (num_bins - 1)
    m = torch.arange(1, num_freq + 1, dtype=torch.float64)
    ang = math.pi * t[:, None] * m[None, :]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1) / math.sqrt(num_freq)


def coord_init_rows(
    reference: torch.Tensor, num_bins: int = NUM_COORD_BINS, init: str = "sincos", seed: int = 0, scale: float = 0.5
) -> torch.Tensor:
    """New coord rows ``[num_bins, H]`` (float32) built from ``reference`` rows ``[N, H]`` of the same table.

    ``sincos``: mean(reference) + a deterministic projection of low-frequency sin/cos features of k/999
    whose norm is ``scale`` × the typical distance of a reference row from the mean (smooth in k).
    ``mean``: mean(reference) + noise of 1e-3 × that typical distance. ``random``: mean(reference) +
    Gaussian rows with the reference's per-dimension std.
    """
    ref = reference.detach().to(torch.float64)
    hidden = ref.shape[1]
    if ref.shape[0] == 0:
        mu = torch.zeros(hidden, dtype=torch.float64)
        typical = 0.02 * math.sqrt(hidden)
        std = torch.full((hidden,), 0.02, dtype=torch.float64)
    else:
        mu = ref.mean(0)
        typical = float((ref - mu).norm(dim=1).mean()) or 0.02 * math.sqrt(hidden)
        std = ref.std(0, unbiased=False) if ref.shape[0] > 1 else torch.full((hidden,), 0.02, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    if init == "sincos":
        num_freq = max(1, min(8, hidden // 2))
        feats = _sincos_features(num_bins, num_freq)  # unit norm rows
        proj = torch.randn(hidden, 2 * num_freq, generator=gen, dtype=torch.float64)
        q, _ = torch.linalg.qr(proj)  # [H, 2F] orthonormal columns: keeps feature distances
        rows = mu + scale * typical * feats @ q.T
    elif init == "mean":
        noise = torch.randn(num_bins, hidden, generator=gen, dtype=torch.float64) / math.sqrt(hidden)
        rows = mu + 1e-3 * typical * noise
    elif init == "random":
        rows = mu + torch.randn(num_bins, hidden, generator=gen, dtype=torch.float64) * std
    else:
        raise ValueError(f"model.coord_init must be one of {list(COORD_INITS)}, got {init!r}")
    return rows.to(torch.float32)


@torch.no_grad()
def init_coord_rows(model, vocab: CoordVocab, init: str = "sincos", seed: int = 0) -> None:
    """Initialise the coord rows of the input embeddings and (if untied) of the LM head, in place.

    Reference rows are the table rows below ``vocab.first_id`` (the pretrained vocabulary).
    """
    emb = model.get_input_embeddings().weight
    tables = [(emb, seed)]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not emb:  # a tied head is the same Parameter
        tables.append((out.weight, seed + 1))
    with gathered_for_write([w for w, _ in tables]):
        for weight, s in tables:
            rows = coord_init_rows(weight[: vocab.first_id], vocab.num_bins, init=init, seed=s)
            weight[vocab.first_id : vocab.end_id] = rows.to(device=weight.device, dtype=weight.dtype)


def table_rows(module: torch.nn.Module) -> int:
    """Rows of an embedding table or LM head, read from the module.

    Not ``weight.shape[0]``: under DeepSpeed ZeRO-3 a partitioned weight's local tensor is empty
    (shape ``[0]``) outside its module's forward, and a loader that trusted it would "grow" the
    table and re-initialise the coord rows of a checkpoint that already has them.
    """
    if isinstance(module, torch.nn.Embedding):
        return int(module.num_embeddings)
    if isinstance(module, torch.nn.Linear):
        return int(module.out_features)
    return int(logical_shape(module.weight)[0])
