"""Config system: YAML + ``extends`` + ``--set`` overrides -> validated, frozen :class:`Config`.

See docs/CONFIG.md for the key tree and configs/loader.py for the steps.
"""

from configs.errors import ConfigError, did_you_mean
from configs.loader import (
    add_config_args,
    build_config,
    load_config,
    save_resolved,
)
from configs.types import Config, FrozenDict, freeze, thaw

__all__ = [
    "Config",
    "ConfigError",
    "FrozenDict",
    "add_config_args",
    "build_config",
    "did_you_mean",
    "freeze",
    "load_config",
    "save_resolved",
    "thaw",
]
