"""Test-only transliterations of the release's Oriented R-CNN steps, kept as close to the source as runs
without mmcv (Apache-2.0, OpenMMLab):

- mmdet 2.x ``anchor_inside_flags``, ``bbox_overlaps`` (iou, not aligned), ``MaxIoUAssigner.assign_wrt_overlaps``
  and ``AssignResult.add_gt_``, ``AnchorHead.get_targets``' ``avg_factor`` and ``weight_reduce_loss``;
- mmcv 1.x ``batched_nms`` (the NMS kernel itself stood in for by torchvision's ``nms``, which keeps the same
  boxes: greedy, IoU > threshold suppresses, no +1 offset);
- mmrotate 0.3.4 ``OrientedRPNHead._get_targets_single`` / ``loss_single`` / ``_get_bboxes_single``,
  ``RBboxOverlaps2D``, ``RotatedBBoxHead._get_target_single`` / ``loss`` / ``get_bboxes`` and
  ``multiclass_nms_rotated`` (mmcv's ``box_iou_rotated`` and ``nms_rotated`` stood in for by
  ``monatune.ops.rotated_box_iou`` and ``rotated_nms``).

The coders come from ``oriented_coders_reference`` (transliterations of mmrotate's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from oriented_coders_reference import (
    midpoint_bbox2delta,
    midpoint_delta2bbox,
    obb2xyxy,
    xywha_bbox2delta,
    xywha_delta2bbox,
)
from torchvision.ops import nms

from monatune.ops import rotated_box_iou, rotated_nms

RPN_STDS = (1.0, 1.0, 1.0, 1.0, 0.5, 0.5)
ROI_STDS = (0.1, 0.1, 0.2, 0.2, 0.1)


# ---------------------------------------------------------------- mmdet
def anchor_inside_flags(flat_anchors, valid_flags, img_shape, allowed_border=0):
    img_h, img_w = img_shape[:2]
    if allowed_border >= 0:
        inside_flags = valid_flags & \
            (flat_anchors[:, 0] >= -allowed_border) & \
            (flat_anchors[:, 1] >= -allowed_border) & \
            (flat_anchors[:, 2] < img_w + allowed_border) & \
            (flat_anchors[:, 3] < img_h + allowed_border)  # fmt: skip
    else:
        inside_flags = valid_flags
    return inside_flags


def bbox_overlaps(bboxes1, bboxes2, eps=1e-6):
    area1 = (bboxes1[..., 2] - bboxes1[..., 0]) * (bboxes1[..., 3] - bboxes1[..., 1])
    area2 = (bboxes2[..., 2] - bboxes2[..., 0]) * (bboxes2[..., 3] - bboxes2[..., 1])
    lt = torch.max(bboxes1[..., :, None, :2], bboxes2[..., None, :, :2])
    rb = torch.min(bboxes1[..., :, None, 2:], bboxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1[..., None] + area2[..., None, :] - overlap
    eps = union.new_tensor([eps])
    union = torch.max(union, eps)
    return overlap / union


def assign_wrt_overlaps(overlaps, pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality=True,
                        gt_max_assign_all=True):  # fmt: skip
    """``assigned_gt_inds``: 0 negative, -1 ignored, i + 1 for ground truth i."""
    num_gts, num_bboxes = overlaps.size(0), overlaps.size(1)
    assigned_gt_inds = overlaps.new_full((num_bboxes,), -1, dtype=torch.long)
    if num_gts == 0 or num_bboxes == 0:
        if num_gts == 0:
            assigned_gt_inds[:] = 0
        return assigned_gt_inds
    max_overlaps, argmax_overlaps = overlaps.max(dim=0)
    gt_max_overlaps, gt_argmax_overlaps = overlaps.max(dim=1)
    assigned_gt_inds[(max_overlaps >= 0) & (max_overlaps < neg_iou_thr)] = 0
    pos_inds = max_overlaps >= pos_iou_thr
    assigned_gt_inds[pos_inds] = argmax_overlaps[pos_inds] + 1
    if match_low_quality:
        for i in range(num_gts):
            if gt_max_overlaps[i] >= min_pos_iou:
                if gt_max_assign_all:
                    max_iou_inds = overlaps[i, :] == gt_max_overlaps[i]
                    assigned_gt_inds[max_iou_inds] = i + 1
                else:
                    assigned_gt_inds[gt_argmax_overlaps[i]] = i + 1
    return assigned_gt_inds


def batched_nms(boxes, scores, idxs, iou_threshold, split_thr=10000):
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    boxes_for_nms = boxes + offsets[:, None]
    if boxes_for_nms.shape[0] < split_thr:
        keep = nms(boxes_for_nms, scores, iou_threshold)
        boxes = boxes[keep]
        scores = scores[keep]
    else:
        total_mask = scores.new_zeros(scores.size(), dtype=torch.bool)
        scores_after_nms = scores.new_zeros(scores.size())
        for id in torch.unique(idxs):
            mask = (idxs == id).nonzero(as_tuple=False).view(-1)
            keep = nms(boxes_for_nms[mask], scores[mask], iou_threshold)
            total_mask[mask[keep]] = True
            scores_after_nms[mask[keep]] = scores[mask][keep]
        keep = total_mask.nonzero(as_tuple=False).view(-1)
        scores, inds = scores_after_nms[keep].sort(descending=True)
        keep = keep[inds]
        boxes = boxes[keep]
    return torch.cat([boxes, scores[:, None]], -1), keep


# ---------------------------------------------------------------- OrientedRPNHead
def rpn_targets_single(flat_anchors, gt_bboxes, img_shape, allowed_border=0, version="le90"):
    """``_get_targets_single`` before sampling: per anchor the assigned gt index (0 neg, -1 ignored / outside)
    and the rotated gt of each assigned anchor (zeros elsewhere)."""
    valid_flags = torch.ones(len(flat_anchors), dtype=torch.bool)
    inside_flags = anchor_inside_flags(flat_anchors, valid_flags, img_shape, allowed_border)
    anchors = flat_anchors[inside_flags, :]
    gt_hbboxes = obb2xyxy(gt_bboxes, version)
    overlaps = bbox_overlaps(gt_hbboxes, anchors)
    inds = assign_wrt_overlaps(overlaps, 0.7, 0.3, 0.3)
    full = torch.full((len(flat_anchors),), -1, dtype=torch.long)
    full[inside_flags] = inds
    matched = flat_anchors.new_zeros((len(flat_anchors), 5))
    pos = full > 0
    matched[pos] = gt_bboxes[full[pos] - 1]
    return full, matched


def rpn_loss(cls_scores, bbox_preds, anchors, pos_inds_list, neg_inds_list, pos_targets_list):
    """``AnchorHead.get_targets`` + ``loss_single`` summed over levels, for already sampled anchors.

    cls_scores [B, N], bbox_preds [B, N, 6], anchors [N, 4]; per image the sampled positive / negative
    indices and the positives' rotated gt.
    """
    num_total_pos = sum([max(inds.numel(), 1) for inds in pos_inds_list])
    num_total_neg = sum([max(inds.numel(), 1) for inds in neg_inds_list])
    num_total_samples = num_total_pos + num_total_neg
    labels, label_weights, bbox_targets, bbox_weights = [], [], [], []
    for pos_inds, neg_inds, pos_gt in zip(pos_inds_list, neg_inds_list, pos_targets_list):
        n = len(anchors)
        lab = anchors.new_full((n,), 1, dtype=torch.long)  # num_classes = 1: background
        lw = anchors.new_zeros(n)
        bt = anchors.new_zeros((n, 6))
        bw = anchors.new_zeros((n, 6))
        if len(pos_inds) > 0:
            bt[pos_inds, :] = midpoint_bbox2delta(anchors[pos_inds], pos_gt, stds=RPN_STDS, version="le90")
            bw[pos_inds, :] = 1.0
            lab[pos_inds] = 0
            lw[pos_inds] = 1.0
        if len(neg_inds) > 0:
            lw[neg_inds] = 1.0
        labels.append(lab)
        label_weights.append(lw)
        bbox_targets.append(bt)
        bbox_weights.append(bw)
    labels, label_weights = torch.cat(labels), torch.cat(label_weights)
    bbox_targets, bbox_weights = torch.cat(bbox_targets), torch.cat(bbox_weights)
    # CrossEntropyLoss(use_sigmoid=True): _expand_onehot_labels (label 1 = background -> all zeros)
    cls_score = cls_scores.reshape(-1, 1)
    bin_labels = cls_score.new_zeros(cls_score.shape)
    bin_labels[labels == 0, 0] = 1
    loss_cls = F.binary_cross_entropy_with_logits(cls_score, bin_labels, reduction="none") * label_weights[:, None]
    eps = torch.finfo(torch.float32).eps
    loss_cls = loss_cls.sum() / (num_total_samples + eps)
    diff = torch.abs(bbox_preds.reshape(-1, 6) - bbox_targets)
    beta = 0.1111111111111111
    loss_bbox = torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta) * bbox_weights
    loss_bbox = loss_bbox.sum() / (num_total_samples + eps)
    return loss_cls, loss_bbox


def rpn_get_bboxes_single(cls_scores, bbox_preds, mlvl_anchors, nms_pre, max_per_img, iou_threshold,
                          min_bbox_size=0, version="le90"):  # fmt: skip
    """``OrientedRPNHead._get_bboxes_single``: cls_scores [A, H, W] and bbox_preds [A * 6, H, W] per level."""
    level_ids, mlvl_scores, mlvl_bbox_preds, mlvl_valid_anchors = [], [], [], []
    for idx, _ in enumerate(cls_scores):
        rpn_cls_score = cls_scores[idx].permute(1, 2, 0).reshape(-1)
        scores = rpn_cls_score.sigmoid()
        rpn_bbox_pred = bbox_preds[idx].permute(1, 2, 0).reshape(-1, 6)
        anchors = mlvl_anchors[idx]
        if nms_pre > 0 and scores.shape[0] > nms_pre:
            ranked_scores, rank_inds = scores.sort(descending=True)
            topk_inds = rank_inds[:nms_pre]
            scores = ranked_scores[:nms_pre]
            rpn_bbox_pred = rpn_bbox_pred[topk_inds, :]
            anchors = anchors[topk_inds, :]
        mlvl_scores.append(scores)
        mlvl_bbox_preds.append(rpn_bbox_pred)
        mlvl_valid_anchors.append(anchors)
        level_ids.append(scores.new_full((scores.size(0),), idx, dtype=torch.long))
    scores = torch.cat(mlvl_scores)
    anchors = torch.cat(mlvl_valid_anchors)
    rpn_bbox_pred = torch.cat(mlvl_bbox_preds)
    proposals = midpoint_delta2bbox(anchors, rpn_bbox_pred, stds=RPN_STDS, version=version).reshape(-1, 5)
    ids = torch.cat(level_ids)
    if min_bbox_size > 0:
        w, h = proposals[:, 2], proposals[:, 3]
        valid_mask = (w >= min_bbox_size) & (h >= min_bbox_size)
        proposals, scores, ids = proposals[valid_mask], scores[valid_mask], ids[valid_mask]
    hproposals = obb2xyxy(proposals, version)
    _, keep = batched_nms(hproposals, scores, ids, iou_threshold)
    dets = torch.cat([proposals, scores[:, None]], dim=1)
    dets = dets[keep]
    return dets[:max_per_img]


# ---------------------------------------------------------------- OrientedStandardRoIHead
def rbbox_overlaps(bboxes1, bboxes2):
    clamped_bboxes1 = bboxes1.detach().clone()
    clamped_bboxes2 = bboxes2.detach().clone()
    clamped_bboxes1[:, 2:4].clamp_(min=1e-3)
    clamped_bboxes2[:, 2:4].clamp_(min=1e-3)
    return rotated_box_iou(clamped_bboxes1, clamped_bboxes2)


def roi_assign_with_gt(proposals, gt_bboxes, gt_labels):
    """MaxIoUAssigner(0.5, 0.5, 0.5, match_low_quality=False) on RBboxOverlaps2D, then RRandomSampler's
    ``add_gt_as_proposals``: candidate boxes (gt first), their gt index (0-based, -1 negative) and label
    (``gt_labels``' value, -1 for negatives)."""
    overlaps = rbbox_overlaps(gt_bboxes, proposals[:, :5])
    gt_inds = assign_wrt_overlaps(overlaps, 0.5, 0.5, 0.5, match_low_quality=False)
    bboxes = proposals[:, :5]
    if len(gt_bboxes) > 0:
        bboxes = torch.cat([gt_bboxes, bboxes], dim=0)
        self_inds = torch.arange(1, len(gt_labels) + 1, dtype=torch.long)
        gt_inds = torch.cat([self_inds, gt_inds])
    labels = torch.full_like(gt_inds, -1)
    labels[gt_inds > 0] = gt_labels[gt_inds[gt_inds > 0] - 1]
    return bboxes, gt_inds - 1, labels


def roi_targets_and_loss(cls_score, bbox_pred, pos_bboxes, neg_bboxes, pos_gt_bboxes, pos_gt_labels, num_classes):
    """``RotatedBBoxHead._get_target_single`` (one image) + ``loss`` (reg_class_agnostic, CE + SmoothL1 beta 1)."""
    num_pos, num_neg = pos_bboxes.size(0), neg_bboxes.size(0)
    num_samples = num_pos + num_neg
    labels = pos_bboxes.new_full((num_samples,), num_classes, dtype=torch.long)
    label_weights = pos_bboxes.new_zeros(num_samples)
    bbox_targets = pos_bboxes.new_zeros(num_samples, 5)
    bbox_weights = pos_bboxes.new_zeros(num_samples, 5)
    if num_pos > 0:
        labels[:num_pos] = pos_gt_labels
        label_weights[:num_pos] = 1.0
        bbox_targets[:num_pos, :] = xywha_bbox2delta(pos_bboxes, pos_gt_bboxes, stds=ROI_STDS, angle_range="le90",
                                                     edge_swap=True, proj_xy=True)  # fmt: skip
        bbox_weights[:num_pos, :] = 1
    if num_neg > 0:
        label_weights[-num_neg:] = 1.0
    eps = torch.finfo(torch.float32).eps
    avg_factor = max(torch.sum(label_weights > 0).float().item(), 1.0)
    loss_cls = (F.cross_entropy(cls_score, labels, reduction="none") * label_weights).sum() / (avg_factor + eps)
    pos_inds = (labels >= 0) & (labels < num_classes)
    if pos_inds.any():
        pos_bbox_pred = bbox_pred.view(bbox_pred.size(0), 5)[pos_inds.type(torch.bool)]
        diff = torch.abs(pos_bbox_pred - bbox_targets[pos_inds])
        loss = torch.where(diff < 1.0, 0.5 * diff * diff / 1.0, diff - 0.5 * 1.0) * bbox_weights[pos_inds]
        loss_bbox = loss.sum() / (bbox_targets.size(0) + eps)
    else:
        loss_bbox = bbox_pred[pos_inds].sum()
    return loss_cls, loss_bbox


def get_bboxes(rois, cls_score, bbox_pred, img_shape, scale_factor, score_thr=0.05, iou_thr=0.1, max_per_img=2000):
    """``RotatedBBoxHead.get_bboxes`` (rescale=True) + ``multiclass_nms_rotated``: dets [N, 6] and 0-based labels."""
    scores = F.softmax(cls_score, dim=-1)
    bboxes = xywha_delta2bbox(rois[..., 1:], bbox_pred, stds=ROI_STDS, max_shape=img_shape, angle_range="le90",
                              edge_swap=True, proj_xy=True)  # fmt: skip
    if scale_factor is not None:
        scale_factor = bboxes.new_tensor(scale_factor)
        bboxes = bboxes.view(bboxes.size(0), -1, 5)
        bboxes[..., :4] = bboxes[..., :4] / scale_factor
        bboxes = bboxes.view(bboxes.size(0), -1)
    return multiclass_nms_rotated(bboxes, scores, score_thr, iou_thr, max_per_img)


def multiclass_nms_rotated(multi_bboxes, multi_scores, score_thr, iou_thr, max_num=-1):
    num_classes = multi_scores.size(1) - 1
    if multi_bboxes.shape[1] > 5:
        bboxes = multi_bboxes.view(multi_scores.size(0), -1, 5)
    else:
        bboxes = multi_bboxes[:, None].expand(multi_scores.size(0), num_classes, 5)
    scores = multi_scores[:, :-1]
    labels = torch.arange(num_classes, dtype=torch.long, device=scores.device)
    labels = labels.view(1, -1).expand_as(scores)
    bboxes = bboxes.reshape(-1, 5)
    scores = scores.reshape(-1)
    labels = labels.reshape(-1)
    valid_mask = scores > score_thr
    inds = valid_mask.nonzero(as_tuple=False).squeeze(1)
    bboxes, scores, labels = bboxes[inds], scores[inds], labels[inds]
    if bboxes.numel() == 0:
        return torch.cat([bboxes, scores[:, None]], -1), labels
    max_coordinate = bboxes[:, :2].max() + bboxes[:, 2:4].max()
    offsets = labels.to(bboxes) * (max_coordinate + 1)
    bboxes_for_nms = bboxes.clone()
    bboxes_for_nms[:, :2] = bboxes_for_nms[:, :2] + offsets[:, None]
    keep = rotated_nms(bboxes_for_nms, scores, iou_thr)
    if max_num > 0:
        keep = keep[:max_num]
    bboxes = bboxes[keep]
    scores = scores[keep]
    labels = labels[keep]
    return torch.cat([bboxes, scores[:, None]], 1), labels
