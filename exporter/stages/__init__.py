"""The built-in stages, registered explicitly (no import side effects)."""

from exporter.stages.export import ExportStage
from exporter.stages.load import LoadStage
from exporter.stages.merge import MergeStage
from exporter.stages.parity import ParityStage

BUILTIN_STAGES = (LoadStage, MergeStage, ExportStage, ParityStage)

__all__ = ["BUILTIN_STAGES", "ExportStage", "LoadStage", "MergeStage", "ParityStage"]
