"""Load a Qwen3-VL checkpoint (model + tokenizer + image processor), make sure it has the coord
tokens, freeze parts of it, and save it back.

AutoProcessor is not used: for Qwen3-VL it builds a video processor that needs torchvision. The
tokenizer and image processor are loaded separately and travel together in ``LoadedModel``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from configs.errors import ConfigError, UserError
from configs.validation import declared_default, declared_enum
from core.vocab import LOGGER_NAME
from data.coordjson import IM_END
from model import packed_attention
from model.adapters import apply_adapter, is_adapter_dir, load_adapter_weights, merge_adapter, read_adapter_config
from model.shapes import logical_numel
from model.vocab import COORD_INITS, CoordVocab, coord_vocab_from_tokenizer, ensure_coord_tokens, table_rows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = declared_enum("model.attn_implementation")
logger = logging.getLogger(LOGGER_NAME)


@dataclass
class LoadedModel:
    """What ``load_model_and_processors`` returns; unpacks as ``model, tokenizer, image_processor, coord_vocab``."""

    model: Any  # Qwen3VLForConditionalGeneration
    tokenizer: Any
    image_processor: Any
    coord_vocab: CoordVocab
    added_coord_tokens: bool = False

    def __iter__(self):
        return iter((self.model, self.tokenizer, self.image_processor, self.coord_vocab))


def _flash_attn_usable() -> bool:
    """flash-attn is importable and there is a CUDA device for it to run on."""
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attn(attn_implementation: str) -> str:
    """The attention kernel to load with: ``auto`` is ``flash_attention_2`` when flash-attn is importable
    (and CUDA is there), else ``sdpa_packed`` (``model.packed_attention``: SDPA per packed sample instead
    of a dense block mask over the row); the choice is logged. Other values are checked and returned;
    ``sdpa_packed`` is registered with transformers here."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(
            "model.attn_implementation", f"must be one of {list(ATTN_IMPLEMENTATIONS)}, got {attn_implementation!r}"
        )
    if attn_implementation == "auto":
        chosen = "flash_attention_2" if _flash_attn_usable() else packed_attention.NAME
        why = "flash-attn importable" if chosen == "flash_attention_2" else "flash-attn not installed or no CUDA (requirements-gpu.txt)"
        logger.info("model.attn_implementation=auto -> %s (%s)", chosen, why)
        attn_implementation = chosen
    if attn_implementation == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "model.attn_implementation=flash_attention_2 needs the flash-attn package: "
                "`pip install -r requirements-gpu.txt` (CUDA only), or set model.attn_implementation=auto"
            ) from e
    if attn_implementation == packed_attention.NAME:
        packed_attention.register()
    return attn_implementation


def looks_local(name_or_path: str) -> bool:
    """True when ``name_or_path`` can only mean a local path (not a hub id ``org/name``)."""
    p = str(name_or_path)
    first = Path(p).parts[:1]
    return (os.path.isabs(p) or p.startswith((".", "~")) or p.count("/") > 1 or (os.sep != "/" and os.sep in p)
            or Path(p).exists() or (bool(first) and Path(first[0]).is_dir()))  # "runs/x" with a local runs/


def check_checkpoint_path(name_or_path: str, key: str = "checkpoint") -> None:
    """Fail with one clear line when a local checkpoint path is missing or is not a model dir.

    ``key`` names where the path came from (a config key or a CLI argument). Hub ids are not
    checked here (loading them needs the network or the local hub cache).
    """
    if not looks_local(name_or_path):
        return
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise UserError(f"{key}={str(name_or_path)!r}: no such directory (a checkpoint dir with config.json, "
                        "or a Hugging Face hub id like Qwen/Qwen3-VL-2B-Instruct)")
    if not (path / "config.json").is_file() and not is_adapter_dir(path):
        hint = (f"; this is a training checkpoint: its model is {str(name_or_path).rstrip('/')}/model"
                if _is_model_dir(path / "model") else "")
        raise UserError(f"{key}={str(name_or_path)!r}: no config.json in this directory; point it at the folder "
                        f"that save_pretrained wrote (config.json, tokenizer files, weights){hint}")


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "config.json").is_file() or is_adapter_dir(path))


def model_dir_of(checkpoint: str) -> str:
    """``checkpoint`` itself, or its ``model/`` folder when it is a training checkpoint
    (``<run dir>/checkpoint-<step>``, which holds the model next to the optimizer state)."""
    path = Path(checkpoint).expanduser()
    if path.is_dir() and not _is_model_dir(path) and _is_model_dir(path / "model"):
        return str(path / "model")
    return checkpoint


def no_coord_tokens_fix(name_or_path: str, key: str) -> str:
    """The one line for a model without the coord tokens where trained ones are needed (Stage-2, inference)."""
    return (f"{key}={str(name_or_path)!r} has no coord tokens <|coord_0|>..<|coord_999|>: point it at a Stage-1 "
            "output (<stage-1 run dir>/checkpoint-<step>/model), whose coord rows are trained; to start from "
            "fresh, untrained coord rows on purpose, add them first with "
            f"`python scripts/add_coord_tokens.py {name_or_path} --out DIR` and use DIR")


def require_coord_tokens(tokenizer, name_or_path: str, key: str) -> CoordVocab:
    """The tokenizer's coord vocabulary; a tokenizer without any coord token is one :class:`UserError`
    (:func:`no_coord_tokens_fix`); a broken set (split or non-contiguous tokens) is the vocab's ValueError."""
    from model.vocab import has_any_coord_token

    if not has_any_coord_token(tokenizer):
        raise UserError(no_coord_tokens_fix(name_or_path, key))
    return coord_vocab_from_tokenizer(tokenizer)


def _load_image_processor(name_or_path: str):
    from transformers import AutoImageProcessor

    try:
        # The PIL backend needs no torchvision (not installed here).
        return AutoImageProcessor.from_pretrained(name_or_path, backend="pil")
    except TypeError:
        return AutoImageProcessor.from_pretrained(name_or_path)


def load_tokenizer_and_image_processor(name_or_path: str, *, key: str = "checkpoint") -> tuple[Any, Any]:
    """Tokenizer + image processor of a checkpoint (no weights); a bad path or hub id is one clear line."""
    from transformers import AutoTokenizer

    check_checkpoint_path(name_or_path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:  # hub lookups of a bad id / no network: one line, not the hub traceback
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UserError(f"{key}={name_or_path!r}: cannot load a tokenizer from it ({first.strip()})") from exc
    return tokenizer, _load_image_processor(name_or_path)


def load_model_and_processors(
    name_or_path: str,
    *,
    dtype: str = "float32",
    attn_implementation: str = declared_default("model.attn_implementation"),
    add_coord_tokens: bool = True,
    coord_init: str = "sincos",
    key: str = "checkpoint",
) -> LoadedModel:
    """Load a Qwen3-VL checkpoint from a local dir or HF id.

    ``add_coord_tokens=True`` adds the 1000 coord tokens when missing (resizing without shrinking and
    initialising the rows with ``coord_init``); ``False`` requires them to be present already.
    The model is returned in eval mode on CPU in ``dtype``; the trainer moves and wraps it.

    A directory written by an adapter run (``adapter.json``, see ``model.adapters``) loads as its base
    checkpoint with the adapter merged in: an ordinary model.
    ``key`` names the source of ``name_or_path`` in error messages (config key or CLI argument).
    """
    from transformers import AutoModelForImageTextToText

    if is_adapter_dir(name_or_path):
        return _load_merged_adapter(name_or_path, dtype=dtype, attn_implementation=attn_implementation)

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if coord_init not in COORD_INITS:
        raise ValueError(f"model.coord_tokens.init must be one of {list(COORD_INITS)}, got {coord_init!r}")
    tokenizer, image_processor = load_tokenizer_and_image_processor(name_or_path, key=key)  # path errors first
    if not add_coord_tokens:  # before the weights load: a wrong path costs a second, not a model load
        require_coord_tokens(tokenizer, name_or_path, key)
    attn_implementation = resolve_attn(attn_implementation)
    model = AutoModelForImageTextToText.from_pretrained(
        name_or_path, dtype=DTYPES[dtype], attn_implementation=attn_implementation
    )
    if add_coord_tokens:
        vocab, added = ensure_coord_tokens(tokenizer, model, init=coord_init)
        if added:
            logger.warning("%s=%s has no coord tokens: added the 1000 coord tokens <|coord_0|>..<|coord_999|> "
                           "with fresh rows initialised by model.coord_tokens.init=%s (tokenizer now %d tokens)",
                           key, name_or_path, coord_init, len(tokenizer))
    else:
        vocab = coord_vocab_from_tokenizer(tokenizer)
        added = False
        rows = table_rows(model.get_input_embeddings())
        if rows < vocab.end_id:
            raise ValueError(
                f"{name_or_path}: embedding table has {rows} rows but coord ids reach {vocab.end_id - 1}; "
                "set model.coord_tokens.add_if_missing=true to resize it"
            )
    _ensure_generation_ids(model, tokenizer)
    model.eval()
    return LoadedModel(model, tokenizer, image_processor, vocab, added)


def _load_merged_adapter(adapter_dir: str, *, dtype: str, attn_implementation: str) -> LoadedModel:
    """Base checkpoint recorded in ``adapter_dir/adapter.json`` + the adapter's tensors, merged."""
    meta = read_adapter_config(adapter_dir)
    if is_adapter_dir(meta.base):
        raise ValueError(f"{adapter_dir}/adapter.json: its base {meta.base!r} is itself an adapter dir; merge it first")
    if not os.path.isdir(meta.base) and meta.base.startswith((".", "/")):
        raise FileNotFoundError(
            f"{adapter_dir}/adapter.json: base checkpoint {meta.base!r} not found; it must exist to load this adapter "
            "(or merge it where the base exists: python scripts/merge_adapter.py ADAPTER_DIR --out DIR)"
        )
    # Merge in fp32 (a bf16 W + B@A rounds the small LoRA update away), then cast.
    loaded = load_model_and_processors(meta.base, dtype="float32", attn_implementation=attn_implementation,
                                       add_coord_tokens=True, coord_init=meta.coord_init)
    apply_adapter(loaded.model, meta.spec, loaded.coord_vocab)
    load_adapter_weights(loaded.model, adapter_dir)
    merge_adapter(loaded.model)
    loaded.model.to(DTYPES[dtype]).eval()
    return loaded


def memory_summary(model) -> dict[str, float]:
    """GiB of parameters (all / trainable) and of the AdamW state the trainable ones need (2 fp32 moments)."""
    gib = 1024**3
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    return {
        "params_gib": round(sum(logical_numel(p) * p.element_size() for p in params) / gib, 4),
        "trainable_params_gib": round(sum(logical_numel(p) * p.element_size() for p in trainable) / gib, 4),
        "adamw_state_gib": round(sum(2 * 4 * logical_numel(p) for p in trainable) / gib, 4),
    }


def _ensure_generation_ids(model, tokenizer) -> None:
    """Generation must stop at ``<|im_end|>`` (the answer's end token) and pad with the tokenizer's pad."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    eos = gen.eos_token_id
    eos_list = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if im_end is not None and im_end not in eos_list:
        gen.eos_token_id = [im_end, *eos_list]
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id


def _count(params) -> int:
    return int(sum(logical_numel(p) for p in params))


PARTS: tuple[str, ...] = ("language_model", "merger", "vision")
"""The three parameter groups of a Qwen3-VL model, as named by ``model.freeze.*`` and ``training.lr_mult.*``."""


def param_parts(model) -> dict[int, str]:
    """``id(param) -> part`` for every parameter of the Qwen3-VL inside ``model`` (one of :data:`PARTS`).

    ``vision``: the vision tower except its mergers; ``merger``: the patch merger and the deepstack
    mergers (vision → LM projection); ``language_model``: the text decoder, its embeddings and the LM
    head. Shared tensors appear once.
    """
    from model.forward import unwrap_vlm

    vlm = unwrap_vlm(model)
    visual = vlm.model.visual
    merger_ids = set()
    for name in ("merger", "deepstack_merger_list"):
        sub = getattr(visual, name, None)
        if sub is not None:
            merger_ids |= {id(p) for p in sub.parameters()}
    visual_ids = {id(p) for p in visual.parameters()}
    parts = {}
    for p in vlm.parameters():
        parts[id(p)] = "merger" if id(p) in merger_ids else "vision" if id(p) in visual_ids else "language_model"
    return parts


def apply_freeze(model, vision: bool, merger: bool, language_model: bool) -> dict[str, int]:
    """Freeze parts of a Qwen3-VL model (True = frozen; ``model.freeze.*`` in the config; parts as in
    :func:`param_parts`). Returns parameter counts ``{"trainable", "frozen", "total"}`` (shared tensors
    counted once).
    """
    from model.forward import unwrap_vlm

    vlm = unwrap_vlm(model)
    frozen = {"vision": vision, "merger": merger, "language_model": language_model}
    parts = param_parts(vlm)
    for p in vlm.parameters():
        p.requires_grad_(not frozen[parts[id(p)]])
    params = list(vlm.parameters())  # deduplicated by nn.Module (tied weights once)
    trainable = _count(p for p in params if p.requires_grad)
    total = _count(params)
    return {"trainable": trainable, "frozen": total - trainable, "total": total}


def save_checkpoint_model(model, tokenizer, image_processor, out_dir: str) -> str:
    """``save_pretrained`` model (unwrapped), tokenizer and image processor into ``out_dir``; returns it."""
    import os

    from model.forward import unwrap_vlm

    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    unwrap_vlm(model).save_pretrained(out_dir)
    return out_dir
