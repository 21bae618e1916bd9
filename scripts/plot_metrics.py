"""Plot ``metrics.jsonl`` of one or more runs to a PNG (the plotting lives in ``training.plots``)::

    python scripts/plot_metrics.py runs/a runs/b/metrics.jsonl \\
        --keys loss/total eval/rollout/mAP [--out plot.png] [--smooth 20]
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.errors import run_cli  # noqa: E402
from training.plots import main  # noqa: E402,F401  (the CLI entry point)

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
