"""eval.inloop (+ eval.infer): rollouts -> parse -> match -> eval/rollout/* and the run-dir files.

A scripted backend replays the GT answer tokens (the tokenizer, parser, matcher and COCO are all
real), so the expected numbers are known; one test drives the real HF backend on the tiny model.
"""

from __future__ import annotations

import json
import logging
import math

import pytest

from configs.types import EvalDetectionConfig, MatchingConfig
from data.encoding import ChatEncoder
from data.records import read_jsonl
from data.shapes import make_shapes_dataset
from eval import evaluate as evaluate_cli
from eval import infer, inloop
from eval.artifacts import ARTIFACT_FILES
from eval.detection import read_predictions_jsonl
from model.tiny import build_tiny_checkpoint, build_tiny_in_memory
from model.vocab import coord_vocab_from_tokenizer
from rollout.types import GenerationOutput

COCO_LIKE = ("AP", "AR", "per_category", "F1@")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    _, val = make_shapes_dataset(root, num_train=1, num_val=5, image_size=64, max_shapes=3)
    records, _ = read_jsonl(val)
    model, tok, proc = build_tiny_in_memory()
    encoder = ChatEncoder(tok, proc, prompt="Detect all objects.")
    return {"model": model, "tok": tok, "vocab": coord_vocab_from_tokenizer(tok), "encoder": encoder,
            "records": records, "val": val}  # fmt: skip


class ReplayBackend:
    """Generates the GT answer of each prompt's record, every token with probability ``prob(record)``."""

    def __init__(self, encoder, prob=lambda rec: 0.9):
        self.encoder = encoder
        self.prob = prob
        self.calls: list[str] = []
        self.batch_size = 2

    def generate(self, prompts):
        out = []
        for p in prompts:
            rec = p.record
            self.calls.append(rec.image_id)
            full = self.encoder.encode(rec)
            ids = full.input_ids[full.prompt_len :].tolist()
            lp = math.log(self.prob(rec))
            out.append(GenerationOutput(token_ids=ids, token_logprobs=[lp] * len(ids), finished=True))
        return out


REPLAY = object()  # default backend of _run: replay the GT answers


def _run(tiny, tmp_path, backend=REPLAY, **kw):
    kw.setdefault("eval_detection", EvalDetectionConfig(enabled=True, score_mode="token_prob"))
    return inloop.run_rollout_eval(
        tiny["model"], tiny["tok"], tiny["vocab"], tiny["encoder"], tiny["records"],
        backend=ReplayBackend(tiny["encoder"]) if backend is REPLAY else backend,
        matching=MatchingConfig(iou_gate=0.3), out_dir=tmp_path / "eval" / "step_7", step=7, **kw,
    )  # fmt: skip


def test_perfect_rollouts_give_full_scores_and_files(tiny, tmp_path, caplog):
    console = logging.getLogger("coordexp")  # may not propagate (training.setup.setup_logging): listen on it
    console.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="coordexp"):
            payload = _run(tiny, tmp_path)
    finally:
        console.removeHandler(caplog.handler)
    # one console summary line per eval
    summary = sorted({r.getMessage() for r in caplog.records if r.getMessage().startswith("eval step 7:")})
    assert len(summary) == 1  # (the record may reach caplog through two handlers)
    assert summary[0].startswith("eval step 7: mAP 1.0000 AP50 1.0000 F1 1.0000 parse-valid 1.00 (5 images, ")
    n_gt = sum(len(r.objects) for r in tiny["records"])
    assert payload["eval/rollout/mAP"] == pytest.approx(1.0)
    assert isinstance(payload["eval/rollout/mAP"], float)
    for k in ("precision", "recall", "f1", "parse_valid_rate", "finished_rate", "matched_iou_mean"):
        assert payload[f"eval/rollout/{k}"] == pytest.approx(1.0), k
    assert payload["eval/rollout/matched_total"] == n_gt == payload["eval/rollout/gt_objects_total"]
    assert payload["eval/rollout/gt_per_sample"] == pytest.approx(n_gt / 5)
    assert payload["eval/rollout/samples_total"] == 5
    # mAP is the only COCO key; no internal "_" keys leak
    assert [k for k in payload if any(c in k.split("/")[-1] for c in COCO_LIKE)] == ["eval/rollout/mAP"]
    assert not any(k.split("/")[-1].startswith("_") for k in payload)

    out = tmp_path / "eval" / "step_7"
    lines = read_predictions_jsonl(out / "predictions.jsonl")
    assert [line["image_id"] for line in lines] == [r.image_id for r in tiny["records"]]
    rec0 = tiny["records"][0]
    assert lines[0]["image"] == rec0.image_path and lines[0]["parse_valid"] is True
    k = rec0.objects[0].bins  # GT written in pixels: bin / 999 * size
    assert lines[0]["gt"][0]["bbox_2d"] == pytest.approx([k[0] / 999 * 64, k[1] / 999 * 64, k[2] / 999 * 64, k[3] / 999 * 64])
    assert lines[0]["pred"][0]["score"] == pytest.approx(0.9)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["AP"] == pytest.approx(1.0) and saved["step"] == 7
    assert saved["rollout"]["eval/rollout/mAP"] == payload["eval/rollout/mAP"]
    assert set(saved["per_category"]) == {o.desc for r in tiny["records"] for o in r.objects}

    # the offline evaluator on the written file reproduces the in-loop report exactly
    assert evaluate_cli.main(["--predictions", str(out / "predictions.jsonl"), "--out", str(tmp_path / "m.json")]) == 0
    offline = json.loads((tmp_path / "m.json").read_text())
    assert offline["metrics"] == saved["metrics"]
    assert offline["per_category"] == saved["per_category"]
    assert offline["counters"] == {**saved["counters"], "lines_skipped_count": 0}
    assert offline["f1ish"] == saved["f1ish"] and saved["f1ish"]["f1ish@0.5_full_micro_f1"] == pytest.approx(1.0)
    # the artifacts: in-loop (under eval/step_7/) and offline (next to --out) are the same files
    for name in ARTIFACT_FILES:
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name
    per_image = json.loads((out / "per_image.json").read_text())
    assert per_image["images_written"] == per_image["images_total"] == 5


def test_inloop_artifacts_are_size_bounded(tiny, tmp_path):
    from configs.types import EvalConfig

    _run(tiny, tmp_path, eval_cfg=EvalConfig(artifacts_max_images=2))
    out = tmp_path / "eval" / "step_7"
    per_image = json.loads((out / "per_image.json").read_text())
    assert (per_image["images_total"], per_image["images_written"], len(per_image["images"])) == (5, 2, 2)
    assert len((out / "matches.jsonl").read_text().splitlines()) == 2
    assert len(read_predictions_jsonl(out / "predictions.jsonl")) == 5  # predictions are never cut


def test_token_prob_scores_reach_the_predictions(tiny, tmp_path):
    probs = {r.image_id: 0.2 + 0.1 * i for i, r in enumerate(tiny["records"])}
    _run(tiny, tmp_path, backend=ReplayBackend(tiny["encoder"], prob=lambda rec: probs[rec.image_id]))
    for line in read_predictions_jsonl(tmp_path / "eval" / "step_7" / "predictions.jsonl"):
        assert line["pred"]
        assert [p["score"] for p in line["pred"]] == pytest.approx([probs[line["image_id"]]] * len(line["pred"]))
    _run(tiny, tmp_path, backend=ReplayBackend(tiny["encoder"]), eval_detection=EvalDetectionConfig(score_mode="constant"))
    for line in read_predictions_jsonl(tmp_path / "eval" / "step_7" / "predictions.jsonl"):
        assert all(p["score"] == 1.0 for p in line["pred"])


def test_coco_failure_gives_zero_map_and_a_warning_in_train_log(tiny, tmp_path, monkeypatch, fresh_coordexp_logger):
    from training.setup import setup_logging

    def boom(*a, **k):
        raise RuntimeError("pycocotools exploded")

    monkeypatch.setattr(inloop, "evaluate_detection", boom)
    (tmp_path / "run").mkdir()
    logger = setup_logging(tmp_path / "run")
    payload = _run(tiny, tmp_path)
    assert payload["eval/rollout/mAP"] == 0.0 and isinstance(payload["eval/rollout/mAP"], float)
    assert payload["eval/rollout/precision"] == pytest.approx(1.0)  # the rest of the eval still counts
    for handler in logger.handlers:
        handler.flush()
    log = (tmp_path / "run" / "train.log").read_text()
    assert "COCO evaluation failed" in log and "exploded" in log  # the run's log, not a stray logger
    saved = json.loads((tmp_path / "eval" / "step_7" / "metrics.json").read_text())
    assert "exploded" in saved["coco_error"]


def test_detection_disabled_emits_no_map(tiny, tmp_path):
    cfg = EvalDetectionConfig(enabled=False, metrics="coco", score_mode="token_prob", score_include_desc=False)
    payload = _run(tiny, tmp_path, eval_detection=cfg)
    assert "eval/rollout/mAP" not in payload
    assert payload["eval/rollout/recall"] == pytest.approx(1.0)
    assert (tmp_path / "eval" / "step_7" / "predictions.jsonl").is_file()


class FakeAccelerator:
    def __init__(self, rank, world):
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0


def test_ddp_shards_are_gathered_once_in_dataset_order(tiny, tmp_path, monkeypatch):
    single = _run(tiny, tmp_path / "single")
    # Rank 1 of 2 owns records 1 and 3; the gather also returns a padded duplicate (as
    # gather_for_metrics-style padding would) that must be dropped.
    other = inloop.predict_records(tiny["model"], tiny["tok"], tiny["vocab"], tiny["encoder"], tiny["records"],
                                   indices=[1, 3], backend=ReplayBackend(tiny["encoder"]))  # fmt: skip
    monkeypatch.setattr(inloop, "_gather_object", lambda local: list(local) + other + [other[-1]])
    broadcasts = []
    monkeypatch.setattr(inloop, "_broadcast_object", lambda v: broadcasts.append(v) or v)
    backend = ReplayBackend(tiny["encoder"])
    payload = _run(tiny, tmp_path / "ddp", backend=backend, accelerator=FakeAccelerator(0, 2))
    ids = [r.image_id for r in tiny["records"]]
    assert backend.calls == [ids[0], ids[2], ids[4]]  # rank 0 generated only its shard
    assert payload == single
    assert broadcasts == [pytest.approx(1.0)]
    lines = read_predictions_jsonl(tmp_path / "ddp" / "eval" / "step_7" / "predictions.jsonl")
    assert [line["image_id"] for line in lines] == ids
    # a lost shard fails loudly instead of silently evaluating fewer images
    monkeypatch.setattr(inloop, "_gather_object", lambda local: list(local))
    with pytest.raises(RuntimeError, match="lost 2 of 5 images"):
        _run(tiny, tmp_path / "lost", accelerator=FakeAccelerator(0, 2))


def test_real_hf_backend_on_tiny_model(tiny, tmp_path):
    model = tiny["model"]
    model.train()
    payload = _run(tiny, tmp_path, backend=None, backend_kwargs={"max_new_tokens": 6, "batch_size": 3})
    assert model.training  # mode restored
    model.eval()
    # 6 new tokens cannot hold one complete object (`{"objects": [{"desc": ` alone is longer), so
    # there is no valid prediction and the answer is known: mAP exactly 0, no predicted objects
    assert isinstance(payload["eval/rollout/mAP"], float) and payload["eval/rollout/mAP"] == 0.0
    assert payload["eval/rollout/pred_per_sample"] == 0.0 and payload["eval/rollout/matched_total"] == 0.0
    assert 0.0 <= payload["eval/rollout/parse_valid_rate"] <= 1.0
    assert payload["eval/rollout/samples_total"] == 5
    lines = read_predictions_jsonl(tmp_path / "eval" / "step_7" / "predictions.jsonl")
    assert len(lines) == 5 and all(isinstance(line["raw_text"], str) for line in lines)
    with pytest.raises(ValueError, match="max_new_tokens"):
        _run(tiny, tmp_path, backend=None, backend_kwargs={})


def test_infer_cli_writes_predictions(tiny, tmp_path, capsys):
    from pathlib import Path

    ckpt = build_tiny_checkpoint(str(tmp_path / "ckpt"))
    out = tmp_path / "preds.jsonl"
    # an LVIS-style line (scripts/coco_to_jsonl.py): its lists reach predictions.jsonl for the federated eval
    val_lines = Path(tiny["val"]).read_text().splitlines()
    first = {**json.loads(val_lines[0]), "neg_descs": ["purple star"], "not_exhaustive_descs": []}
    lvis_val = Path(tiny["val"]).with_name("val_lvis.jsonl")
    lvis_val.write_text("\n".join([json.dumps(first), *val_lines[1:]]) + "\n")
    rc = infer.main(["--checkpoint", ckpt, "--jsonl", str(lvis_val), "--out", str(out), "--batch-size", "2",
                     "--max-new-tokens", "4", "--limit", "3", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    lines = read_predictions_jsonl(out)
    assert [line["image_id"] for line in lines] == [r.image_id for r in tiny["records"][:3]]
    assert all(line["gt"] for line in lines)
    assert (lines[0]["neg_descs"], lines[0]["not_exhaustive_descs"]) == (["purple star"], [])
    assert "neg_descs" not in lines[1]
    printed = capsys.readouterr().out
    assert "eval/rollout/parse_valid_rate" in printed and "python -m eval.evaluate" in printed


def test_infer_cli_coord_pick_reaches_the_backend(tiny, tmp_path, monkeypatch):
    import rollout.backends as backends

    built = []
    real = backends.make_generation_backend

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(backends, "make_generation_backend", spy)
    ckpt = build_tiny_checkpoint(str(tmp_path / "ckpt"))
    out = tmp_path / "preds.jsonl"
    rc = infer.main(["--checkpoint", ckpt, "--jsonl", tiny["val"], "--out", str(out), "--batch-size", "2",
                     "--max-new-tokens", "4", "--limit", "2", "--device", "cpu", "--coord-pick", "expectation"])  # fmt: skip
    assert rc == 0 and len(read_predictions_jsonl(out)) == 2
    assert [b.coord_pick for b in built] == ["expectation"]


def _ddp_worker(rank, world, store, queue):
    import os
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    # Rendezvous through a FileStore (no TCP port to race for); Accelerator adopts the initialised group.
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    local = [inloop.SampleResult(index=i, image_id=str(i), image="", width=1, height=1, gt=[], pred=[], raw_text="",
                                 parse_valid=True, finished=True, matched_iou_sum=0.0)
             for i in range(rank, 5, world)]  # fmt: skip
    res = inloop.gather_results(local, 5, acc)
    value = inloop._broadcast_object(0.25 if acc.is_main_process else None)
    queue.put((rank, [r.index for r in res], value))


@pytest.mark.slow
def test_real_two_process_gather_and_broadcast(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = f"file://{tmp_path / 'pg_store'}"
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, store, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert got == [(0, [0, 1, 2, 3, 4], 0.25), (1, [0, 1, 2, 3, 4], 0.25)]


class CoinBackend(ReplayBackend):
    """Sampling stand-in: per prompt a coin from its seeded generator decides between the GT answer and an
    empty one. ``derive`` records the temperature it was asked for."""

    def __init__(self, encoder):
        super().__init__(encoder)
        import torch

        self.generator = torch.Generator().manual_seed(0)
        self.temperatures: list[float] = []

    def derive(self, *, temperature, batch_size):
        self.temperatures.append(temperature)
        return self

    def generate(self, prompts):
        import torch

        tok = self.encoder.tokenizer
        empty = tok('{"objects": []}', add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
        replay = super().generate(prompts)
        coins = torch.randint(0, 2, (len(prompts),), generator=self.generator).tolist()
        return [r if c else GenerationOutput(token_ids=empty, token_logprobs=[0.0] * len(empty), finished=True)
                for r, c in zip(replay, coins)]


def _oracle(tiny, seed):
    kw = dict(matching=MatchingConfig(iou_gate=0.3))
    results = inloop.predict_records(tiny["model"], tiny["tok"], tiny["vocab"], tiny["encoder"], tiny["records"],
                                     backend=ReplayBackend(tiny["encoder"]), **kw)
    backend = CoinBackend(tiny["encoder"])
    inloop.add_sampled_rollouts(results, tiny["model"], tiny["tok"], tiny["vocab"], tiny["encoder"], tiny["records"],
                                backend=backend, num_samples=2, temperature=0.7, seed=seed, **kw)
    assert backend.temperatures == [0.7]
    return results


def test_oracle_k_rollouts_are_seeded_and_scored(tiny):
    from eval.detection import evaluate_detection

    results = _oracle(tiny, seed=5)
    samples = [r.samples for r in results]
    assert [len(s) for s in samples] == [2] * 5
    assert all(p in ([], r.pred) for r, s in zip(results, samples) for p in s)  # each rollout: the GT answer or nothing
    assert samples == [r.samples for r in _oracle(tiny, seed=5)]  # same seed, same rollouts
    assert any(samples != [r.samples for r in _oracle(tiny, seed=s)] for s in (6, 7, 8))
    report = evaluate_detection([r.detection_record() for r in results])
    # a GT object is found by some rollout exactly when one of its image's rollouts was the GT answer
    found = sum(len(r.gt) for r in results if any(r.samples))
    assert report.oracle_k["oracle_k@0.5_recall"] == pytest.approx(found / sum(len(r.gt) for r in results))
    assert report.oracle_k["oracle_k_samples"] == 2
    assert 0 < found < sum(len(r.gt) for r in results)  # the seed gives a mix (so the test tells cases apart)


def test_infer_cli_num_samples_writes_k_rollouts_reproducibly(tiny, tmp_path):
    ckpt = build_tiny_checkpoint(str(tmp_path / "ckpt"))
    texts = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        assert infer.main(["--checkpoint", ckpt, "--jsonl", tiny["val"], "--out", str(out), "--batch-size", "2",
                           "--max-new-tokens", "8", "--limit", "2", "--device", "cpu", "--num-samples", "2",
                           "--temperature", "1.0", "--seed", "3"]) == 0
        lines = read_predictions_jsonl(out)
        assert [len(line["samples"]) for line in lines] == [2, 2]
        texts.append(out.read_text())
    assert texts[0] == texts[1]
    with pytest.raises(ValueError, match="--temperature > 0"):
        infer.main(["--checkpoint", ckpt, "--jsonl", tiny["val"], "--out", str(tmp_path / "c.jsonl"),
                    "--num-samples", "2", "--temperature", "0"])


def test_inloop_oracle_k_option_reaches_metrics_json(tiny, tmp_path):
    from configs.types import EvalConfig, OracleConfig

    backend = CoinBackend(tiny["encoder"])
    _run(tiny, tmp_path, backend=backend, eval_cfg=EvalConfig(oracle=OracleConfig(k=2, temperature=0.5, seed=5)))
    out = tmp_path / "eval" / "step_7"
    assert backend.temperatures == [0.5]
    lines = read_predictions_jsonl(out / "predictions.jsonl")
    assert [len(line["samples"]) for line in lines] == [2] * 5
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["oracle_k"]["oracle_k_samples"] == 2 and 0 < saved["oracle_k"]["oracle_k@0.5_recall"] <= 1
    # the greedy pass drew from the same generator; each rollout reseeds it: the rollouts of _oracle(seed=5)
    assert [line["samples"] for line in lines] == [[{"pred": p} for p in r.samples] for r in _oracle(tiny, seed=5)]


def test_inloop_lvis_lists_make_the_eval_federated_and_reach_predictions_jsonl(tiny, tmp_path):
    rec0 = tiny["records"][0]
    lists = {rec0.image_id: {"neg_descs": ["purple star"], "not_exhaustive_descs": []}}
    _run(tiny, tmp_path, lvis_lists=lists)
    out = tmp_path / "eval" / "step_7"
    lines = read_predictions_jsonl(out / "predictions.jsonl")
    assert lines[0]["neg_descs"] == ["purple star"] and "neg_descs" not in lines[1]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["backend"] == "lvis" and saved["metrics"]["AP"] == pytest.approx(1.0)  # perfect replay
