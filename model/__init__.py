"""Model layer: checkpoint loading, coord vocabulary, tiny random Qwen3-VL, forward helpers.

See docs/MODEL.md.
"""

from model.forward import (
    HiddenStatesModel,
    compute_vision,
    embed_tokens,
    hidden_states,
    position_ids_for_batch,
    unwrap_vlm,
)
from model.loading import LoadedModel, apply_freeze, load_model_and_processors, save_checkpoint_model
from model.tiny import (
    QWEN_VL_CHAT_TEMPLATE,
    build_tiny_checkpoint,
    build_tiny_image_processor,
    build_tiny_in_memory,
    build_tiny_tokenizer,
    tiny_qwen3vl_config,
)
from model.vocab import CoordVocab, coord_vocab_from_tokenizer, ensure_coord_tokens, init_coord_rows

__all__ = [
    "CoordVocab",
    "HiddenStatesModel",
    "LoadedModel",
    "QWEN_VL_CHAT_TEMPLATE",
    "apply_freeze",
    "build_tiny_checkpoint",
    "build_tiny_image_processor",
    "build_tiny_in_memory",
    "build_tiny_tokenizer",
    "compute_vision",
    "coord_vocab_from_tokenizer",
    "embed_tokens",
    "ensure_coord_tokens",
    "hidden_states",
    "init_coord_rows",
    "load_model_and_processors",
    "position_ids_for_batch",
    "save_checkpoint_model",
    "tiny_qwen3vl_config",
    "unwrap_vlm",
]
