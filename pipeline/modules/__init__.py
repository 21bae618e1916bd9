"""Built-in pipeline modules. Importing this package registers them (``pipeline.registry``).

Objective: ``token_ce``, ``bbox_geo``, ``coord_reg``. Diagnostics: ``coord_diag``,
``token_stats`` (the minimal template for a new module; see docs/training/PIPELINE.md).
"""

from pipeline.modules import bbox_geo, coord_diag, coord_reg, token_ce, token_stats

__all__ = ["bbox_geo", "coord_diag", "coord_reg", "token_ce", "token_stats"]
