"""The shared vocabulary every package may import (``core.vocab``): token types, subsets, contexts,
channels, loss components and the bin count. It imports nothing of the project and no third-party
package, so ``configs/``, ``data/`` and ``losses/`` can all depend on it (docs/ARCHITECTURE.md)."""
