"""vLLM generation backend (``rollout_matching.backend: vllm``), colocated in the training process.

Imported only when selected; vLLM itself is imported only inside :class:`VLLMEngine`, so this
module (and its weight-sync bookkeeping) loads and is tested without vLLM installed. Install with
``pip install -r requirements-vllm.txt`` (see that file for the torch/transformers versions vLLM
pins). docs/ROLLOUT.md ("Generation backends") describes the design:

- one engine per training process (rank), on that rank's GPU, started from the training model's
  own weights (saved once under the run dir) with vLLM's ``external_launcher`` executor, so it
  lives in the training process and receives weights in memory;
- :class:`WeightSync` counts optimizer steps that changed the weights (``weights_changed``) and
  the version the engine holds; ``generate`` pushes the weights first only when they differ;
- with ``rollout_matching.vllm.sleep_mode`` the engine sleeps (level 1: weights to host memory,
  KV cache dropped) between rollouts, leaving the GPU to the training step.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from configs.types import VLLMBackendConfig
from data.types import EncodedSample
from rollout.backends import AUTO, GenerationBackend, check_decoding, default_eos_ids, trim_at_eos
from rollout.types import GenerationOutput

INSTALL_HINT = (
    "rollout_matching.backend: vllm needs the vllm package, which is not installed: "
    "pip install -r requirements-vllm.txt, or set rollout_matching.backend: hf"
)


def require_vllm() -> None:
    """Fail with one line naming the fix when vLLM is not importable."""
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(INSTALL_HINT)


@dataclass
class WeightSync:
    """Which training weights the engine holds, shared by a backend and the backends it derives.

    trained_version: optimizer steps that changed the training weights so far
    engine_version:  the ``trained_version`` the engine's weights equal (start: 0, it was started from them)
    pushes:          how many times weights were pushed
    """

    trained_version: int = 0
    engine_version: int = 0
    pushes: int = 0

    def mark_changed(self) -> None:
        self.trained_version += 1

    @property
    def stale(self) -> bool:
        return self.engine_version != self.trained_version

    def mark_pushed(self) -> None:
        self.engine_version = self.trained_version
        self.pushes += 1


@dataclass(frozen=True)
class EngineRequest:
    """One prompt for the engine: the chat-encoded ids (image pads already expanded) and its image."""

    prompt_token_ids: list[int]
    image: Any  # PIL.Image.Image | None
    seed: int  # per-request sampling seed (drawn from the backend's generator)


@dataclass(frozen=True)
class EngineSampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int  # 0 = off
    stop_token_ids: tuple[int, ...]


class Engine(Protocol):
    """What :class:`VLLMGenerationBackend` needs from an engine (vLLM's ``LLM``, or a fake in tests)."""

    def generate(self, requests: Sequence[EngineRequest], sampling: EngineSampling) -> list[tuple[list[int], list[float]]]:
        """Per request: generated ids and the raw-model log-prob of each (in request order)."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def sleep(self) -> None: ...

    def wake_up(self) -> None: ...


class VLLMGenerationBackend(GenerationBackend):
    """``GenerationBackend`` on an :class:`Engine`; returns the same ``GenerationOutput`` as the HF backend.

    model:        the unwrapped training model (weights are read from it when the engine is stale)
    engine:       a started :class:`Engine`
    sync:         the :class:`WeightSync` (shared with derived backends)
    image_loader: ``record -> PIL image`` (``ChatEncoder.load_image``), for prompts with an image
    batch_size:   prompts per engine call (the engine schedules inside a call); ``"auto"``: all
    sleep_mode:   sleep the engine after each ``generate``
    weights_fn:   ``() -> iterable of (name, tensor)`` to push; default ``model.state_dict().items()``
    The other settings mean what they mean for ``HFGenerationBackend``; log-probs are the raw
    model's (vLLM ``logprobs_mode="raw_logprobs"``). Each prompt's sampling seed is drawn from
    ``generator``, so reseeding it per step (the trainer does) makes rollouts resume exactly.
    """

    def __init__(
        self,
        model,
        engine: Engine,
        sync: WeightSync,
        *,
        image_loader: Callable[[Any], Any] | None,
        max_new_tokens: int,
        eos_token_ids: Sequence[int],
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        batch_size: int | str = AUTO,
        seed: int = 0,
        sleep_mode: bool = True,
        weights_fn: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None,
    ):
        check_decoding(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                       batch_size=batch_size)
        self.model = model
        self.engine = engine
        self.sync = sync
        self.image_loader = image_loader
        self.max_new_tokens = int(max_new_tokens)
        self.eos_token_ids = [int(e) for e in eos_token_ids]
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.sleep_mode = bool(sleep_mode)
        self.weights_fn = weights_fn or (lambda: model.state_dict().items())

    @classmethod
    def start(cls, model, tokenizer, vcfg: VLLMBackendConfig, *, encoder, work_dir, **decoding) -> VLLMGenerationBackend:
        """Start a colocated engine from ``model``'s current weights (``rollout_matching.vllm`` = ``vcfg``)."""
        require_vllm()
        if not torch.cuda.is_available():
            raise RuntimeError("rollout_matching.backend: vllm needs a CUDA GPU; use rollout_matching.backend: hf")
        if encoder is None or work_dir is None:
            raise ValueError("VLLMGenerationBackend.start needs the ChatEncoder and a work dir (the run dir)")
        model_dir = Path(work_dir) / "vllm_model"
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:  # every rank's engine starts from the same weights: write them once
            model.save_pretrained(str(model_dir))
            tokenizer.save_pretrained(str(model_dir))
            encoder.image_processor.save_pretrained(str(model_dir))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        engine = VLLMEngine(model_dir, vcfg, dtype=next(model.parameters()).dtype, image_size=encoder.size)
        backend = cls(
            model, engine, WeightSync(), image_loader=encoder.load_image, eos_token_ids=default_eos_ids(model, tokenizer),
            sleep_mode=vcfg.sleep_mode, **decoding,
        )  # fmt: skip
        if backend.sleep_mode:
            engine.sleep()
        return backend

    def derive(self, *, temperature: float, batch_size: int | str) -> VLLMGenerationBackend:
        return VLLMGenerationBackend(
            self.model, self.engine, self.sync, image_loader=self.image_loader, max_new_tokens=self.max_new_tokens,
            eos_token_ids=self.eos_token_ids, temperature=temperature, top_p=self.top_p, top_k=self.top_k,
            batch_size=batch_size, seed=self.seed, sleep_mode=self.sleep_mode, weights_fn=self.weights_fn,
        )  # fmt: skip

    def weights_changed(self) -> None:
        self.sync.mark_changed()

    def _request(self, prompt: EncodedSample) -> EngineRequest:
        image = None
        if prompt.pixel_values is not None and prompt.pixel_values.numel():
            if prompt.record is None or self.image_loader is None:
                raise ValueError("vLLM rollouts reload each prompt's image: the prompt needs its record (ChatEncoder.encode_prompt sets it)")
            image = self.image_loader(prompt.record)
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())
        return EngineRequest(prompt_token_ids=prompt.input_ids.tolist(), image=image, seed=seed)

    def generate(self, prompts: Sequence[EncodedSample]) -> list[GenerationOutput]:
        if not prompts:
            return []
        if self.sleep_mode:
            self.engine.wake_up()
        try:
            if self.sync.stale:
                with torch.no_grad():
                    self.engine.load_weights(self.weights_fn())
                self.sync.mark_pushed()
            sampling = EngineSampling(self.max_new_tokens, self.temperature, self.top_p, self.top_k, tuple(self.eos_token_ids))
            requests = [self._request(p) for p in prompts]
            size = len(requests) if self.batch_size == AUTO else int(self.batch_size)
            raw: list[tuple[list[int], list[float]]] = []
            for b in range(0, len(requests), size):
                raw.extend(self.engine.generate(requests[b : b + size], sampling))
        finally:
            if self.sleep_mode:
                self.engine.sleep()
        if len(raw) != len(prompts):
            raise RuntimeError(f"vLLM engine returned {len(raw)} outputs for {len(prompts)} prompts")
        return [trim_at_eos(ids[: self.max_new_tokens], lps[: self.max_new_tokens], self.eos_token_ids) for ids, lps in raw]


class VLLMEngine:
    """vLLM's offline ``LLM`` in this process (``external_launcher``: one engine per rank, on its GPU).

    Needs a GPU and vLLM; not exercised by the CPU test suite (the GPU equality test runs it).
    """

    def __init__(self, model_dir: Path, vcfg: VLLMBackendConfig, *, dtype: torch.dtype, image_size: dict | None):
        require_vllm()
        from vllm import LLM

        # external_launcher reads the torch.distributed environment; a single process gets its defaults.
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517")):  # fmt: skip
            os.environ.setdefault(key, value)
        kwargs: dict[str, Any] = dict(
            model=str(model_dir), dtype=str(dtype).removeprefix("torch."), gpu_memory_utilization=vcfg.gpu_memory_utilization,
            enable_sleep_mode=vcfg.sleep_mode, enforce_eager=vcfg.enforce_eager, distributed_executor_backend="external_launcher",
            logprobs_mode="raw_logprobs", limit_mm_per_prompt={"image": 1}, seed=int(os.environ["RANK"]),
        )  # fmt: skip
        if vcfg.max_model_len is not None:
            kwargs["max_model_len"] = vcfg.max_model_len
        if image_size is not None:  # resize exactly like ChatEncoder, so the image-pad count matches
            kwargs["mm_processor_kwargs"] = {"size": dict(image_size)}
        self.llm = LLM(**kwargs)
        self.asleep = False

    def _model(self):
        worker = self.llm.llm_engine.model_executor.driver_worker
        runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
        return runner.model

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._model().load_weights(weights=weights)

    def generate(self, requests: Sequence[EngineRequest], sampling: EngineSampling) -> list[tuple[list[int], list[float]]]:
        from vllm import SamplingParams

        inputs, params = [], []
        for r in requests:
            item: dict[str, Any] = {"prompt_token_ids": r.prompt_token_ids}
            if r.image is not None:
                item["multi_modal_data"] = {"image": r.image}
            inputs.append(item)
            params.append(SamplingParams(
                max_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else -1, seed=r.seed, logprobs=0,
                stop_token_ids=list(sampling.stop_token_ids), detokenize=False, skip_special_tokens=False,
            ))  # fmt: skip
        results = []
        for out in self.llm.generate(inputs, params, use_tqdm=False):
            seq = out.outputs[0]
            ids = list(seq.token_ids)
            results.append((ids, [float(step[t].logprob) for t, step in zip(ids, seq.logprobs)]))
        return results

    def sleep(self) -> None:
        if not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


__all__ = ["INSTALL_HINT", "Engine", "EngineRequest", "EngineSampling", "VLLMEngine", "VLLMGenerationBackend", "WeightSync", "require_vllm"]
