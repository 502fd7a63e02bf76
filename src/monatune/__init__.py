"""monatune: Mona-tuning of timm vision backbones.

Example:
    >>> import timm, monatune
    >>> model = timm.create_model("swin_base_patch4_window7_224", num_classes=102)
    >>> monatune.load_pretrained(model, "swin_base_patch4_window7_224_22k.pth")
    >>> monatune.apply(model, "mona")
    >>> print(monatune.count_parameters(model))
"""
from .adapters.mona import Mona
from .checkpoints import (
    FORMATS,
    LoadReport,
    UnsafeCheckpointError,
    adapter_state_dict,
    convert_release_checkpoint,
    load_adapter,
    load_pretrained,
    save_adapter,
)
from .models.dense import build_dense_backbone
from .models.vit import set_token_grid
from .methods import METHODS
from .params import ParamReport, count_parameters
from .tuning import (
    active_adapter,
    adapter_modules,
    apply,
    disable_adapters,
    get_state,
    is_tuned,
    list_adapters,
    merge_adapter,
    remove_adapter,
    set_active_adapter,
    unapply,
    unmerge_adapter,
)

from ._version import __version__
from .models import onnx_symbolics as _onnx_symbolics

_onnx_symbolics.register()  # what the TorchScript ONNX exporter lacks for resampled position embeddings

__all__ = [
    "Mona",
    "METHODS",
    "apply",
    "unapply",
    "remove_adapter",
    "set_active_adapter",
    "disable_adapters",
    "active_adapter",
    "list_adapters",
    "merge_adapter",
    "unmerge_adapter",
    "adapter_modules",
    "get_state",
    "is_tuned",
    "build_dense_backbone",
    "set_token_grid",
    "count_parameters",
    "ParamReport",
    "save_adapter",
    "load_adapter",
    "adapter_state_dict",
    "load_pretrained",
    "convert_release_checkpoint",
    "LoadReport",
    "UnsafeCheckpointError",
    "FORMATS",
]
