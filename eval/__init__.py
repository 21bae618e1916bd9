"""Evaluation: the one COCO helper, object scores, in-loop rollout eval and the offline CLIs.

``eval.detection.evaluate_detection`` is the only COCO entry point; see docs/EVAL.md.
Only the light contract is re-exported here so ``import eval`` never pulls torch or pycocotools.
"""

from eval.detection import DetectionObject, DetectionRecord, DetectionReport, evaluate_detection, normalize_desc
from eval.scores import SCORE_MODES, score_objects

__all__ = [
    "SCORE_MODES",
    "DetectionObject",
    "DetectionRecord",
    "DetectionReport",
    "evaluate_detection",
    "normalize_desc",
    "score_objects",
]
