"""Re-export of :mod:`core.vocab` under its former name (code outside the tree may still import it)."""

from core.vocab import *  # noqa: F403
from core.vocab import PLUGIN_COMPONENTS, loss_key, register_component  # noqa: F401
