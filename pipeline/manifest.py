"""Re-export of :mod:`configs.pipeline` under its former name (manifests are resolved where configs load)."""

from configs.pipeline import *  # noqa: F403
from configs.pipeline import (  # noqa: F401
    _SOFT_CE_W1_MAP,
    _TWO_CHANNEL_FLAT,
    MODE_KEYS,
    PIPELINE_LOCATIONS,
    ModuleSpec,
    ResolvedPipeline,
    load_plugins,
    resolve_pipeline,
)
