"""Shared test fixtures for the data layer: the REAL Qwen BPE tokenizer grown like a Qwen3-VL one,
a Qwen3-VL-style chat template, an in-process Qwen2-VL image processor, and tiny PNG records.

Importable from any test (``from tests._data_fixtures import qwen_tokenizer``). Builders are
cached because loading the 151k-entry vocabulary and adding 1026 tokens costs ~1 s.
"""

from __future__ import annotations

import functools
import json
import os

from PIL import Image

FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "qwen_tokenizer")

# The 26 special tokens of a real Qwen3-VL tokenizer, ids 151643..151668 in this order.
QWEN3VL_SPECIAL_TOKENS = (
    "<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> "
    "<|box_end|> <|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> "
    "<|image_pad|> <|video_pad|> <tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> "
    "<|fim_suffix|> <|fim_pad|> <|repo_name|> <|file_sep|> <tool_response> </tool_response> "
    "<think> </think>"
).split()

# Qwen3-VL-style ChatML: no default system message; an image item renders as the vision block.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# Small image budget: a 64x64 image becomes a 2x2 grid of 32-px merged patches (4 image tokens).
MIN_PIXELS = 32 * 32
MAX_PIXELS = 64 * 64


@functools.lru_cache(maxsize=1)
def qwen_tokenizer():
    """Real Qwen2 BPE + 26 Qwen3-VL specials (ids 151643..151668) + 1000 coord tokens (151669..152668).

    Shared and cached: do not mutate it in a test.
    """
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from data.coordjson import coord_token_texts

    tok = AutoTokenizer.from_pretrained(FIXTURE_DIR)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN3VL_SPECIAL_TOKENS], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in coord_token_texts()], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tok.convert_tokens_to_ids("<|coord_0|>") == 151669
    return tok


def image_processor(min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS):
    """Qwen2-VL image processor (PIL backend) with Qwen3-VL geometry: patch 16, merge 2, temporal 2."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )


def write_png(path: str, width: int = 64, height: int = 64, color=(200, 30, 30)) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)
    return path


def write_jsonl(path: str, rows: list) -> str:
    """Write rows (dicts are JSON-encoded, strings written verbatim) one per line."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path
