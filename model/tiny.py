"""A tiny random Qwen3-VL with a real byte-level BPE tokenizer, for tests and the CPU demo.

Everything is deterministic: the BPE is trained on a built-in corpus (and committed as tiny_tokenizer.json), the model weights come from
``torch.manual_seed(seed)``. The tokenizer mirrors the real Qwen3-VL layout: regular BPE vocabulary,
then the 26 Qwen special tokens in Qwen order, then the 1000 coord tokens; the model's embedding
table has more rows than the tokenizer has entries (as real checkpoints do).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

from data.coordjson import IM_END, coord_token_texts
from model.vocab import COORD_INITS, coord_vocab_from_tokenizer, init_coord_rows

# The 26 special tokens of a real Qwen3-VL tokenizer (ids 151643..151668 there), in Qwen order.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = tuple(
    "<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> "
    "<|box_end|> <|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> "
    "<|image_pad|> <|video_pad|> <tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> "
    "<|fim_suffix|> <|fim_pad|> <|repo_name|> <|file_sep|> <tool_response> </tool_response> "
    "<think> </think>".split()
)

# Qwen3-VL-style ChatML. Content is a string or a list of {"type": "image"} / {"type": "text", "text": ...}
# items; an image renders as the vision block whose single <|image_pad|> the encoder expands to the
# image's token count. No default system message (Qwen3-VL has none).
QWEN_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Image budget of the tiny processor: a 64x64 image is a 4x4 grid of 16-px patches → 2x2 = 4 image tokens.
TINY_MIN_PIXELS = 32 * 32
TINY_MAX_PIXELS = 64 * 64

_TINY_BPE_VOCAB = 600
_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "grey", "brown")
_SHAPES = ("circle", "square", "triangle", "rectangle", "star", "cat", "dog", "car", "person", "cup")
_PROMPTS = (
    "Detect all objects in the image. Answer with one line of JSON: "
    '{"objects": [{"desc": ..., "bbox_2d": [x1, y1, x2, y2]}]} with coordinates as coord tokens.',
    "Locate every object and list its description and bounding box.",
)


def _tiny_corpus() -> list[str]:
    """Deterministic CoordJSON-like training text (numbers stand in for the later-added coord tokens)."""
    lines = list(_PROMPTS)
    for i, colour in enumerate(_COLOURS):
        for j, shape in enumerate(_SHAPES):
            a, b = (7 * i + 3 * j) % 1000, (11 * j + 5 * i) % 1000
            obj = f'{{"desc": "{colour} {shape}", "bbox_2d": [{a}, {b}, {a + 40}, {b + 60}]}}'
            nxt = f'{{"desc": "small {shape}", "bbox_2d": [{b}, {a}, {b + 9}, {a + 9}]}}'
            lines.append(f'{{"objects": [{obj}, {nxt}]}}')
    lines.append('{"objects": []}')
    lines.append('a "quoted" desc, with {braces} and [brackets]: ok')
    return lines


# The trained tokenizer is committed beside this module: training the BPE costs seconds per process
# (every test worker, every spawned DDP rank). `python scripts/make_tiny_tokenizer.py` regenerates the file;
# tests/test_model_tiny.py fails when it no longer matches `train_tiny_tokenizer()`.
TINY_TOKENIZER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_tokenizer.json")


def train_tiny_tokenizer():
    """Train the tiny tokenizer from scratch (what ``TINY_TOKENIZER_FILE`` holds); see ``build_tiny_tokenizer``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_BPE_VOCAB,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in coord_token_texts()], special_tokens=True)
    return _qwen_wrapped(tok.backend_tokenizer)


def build_tiny_tokenizer():
    """Byte-level BPE (~600 regular tokens) + the 26 Qwen specials + 1000 coord tokens, as PreTrainedTokenizerFast.

    pad = ``<|endoftext|>``, eos = ``<|im_end|>``, chat template ``QWEN_VL_CHAT_TEMPLATE``. Loaded from
    ``TINY_TOKENIZER_FILE`` (milliseconds), identical to ``train_tiny_tokenizer()``.
    """
    from tokenizers import Tokenizer

    return _qwen_wrapped(Tokenizer.from_file(TINY_TOKENIZER_FILE))


def _qwen_wrapped(backend):
    """PreTrainedTokenizerFast around a ``tokenizers.Tokenizer`` with the Qwen pad/eos/chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.pad_token = "<|endoftext|>"
    tok.eos_token = IM_END
    tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def _tiny_tokenizer_text() -> str:
    return train_tiny_tokenizer().backend_tokenizer.to_str(pretty=True) + "\n"


def write_tiny_tokenizer_file(path: str = TINY_TOKENIZER_FILE) -> str:
    """Train the tiny tokenizer and write its ``tokenizers`` JSON to ``path`` (the committed fixture)."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(_tiny_tokenizer_text())
    return path


def tiny_tokenizer_is_current(path: str = TINY_TOKENIZER_FILE) -> bool:
    """True when ``path`` holds exactly what ``train_tiny_tokenizer()`` produces now."""
    with open(path, encoding="utf-8") as fh:
        return fh.read() == _tiny_tokenizer_text()


def build_tiny_image_processor(min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS):
    """Qwen2-VL image processor (PIL backend) with Qwen3-VL geometry: patch 16, merge 2, temporal 2.

    ``min_pixels`` / ``max_pixels`` bound the resized image area in pixels.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )


def tiny_qwen3vl_config(
    tokenizer,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vision_depth: int = 2,
    vision_hidden: int = 32,
    vision_heads: int = 2,
    intermediate: int = 128,
    row_multiple: int = 64,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = False,
    head_dim: int | None = None,
    vision_intermediate: int | None = None,
    deepstack_indexes: list[int] | None = None,
    vision_position_embeddings: int = 64,
    max_position_embeddings: int = 4096,
    init_std: float = 0.02,
):
    """Qwen3VLConfig for a tiny random model matching ``tokenizer``.

    Special ids (image/video pad, vision start/end, eos, pad) come from the tokenizer. The row count
    is ``vocab_size`` when given (e.g. 151,936 as in Qwen3-VL), else ``len(tokenizer)`` rounded up to
    ``row_multiple`` plus one extra block: more rows than tokenizer entries, like real checkpoints.
    ``mrope_section`` sums to ``head_dim / 2``; deepstack taps the first ``vision_depth - 1`` blocks.
    The optional keys give real shapes (``bench/bench_train_step.py``): ``head_dim`` (default
    ``hidden / heads``; Qwen3 uses 128 at every size), ``vision_intermediate`` (default
    ``2 * vision_hidden``), ``deepstack_indexes``, the vision tower's learned position grid
    ``vision_position_embeddings`` (a square number; 2304 in Qwen3-VL) and ``max_position_embeddings``.
    ``init_std`` is the std of the random weights (HF's ``initializer_range``, 0.02 as in Qwen3-VL); at
    width 64 a larger one (0.1) shortens the plateau before the model starts reading the image
    (docs/MODEL.md, "The tiny model").
    """
    if not init_std > 0:
        raise ValueError(f"init_std must be > 0, got {init_std}")
    from transformers import Qwen3VLConfig

    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        head_dim = hidden // heads
    half = head_dim // 2
    if half < 3:
        raise ValueError(f"head_dim {head_dim} too small for 3-axis mrope; use hidden/heads >= 6")
    # Qwen3-VL's split is [24, 20, 20] of 64; keep the same shape: t gets the remainder.
    hw = (half * 20) // 64 or 1
    mrope = [half - 2 * hw, hw, hw]
    ids = tokenizer.convert_tokens_to_ids
    if vocab_size is None:
        vocab_size = (len(tokenizer) + row_multiple - 1) // row_multiple * row_multiple + row_multiple
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=ids("<|endoftext|>"),
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids(IM_END),
    )
    vision_config = dict(
        depth=vision_depth,
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or 2 * vision_hidden,
        num_heads=vision_heads,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=hidden,
        num_position_embeddings=vision_position_embeddings,
        deepstack_visual_indexes=list(deepstack_indexes) if deepstack_indexes is not None
        else list(range(max(vision_depth - 1, 1))),
    )
    cfg = Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=tie_word_embeddings,
    )
    cfg.eos_token_id = ids(IM_END)
    cfg.pad_token_id = ids("<|endoftext|>")
    # Every sub-model's _init_weights reads its own config's initializer_range.
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c.initializer_range = float(init_std)
    return cfg


def _tiny_generation_config(tokenizer):
    from transformers import GenerationConfig

    ids = tokenizer.convert_tokens_to_ids
    return GenerationConfig(
        eos_token_id=[ids(IM_END), ids("<|endoftext|>")],
        pad_token_id=ids("<|endoftext|>"),
        do_sample=False,
    )


# "hf": the coord rows are random like every other row; the rest as model.vocab.COORD_INITS.
TINY_COORD_INITS = ("hf", *COORD_INITS)


def build_tiny_in_memory(seed: int = 0, coord_tokens: bool = True, max_pixels: int = TINY_MAX_PIXELS,
                         coord_init: str = "hf", **config_kwargs):
    """(model, tokenizer, image_processor): tiny random Qwen3-VL in fp32, eval mode, weights seeded by ``seed``.

    ``coord_tokens=False`` builds the tokenizer WITHOUT the 1000 coord tokens (to test adding them).
    ``max_pixels`` is the image processor's budget (resized area in pixels); ``config_kwargs`` go to
    :func:`tiny_qwen3vl_config` (``hidden``, ``layers``, ``vision_depth``, ``vision_hidden``, ...).
    ``coord_init``: ``"hf"`` leaves the coord rows (input embeddings and LM head) as random as every
    other row; one of ``model.vocab.COORD_INITS`` re-initialises them the way the loader initialises
    the coord rows it adds to a real checkpoint (:func:`model.vocab.init_coord_rows`, seeded by ``seed``).
    """
    from transformers import Qwen3VLForConditionalGeneration

    if coord_init not in TINY_COORD_INITS:
        raise ValueError(f"model.tiny.coord_init must be one of {list(TINY_COORD_INITS)}, got {coord_init!r}")
    if coord_init != "hf" and not coord_tokens:
        raise ValueError(f"coord_init={coord_init!r} needs the coord tokens (coord_tokens=True): without them there "
                         "are no coord rows to initialise")
    tok = _cached_tokenizer(coord_tokens)
    cfg = tiny_qwen3vl_config(tok, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(cfg)
    if coord_init != "hf":
        init_coord_rows(model, coord_vocab_from_tokenizer(tok), init=coord_init, seed=seed)
    model.generation_config = _tiny_generation_config(tok)
    model.eval()
    return model, tok, build_tiny_image_processor(max_pixels=max_pixels)


@functools.cache
def _trained_tokenizer():
    """The tiny tokenizer, its BPE trained once per process (callers get copies)."""
    return build_tiny_tokenizer()


def _cached_tokenizer(coord_tokens: bool):
    """A fresh copy of the tiny tokenizer (BPE training is cached; copies keep callers independent)."""
    import copy

    tok = copy.deepcopy(_trained_tokenizer())
    if not coord_tokens:
        tok = _without_coord_tokens(tok)
    return tok


def _without_coord_tokens(tok):
    """Same tokenizer with the coord tokens removed (the BPE + 26 specials only)."""
    import json

    from tokenizers import Tokenizer

    state = json.loads(tok.backend_tokenizer.to_str())
    coord = set(coord_token_texts())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] not in coord]
    return _qwen_wrapped(Tokenizer.from_str(json.dumps(state)))


_CHECKPOINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
_PARAMS_FILE = "tiny_params.json"


def _is_complete_checkpoint(out_dir: str) -> bool:
    if not all(os.path.isfile(os.path.join(out_dir, f)) for f in _CHECKPOINT_FILES):
        return False
    return any(f.endswith(".safetensors") for f in os.listdir(out_dir))


def _saved_params(out_dir: str) -> dict | None:
    import json

    path = os.path.join(out_dir, _PARAMS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _build_params(**given) -> dict:
    """The arguments that decide a tiny checkpoint, defaults filled in (``tiny_params.json``).

    Passing a default explicitly (a config's ``model.tiny.hidden: 64``) and leaving it out (a test
    fixture) describe the same model, so they must not make each other's checkpoint look stale.
    """
    import inspect

    params = {}
    for fn in (build_tiny_in_memory, tiny_qwen3vl_config):
        for name, p in inspect.signature(fn).parameters.items():
            if p.default is not inspect.Parameter.empty:
                params[name] = p.default
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise TypeError(f"build_tiny_checkpoint got unknown arguments {unknown}; allowed: {sorted(params)}")
    params.update(given)
    return dict(sorted(params.items()))


@contextlib.contextmanager
def _without_zero3_init() -> Iterator[None]:
    """Build the tiny model as plain tensors even inside a DeepSpeed ZeRO-3 launch.

    Under ``accelerate launch`` with a ZeRO-3 config, transformers constructs models inside
    ``deepspeed.zero.Init`` (it sees accelerate's DeepSpeed config through a module-level weak
    reference), which partitions every weight as it is created: the seeded random initialisation is
    then not the one a plain run draws, and ``save_pretrained`` from one rank writes empty tensors.
    The tiny builder is a data-preparation step, not the training model, so the reference is
    cleared for the build and restored after it. The training model is still loaded (and sharded) by
    ``from_pretrained`` as usual.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers always ships the module
        yield
        return
    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def build_tiny_checkpoint(out_dir: str, seed: int = 0, coord_tokens: bool = True, **kwargs) -> str:
    """Save a tiny checkpoint (model + tokenizer + image processor) with ``save_pretrained`` into ``out_dir``.

    ``kwargs`` as :func:`build_tiny_in_memory` (``max_pixels``, model sizes). Idempotent: when
    ``out_dir`` already holds a complete checkpoint built with the same arguments (recorded in
    ``tiny_params.json``) it is left as is; different arguments rebuild it, so a config that changes
    ``model.tiny.*`` never trains a stale model.
    """
    import json

    params = _build_params(seed=seed, coord_tokens=coord_tokens, **kwargs)
    if _is_complete_checkpoint(out_dir) and _saved_params(out_dir) == params:
        return out_dir
    if os.path.isdir(out_dir):  # stale or half-written: unmark it first (a crash below must not leave it "complete")
        for name in os.listdir(out_dir):
            if name == _PARAMS_FILE or name.endswith(".safetensors"):
                os.remove(os.path.join(out_dir, name))
    with _without_zero3_init():
        model, tok, proc = build_tiny_in_memory(seed=seed, coord_tokens=coord_tokens, **kwargs)
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    with open(os.path.join(out_dir, _PARAMS_FILE), "w", encoding="utf-8") as fh:
        json.dump(params, fh, sort_keys=True)
    # Model last: its weights file marks the checkpoint complete (see _is_complete_checkpoint).
    # transformers writes weights only on global rank 0 once torch.distributed is up; this file is built
    # by whichever rank training.setup.each_node_first picks (local rank 0 of node 1 on node-local disks).
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    model.save_pretrained(out_dir)
    return out_dir

