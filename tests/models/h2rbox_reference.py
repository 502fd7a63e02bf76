"""Test-only transliteration of the release's ``H2RBoxV2PHead.loss`` / ``_get_bboxes_single`` (STAR-MMRotate,
mmrotate 0.3 + mmdet 2.x), in plain torch, kept close to the original's structure (level-major flattening,
``index_reduce_`` means, mmcv's class-offset NMS trick) so that monatune's head can be compared with it.
mmdet pieces are inlined: ``MlvlPointGenerator`` (offset 0.5), ``py_sigmoid_focal_loss``, ``IoULoss(mode="log")``
with ``bbox_overlaps(is_aligned=True)``, ``CrossEntropyLoss(use_sigmoid=True)``, ``SmoothL1Loss``, and
``weight_reduce_loss`` (sum / (avg_factor + float32 eps)). Not part of the library.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from monatune.ops import rotated_nms

INF = 1e8
EPS32 = torch.finfo(torch.float32).eps


def psc_decode(angle_preds, num_step=3):
    coef_sin = torch.tensor(tuple(torch.sin(torch.tensor(2 * k * math.pi / num_step)) for k in range(num_step))).to(angle_preds)
    coef_cos = torch.tensor(tuple(torch.cos(torch.tensor(2 * k * math.pi / num_step)) for k in range(num_step))).to(angle_preds)
    phase_sin = torch.sum(angle_preds[:, 0:num_step] * coef_sin, dim=-1, keepdim=True)
    phase_cos = torch.sum(angle_preds[:, 0:num_step] * coef_cos, dim=-1, keepdim=True)
    phase = -torch.atan2(phase_sin, phase_cos)
    return phase / 2


def grid_priors(sizes, strides):
    out = []
    for (h, w), s in zip(sizes, strides):
        shift_x = (torch.arange(0, w) + 0.5) * s
        shift_y = (torch.arange(0, h) + 0.5) * s
        xx = shift_x.repeat(len(shift_y))
        yy = shift_y.view(-1, 1).repeat(1, len(shift_x)).view(-1)
        out.append(torch.stack([xx, yy], dim=-1))
    return out


def distance2obb(points, distance):
    distance, angle = distance.split([4, 1], dim=1)
    cos_angle, sin_angle = torch.cos(angle), torch.sin(angle)
    rot_matrix = torch.cat([cos_angle, -sin_angle, sin_angle, cos_angle], dim=1).reshape(-1, 2, 2)
    wh = distance[:, :2] + distance[:, 2:]
    offset_t = (distance[:, 2:] - distance[:, :2]) / 2
    offset = torch.bmm(rot_matrix, offset_t.unsqueeze(2)).squeeze(2)
    ctr = points + offset
    angle_regular = (angle + math.pi / 2) % math.pi - math.pi / 2
    return torch.cat([ctr, wh, angle_regular], dim=-1)


def _target_single(gt_bboxes, gt_labels, points, regress_ranges, num_points_per_lvl, strides, num_classes, radius):
    gt_bids = gt_bboxes[:, 5]
    gt_bboxes = gt_bboxes[:, :5]
    num_points, num_gts = points.size(0), gt_labels.size(0)
    if num_gts == 0:
        return (gt_labels.new_full((num_points,), num_classes), gt_bboxes.new_zeros((num_points, 4)),
                gt_bboxes.new_zeros((num_points, 1)), gt_bboxes.new_zeros((num_points,)))
    areas = gt_bboxes[:, 2] * gt_bboxes[:, 3]
    areas = areas[None].repeat(num_points, 1)
    regress_ranges = regress_ranges[:, None, :].expand(num_points, num_gts, 2)
    points = points[:, None, :].expand(num_points, num_gts, 2)
    gt_bboxes = gt_bboxes[None].expand(num_points, num_gts, 5)
    gt_ctr, gt_wh, gt_angle = torch.split(gt_bboxes, [2, 2, 1], dim=2)
    cos_angle, sin_angle = torch.cos(gt_angle), torch.sin(gt_angle)
    rot_matrix = torch.cat([cos_angle, sin_angle, -sin_angle, cos_angle], dim=-1).reshape(num_points, num_gts, 2, 2)
    offset = torch.matmul(rot_matrix, (points - gt_ctr)[..., None]).squeeze(-1)
    w, h = gt_wh[..., 0], gt_wh[..., 1]
    offset_x, offset_y = offset[..., 0], offset[..., 1]
    bbox_targets = torch.stack((w / 2 + offset_x, h / 2 + offset_y, w / 2 - offset_x, h / 2 - offset_y), -1)
    inside_gt_bbox_mask = bbox_targets.min(-1)[0] > 0
    stride = offset.new_zeros(offset.shape)
    lvl_begin = 0
    for lvl_idx, num_points_lvl in enumerate(num_points_per_lvl):
        lvl_end = lvl_begin + num_points_lvl
        stride[lvl_begin:lvl_end] = strides[lvl_idx] * radius
        lvl_begin = lvl_end
    inside_center_bbox_mask = (abs(offset) < stride).all(dim=-1)
    inside_gt_bbox_mask = torch.logical_and(inside_center_bbox_mask, inside_gt_bbox_mask)
    max_regress_distance = bbox_targets.max(-1)[0]
    inside_regress_range = (max_regress_distance >= regress_ranges[..., 0]) & (max_regress_distance <= regress_ranges[..., 1])
    areas[inside_gt_bbox_mask == 0] = INF
    areas[inside_regress_range == 0] = INF
    min_area, min_area_inds = areas.min(dim=1)
    labels = gt_labels[min_area_inds]
    labels[min_area == INF] = num_classes
    bbox_targets = bbox_targets[range(num_points), min_area_inds]
    angle_targets = gt_angle[range(num_points), min_area_inds]
    bid_targets = gt_bids[min_area_inds]
    return labels, bbox_targets, angle_targets, bid_targets


def release_loss(cls_scores, bbox_preds, angle_preds, centernesses, gt_bboxes, gt_labels, ss_info, *, strides,
                 regress_ranges, num_classes, square_cls, radius=1.5):
    """``gt_bboxes``: per image [G, 6] (cx, cy, w, h, theta, id); labels 0-based; ss_info ("rot", a) / ("flp", 0)."""
    sizes = [c.shape[-2:] for c in cls_scores]
    points = grid_priors(sizes, strides)
    num_levels = len(points)
    expanded = [points[i].new_tensor(regress_ranges[i])[None].expand_as(points[i]) for i in range(num_levels)]
    concat_ranges, concat_points = torch.cat(expanded), torch.cat(points)
    num_points = [c.size(0) for c in points]
    per_img = [_target_single(b, lab, concat_points, concat_ranges, num_points, strides, num_classes, radius)
               for b, lab in zip(gt_bboxes, gt_labels)]
    lists = [[f.split(num_points, 0) for f in field] for field in zip(*per_img)]
    labels, bbox_targets, angle_targets, bid_targets = [], [], [], []
    for i in range(num_levels):
        labels.append(torch.cat([x[i] for x in lists[0]]))
        bbox_targets.append(torch.cat([x[i] for x in lists[1]]) / strides[i])
        angle_targets.append(torch.cat([x[i] for x in lists[2]]))
        bid_targets.append(torch.cat([x[i] for x in lists[3]]))
    num_imgs = cls_scores[0].size(0)
    flatten_cls_scores = torch.cat([c.permute(0, 2, 3, 1).reshape(-1, num_classes) for c in cls_scores])
    flatten_bbox_preds = torch.cat([b.permute(0, 2, 3, 1).reshape(-1, 4) for b in bbox_preds])
    flatten_angle_preds = torch.cat([a.permute(0, 2, 3, 1).reshape(-1, 3) for a in angle_preds])
    flatten_centerness = torch.cat([c.permute(0, 2, 3, 1).reshape(-1) for c in centernesses])
    flatten_labels, flatten_bbox_targets = torch.cat(labels), torch.cat(bbox_targets)
    flatten_angle_targets, flatten_bid_targets = torch.cat(angle_targets), torch.cat(bid_targets)
    flatten_points = torch.cat([p.repeat(num_imgs, 1) for p in points])
    pos_inds = ((flatten_labels >= 0) & (flatten_labels < num_classes)).nonzero().reshape(-1)
    num_pos = max(torch.tensor(len(pos_inds), dtype=torch.float), 1.0)
    # py_sigmoid_focal_loss with one-hot targets (background column dropped)
    target = F.one_hot(flatten_labels, num_classes=num_classes + 1)[:, :num_classes].type_as(flatten_cls_scores)
    p = flatten_cls_scores.sigmoid()
    pt = (1 - p) * target + p * (1 - target)
    focal_weight = (0.25 * target + 0.75 * (1 - target)) * pt.pow(2.0)
    loss_cls = (F.binary_cross_entropy_with_logits(flatten_cls_scores, target, reduction="none") * focal_weight).sum() / (num_pos + EPS32)

    pos_bbox_preds = flatten_bbox_preds[pos_inds]
    pos_angle_preds = flatten_angle_preds[pos_inds]
    pos_centerness = flatten_centerness[pos_inds]
    pos_bbox_targets = flatten_bbox_targets[pos_inds]
    pos_angle_targets = flatten_angle_targets[pos_inds]
    pos_labels = flatten_labels[pos_inds]
    pos_bid_targets = flatten_bid_targets[pos_inds]
    lr, tb = pos_bbox_targets[:, [0, 2]], pos_bbox_targets[:, [1, 3]]
    pos_centerness_targets = torch.sqrt((lr.min(-1)[0] / lr.max(-1)[0]) * (tb.min(-1)[0] / tb.max(-1)[0]))
    centerness_denorm = max(pos_centerness_targets.sum().detach(), 1e-6)
    assert len(pos_inds) > 0
    pos_points = flatten_points[pos_inds]
    pos_decoded_angle_preds = psc_decode(pos_angle_preds).detach()
    square_mask = torch.zeros_like(pos_labels, dtype=torch.bool)
    for c in square_cls:
        square_mask = torch.logical_or(square_mask, pos_labels == c)
    pos_decoded_angle_preds[square_mask] = 0
    target_mask = torch.abs(pos_angle_targets[square_mask]) < torch.pi / 4
    pos_angle_targets[square_mask] = torch.where(target_mask, 0, -torch.pi / 2)
    pred = distance2obb(pos_points, torch.cat([pos_bbox_preds, pos_decoded_angle_preds], dim=-1))
    tgt = distance2obb(pos_points, torch.cat([pos_bbox_targets, pos_angle_targets], dim=-1))
    # nested_projection
    target_projected = torch.cat((tgt[..., 0:2] - tgt[..., 2:4] / 2, tgt[..., 0:2] + tgt[..., 2:4] / 2), -1)
    da = pred[..., 4] - tgt[..., 4]
    cosa, sina = torch.cos(da).abs(), torch.sin(da).abs()
    pred_wh = torch.matmul(torch.stack((cosa, sina, sina, cosa), -1).view(*cosa.shape, 2, 2), pred[..., 2:4][..., None])[..., 0]
    pred_projected = torch.cat((pred[..., :2] - pred_wh / 2, pred[..., :2] + pred_wh / 2), -1)
    # IoULoss(mode="log"), bbox_overlaps(is_aligned=True)
    area1 = (pred_projected[..., 2] - pred_projected[..., 0]) * (pred_projected[..., 3] - pred_projected[..., 1])
    area2 = (target_projected[..., 2] - target_projected[..., 0]) * (target_projected[..., 3] - target_projected[..., 1])
    lt = torch.max(pred_projected[..., :2], target_projected[..., :2])
    rb = torch.min(pred_projected[..., 2:], target_projected[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = torch.max(area1 + area2 - overlap, torch.tensor([1e-6]))
    ious = (overlap / union).clamp(min=1e-6)
    loss_bbox = (-ious.log() * pos_centerness_targets).sum() / (centerness_denorm + EPS32)
    loss_centerness = F.binary_cross_entropy_with_logits(pos_centerness, pos_centerness_targets, reduction="none").sum() / (num_pos + EPS32)

    bid, idx = torch.unique(pos_bid_targets, return_inverse=True)
    compacted_bid_targets = torch.empty_like(bid).index_reduce_(0, idx, pos_bid_targets, "mean", include_self=False)
    _, bidx, bcnt = torch.unique(compacted_bid_targets.long(), return_inverse=True, return_counts=True)
    bmsk = bcnt[bidx] == 2
    rot = ss_info[1]
    pair_angle_preds = torch.empty(*bid.shape, pos_angle_preds.shape[-1]).index_reduce_(
        0, idx, pos_angle_preds, "mean", include_self=False)[bmsk].view(-1, 2, pos_angle_preds.shape[-1])
    pair_labels = torch.empty(*bid.shape, dtype=pos_labels.dtype).index_reduce_(
        0, idx, pos_labels, "mean", include_self=False)[bmsk].view(-1, 2)[:, 0]
    square_mask = torch.zeros_like(pair_labels, dtype=torch.bool)
    for c in square_cls:
        square_mask = torch.logical_or(square_mask, pair_labels == c)
    angle_ori_preds = psc_decode(pair_angle_preds[:, 0])
    angle_trs_preds = psc_decode(pair_angle_preds[:, 1])
    if len(pair_angle_preds):
        d_ang = angle_trs_preds - angle_ori_preds - rot if ss_info[0] == "rot" else angle_ori_preds + angle_trs_preds
        d_ang = (d_ang + torch.pi / 2) % torch.pi - torch.pi / 2
        d_ang[square_mask] = 0
        diff = d_ang.abs()
        loss_ss = 0.2 * torch.where(diff < 0.1, 0.5 * diff * diff / 0.1, diff - 0.5 * 0.1).mean()
    else:
        loss_ss = pair_angle_preds.sum()
    return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_centerness": loss_centerness, "loss_ss": loss_ss}


def release_detections(cls_scores, bbox_preds, angle_preds, centernesses, points, strides, *, num_classes, nms_pre,
                       score_thr, iou_thr, max_per_img, square_cls=(), resize_cls=(), scale_factor=None):
    """One image's ``_get_bboxes_single`` (per-level maps without the batch dim; bbox_preds in stride units)."""
    mlvl_bboxes, mlvl_scores, mlvl_centerness = [], [], []
    for cls_score, bbox_pred, angle_pred, centerness, pts, s in zip(cls_scores, bbox_preds, angle_preds, centernesses, points, strides):
        scores = cls_score.permute(1, 2, 0).reshape(-1, num_classes).sigmoid()
        centerness = centerness.permute(1, 2, 0).reshape(-1).sigmoid()
        bbox_pred = bbox_pred.permute(1, 2, 0).reshape(-1, 4) * s
        angle = psc_decode(angle_pred.permute(1, 2, 0).reshape(-1, 3))
        bbox_pred = torch.cat([bbox_pred, angle], dim=1)
        if nms_pre > 0 and scores.shape[0] > nms_pre:
            max_scores, _ = (scores * centerness[:, None]).max(dim=1)
            _, topk_inds = max_scores.topk(nms_pre)
            pts, bbox_pred, scores, centerness = pts[topk_inds], bbox_pred[topk_inds], scores[topk_inds], centerness[topk_inds]
        mlvl_bboxes.append(distance2obb(pts, bbox_pred))
        mlvl_scores.append(scores)
        mlvl_centerness.append(centerness)
    bboxes = torch.cat(mlvl_bboxes)
    if scale_factor is not None:
        bboxes[..., :4] = bboxes[..., :4] / bboxes.new_tensor(scale_factor)
    multi_scores = torch.cat(mlvl_scores)
    score_factors = torch.cat(mlvl_centerness)
    # multiclass_nms_rotated
    bboxes = bboxes[:, None].expand(multi_scores.size(0), num_classes, 5).reshape(-1, 5)
    labels = torch.arange(num_classes).view(1, -1).expand_as(multi_scores).reshape(-1)
    scores = multi_scores.reshape(-1)
    valid_mask = scores > score_thr
    scores = scores * score_factors.view(-1, 1).expand(multi_scores.size(0), num_classes).reshape(-1)
    inds = valid_mask.nonzero(as_tuple=False).squeeze(1)
    bboxes, scores, labels = bboxes[inds], scores[inds], labels[inds]
    if bboxes.numel() == 0:
        return bboxes, scores, labels
    max_coordinate = bboxes[:, :2].max() + bboxes[:, 2:4].max()
    offsets = labels.to(bboxes) * (max_coordinate + 1)
    bboxes_for_nms = bboxes.clone()
    bboxes_for_nms[:, :2] = bboxes_for_nms[:, :2] + offsets[:, None]
    keep = rotated_nms(bboxes_for_nms, scores, iou_thr)[:max_per_img]
    bboxes, scores, labels = bboxes[keep].clone(), scores[keep], labels[keep]
    for c in square_cls:
        bboxes[labels == c, 4] = 0
    for c in resize_cls:
        bboxes[labels == c, 2:4] *= 0.85
    return bboxes, scores, labels
