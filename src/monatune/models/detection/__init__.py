"""Detectors on monatune's dense backbones: torchvision's models, and a Cascade Mask R-CNN built from its parts."""
