"""COCO results export (test-dev upload): predictions.jsonl -> the official results file.

    python -m eval.export_coco --predictions preds.jsonl --categories instances_val2017.json --out results.json
        [--semantic-model NAME_OR_PATH --semantic-threshold 0.6]

Writes ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]`` with the official
category ids of ``--categories`` (any COCO-format file with a ``categories`` list; the test-dev
``image_info_test-dev2017.json`` has the same 80). Each predicted desc maps onto those names with
``eval.semantic`` (exact normalised match, then the encoder when ``--semantic-model`` is given); a
desc that maps to none is left out and counted. ``image_id``: an int, or a string of digits
(``"000000397133"``), or else the file name of the record's ``image`` looked up in the file's
``images`` list. GT in the records is ignored (test-dev has none).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from configs.errors import InputError, add_debug_flag, run_cli
from eval.detection import _pixel_box, _xywh, read_predictions, to_detection_record
from eval.semantic import UNMAPPED, CategoryMapper, add_semantic_args, load_encoder, normalize_desc, semantic_from_args


def _image_id(rec: Any, by_file: dict[str, int], where: str) -> int:
    iid = rec.image_id
    if isinstance(iid, int):
        return iid
    if isinstance(iid, str) and iid.isdigit():
        return int(iid)
    name = Path(str(rec.image or iid)).name
    if name in by_file:
        return by_file[name]
    raise InputError(f"{where}: image_id {iid!r} is not a COCO image id (an int or a string of digits) and "
                     f"{name!r} is not a file_name in the --categories file's images")


def export_results(records: Sequence[Any], coco: dict, semantic: Any = None) -> tuple[list[dict], dict[str, int]]:
    """The results list and counters (``pred_objects``, ``pred_exact_count``, ``pred_semantic_count``, ``pred_unmapped_count``)."""
    cats = coco.get("categories")
    if not isinstance(cats, list) or not cats:
        raise InputError("--categories: the file has no 'categories' list (use instances_val2017.json or "
                         "image_info_test-dev2017.json)")
    ids = {normalize_desc(c["name"]): int(c["id"]) for c in cats}
    by_file = {Path(i["file_name"]).name: int(i["id"]) for i in coco.get("images", []) if "file_name" in i}
    mapper = CategoryMapper(list(ids), load_encoder(semantic), float(getattr(semantic, "threshold", 0.6)))
    counters = {"pred_objects": 0, "pred_exact_count": 0, "pred_semantic_count": 0, "pred_unmapped_count": 0}
    out: list[dict] = []
    for i, raw in enumerate(records):
        rec = to_detection_record(raw, where=f"records[{i}]")
        image_id = _image_id(rec, by_file, f"records[{i}]")
        for obj, m in zip(rec.pred, mapper.map_many([o.desc for o in rec.pred])):
            counters["pred_objects"] += 1
            counters[f"pred_{m.kind}_count"] += 1
            if m.kind == UNMAPPED:
                continue
            box = [round(v, 2) for v in _xywh(_pixel_box(obj, rec))]
            out.append({"image_id": image_id, "category_id": ids[m.category], "bbox": box,
                        "score": round(1.0 if obj.score is None else float(obj.score), 5)})
    return out, counters


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.export_coco", description=__doc__.split("\n")[0])
    p.add_argument("--predictions", required=True, help="predictions.jsonl (eval.infer output)")
    p.add_argument("--categories", required=True, help="COCO-format JSON with the official categories "
                   "(instances_val2017.json)")
    p.add_argument("--out", required=True, help="results JSON to write (upload this)")
    add_semantic_args(p)
    return add_debug_flag(p)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    semantic = semantic_from_args(args)  # a missing package or model fails before anything is read
    path = Path(args.categories)
    if not path.is_file():
        raise FileNotFoundError(f"--categories {path}: no such file")
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"--categories {path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    results, counters = export_results(read_predictions(args.predictions).records, coco, semantic)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results) + "\n", encoding="utf-8")
    print(f"wrote {out}: {len(results)} detections; " + ", ".join(f"{k} {v}" for k, v in counters.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
