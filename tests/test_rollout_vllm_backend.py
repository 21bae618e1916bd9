"""vLLM backend: the interface, weight-sync bookkeeping and sleep/wake with a fake engine (CPU); the
greedy equality test against the HF backend runs only where vLLM and a GPU are available."""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch

from data.encoding import ChatEncoder
from data.types import GTObject, Record
from model.tiny import build_tiny_in_memory
from rollout.backends import GenerationBackend, HFGenerationBackend, make_generation_backend
from rollout.vllm_backend import INSTALL_HINT, EngineRequest, VLLMGenerationBackend, WeightSync
from tests._data_fixtures import write_png
from training.session import optimizer_step

EOS = 2


class FakeEngine:
    """Records every call. Request i of a call answers ``[seed % 50 + 10, len(prompt), EOS, 99]``
    (tokens after the eos, which the backend must cut) with log-probs ``-0.5 * position``; a prompt
    of length 4 never ends (``max_new_tokens`` tokens, no eos)."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.awake = True

    def generate(self, requests, sampling):
        assert self.awake, "generate on a sleeping engine"
        self.calls.append(("generate", [r.prompt_token_ids for r in requests], sampling))
        out = []
        for r in requests:
            n = len(r.prompt_token_ids)
            ids = [7] * (sampling.max_new_tokens + 3) if n == 4 else [r.seed % 50 + 10, n, EOS, 99]
            out.append((ids, [-0.5 * k for k in range(len(ids))]))
        return out

    def load_weights(self, weights):
        assert self.awake, "weights pushed into a sleeping engine"
        self.calls.append(("load_weights",))
        self.weights = {k: v.clone() for k, v in weights}

    def sleep(self):
        self.calls.append(("sleep",))
        self.awake = False

    def wake_up(self):
        self.calls.append(("wake_up",))
        self.awake = True


def _prompt(n: int) -> SimpleNamespace:
    """A text-only prompt of ``n`` tokens (the backend reads input_ids, pixel_values, record)."""
    return SimpleNamespace(input_ids=torch.arange(100, 100 + n), pixel_values=None, record=None)


def _backend(engine=None, sync=None, **kw):
    model = torch.nn.Linear(2, 2)
    kw.setdefault("max_new_tokens", 6)
    backend = VLLMGenerationBackend(model, engine or FakeEngine(), sync or WeightSync(), image_loader=None,
                                    eos_token_ids=[EOS], **kw)
    return model, backend


def _count(engine, name):
    return sum(c[0] == name for c in engine.calls)


def test_outputs_are_generation_outputs_in_prompt_order():
    engine = FakeEngine()
    _, backend = _backend(engine, batch_size=2)
    assert isinstance(backend, GenerationBackend)
    prompts = [_prompt(5), _prompt(4), _prompt(6)]
    out = backend.generate(prompts)
    assert [o.token_ids[1:] for o in out[::2]] == [[5, EOS], [6, EOS]]  # cut after the eos, kept
    assert [o.finished for o in out] == [True, False, True]
    assert out[1].token_ids == [7] * 6 and out[1].token_logprobs == [-0.5 * k for k in range(6)]  # capped
    assert out[0].token_logprobs == [0.0, -0.5, -1.0]
    gens = [c for c in engine.calls if c[0] == "generate"]
    assert [len(c[1]) for c in gens] == [2, 1]  # batch_size prompts per engine call
    sampling = gens[0][2]
    assert (sampling.max_new_tokens, sampling.temperature, sampling.stop_token_ids) == (6, 0.0, (EOS,))
    assert backend.generate([]) == []


def test_weights_pushed_only_after_a_step_that_changed_them():
    engine = FakeEngine()
    model, backend = _backend(engine)
    backend.generate([_prompt(5)])
    assert _count(engine, "load_weights") == 0  # the engine starts from the current weights
    backend.weights_changed()
    with torch.no_grad():
        model.weight.fill_(3.0)
    backend.generate([_prompt(5)])
    assert _count(engine, "load_weights") == 1 and torch.equal(engine.weights["weight"], model.weight)
    backend.generate([_prompt(5)])  # no step in between: nothing to push
    assert _count(engine, "load_weights") == 1
    backend.weights_changed()
    backend.weights_changed()
    backend.generate([_prompt(5)])  # two steps, one push
    assert _count(engine, "load_weights") == 2
    assert (backend.sync.trained_version, backend.sync.engine_version, backend.sync.pushes) == (3, 3, 2)


def test_derived_backend_shares_engine_and_versions():
    engine = FakeEngine()
    _, backend = _backend(engine, temperature=1.0, top_k=5)
    greedy = backend.derive(temperature=0.0, batch_size=1)
    assert greedy.engine is engine and greedy.sync is backend.sync and greedy.top_k == 5
    backend.weights_changed()
    greedy.generate([_prompt(5), _prompt(6)])  # eval after a step sees the new weights
    assert _count(engine, "load_weights") == 1
    backend.generate([_prompt(5)])
    assert _count(engine, "load_weights") == 1
    assert [c[2].temperature for c in engine.calls if c[0] == "generate"] == [0.0, 0.0, 1.0]


def test_sleep_mode_wakes_pushes_generates_and_sleeps():
    engine = FakeEngine()
    _, backend = _backend(engine, sleep_mode=True)
    engine.sleep()  # start() leaves a sleeping engine
    engine.calls.clear()
    backend.weights_changed()
    backend.generate([_prompt(5)])
    assert [c[0] for c in engine.calls] == ["wake_up", "load_weights", "generate", "sleep"]
    assert not engine.awake
    _, no_sleep = _backend(FakeEngine(), sleep_mode=False)
    no_sleep.generate([_prompt(5)])
    assert [c[0] for c in no_sleep.engine.calls] == ["generate"]


def test_engine_error_still_puts_engine_to_sleep():
    engine = FakeEngine()
    _, backend = _backend(engine, sleep_mode=True)

    def boom(requests, sampling):
        raise RuntimeError("engine died")

    engine.generate = boom
    with pytest.raises(RuntimeError, match="engine died"):
        backend.generate([_prompt(5)])
    assert not engine.awake


def test_sampling_seeds_follow_the_generator():
    """The trainer reseeds ``generator`` per optimizer step; per-request seeds follow, so a resumed
    run sends the engine the seeds of the uninterrupted run."""
    _, a = _backend()
    _, b = _backend()
    seen = []
    for backend in (a, b):
        backend.generator.manual_seed(1234)
        seen.append([backend._request(_prompt(3)).seed for _ in range(3)])
    assert seen[0] == seen[1] and len(set(seen[0])) == 3
    assert isinstance(a._request(_prompt(3)), EngineRequest)


def test_image_prompt_without_record_fails_with_fix():
    _, backend = _backend()
    p = SimpleNamespace(input_ids=torch.arange(3), pixel_values=torch.ones(4, 2), record=None)
    with pytest.raises(ValueError, match="needs its record"):
        backend.generate([p])


def test_optimizer_step_notifies_only_steps_that_changed_weights():
    """``training.session.optimizer_step`` tells the backend after an optimizer step, not after a
    micro-step inside the accumulation window, nor after a step skipped as non-finite (by the
    guard, or by the fp16 grad scaler)."""
    from training.faults import InterruptFlag, NonFiniteGuard

    notes = []
    backend = SimpleNamespace(weights_changed=lambda: notes.append(1))
    accelerator = SimpleNamespace(backward=lambda loss: None, sync_gradients=False, num_processes=1, scaler=None,
                                  is_main_process=True,
                                  clip_grad_norm_=lambda params, max_norm: torch.tensor(1.0))
    optimizer = SimpleNamespace(step=lambda: None, zero_grad=lambda set_to_none: None, step_was_skipped=False)
    s = SimpleNamespace(optimizer=optimizer, scheduler=SimpleNamespace(step=lambda: None), rollout_backend=backend,
                        model=torch.nn.Linear(1, 1), guard=NonFiniteGuard(10), interrupt=InterruptFlag(False))
    run = SimpleNamespace(accelerator=accelerator)
    optimizer_step(run, s, torch.tensor(0.0), 0.0)  # inside the window
    assert notes == []
    accelerator.sync_gradients = True
    optimizer_step(run, s, torch.tensor(0.0), 0.0)
    assert notes == [1]
    optimizer_step(run, s, torch.tensor(float("nan")), 0.0)  # non-finite loss: step skipped
    assert notes == [1]
    accelerator.scaler = object()
    optimizer.step_was_skipped = True  # fp16: the scaler found an overflow, weights unchanged
    optimizer_step(run, s, torch.tensor(0.0), 0.0)
    assert notes == [1]
    s.rollout_backend = None  # Stage-1 before its first eval
    optimizer.step_was_skipped = False
    optimizer_step(run, s, torch.tensor(0.0), 0.0)
    assert notes == [1]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_missing_vllm_fails_at_start_with_one_line():
    rm = SimpleNamespace(backend="vllm", vllm=SimpleNamespace(), hf=None,
                         decoding=SimpleNamespace(max_new_tokens=4, temperature=0.0, top_p=1.0, top_k=0, batch_size=8, seed=0,
                                                  coord_pick="argmax"))
    with pytest.raises(ImportError) as err:
        make_generation_backend(rm, torch.nn.Linear(1, 1), None)
    assert str(err.value) == INSTALL_HINT and "\n" not in INSTALL_HINT
    assert "requirements-vllm.txt" in INSTALL_HINT and "rollout_matching.backend: hf" in INSTALL_HINT


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                    reason="needs vLLM (pip install -r requirements-vllm.txt) and a CUDA GPU")
def test_vllm_greedy_equals_hf_on_tiny_model(tmp_path):
    """Greedy rollouts of the colocated engine equal the HF backend's (tokens; log-probs to 1e-2 in bf16)."""
    model, tok, proc = build_tiny_in_memory(seed=0)
    model = model.to("cuda", torch.bfloat16)
    enc = ChatEncoder(tok, proc, prompt="Detect all objects.")
    prompts = []
    for i, (w, h) in enumerate([(64, 64), (32, 64), (64, 32), (48, 48)]):
        path = write_png(os.path.join(tmp_path, f"{i}.png"), w, h, color=(40 * i, 90, 200))
        prompts.append(enc.encode_prompt(Record(path, w, h, (GTObject("cat", (1, 2, 30, 40)),), f"i{i}", f"t:{i}")))
    vcfg = SimpleNamespace(gpu_memory_utilization=0.2, sleep_mode=True, max_model_len=2048, enforce_eager=False)
    vllm_backend = VLLMGenerationBackend.start(model, tok, vcfg, encoder=enc, work_dir=tmp_path, max_new_tokens=16)
    ref = HFGenerationBackend(model, tok, max_new_tokens=16, batch_size=4).generate(prompts)
    out = vllm_backend.generate(prompts)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]
    for a, b in zip(out, ref):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-2)
