"""The built-in stages, registered explicitly (no import side effects)."""

from exporter.stages.dequantize import DequantizeStage
from exporter.stages.export import ExportStage
from exporter.stages.load import LoadStage
from exporter.stages.merge import MergeStage
from exporter.stages.parity import ParityStage
from exporter.stages.publish import PublishStage

BUILTIN_STAGES = (LoadStage, DequantizeStage, MergeStage, ExportStage, ParityStage, PublishStage)

__all__ = ["BUILTIN_STAGES", "DequantizeStage", "ExportStage", "LoadStage", "MergeStage", "ParityStage",
           "PublishStage"]
