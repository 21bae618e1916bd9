"""The shared vocabulary: the names every trainer, module, data contract and metric shares.

Token types, contexts, object subsets and canonical loss components are plain
constants (ints for tensors, strings for configs and metric keys). Nothing here
imports torch: it is the vocabulary of the contract in docs/training/METRICS_LOSSES.md.

Alignment convention used across the code base: every per-token array is indexed
by the *token position* ``j`` (the token as it sits in ``input_ids``). The logits
that predict token ``j`` come from position ``j - 1``. Code that needs both says
``coord_in_pos`` (where a coord token is fed as input) and ``coord_out_pos``
(``coord_in_pos - 1``, where its distribution is read).
"""

from __future__ import annotations

# ---------------------------------------------------------------- token types
# Integer codes stored in ``token_types`` tensors. IGNORE marks tokens that are
# never supervised: the prompt, image pads, padding.
IGNORE = -1
STRUCT = 0
DESC = 1
COORD = 2
EOS = 3

TOKEN_TYPES: dict[str, int] = {"struct": STRUCT, "desc": DESC, "coord": COORD, "eos": EOS}
TOKEN_TYPE_NAMES: dict[int, str] = {v: k for k, v in TOKEN_TYPES.items()}

# Tie-break when a fused BPE token covers the same number of characters of two
# types: the earlier entry wins. Desc beats struct so desc text stays supervised
# as desc wherever a tie makes it ambiguous; coord tokens are always whole.
TOKEN_TYPE_TIE_ORDER: tuple[int, ...] = (COORD, DESC, STRUCT, EOS)

# ------------------------------------------------------------------- contexts
GT = "gt"
SELF_CONTEXT = "self_context"
ROLLOUT = "rollout"
CONTEXTS: tuple[str, ...] = (GT, SELF_CONTEXT, ROLLOUT)

# -------------------------------------------------------------------- subsets
# Integer codes stored in ``subset`` tensors (rollout context only). NO_SUBSET
# marks tokens outside any object span (the container opening, separators, the
# closure) and every token in the gt / self_context contexts.
NO_SUBSET = -1
MATCHED = 0
FP = 1
FN = 2
SUBSETS: dict[str, int] = {"matched": MATCHED, "fp": FP, "fn": FN}
SUBSET_NAMES: dict[int, str] = {v: k for k, v in SUBSETS.items()}

# ----------------------------------------------------------------- components
STRUCT_CE = "struct_ce"
DESC_CE = "desc_ce"
COORD_TOKEN_CE = "coord_token_ce"
COORD_REG = "coord_reg"
GEO = "geo"
COMPONENTS: tuple[str, ...] = (STRUCT_CE, DESC_CE, COORD_TOKEN_CE, COORD_REG, GEO)

# Sub-terms that may appear as loss/<component>/<sub>.
COMPONENT_SUBTERMS: dict[str, tuple[str, ...]] = {
    GEO: ("smoothl1", "ciou"),
    COORD_REG: ("soft_ce", "w1", "entropy", "el1", "ehuber", "coord_gate", "text_gate"),
}

# Components of modules registered outside this package (a plugin file, docs/ARCHITECTURE.md), with their
# sub-terms: filled by register_component, read by loss_key and the metrics contract.
PLUGIN_COMPONENTS: dict[str, tuple[str, ...]] = {}


def register_component(name: str, subterms: tuple[str, ...] = ()) -> None:
    """Make ``loss/<name>[/<sub>][/<context>]`` a canonical loss key (a new objective module's loss)."""
    if name in COMPONENTS or PLUGIN_COMPONENTS.get(name, tuple(subterms)) != tuple(subterms):
        raise ValueError(f"loss component {name!r} is already registered; pick another name")
    PLUGIN_COMPONENTS[name] = tuple(subterms)


def known_components() -> tuple[str, ...]:
    """Every loss component: the built-in ones, then the registered ones."""
    return COMPONENTS + tuple(PLUGIN_COMPONENTS)

# ------------------------------------------------------- coord decode / context embedding modes
DECODE_MODES: tuple[str, ...] = ("exp", "st")  # expectation decode, or Straight-Through (argmax forward)
EMBED_MODES: tuple[str, ...] = ("soft", "st", "hard")  # Channel-A coord context embeddings
GRAD_MODES: tuple[str, ...] = ("unroll", "em_detach")  # Channel-A gradient through the iterations

# ------------------------------------------------------------------- variants
# custom.trainer_variant: Stage-1 (train_stage1.py) or one of the Stage-2 trainers (train_stage2.py).
STAGE1 = "stage1"
STAGE2_TWO_CHANNEL = "stage2_two_channel"
STAGE2_ROLLOUT_ALIGNED = "stage2_rollout_aligned"
STAGE2_VARIANTS: tuple[str, ...] = (STAGE2_TWO_CHANNEL, STAGE2_ROLLOUT_ALIGNED)
VARIANTS: tuple[str, ...] = (STAGE1, *STAGE2_VARIANTS)

# Channels of Stage-2 Two-Channel. Stage-1 and Rollout-Aligned run every module
# whatever its ``channels`` (Rollout-Aligned is channel B by construction).
CHANNEL_A = "A"
CHANNEL_B = "B"
CHANNELS: tuple[str, ...] = (CHANNEL_A, CHANNEL_B)

NUM_COORD_BINS = 1000

# The project's logger (train.log on the main process, training.setup.setup_logging): every package logs to it.
LOGGER_NAME = "coordexp"


def loss_key(component: str, sub: str | None = None, context: str | None = None) -> str:
    """Canonical metric key: ``loss/<component>[/<sub>][/<context>]``.

    ``loss_key("total")`` gives ``loss/total``. Unknown components raise so a typo
    cannot create a new spelling in the logs.
    """
    if component != "total" and component not in COMPONENTS and component not in PLUGIN_COMPONENTS:
        raise KeyError(f"unknown loss component {component!r}; known: {', '.join(known_components())}")
    subterms = COMPONENT_SUBTERMS.get(component) or PLUGIN_COMPONENTS.get(component, ())
    if sub is not None and sub not in subterms:
        known = subterms
        raise KeyError(f"unknown sub-term {sub!r} of {component!r}; known: {', '.join(known) or 'none'}")
    if context is not None and context not in CONTEXTS:
        raise KeyError(f"unknown context {context!r}; known: {', '.join(CONTEXTS)}")
    parts = ["loss", component]
    if sub is not None:
        parts.append(sub)
    if context is not None:
        parts.append(context)
    return "/".join(parts)
