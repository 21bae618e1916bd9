"""Generation backends: prompts in, generated ids + per-token log-probabilities out.

``GenerationBackend`` is the interface every trainer and evaluator uses. ``HFGenerationBackend``
runs ``transformers`` ``generate`` on the (unwrapped) Qwen3-VL model and is the default and the
reference; ``rollout.vllm_backend.VLLMGenerationBackend`` (``rollout_matching.backend: vllm``) fits
the same interface and is imported only when selected. :func:`make_generation_backend` builds the
configured one for training and eval. docs/ROLLOUT.md ("Generation backends") explains the modes.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn.utils import parametrize

from configs.validation import declared_enum
from data.types import EncodedSample
from rollout.parser import default_eos_id
from rollout.types import GenerationOutput

HF_CACHES = declared_enum("rollout_matching.hf.cache")  # rollout_matching.hf.cache
COMPILE_MODES = declared_enum("rollout_matching.hf.compile")  # rollout_matching.hf.compile
AUTO = "auto"  # rollout_matching.decoding.batch_size: auto
AUTO_BATCH_CAP = 256  # never more prompts per generate call, whatever the memory says
AUTO_BATCH_NO_CUDA = 8  # auto off CUDA: CPU decode is compute-bound, larger batches gain little
AUTO_MEMORY_FRACTION = 0.8  # of the free memory; the rest absorbs what the estimate leaves out


class GenerationBackend(abc.ABC):
    """Generates one continuation per prompt (``EncodedSample`` from ``ChatEncoder.encode_prompt``)."""

    generator: torch.Generator  # sampling stream; the trainer reseeds it per optimizer step
    # Set by the trainer: true once the run stops on a signal. The hf backend then ends the generate call
    # at the next decoded token (the step's results are dropped and the step replayed on resume).
    abandon: Callable[[], bool] | None = None

    @abc.abstractmethod
    def generate(self, prompts: Sequence[EncodedSample]) -> list[GenerationOutput]:
        """One ``GenerationOutput`` per prompt, in prompt order."""

    @abc.abstractmethod
    def derive(self, *, temperature: float, batch_size: int | str) -> GenerationBackend:
        """The same engine with other decoding settings (in-loop eval: greedy, ``eval.batch_size``)."""

    @abc.abstractmethod
    def weights_changed(self) -> None:
        """Called by the trainer after every optimizer step that changed the weights.

        An engine holding its own copy of the weights (vLLM) pushes them before its next generate.
        """


class _Abandon:
    """Stopping criterion: every row is done once ``abandon()`` is true (checked after each decoded token)."""

    def __init__(self, abandon: Callable[[], bool]):
        self.abandon = abandon

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), bool(self.abandon()), dtype=torch.bool, device=input_ids.device)


class _ChosenTokenLogprobs:
    """Logits processor that records ``log_softmax(raw logits)[chosen token]`` step by step.

    ``generate(output_logits=True)`` would keep a ``[B, V]`` tensor per generated step (with Qwen's
    ~152k vocabulary, batch 8 and 512 steps: ~2.5 GB). This keeps one step's log-probabilities:
    at step ``t`` the token chosen at ``t - 1`` is the last column of ``input_ids``. It must run
    first in the processor list so it sees the raw logits (the backend applies temperature /
    top-k / top-p itself, after it). The chosen values stay on the model's device until
    :meth:`finish` (a per-step ``.cpu()`` would synchronise every decode step).
    """

    def __init__(self):
        self.prev: torch.Tensor | None = None  # [B, V] log-probs of the step whose token is not known yet
        self.chosen: list[torch.Tensor] = []  # per step: [B] log-prob of the chosen token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1:])
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _take(self, last: torch.Tensor) -> None:
        if self.prev is not None:
            self.chosen.append(self.prev.gather(1, last.to(self.prev.device)).squeeze(1))
            self.prev = None

    def finish(self, sequences: torch.Tensor, steps: int) -> torch.Tensor:
        """``[B, steps]`` log-probs on the CPU, given the final sequences (their last token closes the last step)."""
        self._take(sequences[:, -1:])
        out = torch.stack(self.chosen, dim=1).cpu() if self.chosen else torch.zeros((sequences.shape[0], 0))
        return out[:, :steps]


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


# ------------------------------------------------------------------ batching


def length_sorted_batches(prompts: Sequence[EncodedSample], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped into generation batches of at most ``batch_size``, longest prompts first.

    Neighbours in length share a batch, so left padding is small; prompts with and without an
    image never share one (the model takes one ``pixel_values`` per batch). The longest batch
    comes first so a static KV cache is sized once for the call. Callers put outputs back in
    prompt order with the returned indices.
    """
    if batch_size < 1:
        raise ValueError(f"rollout_matching.decoding.batch_size must be >= 1 or 'auto', got {batch_size}")

    def has_image(p: EncodedSample) -> bool:
        return p.pixel_values is not None and p.pixel_values.numel() > 0

    order = sorted(range(len(prompts)), key=lambda i: (not has_image(prompts[i]), -len(prompts[i]), i))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and has_image(prompts[batches[-1][0]]) == has_image(prompts[i]):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def kv_bytes_per_token(model, dtype: torch.dtype | None = None) -> int:
    """Bytes of KV cache one token takes: ``2 (K and V) x layers x kv_heads x head_dim x element size``."""
    cfg = model.config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = torch.finfo(dtype or _model_device_dtype(model)[1]).bits // 8
    return 2 * cfg.num_hidden_layers * heads * head_dim * elem


def estimate_batch_size(
    *,
    free_bytes: int,
    prompt_len: int,
    max_new_tokens: int,
    kv_per_token: int,
    hidden_size: int,
    intermediate_size: int,
    vocab_size: int,
    elem_bytes: int,
    fraction: float = AUTO_MEMORY_FRACTION,
    cap: int = AUTO_BATCH_CAP,
) -> int:
    """Prompts per generate call that fit in ``fraction * free_bytes`` (``decoding.batch_size: auto``).

    One row costs
      KV cache        ``kv_per_token * (prompt_len + max_new_tokens)`` (a static cache holds it all
                      from the first step),
      prefill         ``prompt_len * (4 * hidden + 3 * intermediate) * elem_bytes`` (residual, q/k/v/o
                      and the MLP's gate/up/act of one layer at a time),
      logits          ``4 * vocab * 4`` bytes (the step's fp32 logits, their copy, the recorded
                      log-softmax and the warped scores).
    The vision tower's activations, allocator fragmentation and the compiled graph's workspace
    are what the ``1 - fraction`` margin is for. Returns ``max(1, min(cap, floor(...)))``.
    """
    per_row = (
        kv_per_token * (prompt_len + max_new_tokens)
        + prompt_len * (4 * hidden_size + 3 * intermediate_size) * elem_bytes
        + 16 * vocab_size
    )
    return max(1, min(cap, math.floor(fraction * free_bytes / per_row)))


def free_generation_bytes(device: torch.device) -> int | None:
    """Bytes generation may use on ``device``: the driver's free memory plus what torch's caching
    allocator holds unused. None off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def auto_batch_size(model, prompt_len: int, max_new_tokens: int) -> int:
    """:func:`estimate_batch_size` for ``model`` on its device (``AUTO_BATCH_NO_CUDA`` off CUDA)."""
    device, dtype = _model_device_dtype(model)
    free = free_generation_bytes(device)
    if free is None:
        return AUTO_BATCH_NO_CUDA
    cfg = model.config.get_text_config(decoder=True)
    return estimate_batch_size(
        free_bytes=free, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
        kv_per_token=kv_bytes_per_token(model, dtype), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size, elem_bytes=torch.finfo(dtype).bits // 8,
    )  # fmt: skip


def check_decoding(*, max_new_tokens: int, temperature: float, top_p: float, top_k: int, batch_size: int | str) -> None:
    """Fail fast on decoding settings any backend would reject (dotted keys in the messages)."""
    if max_new_tokens <= 0:
        raise ValueError(f"rollout_matching.max_new_tokens must be a positive integer, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"rollout_matching.temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"rollout_matching.top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"rollout_matching.top_k must be >= 0 (0 = off), got {top_k}")
    if batch_size != AUTO and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0):
        raise ValueError(f"rollout_matching.batch_size must be a positive integer or 'auto', got {batch_size!r}")


def default_eos_ids(model, tokenizer) -> list[int]:
    """``<|im_end|>`` plus the model's ``generation_config.eos_token_id`` (the ids that end a generation)."""
    im_end = default_eos_id(tokenizer)
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    cfg_eos = [] if cfg_eos is None else ([cfg_eos] if isinstance(cfg_eos, int) else list(cfg_eos))
    return [im_end] + [int(e) for e in cfg_eos if int(e) != im_end]


def trim_at_eos(token_ids: Sequence[int], logprobs: Sequence[float], eos_ids: Sequence[int]) -> GenerationOutput:
    """Cut a generated row after its first eos (kept); ``finished`` when there is one."""
    eos = set(int(e) for e in eos_ids)
    n = next((k + 1 for k, t in enumerate(token_ids) if int(t) in eos), len(token_ids))
    return GenerationOutput(
        token_ids=[int(t) for t in token_ids[:n]],
        token_logprobs=[float(v) for v in logprobs[:n]],
        finished=n > 0 and int(token_ids[n - 1]) in eos,
    )


COORD_PICKS = declared_enum("rollout_matching.decoding.coord_pick")


class CoordExpectationPick:
    """Logits processor for ``coord_pick: expectation``: the coord block collapses onto its expectation.

    The 1000 coord logits are replaced by one entry: the coord token of bin
    ``round(Σ_k softmax(coord logits)_k · k)`` gets ``logsumexp(coord logits)`` (the block's whole
    probability under the full softmax), every other coord token ``-inf``; text logits are untouched.
    So a coord is written exactly when the summed coord probability beats the best text token
    (greedy) or is drawn with that probability (sampling), and its value is the expectation that the
    geometry losses train instead of the single most likely bin, which for a flat coord distribution
    can sit far from it. It edits the raw logits in place, after the log-prob recorder and before
    temperature / top-k / top-p.

    ``coord_ids``: the coord token ids in bin order (``CoordVocab.ids``).
    """

    def __init__(self, coord_ids: Sequence[int]):
        self.coord_ids = torch.as_tensor(coord_ids, dtype=torch.long)
        self.bins = torch.arange(len(self.coord_ids), dtype=torch.float32)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.coord_ids.device != scores.device:  # once: no host-to-device copy per decode step
            self.coord_ids, self.bins = self.coord_ids.to(scores.device), self.bins.to(scores.device)
        ids = self.coord_ids
        coord = scores[:, ids].float()  # a copy: the block is read before it is overwritten
        expected = (torch.softmax(coord, dim=-1) * self.bins).sum(-1)
        chosen = ids[expected.round().long().clamp_(0, len(ids) - 1)]
        # in place (the log-prob recorder before this has already read the raw logits): no [B, V] copy
        scores[:, ids] = float("-inf")
        scores.scatter_(1, chosen[:, None], torch.logsumexp(coord, dim=-1, keepdim=True).to(scores.dtype))
        return scores


# ------------------------------------------------------------------ HF


class HFGenerationBackend(GenerationBackend):
    """Batched ``model.generate`` with left padding, KV cache and exact per-token log-probabilities.

    model:          the unwrapped ``Qwen3VLForConditionalGeneration`` (not the DDP/accelerate wrapper)
    tokenizer:      its tokenizer (pad id and ``<|im_end|>``)
    max_new_tokens: generation budget per prompt
    temperature:    0 -> greedy; > 0 -> sampling with ``top_p`` (1.0 = off) and ``top_k`` (0 = off)
    batch_size:     prompts per ``generate`` call, or ``"auto"`` (:func:`auto_batch_size` from the
                    longest prompt of the call and the free device memory)
    seed:           seeds the backend's own ``torch.Generator``; each batch draws its sampling seed
                    from it and runs inside ``torch.random.fork_rng``, so the training RNG (CPU and
                    CUDA) is left exactly as it was
    eos_token_ids:  ids that end a generation; default ``<|im_end|>`` plus the model's
                    ``generation_config.eos_token_id``
    cache:          ``"static"``: a preallocated KV cache of ``prompt + max_new_tokens`` slots (fixed
                    shapes, so the decode step can be compiled); ``"dynamic"``: the cache grows per
                    step (the reference, never compiled); ``"auto"``: static on CUDA (and whenever
                    ``compile="always"``), dynamic elsewhere, where nothing is compiled and a static
                    cache only adds attention over empty slots
    compile:        ``"auto"``: transformers compiles the decode step of a static cache on CUDA;
                    ``"always"``: also on other devices; ``"never"``: eager
    coord_pick:     ``"argmax"``: coord tokens as the decoder chooses them; ``"expectation"``:
                    :class:`CoordExpectationPick` (the coord ids come from the tokenizer)

    Prompts are sorted by length into batches (:func:`length_sorted_batches`) and the outputs put
    back in prompt order. A batch stops as soon as every row has produced an eos (finished rows are
    fed padding until then). Log-probabilities are ``log_softmax`` of the model's raw logits
    (before temperature/top-k/top-p) at the chosen token, natural log, float32. The model is put in
    eval mode under ``torch.no_grad()`` and its previous train/eval mode and M-RoPE
    ``rope_deltas`` are restored. ``last_stats`` describes the last ``generate`` call.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        batch_size: int | str = 8,
        seed: int = 0,
        eos_token_ids: Sequence[int] | None = None,
        cache: str = "auto",
        compile: str = "auto",
        coord_pick: str = "argmax",
    ):
        check_decoding(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                       batch_size=batch_size)
        if cache not in HF_CACHES:
            raise ValueError(f"rollout_matching.hf.cache must be one of {HF_CACHES}, got {cache!r}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"rollout_matching.hf.compile must be one of {COMPILE_MODES}, got {compile!r}")
        if compile == "always" and cache == "dynamic":
            raise ValueError("rollout_matching.hf.compile: always needs rollout_matching.hf.cache: static "
                             "(a dynamic cache changes shape every step)")
        if coord_pick not in COORD_PICKS:
            raise ValueError(f"rollout_matching.decoding.coord_pick must be one of {COORD_PICKS}, got {coord_pick!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.coord_pick = coord_pick
        self._coord_pick_processor = None
        if coord_pick == "expectation":
            from model.vocab import coord_vocab_from_tokenizer

            self._coord_pick_processor = CoordExpectationPick(coord_vocab_from_tokenizer(tokenizer).ids)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.batch_size = batch_size if batch_size == AUTO else int(batch_size)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.eos_token_ids = [int(e) for e in (default_eos_ids(model, tokenizer) if eos_token_ids is None else eos_token_ids)]
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_ids[0]
        self.cache = cache
        self.compile = compile
        self.last_stats: dict[str, Any] = {}

    def derive(self, *, temperature: float, batch_size: int | str) -> HFGenerationBackend:
        return HFGenerationBackend(
            self.model, self.tokenizer, max_new_tokens=self.max_new_tokens, temperature=temperature,
            top_p=self.top_p, top_k=self.top_k, batch_size=batch_size, seed=self.seed,
            eos_token_ids=self.eos_token_ids, cache=self.cache, compile=self.compile, coord_pick=self.coord_pick,
        )  # fmt: skip

    def weights_changed(self) -> None:
        """Nothing to do: generation reads the live training model."""

    def cache_mode(self) -> str:
        """``static`` or ``dynamic``: ``cache`` with ``auto`` resolved for the model's device."""
        if self.cache != "auto":
            return self.cache
        if self.compile == "always" or _model_device_dtype(self.model)[0].type == "cuda":
            return "static"
        return "dynamic"

    def resolved_batch_size(self, prompts: Sequence[EncodedSample]) -> int:
        if self.batch_size != AUTO:
            return self.batch_size
        return auto_batch_size(self.model, max(len(p) for p in prompts), self.max_new_tokens)

    def generate(self, prompts: Sequence[EncodedSample]) -> list[GenerationOutput]:
        if not prompts:
            return []
        batch_size = self.resolved_batch_size(prompts)
        outputs: list[GenerationOutput | None] = [None] * len(prompts)
        steps = []
        # Parametrized tables (coord-offset adapter, model/adapters.py) are rebuilt once per call, not
        # once per decoded token; a no-op for a model without parametrizations.
        with torch.no_grad(), parametrize.cached():
            for idx in length_sorted_batches(prompts, batch_size):
                if self.abandon is not None and self.abandon():  # stopping: the rest is never used
                    for i in idx:
                        outputs[i] = trim_at_eos([], [], self.eos_token_ids)
                    continue
                for i, out in zip(idx, self._generate_batch([prompts[i] for i in idx])):
                    outputs[i] = out
                steps.append(self._last_steps)
        self.last_stats = {"batch_size": batch_size, "batches": len(steps), "decode_steps": steps, "cache": self.cache_mode()}
        return outputs  # type: ignore[return-value]

    def _batch_inputs(self, prompts: list[EncodedSample]) -> dict:
        device, dtype = _model_device_dtype(self.model)
        L = max(len(p) for p in prompts)
        B = len(prompts)
        ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        mm = torch.zeros((B, L), dtype=torch.long)
        for i, p in enumerate(prompts):
            n = len(p)
            ids[i, L - n :] = p.input_ids  # left padding: generation continues right after each prompt
            attn[i, L - n :] = 1
            mm[i, L - n :] = p.mm_token_type_ids
        kwargs = dict(input_ids=ids.to(device), attention_mask=attn.to(device), mm_token_type_ids=mm.to(device))
        with_img = [p for p in prompts if p.pixel_values is not None and p.pixel_values.numel()]
        if with_img:
            if len(with_img) != len(prompts):
                raise ValueError("a generation batch mixes prompts with and without images; batch them separately")
            kwargs["pixel_values"] = torch.cat([p.pixel_values for p in prompts]).to(device=device, dtype=dtype)
            kwargs["image_grid_thw"] = torch.cat([p.image_grid_thw.reshape(-1, 3) for p in prompts]).to(device)
        return kwargs

    def _cache_kwargs(self) -> dict:
        """``generate`` kwargs of the cache/compile mode (transformers' own static-cache + compiled decode)."""
        if self.cache_mode() == "dynamic":
            return {"disable_compile": True}
        kwargs: dict[str, Any] = {"cache_implementation": "static"}
        if self.compile == "never":
            kwargs["disable_compile"] = True
        elif self.compile == "always":
            from transformers import CompileConfig

            config = CompileConfig()
            config._compile_all_devices = True  # transformers' switch for compiling off CUDA
            kwargs["compile_config"] = config
        return kwargs

    def _generate_batch(self, prompts: list[EncodedSample]) -> list[GenerationOutput]:
        model = self.model
        inputs = self._batch_inputs(prompts)
        L = inputs["input_ids"].shape[1]
        sample = self.temperature > 0
        from transformers import (
            LogitsProcessorList,
            StoppingCriteriaList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        recorder = _ChosenTokenLogprobs()
        processors = [recorder]  # first: it must see the raw logits
        if self._coord_pick_processor is not None:  # on the raw logits too, before any warper
            processors.append(self._coord_pick_processor)
        if sample:
            processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                processors.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
        gen_kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            do_sample=sample,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            return_dict_in_generate=True,
            logits_processor=LogitsProcessorList(processors),
            # our own warpers above; the model's generation_config defaults must not add theirs
            temperature=None, top_p=None, top_k=None, repetition_penalty=None,
            **self._cache_kwargs(),
            # Under FSDP / ZeRO-3 the trainer gathers the weights for the whole call
            # (training.sharding.full_weights), so decoding needs no collectives. transformers would
            # otherwise switch on synced_gpus there, and ranks with different numbers of prompts
            # (in-loop eval shards the val set) would wait on each other forever.
            synced_gpus=False,
        )
        if self.abandon is not None:
            gen_kwargs["stopping_criteria"] = StoppingCriteriaList([_Abandon(self.abandon)])
        batch_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())
        inner = getattr(model, "model", None)
        old_rope = getattr(inner, "rope_deltas", None)
        was_training = model.training
        cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        try:
            model.eval()
            with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices):
                torch.manual_seed(batch_seed)
                out = model.generate(**inputs, **gen_kwargs)
        finally:
            model.train(was_training)
            if inner is not None and hasattr(inner, "rope_deltas"):
                inner.rope_deltas = old_rope
        seqs = out.sequences[:, L:].cpu()
        steps = seqs.shape[1]
        self._last_steps = steps
        # [B, steps] log-probability of each chosen token under the raw model distribution.
        logp = recorder.finish(out.sequences, steps)
        return [trim_at_eos(seqs[i].tolist(), logp[i].tolist(), self.eos_token_ids) for i in range(len(prompts))]


# ------------------------------------------------------------------ factory


def make_generation_backend(
    rm,
    model,
    tokenizer,
    *,
    temperature: float | None = None,
    batch_size: int | str | None = None,
    encoder=None,
    work_dir=None,
) -> GenerationBackend:
    """The backend ``rollout_matching`` selects (``rm``: ``configs.types.RolloutMatchingConfig``, or
    anything with its ``backend``, ``hf``, ``vllm`` and ``decoding`` fields).

    model:       the unwrapped Qwen3-VL (generation never goes through DDP/FSDP wrappers)
    temperature / batch_size: override ``rm.decoding`` (``eval.infer``: 0 and ``--batch-size``)
    encoder:     the ``ChatEncoder`` (vLLM reloads each prompt's image with its resize settings)
    work_dir:    where vLLM writes the model it starts from (the run dir)
    """
    d = rm.decoding
    kwargs = dict(
        max_new_tokens=d.max_new_tokens, temperature=d.temperature if temperature is None else temperature,
        top_p=d.top_p, top_k=d.top_k, batch_size=d.batch_size if batch_size is None else batch_size, seed=d.seed,
    )  # fmt: skip
    if rm.backend == "hf":
        return HFGenerationBackend(model, tokenizer, cache=rm.hf.cache, compile=rm.hf.compile, coord_pick=d.coord_pick,
                                   **kwargs)
    if rm.backend == "vllm":
        if d.coord_pick != "argmax":  # the loader rejects it too; eval.infer builds its settings without the loader
            raise ValueError("rollout_matching.decoding.coord_pick: expectation needs rollout_matching.backend: hf")
        from rollout.vllm_backend import VLLMGenerationBackend

        return VLLMGenerationBackend.start(model, tokenizer, rm.vllm, encoder=encoder, work_dir=work_dir, **kwargs)
    raise ValueError(f"rollout_matching.backend must be one of ('hf', 'vllm'), got {rm.backend!r}")


__all__ = [
    "COORD_PICKS",
    "CoordExpectationPick",
    "GenerationBackend",
    "HFGenerationBackend",
    "auto_batch_size",
    "estimate_batch_size",
    "kv_bytes_per_token",
    "length_sorted_batches",
    "make_generation_backend",
    "trim_at_eos",
]
