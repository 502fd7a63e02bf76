"""Test-only transliteration of mmcv 1.x's CPU ``roi_align_rotated`` forward
(``mmcv/ops/csrc/pytorch/cpu/roi_align_rotated.cpp``, ``ROIAlignRotatedForward`` and
``pre_calc_for_bilinear_interpolate``; Apache-2.0, OpenMMLab, from detectron2's ``ROIAlignRotated``):
one RoI, one bin, one sampling point at a time, in float64 Python arithmetic; the channels are a numpy vector.
"""
from __future__ import annotations

import math

import numpy as np


def bilinear_interpolate(data: np.ndarray, height: int, width: int, y: float, x: float) -> np.ndarray:
    """``data`` is ``[C, H, W]``; returns ``[C]`` (the kernel's PreCalc weights applied)."""
    if y < -1.0 or y > height or x < -1.0 or x > width:  # inverse elements are out of the feature map
        return np.zeros(data.shape[0])
    if y < 0:
        y = 0.0
    if x < 0:
        x = 0.0
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    w1, w2, w3, w4 = hy * hx, hy * lx, ly * hx, ly * lx
    return (
        w1 * data[:, y_low, x_low] + w2 * data[:, y_low, x_high] + w3 * data[:, y_high, x_low]
        + w4 * data[:, y_high, x_high]
    )  # fmt: skip


def roi_align_rotated_reference(input, rois, pooled_height, pooled_width, spatial_scale, sampling_ratio, aligned,
                                clockwise) -> np.ndarray:  # fmt: skip
    """``input`` ``[B, C, H, W]`` and ``rois`` ``[K, 6]`` (arrays or tensors); returns ``[K, C, PH, PW]`` float64."""
    input = np.asarray(input, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)
    _, channels, height, width = input.shape
    output = np.zeros((len(rois), channels, pooled_height, pooled_width))
    for n, current_roi in enumerate(rois):
        roi_batch_ind = int(current_roi[0])
        offset = 0.5 if aligned else 0.0
        roi_center_w = current_roi[1] * spatial_scale - offset
        roi_center_h = current_roi[2] * spatial_scale - offset
        roi_width = current_roi[3] * spatial_scale
        roi_height = current_roi[4] * spatial_scale
        theta = current_roi[5]
        if clockwise:
            theta = -theta
        cos_theta, sin_theta = math.cos(theta), math.sin(theta)
        if aligned:
            assert roi_width >= 0 and roi_height >= 0
        else:
            roi_width = max(roi_width, 1.0)
            roi_height = max(roi_height, 1.0)
        bin_size_h = roi_height / pooled_height
        bin_size_w = roi_width / pooled_width
        roi_bin_grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(np.float32(roi_height / pooled_height))
        roi_bin_grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(np.float32(roi_width / pooled_width))
        count = max(roi_bin_grid_h * roi_bin_grid_w, 1)
        roi_start_h = -roi_height / 2.0
        roi_start_w = -roi_width / 2.0
        data = input[roi_batch_ind]
        for ph in range(pooled_height):
            for pw in range(pooled_width):
                output_val = np.zeros(channels)
                for iy in range(roi_bin_grid_h):
                    yy = roi_start_h + ph * bin_size_h + (iy + 0.5) * bin_size_h / roi_bin_grid_h
                    for ix in range(roi_bin_grid_w):
                        xx = roi_start_w + pw * bin_size_w + (ix + 0.5) * bin_size_w / roi_bin_grid_w
                        y = yy * cos_theta - xx * sin_theta + roi_center_h
                        x = yy * sin_theta + xx * cos_theta + roi_center_w
                        output_val += bilinear_interpolate(data, height, width, y, x)
                output[n, :, ph, pw] = output_val / count
    return output


def sample_points_reference(rois, pooled_height, pooled_width, spatial_scale, sampling_ratio, clockwise=True):
    """Feature-map ``(x, y)`` of every sampling point (aligned), for checking what a test exercises."""
    points = []
    for roi in np.asarray(rois, dtype=np.float64):
        theta = -roi[5] if clockwise else roi[5]
        cx, cy = roi[1] * spatial_scale - 0.5, roi[2] * spatial_scale - 0.5
        w, h = roi[3] * spatial_scale, roi[4] * spatial_scale
        for ph in range(pooled_height):
            for iy in range(sampling_ratio):
                yy = -h / 2 + ph * h / pooled_height + (iy + 0.5) * (h / pooled_height) / sampling_ratio
                for pw in range(pooled_width):
                    for ix in range(sampling_ratio):
                        xx = -w / 2 + pw * w / pooled_width + (ix + 0.5) * (w / pooled_width) / sampling_ratio
                        points.append((yy * math.sin(theta) + xx * math.cos(theta) + cx,
                                       yy * math.cos(theta) - xx * math.sin(theta) + cy))  # fmt: skip
    return np.array(points)
