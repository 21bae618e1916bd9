"""The objective pipeline: manifests, module registry, TeacherForcingContext, executor (docs/training/PIPELINE.md).

Forward strategies live in ``pipeline.forwards`` (imported explicitly by trainers; it needs the
model package). Nothing here imports wandb, pycocotools or vLLM.
"""

from configs.pipeline import FLAT_OBJECTIVE_KNOBS, ModuleSpec, ResolvedPipeline, resolve_pipeline
from pipeline.context import PipelineError, TeacherForcingContext
from pipeline.executor import PipelineExecutor, PipelineResult, run_pipeline
from pipeline.registry import DIAGNOSTICS_MODULES, OBJECTIVE_MODULES, get_module, register_module

__all__ = [
    "DIAGNOSTICS_MODULES",
    "FLAT_OBJECTIVE_KNOBS",
    "OBJECTIVE_MODULES",
    "ModuleSpec",
    "PipelineError",
    "PipelineExecutor",
    "PipelineResult",
    "ResolvedPipeline",
    "TeacherForcingContext",
    "get_module",
    "register_module",
    "resolve_pipeline",
    "run_pipeline",
]
