"""Training progress on the main process: a tqdm bar on a terminal, plain log lines off it.

Off a terminal (cluster jobs write stderr to a file) a bar would append a carriage-return frame
per refresh: a 3,000-step run leaves megabytes of frames in the log. There the same numbers are
printed as one plain line every ``run.log_every`` optimizer steps (and at the last step).
"""

from __future__ import annotations

import sys
import time
from typing import Any


def _on_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class TrainProgress:
    """Progress over optimizer steps.

    ``update(step, loss=..., lr=..., tokens=...)`` once per optimizer step:
    ``step`` is the number of optimizer steps done (1-based), ``tokens`` the
    supervised-or-input tokens this step processed on this rank (the caller
    decides which; the postfix says ``tok/s``). Throughput is measured over
    the steps since the bar was created, so a resume does not count the
    skipped steps. Disabled (no output at all) off the main process.

    ``terminal``: draw a tqdm bar (True) or print ``<desc> step N/T loss=... lr=... tok/s=...``
    lines to stderr every ``refresh_every`` steps (False); None decides from ``sys.stderr.isatty()``.
    """

    def __init__(
        self, total: int, initial: int = 0, is_main_process: bool = True, refresh_every: int = 1, desc: str = "train",
        terminal: bool | None = None,
    ):
        self.enabled = is_main_process
        self.refresh_every = refresh_every
        self.total = total
        self.desc = desc
        self.terminal = _on_terminal() if terminal is None else terminal
        self._tokens = 0.0
        self._start = time.perf_counter()
        self._last_step = initial
        self.postfix: dict[str, str] = {}
        self._bar: Any = None
        if self.enabled and self.terminal:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(
        self, step: int, loss: float | None = None, lr: float | None = None, tokens: float = 0
    ) -> dict[str, str]:
        """Advance to ``step`` and return the postfix shown (also off the main process, for tests/logs)."""
        self._tokens += float(tokens)
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{float(loss):.4f}"
        if lr is not None:
            postfix["lr"] = f"{float(lr):.2e}"
        postfix["tok/s"] = f"{self._tokens / elapsed:.0f}"
        self.postfix = postfix
        due = step % self.refresh_every == 0 or step == self.total
        if self._bar is not None:
            self._bar.update(step - self._last_step)
            if due:
                self._bar.set_postfix(postfix, refresh=True)
        elif self.enabled and due:
            fields = " ".join(f"{k}={v}" for k, v in postfix.items())
            print(f"{self.desc} step {step}/{self.total} {fields} elapsed={elapsed:.0f}s", file=sys.stderr, flush=True)
        self._last_step = step
        return postfix

    def write(self, message: str) -> None:
        """Print a line without breaking the bar (main process only)."""
        if self._bar is not None:
            self._bar.write(message)
        elif self.enabled:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
