"""The training engine: a Lightning module base, run-directory callbacks and the CLI."""
from .callbacks import AdapterCheckpoint, PredictionWriter, RunSummary, peak_memory_bytes
from .module import SCHEDULES, TunedModule
from .resume import ResumeCheckpoint, StopOnSignal, TrimResumedMetrics

__all__ = [
    "TunedModule",
    "SCHEDULES",
    "AdapterCheckpoint",
    "ResumeCheckpoint",
    "StopOnSignal",
    "TrimResumedMetrics",
    "RunSummary",
    "PredictionWriter",
    "peak_memory_bytes",
]
