"""eval.export_coco: the official COCO results file, round-tripped through pycocotools' loadRes."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from configs.errors import run_cli
from eval import export_coco
from eval.detection import write_predictions_jsonl
from tests._semantic_fixtures import build_hand_encoder

COCO_GT = {
    "images": [{"id": 397133, "file_name": "000000397133.jpg", "width": 640, "height": 427},
               {"id": 37777, "file_name": "000000037777.jpg", "width": 352, "height": 230}],
    "categories": [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}],
    "annotations": [],
}
RECORDS = [
    {"image_id": "000000397133", "width": 640, "height": 427, "gt": [],
     "pred": [{"desc": "cat", "bbox_2d": [10, 20, 50, 80], "score": 0.9},
              {"desc": "kitty", "bbox_2d": [0, 0, 10, 10], "score": 0.8},
              {"desc": "truck", "bbox_2d": [5, 5, 6, 6], "score": 0.5}]},
    {"image_id": "val/a", "image": "/data/val2017/000000037777.jpg", "width": 352, "height": 230,
     "pred": [{"desc": "Dog", "bbox_2d": [1.004, 2, 3, 4]}]},
]  # fmt: skip


@pytest.fixture
def files(tmp_path):
    (tmp_path / "instances_val2017.json").write_text(json.dumps(COCO_GT))
    write_predictions_jsonl(tmp_path / "preds.jsonl", RECORDS)
    return tmp_path


def _load_res(files, results):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(files / "instances_val2017.json"))
        return gt.loadRes(str(results))


def test_exact_export_round_trips_through_load_res(files, capsys):
    out = files / "results.json"
    assert export_coco.main(["--predictions", str(files / "preds.jsonl"), "--categories",
                             str(files / "instances_val2017.json"), "--out", str(out)]) == 0
    assert "pred_unmapped_count 2" in capsys.readouterr().out  # kitty and truck without an encoder
    results = json.loads(out.read_text())
    assert results == [
        {"image_id": 397133, "category_id": 17, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.9},
        {"image_id": 37777, "category_id": 18, "bbox": [1.0, 2.0, 2.0, 2.0], "score": 1.0},
    ]
    dt = _load_res(files, out)
    anns = sorted(dt.anns.values(), key=lambda a: a["image_id"])
    assert [(a["image_id"], a["category_id"], a["area"]) for a in anns] == [(37777, 18, 4.0), (397133, 17, 2400.0)]


def test_semantic_export_maps_a_synonym_onto_the_official_id(files, tmp_path_factory):
    enc = build_hand_encoder(tmp_path_factory.mktemp("enc"))
    out = files / "results.json"
    assert export_coco.main(["--predictions", str(files / "preds.jsonl"), "--categories",
                             str(files / "instances_val2017.json"), "--out", str(out), "--semantic-model", str(enc)]) == 0
    results = json.loads(out.read_text())
    assert [(r["image_id"], r["category_id"], r["score"]) for r in results] == [
        (397133, 17, 0.9), (397133, 17, 0.8), (37777, 18, 1.0)]  # kitty -> cat (0.7071 >= 0.6); truck dropped
    assert len(_load_res(files, out).anns) == 3


def test_an_unknown_image_is_one_error_line(files, capsys):
    write_predictions_jsonl(files / "bad.jsonl", [{**RECORDS[1], "image": "/x/other.jpg"}])
    rc = run_cli(export_coco.main, ["--predictions", str(files / "bad.jsonl"), "--categories",
                                    str(files / "instances_val2017.json"), "--out", str(files / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "records[0]: image_id 'val/a'" in err
