"""Generation backends: prompts in, generated ids + per-token log-probabilities out.

``GenerationBackend`` is the interface every trainer and evaluator uses; ``HFGenerationBackend``
runs ``transformers`` ``generate`` on the (unwrapped) Qwen3-VL model. A vLLM backend fits the same
interface (prompt ids + image in, ids + logprobs out) and is imported lazily where it lives.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch.nn.utils import parametrize

from data.types import EncodedSample
from rollout.parser import default_eos_id
from rollout.types import GenerationOutput


class GenerationBackend(abc.ABC):
    """Generates one continuation per prompt (``EncodedSample`` from ``ChatEncoder.encode_prompt``)."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[EncodedSample]) -> list[GenerationOutput]:
        """One ``GenerationOutput`` per prompt, in prompt order."""


class _ChosenTokenLogprobs:
    """Logits processor that records ``log_softmax(raw logits)[chosen token]`` step by step.

    ``generate(output_logits=True)`` would keep a ``[B, V]`` tensor per generated step (with Qwen's
    ~152k vocabulary, batch 8 and 512 steps: ~2.5 GB). This keeps one step's log-probabilities:
    at step ``t`` the token chosen at ``t - 1`` is the last column of ``input_ids``. It must run
    first in the processor list so it sees the raw logits (the backend applies temperature /
    top-k / top-p itself, after it).
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
            self.chosen.append(self.prev.gather(1, last.to(self.prev.device)).squeeze(1).cpu())
            self.prev = None

    def finish(self, sequences: torch.Tensor, steps: int) -> torch.Tensor:
        """``[B, steps]`` log-probs, given the final sequences (their last token closes the last step)."""
        self._take(sequences[:, -1:])
        out = torch.stack(self.chosen, dim=1) if self.chosen else torch.zeros((sequences.shape[0], 0))
        return out[:, :steps]


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


class HFGenerationBackend(GenerationBackend):
    """Batched ``model.generate`` with left padding, KV cache and exact per-token log-probabilities.

    model:          the unwrapped ``Qwen3VLForConditionalGeneration`` (not the DDP/accelerate wrapper)
    tokenizer:      its tokenizer (pad id and ``<|im_end|>``)
    max_new_tokens: generation budget per prompt
    temperature:    0 -> greedy; > 0 -> sampling with ``top_p`` (1.0 = off) and ``top_k`` (0 = off)
    batch_size:     prompts per ``generate`` call
    seed:           seeds the backend's own ``torch.Generator``; each batch draws its sampling seed
                    from it and runs inside ``torch.random.fork_rng``, so the training RNG (CPU and
                    CUDA) is left exactly as it was
    eos_token_ids:  ids that end a generation; default ``<|im_end|>`` plus the model's
                    ``generation_config.eos_token_id``

    Log-probabilities are ``log_softmax`` of the model's raw logits (before temperature/top-k/top-p)
    at the chosen token, natural log, float32. The model is put in eval mode under
    ``torch.no_grad()`` and its previous train/eval mode and M-RoPE ``rope_deltas`` are restored.
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
        batch_size: int = 8,
        seed: int = 0,
        eos_token_ids: Sequence[int] | None = None,
    ):
        if max_new_tokens <= 0:
            raise ValueError(f"rollout_matching.max_new_tokens must be a positive integer, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"rollout_matching.temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"rollout_matching.top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"rollout_matching.top_k must be >= 0 (0 = off), got {top_k}")
        if batch_size <= 0:
            raise ValueError(f"rollout_matching.batch_size must be a positive integer, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.batch_size = int(batch_size)
        self.generator = torch.Generator().manual_seed(int(seed))
        im_end = default_eos_id(tokenizer)
        if eos_token_ids is None:
            cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            cfg_eos = [] if cfg_eos is None else ([cfg_eos] if isinstance(cfg_eos, int) else list(cfg_eos))
            eos_token_ids = [im_end] + [int(e) for e in cfg_eos if int(e) != im_end]
        self.eos_token_ids = [int(e) for e in eos_token_ids]
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_ids[0]

    def generate(self, prompts: Sequence[EncodedSample]) -> list[GenerationOutput]:
        outputs: list[GenerationOutput] = []
        # Parametrized tables (coord-offset adapter, model/adapters.py) are rebuilt once per call, not
        # once per decoded token; a no-op for a model without parametrizations.
        with torch.no_grad(), parametrize.cached():
            for b in range(0, len(prompts), self.batch_size):
                outputs.extend(self._generate_batch(list(prompts[b : b + self.batch_size])))
        return outputs

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

    def _generate_batch(self, prompts: list[EncodedSample]) -> list[GenerationOutput]:
        model = self.model
        inputs = self._batch_inputs(prompts)
        L = inputs["input_ids"].shape[1]
        sample = self.temperature > 0
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        recorder = _ChosenTokenLogprobs()
        processors = [recorder]  # first: it must see the raw logits
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
        )
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
        # [B, steps] log-probability of each chosen token under the raw model distribution.
        logp = recorder.finish(out.sequences, steps)
        eos = torch.tensor(self.eos_token_ids)
        results: list[GenerationOutput] = []
        for i in range(len(prompts)):
            row = seqs[i]
            hit = torch.nonzero(torch.isin(row, eos)).flatten()
            n = int(hit[0]) + 1 if hit.numel() else steps
            results.append(
                GenerationOutput(token_ids=row[:n].tolist(), token_logprobs=logp[i, :n].tolist(), finished=bool(hit.numel()))
            )
        return results


__all__ = ["GenerationBackend", "HFGenerationBackend"]
