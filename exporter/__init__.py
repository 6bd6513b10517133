"""lora-export: merge a PEFT LoRA adapter into its base exactly, export it, and prove it behaves like base + adapter.

The public surface is small: build an ``ExportPlan``, call ``run_pipeline``, read the returned context's report.
"""

from exporter.adapter import Adapter, LoraModule, load_adapter
from exporter.errors import ExportError, InputError, MismatchError, NonFiniteError, OutputError, ParityError
from exporter.context import Artifact, Context, ExportPlan
from exporter.merge_math import merge_lora
from exporter.pipeline import Stage, StageRegistry, default_registry, run_pipeline

__all__ = [
    "Adapter", "Artifact", "Context", "ExportError", "ExportPlan", "InputError", "LoraModule", "MismatchError", "NonFiniteError",
    "OutputError", "ParityError", "Stage", "StageRegistry", "default_registry", "load_adapter", "merge_lora",
    "run_pipeline",
]
