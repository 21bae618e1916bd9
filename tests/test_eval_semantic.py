"""eval.semantic: exact match first, then a real sentence-transformers encoder (hand-made, local)."""

from __future__ import annotations

import math
import sys

import pytest

from configs.errors import UserError
from configs.types import SemanticConfig
from eval.detection import evaluate_detection
from eval.semantic import EXACT, SEMANTIC, UNMAPPED, CategoryMapper, load_encoder, normalize_desc
from tests._semantic_fixtures import build_hand_encoder

COS_CAT_KITTY = 2 / (math.sqrt(2) * 2)  # 0.7071 (tests/_semantic_fixtures.py)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return build_hand_encoder(tmp_path_factory.mktemp("semantic"))


@pytest.fixture(scope="module")
def encoder(encoder_dir):
    return load_encoder(SemanticConfig(model=str(encoder_dir)))


def test_normalisation_lowercases_and_turns_separators_into_spaces():
    assert normalize_desc("  Black\t  CAT ") == "black cat"
    assert normalize_desc("Traffic_Light/Signal (red)") == "traffic light signal red"
    assert normalize_desc("bowl[2]{x}") == "bowl 2 x"


def test_similarities_are_the_hand_made_ones(encoder):
    assert encoder.similarity("cat", "kitty") == pytest.approx(COS_CAT_KITTY, abs=1e-5)
    assert encoder.similarity("cat", "truck") == pytest.approx(0.0, abs=1e-5)
    assert encoder.similarity("Cat", "cat_") == 1.0  # equal normalised text


def test_synonym_above_threshold_maps_unrelated_below_is_unmapped(encoder):
    mapper = CategoryMapper(["cat", "dog"], encoder, threshold=0.6)
    kitty, truck, dog = mapper.map_many(["kitty", "truck", "Dog"])
    assert (kitty.category, kitty.kind) == ("cat", SEMANTIC)
    assert kitty.similarity == pytest.approx(COS_CAT_KITTY, abs=1e-5)
    assert (truck.category, truck.kind) == (None, UNMAPPED)
    assert truck.similarity == pytest.approx(0.0, abs=1e-5)
    assert (dog.category, dog.kind, dog.similarity) == ("dog", EXACT, 1.0)
    # the same synonym under a threshold above its similarity is dropped
    assert CategoryMapper(["cat", "dog"], encoder, threshold=0.75).map("kitty").kind == UNMAPPED


def test_exact_match_wins_over_an_equally_close_earlier_category(encoder):
    # puppy's embedding equals dog's, and dog comes first: the embedding argmax alone would say dog.
    mapper = CategoryMapper(["dog", "puppy"], encoder, threshold=0.6)
    assert mapper.map("puppy").category == "puppy"
    assert mapper.map("puppy").kind == EXACT


def test_categories_once_and_each_desc_embedded_once(encoder_dir):
    enc = load_encoder(SemanticConfig(model=str(encoder_dir), batch_size=3))  # a fresh cache (other batch size)
    mapper = CategoryMapper(["cat", "dog"], enc, threshold=0.6)
    assert enc.encoded_count == 2
    mapper.map_many(["kitty", "KITTY", "truck", "kitty"])
    mapper.map_many(["kitty", "cat"])
    assert enc.encoded_count == 4  # + kitty, truck; exact matches are never embedded


def test_without_a_model_only_exact_matches_map():
    mapper = CategoryMapper(["cat"], None)
    assert [m.kind for m in mapper.map_many(["Cat", "kitty"])] == [EXACT, UNMAPPED]


def _rec(i, gt_desc, pred_desc, score):
    box = [10.0, 10.0, 110.0, 110.0]
    return {"image_id": i, "width": 200, "height": 200, "gt": [{"desc": gt_desc, "bbox_2d": box}],
            "pred": [{"desc": pred_desc, "bbox_2d": box, "score": score}]}


def test_semantic_ap_beats_exact_ap_by_the_hand_worked_amount(encoder_dir):
    # 2 GT cats; the 0.9 prediction says "cat", the 0.8 one "kitty" (both IoU 1).
    # Exact: kitty is unmapped (dropped, counted), 1 of 2 GT found at the top score -> every IoU
    # threshold's AP = 51/101. Semantic: both hit -> AP 1. Difference 50/101.
    recs = [_rec(0, "cat", "cat", 0.9), _rec(1, "cat", "kitty", 0.8)]
    exact = evaluate_detection(recs)
    sem = evaluate_detection(recs, semantic=SemanticConfig(model=str(encoder_dir)))
    assert exact.metrics["AP"] == pytest.approx(51 / 101)
    assert sem.metrics["AP"] == pytest.approx(1.0)
    assert sem.metrics["AP"] - exact.metrics["AP"] == pytest.approx(50 / 101)
    assert exact.counters["pred_unmapped_count"] == 1 and exact.counters["pred_semantic_count"] == 0
    assert sem.counters["pred_unmapped_count"] == 0 and sem.counters["pred_semantic_count"] == 1
    assert sem.counters["pred_exact_count"] == 1 and sem.semantic_model == str(encoder_dir)


def test_exact_words_give_the_same_report_with_and_without_semantic(encoder_dir):
    # Shapes-like data: every predicted word is a GT category, so the encoder never decides anything.
    recs = [_rec(0, "cat", "cat", 0.9), _rec(1, "dog", "cat", 0.8), _rec(2, "dog", "dog", 0.4)]
    off = evaluate_detection(recs)
    on = evaluate_detection(recs, semantic=SemanticConfig(model=str(encoder_dir)))
    assert on.metrics == off.metrics and on.per_category == off.per_category and on.f1ish == off.f1ish
    assert on.counters == off.counters


def test_missing_model_is_one_user_error_naming_the_key(tmp_path):
    with pytest.raises(UserError, match=r"eval\.semantic\.model=.*cannot load"):
        load_encoder(SemanticConfig(model=str(tmp_path / "nope")))


def test_missing_package_is_one_user_error_naming_the_key(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails
    with pytest.raises(UserError, match=r"eval\.semantic\.model=.*pip install sentence-transformers"):
        load_encoder(SemanticConfig(model=str(tmp_path / "other")))


def test_sentence_transformers_is_not_imported_when_semantic_is_off():
    import subprocess

    code = ("import sys; from eval.detection import evaluate_detection; "
            "evaluate_detection([{'image_id': 0, 'width': 10, 'height': 10, 'gt': [], 'pred': []}]); "
            "print('sentence_transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_semantic_flags_reach_the_report(encoder_dir, tmp_path):
    import json

    from eval import evaluate as evaluate_cli
    from eval.detection import write_predictions_jsonl

    path = write_predictions_jsonl(tmp_path / "p.jsonl", [_rec(0, "cat", "cat", 0.9), _rec(1, "cat", "kitty", 0.8)])
    args = ["--predictions", str(path), "--semantic-model", str(encoder_dir), "--out", str(tmp_path / "m.json")]
    assert evaluate_cli.main(args) == 0
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["semantic_model"] == str(encoder_dir) and saved["metrics"]["AP"] == pytest.approx(1.0)
    assert saved["counters"]["pred_semantic_count"] == 1
    assert evaluate_cli.main(args + ["--semantic-threshold", "0.75"]) == 0  # kitty (0.7071) now dropped
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["counters"]["pred_unmapped_count"] == 1 and saved["metrics"]["AP"] == pytest.approx(51 / 101)
    match = json.loads((tmp_path / "matches.jsonl").read_text().splitlines()[1])["matches"][0]
    assert match["mapping"] == "unmapped" and match["similarity"] == pytest.approx(COS_CAT_KITTY, abs=1e-5)
