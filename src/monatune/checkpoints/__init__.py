"""Adapter-only checkpoints and loading of existing checkpoint formats."""
from .adapter import adapter_state_dict, load_adapter, save_adapter
from .pretrained import FORMATS, LoadReport, UnsafeCheckpointError, load_pretrained, read_state_dict
from .release import convert_release_checkpoint

__all__ = [
    "adapter_state_dict",
    "load_adapter",
    "save_adapter",
    "FORMATS",
    "LoadReport",
    "UnsafeCheckpointError",
    "load_pretrained",
    "read_state_dict",
    "convert_release_checkpoint",
]
