"""Description -> category mapping: exact normalised match first, else sentence embeddings (docs/EVAL.md).

One implementation serves offline eval (``eval.evaluate``, ``eval.export_coco``), in-loop eval and
Stage-2's description gate (``rollout.matching``):

- :func:`normalize_desc`: lower-case; ``_``, ``/`` and brackets become spaces; whitespace runs collapse.
- :class:`DescEncoder`: a ``sentence-transformers`` model (mean pooling and L2 normalisation are the
  model's own modules; every vector is L2-normalised again here), each normalised desc embedded once
  (cache, shared by every mapper built on the encoder).
- :class:`CategoryMapper`: categories embedded once; a desc maps to the category with the same
  normalised text, else to the category of highest cosine similarity when it reaches
  ``eval.semantic.threshold``, else to nothing (the caller drops the prediction and counts it).

``sentence_transformers`` is imported only by :func:`load_encoder`, i.e. only when
``eval.semantic.model`` is set. A missing package or model is a user error naming
``eval.semantic.model`` (raised at start-up: ``training.preflight.check_paths``, the CLIs).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from configs.errors import UserError
from data.descs import normalize_desc  # noqa: F401  (re-exported: eval.semantic.normalize_desc)

if TYPE_CHECKING:
    from configs.types import SemanticConfig

EXACT, SEMANTIC, UNMAPPED = "exact", "semantic", "unmapped"
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
INSTALL_HINT = "pip install sentence-transformers==6.3.0 (pinned in requirements.txt)"



class DescEncoder:
    """Normalised desc -> unit vector, through a sentence-transformers model; each desc embedded once."""

    def __init__(self, model: Any, batch_size: int = 64, name: str = ""):
        self.model = model
        self.batch_size = int(batch_size)
        self.name = name
        self._cache: dict[str, np.ndarray] = {}
        self.encoded_count = 0  # descs sent to the model (each distinct normalised desc once)

    def _fill(self, keys: Iterable[str]) -> None:
        todo = sorted({k for k in keys if k not in self._cache})
        if not todo:
            return
        vecs = np.asarray(self.model.encode(todo, batch_size=self.batch_size, convert_to_numpy=True,
                                            normalize_embeddings=True, show_progress_bar=False), dtype=np.float64)
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        self.encoded_count += len(todo)
        self._cache.update(zip(todo, vecs))

    def embed(self, descs: Sequence[str]) -> np.ndarray:
        """``[len(descs), dim]`` unit vectors of the normalised descs."""
        keys = [normalize_desc(d) for d in descs]
        self._fill(keys)
        if not keys:
            return np.zeros((0, 0))
        return np.stack([self._cache[k] for k in keys])

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of two descs; 1.0 when their normalised texts are equal."""
        if normalize_desc(a) == normalize_desc(b):
            return 1.0
        va, vb = self.embed([a, b])
        return float(va @ vb)


_LOADED: dict[tuple[str, str, int], DescEncoder] = {}


def load_encoder(cfg: SemanticConfig | None) -> DescEncoder | None:
    """The encoder of ``eval.semantic`` (a ``configs.types.SemanticConfig``), or None when ``model`` is null.

    Loaded once per process (model, device, batch size); a missing package or model raises a
    ``UserError`` naming ``eval.semantic.model`` and the fix.
    """
    name = getattr(cfg, "model", None)
    if not name:
        return None
    key = (str(name), str(cfg.device), int(cfg.batch_size))
    if key in _LOADED:
        return _LOADED[key]
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise UserError(f"eval.semantic.model={name!r} needs the sentence-transformers package: {INSTALL_HINT}; "
                        "or set eval.semantic.model: null (exact match only)") from e
    try:
        model = SentenceTransformer(str(name), device=str(cfg.device))
    except Exception as e:  # noqa: BLE001 - OSError, HF hub errors, a dir that is not a model: all the user's to fix
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"eval.semantic.model={name!r}: cannot load the sentence-transformers model ({msg}); give a "
                        f"local model dir or a downloadable name such as {DEFAULT_MODEL}, or set "
                        "eval.semantic.model: null (exact match only)") from e
    enc = DescEncoder(model, batch_size=int(cfg.batch_size), name=str(name))
    _LOADED[key] = enc
    return enc


@dataclass(frozen=True)
class DescMatch:
    """Where one desc went: ``category`` (None when unmapped), ``kind`` (exact/semantic/unmapped), ``similarity``."""

    category: str | None
    kind: str
    similarity: float


class CategoryMapper:
    """Maps descs onto a fixed category list (exact first, then embeddings; see module docstring)."""

    def __init__(self, categories: Sequence[str], encoder: DescEncoder | None = None, threshold: float = 0.6):
        self.categories = list(dict.fromkeys(normalize_desc(c) for c in categories))
        self._index = {c: i for i, c in enumerate(self.categories)}
        self.encoder = encoder
        self.threshold = float(threshold)
        self._memo: dict[str, DescMatch] = {}
        # Category embeddings: computed once per mapper (i.e. once per evaluation).
        self._cat_vecs = encoder.embed(self.categories) if encoder is not None and self.categories else None

    def map_many(self, descs: Sequence[str]) -> list[DescMatch]:
        keys = [normalize_desc(d) for d in descs]
        todo = [k for k in dict.fromkeys(keys) if k not in self._memo]
        exact = [k for k in todo if k in self._index]
        for k in exact:
            self._memo[k] = DescMatch(k, EXACT, 1.0)
        rest = [k for k in todo if k not in self._index]
        if rest and self._cat_vecs is None:
            for k in rest:
                self._memo[k] = DescMatch(None, UNMAPPED, float("nan"))
        elif rest:
            sims = self.encoder.embed(rest) @ self._cat_vecs.T  # [n, C]
            for k, row in zip(rest, sims):
                j = int(np.argmax(row))  # first category on ties
                sim = float(row[j])
                self._memo[k] = DescMatch(self.categories[j], SEMANTIC, sim) if sim >= self.threshold \
                    else DescMatch(None, UNMAPPED, sim)
        return [self._memo[k] for k in keys]

    def map(self, desc: str) -> DescMatch:
        return self.map_many([desc])[0]


def add_semantic_args(parser) -> None:
    """``--semantic-model/-threshold/-device/-batch-size``: the ``eval.semantic`` keys on a CLI."""
    from configs.types import SemanticConfig

    parser.add_argument("--semantic-model", default=None, help="sentence-transformers model name or local dir: map "
                        "descs onto GT categories by embedding similarity after the exact match (default: exact only)")
    parser.add_argument("--semantic-threshold", type=float, default=SemanticConfig.threshold,
                        help=f"cosine similarity a desc needs to map (default {SemanticConfig.threshold})")
    parser.add_argument("--semantic-device", default=SemanticConfig.device)
    parser.add_argument("--semantic-batch-size", type=int, default=SemanticConfig.batch_size)


def semantic_from_args(args) -> SemanticConfig | None:
    """The ``SemanticConfig`` of :func:`add_semantic_args`' flags (None without ``--semantic-model``), its encoder
    loaded once so that a missing package or model fails before any file is read."""
    if not args.semantic_model:
        return None
    from configs.types import SemanticConfig

    semantic = SemanticConfig(model=args.semantic_model, threshold=args.semantic_threshold,
                              device=args.semantic_device, batch_size=args.semantic_batch_size)
    load_encoder(semantic)
    return semantic
