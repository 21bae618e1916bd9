"""User errors and how the command-line tools report them.

A *user error* is one the person running a command fixes without touching the code: a bad
config key, a bad data record, a missing path, a run dir that already holds a run, a resume
point that does not fit, an optional dependency that is not installed. :data:`USER_ERRORS`
lists those exception types; every CLI (the two recipes, ``eval/*``, ``scripts/*``) runs its
``main`` through :func:`run_cli` (the recipes through ``training.faults.run_recipe_cli``, which keeps
it to one line for all ranks under a launcher), which prints such an error as ONE line ``error: <message>``
(the message names the key or file:line and the fix) on stderr and exits with status 2. Any
other exception is a bug and keeps its traceback. ``--debug`` on the command line or
``COORDEXP_DEBUG=1`` in the environment shows the traceback of user errors too.

``ConfigError`` messages name the dotted key (with list indices), what was expected, and where
possible a did-you-mean.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

DEBUG_ENV = "COORDEXP_DEBUG"


class UserError(Exception):
    """An error the user fixes (config, data, paths, resume, launch); the message carries the fix."""


class ConfigError(UserError, ValueError):
    """Invalid configuration. ``key`` is the dotted path, e.g. ``stage2_ab.pipeline.objective[1].config``."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class InputError(UserError, ValueError):
    """A bad command-line value or input-file content outside the config and the data contract."""


# Paths that do not exist / cannot be written, and optional packages that are not installed, are the
# user's to fix too (the raising code puts the config key or CLI flag into the message).
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError,
                                                IsADirectoryError, PermissionError, ImportError)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def add_debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--debug``: show the traceback of user errors (read by :func:`run_cli`)."""
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of user errors (same as {DEBUG_ENV}=1)")
    return parser


QUOTE_CHARS = 200  # a value quoted in a message keeps this many characters (clip)
LINE_CHARS = 2000  # an `error:` line keeps this many (one_line: head and tail, the fix is usually at the end)


def clip(text: str, limit: int = QUOTE_CHARS) -> str:
    """``text`` cut to about ``limit`` characters, saying how much was left out (a quoted value can be 50 MB)."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (multi-line messages are joined with '; '), at most ~LINE_CHARS long."""
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"  # "[Errno 2] No such file or directory: 'x'" -> "x: No such file or directory"
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    line = "; ".join(parts) or type(exc).__name__
    if len(line) > LINE_CHARS:
        half = LINE_CHARS // 2
        line = f"{line[:half]} ... ({len(line) - 2 * half} characters left out) ... {line[-half:]}"
    return line


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_cli(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a user error becomes one ``error: ...`` line on stderr and exit status 2.

    Returns ``main``'s return value when it is an int (an exit status), else 0. Use as
    ``raise SystemExit(run_cli(main))`` under ``if __name__ == "__main__"``; tests call ``main``
    directly (it raises) or ``run_cli`` (it reports).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        result = main(argv)
    except USER_ERRORS as exc:
        if debug_requested(argv):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
