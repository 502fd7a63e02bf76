"""Deploying a tuned network: its folded form (:func:`fold`) and ``monatune export`` (:func:`export_model`).

Example:
    >>> from monatune.deploy import export_model, fold
    >>> info = export_model("runs/flowers102_swin_l-mona", "exports/flowers")   # model.pt2, model.onnx, export.json
    >>> deployable = fold(tuned_model, inplace=False)                          # merged / folded, eval mode
"""
from .export import DETECTOR_REFUSAL, EXPORT_FILE, ExportCheckError, export_model
from .fold import FoldedMona, fold
from .load import TrainedTask, load_trained

__all__ = ["FoldedMona", "fold", "export_model", "ExportCheckError", "load_trained", "TrainedTask",
           "DETECTOR_REFUSAL", "EXPORT_FILE"]
