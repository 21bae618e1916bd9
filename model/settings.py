"""What inference needs besides the weights, saved with every checkpoint's model dir.

A model answers well only for the input it was trained on: the same image budget, prompt, system
prompt, coord format and data conventions. ``eval.infer`` used to take them from the checkpoint's
``preprocessor_config.json`` (the base model's image budget) and the declared defaults, so on a real
checkpoint it evaluated another input than training did. Every checkpoint's model dir therefore
holds ``coordexp_settings.json`` (:data:`SETTINGS_FILE`), written by :func:`write_settings` (the one
writer, called by the trainers' model saver) and read by :func:`read_settings` (the one reader):

- ``eval.infer`` uses it for every flag left out (docs/EVAL.md);
- a training run whose ``model.name_or_path`` holds it (Stage-2 on the Stage-1 output) takes the
  :data:`DATA_KEYS` its config does not set from it (:func:`inherit`), so its training and in-loop
  eval see what Stage-1 saw;
- an explicit flag or config key that differs from the saved value is used, and logged as a difference.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from configs.errors import UserError
from configs.types import MatchingConfig
from configs.validation import MISSING, lookup
from data.coordjson import NUM_COORD_BINS

if TYPE_CHECKING:
    from configs.types import Config

SETTINGS_FILE = "coordexp_settings.json"
FORMAT_VERSION = 1
COORD_FORMAT = {"token": "<|coord_{k}|>", "num_bins": NUM_COORD_BINS, "bin_to_fraction": "k / 999"}

DATA_KEYS: tuple[str, ...] = (
    "data.prompt",
    "data.system_prompt",
    "data.min_pixels",
    "data.max_pixels",
    "data.coords",
    "data.object_order",
    "data.max_objects",
)
"""What shapes the model's input and its target answer; Stage-2 and ``eval.infer`` take them from the checkpoint."""

EVAL_KEYS: tuple[str, ...] = (
    "rollout_matching.decoding.max_new_tokens",
    "rollout_matching.decoding.coord_pick",
    "rollout_matching.eval_detection.score_mode",
    "rollout_matching.eval_detection.score_include_desc",
    *(f"rollout_matching.matching.{name}" for name in MatchingConfig.eval_fields()),
)
"""How the run's in-loop eval generated and scored; ``eval.infer`` defaults (training keeps its own config)."""


@dataclass(frozen=True)
class CheckpointSettings:
    """The contents of :data:`SETTINGS_FILE`: ``values`` maps each of :data:`DATA_KEYS` + :data:`EVAL_KEYS`
    to the value the run used; ``source`` is the file it was read from (None when built from a config)."""

    values: Mapping[str, Any]
    coord_format: Mapping[str, Any] = field(default_factory=lambda: dict(COORD_FORMAT))
    source: str | None = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


def settings_of(cfg: Config) -> CheckpointSettings:
    """The settings of a loaded config (``cfg.resolved``: every default filled in)."""
    return CheckpointSettings({key: lookup(cfg.resolved, key) for key in (*DATA_KEYS, *EVAL_KEYS)})


def write_settings(model_dir: str | Path, settings: CheckpointSettings) -> Path:
    """Write ``model_dir/coordexp_settings.json`` (the one writer)."""
    path = Path(model_dir) / SETTINGS_FILE
    payload = {"format_version": FORMAT_VERSION, "coord_format": dict(settings.coord_format),
               "settings": {k: settings.values[k] for k in (*DATA_KEYS, *EVAL_KEYS) if k in settings.values}}
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_settings(model_dir: str | Path) -> CheckpointSettings | None:
    """The settings saved in ``model_dir`` (the one reader), or None when it has none (a hub checkpoint)."""
    path = Path(model_dir) / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        values = payload["settings"]
        if not isinstance(values, dict):
            raise TypeError("settings is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a CoordExp settings file ({exc}); delete it to use the flags / config "
                        "only, or copy it from the run's other checkpoints") from exc
    unknown = sorted(set(values) - set(DATA_KEYS) - set(EVAL_KEYS))
    if unknown or payload.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {payload.get('format_version')!r} with keys {unknown} is not "
                        f"format_version {FORMAT_VERSION}; written by another CoordExp version")
    return CheckpointSettings(values, payload.get("coord_format", dict(COORD_FORMAT)), str(path))


def difference(key: str, given: Any, saved: CheckpointSettings, given_by: str) -> str | None:
    """The log line for a ``given`` value (named ``given_by``) that differs from the saved one, else None."""
    if key not in saved.values or saved.values[key] == given:
        return None
    return (f"{given_by} {given!r} differs from {key}={saved.values[key]!r} saved with the checkpoint "
            f"({saved.source}); using {given!r}")


def resolve(explicit: Mapping[str, Any], saved: CheckpointSettings | None, defaults: Mapping[str, Any],
            names: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Per key: the explicit value (not None) if given, else the saved one, else ``defaults[key]``.

    ``names[key]`` names where an explicit value came from (a CLI flag); returns the values and the
    differences to log (explicit values that differ from the saved ones).
    """
    values, notes = {}, []
    for key, default in defaults.items():
        given = explicit.get(key)
        if given is not None:
            values[key] = given
            note = difference(key, given, saved, names.get(key, key)) if saved is not None else None
            if note:
                notes.append(note)
        elif saved is not None and key in saved.values:
            values[key] = saved.values[key]
        else:
            values[key] = default
    return values, notes


def inherit(cfg: Config, model_dir: str | os.PathLike | None) -> tuple[Config, str | None, list[str]]:
    """``(cfg, taken, differences)``: ``cfg`` with the :data:`DATA_KEYS` it does not set taken from
    ``model_dir``'s saved settings (a rebuilt config whose ``raw`` holds them, so ``config.merged.yaml``
    reproduces the run), a line naming what was taken (or None), and one line per key the config sets
    to a value that differs from the saved one. Without saved settings (a hub checkpoint, the tiny
    builder) ``cfg`` is returned as is."""
    if model_dir is None or not os.path.isdir(model_dir):
        return cfg, None, []
    saved = read_settings(model_dir)
    if saved is None:
        return cfg, None, []
    from configs.loader import build_config, deep_merge
    from configs.types import thaw

    taken: dict[str, Any] = {}
    names: list[str] = []
    differences: list[str] = []
    for key in DATA_KEYS:
        if key not in saved.values:
            continue
        value = lookup(cfg.raw, key)
        if value is not MISSING:
            note = difference(key, value, saved, f"the config's {key}")
            if note:
                differences.append(note)
            continue
        node = taken
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = saved.values[key]
        names.append(f"{key}={saved.values[key]!r}")
    if not taken:
        return cfg, None, differences
    line = f"not set in the config, taken from {saved.source}: " + ", ".join(names)
    return build_config(deep_merge(taken, thaw(cfg.raw)), path=cfg.path), line, differences
