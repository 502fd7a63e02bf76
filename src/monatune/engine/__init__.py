"""The training engine: a Lightning module base, run-directory callbacks and the CLI."""
from .callbacks import AdapterCheckpoint, PredictionWriter, ResumeCheckpoint, RunSummary, peak_memory_bytes
from .module import SCHEDULES, TunedModule

__all__ = [
    "TunedModule",
    "SCHEDULES",
    "AdapterCheckpoint",
    "ResumeCheckpoint",
    "RunSummary",
    "PredictionWriter",
    "peak_memory_bytes",
]
