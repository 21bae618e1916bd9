"""Module registry of the objective pipeline (docs/training/PIPELINE.md).

Two plain dicts, filled by :func:`register_module` when ``pipeline.modules`` is imported:

- ``OBJECTIVE_MODULES``: modules that return a loss (``token_ce``, ``bbox_geo``, ``coord_reg``);
- ``DIAGNOSTICS_MODULES``: modules that only return metrics (``coord_diag``, ``token_stats``).

A module is a function ``fn(ctx: TeacherForcingContext, spec: ModuleSpec, settings: PipelineSettings)
-> ModuleOutput``: ``spec`` is its own manifest entry, ``settings`` the pipeline-level facts other
modules own (e.g. token_ce's knobs, which the text gate and token_stats must share).
Its declaration (kind, config dataclass with type, default, range and doc per key, one-line doc) is
``configs.modules.MODULES[name]``: ``configs.pipeline`` validates a written ``config`` against the
schema generated from it, rejects any other key and fills the missing ones from its defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, is_dataclass
from types import MappingProxyType
from typing import Any

import torch

from configs.declare import declared_fields, defaults_of, has_default
from configs.modules import DIAGNOSTICS, MODULES, OBJECTIVE, ModuleDecl, TokenCEWeights, declare_module
from core.vocab import register_component

BUILTIN_MODULES: tuple[str, ...] = tuple(MODULES)  # declared in configs/modules.py, functions in pipeline/modules/


@dataclass(frozen=True)
class PipelineSettings:
    """Pipeline-level settings a module may need beyond its own config, passed to every module.

    token_ce_weights  the run's ``token_ce`` knobs (defaults when the pipeline has no token_ce), so
                      the text gate and token_stats use exactly the CE masks token_ce uses (docs/training/METRICS_LOSSES.md: gates obey the CE masks).
    """

    token_ce_weights: TokenCEWeights = field(default_factory=TokenCEWeights)


@dataclass
class ModuleOutput:
    """What a module returns for one micro-step.

    loss     scalar tensor (objective modules; the executor multiplies it by the entry weight),
             None for diagnostics.
    metrics  metric key -> scalar tensor or float, detached by the executor. Keys follow docs/training/METRICS_CONTRACT.md:
             ``loss/*`` only through ``core.vocab.loss_key``; diagnostics keys end in a
             reduction-class suffix (``_mean``, ``_frac``, ``_total``, ...).
    """

    loss: torch.Tensor | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModuleDef:
    """A registered module: its function, kind, config declaration (``configs/modules.py``) and doc.

    ``defaults``: the declared config defaults (= the allowlist of config keys), read-only.
    """

    name: str
    kind: str
    fn: Callable[..., ModuleOutput]
    config: type
    doc: str

    @property
    def defaults(self) -> Mapping[str, Any]:
        return MappingProxyType(defaults_of(self.config))


OBJECTIVE_MODULES: dict[str, ModuleDef] = {}
DIAGNOSTICS_MODULES: dict[str, ModuleDef] = {}
_BY_KIND: dict[str, dict[str, ModuleDef]] = {OBJECTIVE: OBJECTIVE_MODULES, DIAGNOSTICS: DIAGNOSTICS_MODULES}


def register_module(
    name: str,
    kind: str | None = None,
    config: type | None = None,
    doc: str | None = None,
    *,
    components: Mapping[str, tuple[str, ...]] | None = None,
) -> Callable[[Callable[..., ModuleOutput]], Callable[..., ModuleOutput]]:
    """Decorator: register ``fn(ctx, spec, settings) -> ModuleOutput`` as the function of module ``name``.

    A built-in module is declared in ``configs.modules.MODULES`` (kind, config dataclass, doc) and registers
    with its name alone. A new module (a plugin file) declares itself here: ``kind`` (OBJECTIVE or
    DIAGNOSTICS), ``config`` (a dataclass of ``configs.declare.knob`` fields with defaults: its config
    allowlist, defaults and ranges) and ``doc``; ``components``: new loss components it logs as
    ``loss/<component>[/<sub>]`` (component -> its sub-terms). Raises ValueError on an unknown kind, a
    name registered before, or a config class that is not such a dataclass.
    """
    if kind is not None or config is not None:
        if config is None or not is_dataclass(config) or any(not has_default(f) for f in declared_fields(config)):
            raise ValueError(f"module {name!r}: config must be a dataclass of knob() fields with defaults, "
                             f"got {config!r}")
        if name in MODULES:
            raise ValueError(f"pipeline module {name!r} is already registered; module names must be unique")
        declare_module(ModuleDecl(name, kind, config, doc or ""))
    elif name not in MODULES:
        raise ValueError(f"pipeline module {name!r} is not declared: give its kind, config and doc")
    decl = MODULES[name]

    def decorate(fn: Callable[..., ModuleOutput]) -> Callable[..., ModuleOutput]:
        if name in OBJECTIVE_MODULES or name in DIAGNOSTICS_MODULES:
            raise ValueError(f"pipeline module {name!r} is already registered; module names must be unique")
        for component, subterms in (components or {}).items():
            register_component(component, tuple(subterms))
        _BY_KIND[decl.kind][name] = ModuleDef(name=name, kind=decl.kind, fn=fn, config=decl.config, doc=decl.doc)
        return fn

    return decorate


def unregister_module(name: str) -> None:
    """Remove a module declared and registered by a test (built-in declarations stay)."""
    OBJECTIVE_MODULES.pop(name, None)
    DIAGNOSTICS_MODULES.pop(name, None)
    if name not in BUILTIN_MODULES:
        MODULES.pop(name, None)


def known_modules() -> list[str]:
    """Every registered module name, objective first, each group sorted."""
    _ensure_builtin()
    return sorted(OBJECTIVE_MODULES) + sorted(DIAGNOSTICS_MODULES)


def get_module(name: str) -> ModuleDef:
    """The registered module ``name``; raises KeyError listing the known names."""
    _ensure_builtin()
    if name in OBJECTIVE_MODULES:
        return OBJECTIVE_MODULES[name]
    if name in DIAGNOSTICS_MODULES:
        return DIAGNOSTICS_MODULES[name]
    raise KeyError(
        f"unknown pipeline module {name!r}; known objective modules: {', '.join(sorted(OBJECTIVE_MODULES))}; "
        f"known diagnostics modules: {', '.join(sorted(DIAGNOSTICS_MODULES))}"
    )


def _ensure_builtin() -> None:
    # The built-in modules register themselves on import; importing here (not at the top)
    # avoids an import cycle (the modules import this file).
    import pipeline.modules  # noqa: F401
