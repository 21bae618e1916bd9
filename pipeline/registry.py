"""Module registry of the objective pipeline (docs/training/PIPELINE.md).

Two plain dicts, filled by :func:`register_module` when ``pipeline.modules`` is imported:

- ``OBJECTIVE_MODULES``: modules that return a loss (``token_ce``, ``bbox_geo``, ``coord_reg``);
- ``DIAGNOSTICS_MODULES``: modules that only return metrics (``coord_diag``, ``token_stats``).

A module is a function ``fn(ctx: TeacherForcingContext, spec: ModuleSpec, settings: PipelineSettings)
-> ModuleOutput``: ``spec`` is its own manifest entry, ``settings`` the pipeline-level facts other
modules own (e.g. token_ce's knobs, which the text gate and token_stats must share).
Its config is declared once, as a frozen dataclass of ``configs/modules.py`` (type, default,
range and doc per key): ``pipeline.manifest`` validates a written ``config`` against the schema
generated from it, rejects any other key and fills the missing ones from its defaults.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from configs.declare import declared_fields, defaults_of, has_default
from configs.modules import TokenCEWeights
from core.vocab import register_component

OBJECTIVE = "objective"
DIAGNOSTICS = "diagnostics"
KINDS: tuple[str, ...] = (OBJECTIVE, DIAGNOSTICS)


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

    loss: Any = None
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
    kind: str,
    config: type,
    doc: str,
    *,
    components: Mapping[str, tuple[str, ...]] | None = None,
) -> Callable[[Callable[..., ModuleOutput]], Callable[..., ModuleOutput]]:
    """Decorator: register ``fn(ctx, spec, settings) -> ModuleOutput`` as module ``name`` of ``kind``.

    ``config``: the module's config dataclass (every field a ``configs.declare.knob`` with a default;
    the built-in ones live in ``configs/modules.py``, a plugin declares its own). ``components``: new
    loss components the module logs as ``loss/<component>[/<sub>]`` (component -> its sub-terms),
    registered with ``core.vocab.register_component``. Raises ValueError on an unknown kind, a
    name registered before (in either dict), or a config class that is not such a dataclass.
    """
    if kind not in KINDS:
        raise ValueError(f"module kind {kind!r} unknown; allowed: {', '.join(KINDS)}")
    if not is_dataclass(config) or any(not has_default(f) for f in declared_fields(config)):
        raise ValueError(f"module {name!r}: config must be a dataclass of knob() fields with defaults "
                         f"(configs/modules.py), got {config!r}")

    def decorate(fn: Callable[..., ModuleOutput]) -> Callable[..., ModuleOutput]:
        if name in OBJECTIVE_MODULES or name in DIAGNOSTICS_MODULES:
            raise ValueError(f"pipeline module {name!r} is already registered; module names must be unique")
        for component, subterms in (components or {}).items():
            register_component(component, tuple(subterms))
        _BY_KIND[kind][name] = ModuleDef(
            name=name,
            kind=kind,
            fn=fn,
            config=config,
            doc=doc,
        )
        return fn

    return decorate


def unregister_module(name: str) -> None:
    """Remove a module (tests that register throwaway modules clean up with this)."""
    OBJECTIVE_MODULES.pop(name, None)
    DIAGNOSTICS_MODULES.pop(name, None)


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


def load_plugins(plugins: Sequence[str]) -> None:
    """Import each of ``custom.plugins`` once per process: a ``.py`` file (absolute, or relative to the
    working directory) or an importable module name. Importing it registers its modules."""
    for plugin in plugins:
        if plugin.endswith(".py"):
            path = Path(plugin).expanduser().resolve()
            name = f"coordexp_plugin_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}_{path.stem}"
            if name in sys.modules:
                continue
            if not path.is_file():
                raise FileNotFoundError(f"custom.plugins: {plugin} does not exist (a path relative to the working "
                                        f"directory {Path.cwd()}, or a module name)")
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        else:
            importlib.import_module(plugin)


def _ensure_builtin() -> None:
    # The built-in modules register themselves on import; importing here (not at the top)
    # avoids an import cycle (the modules import this file).
    import pipeline.modules  # noqa: F401
