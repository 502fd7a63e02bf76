"""Test-only transliterations of the STAR-MMRotate release's rotated RetinaNet and the mmdet 2.x code it runs on
(Apache-2.0, OpenMMLab / SJTU), kept as close to the source as runs without mmcv:

- mmrotate 0.3: ``RotatedAnchorGenerator.single_level_grid_priors``, ``RotatedAnchorHead`` (``get_anchors``,
  ``_get_targets_single``, ``get_targets``, ``loss_single``, ``loss``, ``_get_bboxes_single``), ``obb2hbb_oc``,
  ``DeltaXYWHAOBBoxCoder`` ('oc', no edge swap, no projection), ``rbbox_overlaps``, ``multiclass_nms_rotated``,
  ``gaussian_dist_loss_v1`` (``xy_wh_r_2_xy_sigma``, ``kld_loss``, ``GDLoss_v1.forward``);
- mmdet 2.x: ``AnchorGenerator`` (base anchors, grid priors, valid flags), ``MaxIoUAssigner.assign_wrt_overlaps``,
  ``PseudoSampler``, ``images_to_levels``, ``unmap``, ``py_sigmoid_focal_loss`` / ``FocalLoss``, ``L1Loss``,
  ``weight_reduce_loss`` (2.28: ``sum / (avg_factor + eps)``), ``BaseDetector._parse_losses``.

mmcv's kernels are stood in for: ``box_iou_rotated`` by torchvision's rotated IoU (the same detectron2-derived
algorithm) and ``nms_rotated`` by a brute-force greedy pass over the full IoU matrix.
"""
from __future__ import annotations

from copy import deepcopy

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from monatune.ops.boxes import le90_to_cxcywhr

EPS = torch.finfo(torch.float32).eps


# ------------------------------------------------------------------ mmcv kernels (stand-ins)
def box_iou_rotated(bboxes1, bboxes2):
    return box_iou(le90_to_cxcywhr(bboxes1), le90_to_cxcywhr(bboxes2), fmt="cxcywhr").float()


def nms_rotated(dets, scores, iou_threshold):
    order = scores.sort(0, descending=True)[1]
    iou = box_iou_rotated(dets[order], dets[order])
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    keep = order[torch.tensor(keep, dtype=torch.long)]
    return dets[keep], keep


# ------------------------------------------------------------------ anchors
class RotatedAnchorGenerator:
    def __init__(self, strides=(8, 16, 32, 64, 128), ratios=(1.0, 0.5, 2.0), octave_base_scale=4, scales_per_octave=3):
        self.strides = [(s, s) for s in strides]
        self.base_sizes = [min(stride) for stride in self.strides]
        octave_scales = np.array([2 ** (i / scales_per_octave) for i in range(scales_per_octave)])
        scales = octave_scales * octave_base_scale
        self.scales = torch.Tensor(scales)
        self.ratios = torch.Tensor(ratios)
        self.center_offset = 0.0
        self.base_anchors = [self.gen_single_level_base_anchors(b, self.scales, self.ratios) for b in self.base_sizes]

    @property
    def num_base_anchors(self):
        return [base_anchors.size(0) for base_anchors in self.base_anchors]

    def gen_single_level_base_anchors(self, base_size, scales, ratios):
        w = base_size
        h = base_size
        x_center = self.center_offset * w
        y_center = self.center_offset * h
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w * w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h * h_ratios[:, None] * scales[None, :]).view(-1)
        base_anchors = [x_center - 0.5 * ws, y_center - 0.5 * hs, x_center + 0.5 * ws, y_center + 0.5 * hs]
        return torch.stack(base_anchors, dim=-1)

    def _meshgrid(self, x, y):
        xx = x.repeat(y.shape[0])
        yy = y.view(-1, 1).repeat(1, x.shape[0]).view(-1)
        return xx, yy

    def single_level_grid_priors(self, featmap_size, level_idx, dtype=torch.float32):
        base_anchors = self.base_anchors[level_idx].to(dtype)
        feat_h, feat_w = featmap_size
        stride_w, stride_h = self.strides[level_idx]
        shift_x = torch.arange(0, feat_w).to(dtype) * stride_w
        shift_y = torch.arange(0, feat_h).to(dtype) * stride_h
        shift_xx, shift_yy = self._meshgrid(shift_x, shift_y)
        shifts = torch.stack([shift_xx, shift_yy, shift_xx, shift_yy], dim=-1)
        anchors = (base_anchors[None, :, :] + shifts[:, None, :]).view(-1, 4)
        # mmrotate RotatedAnchorGenerator: angle 0
        num_anchors = anchors.size(0)
        xy = (anchors[:, 2:] + anchors[:, :2]) / 2
        wh = anchors[:, 2:] - anchors[:, :2]
        theta = xy.new_zeros((num_anchors, 1))
        return torch.cat([xy, wh, theta], axis=1)

    def grid_priors(self, featmap_sizes):
        return [self.single_level_grid_priors(featmap_sizes[i], i) for i in range(len(self.strides))]

    def valid_flags(self, featmap_sizes, pad_shape):
        multi_level_flags = []
        for i in range(len(self.strides)):
            anchor_stride = self.strides[i]
            feat_h, feat_w = featmap_sizes[i]
            h, w = pad_shape[:2]
            valid_feat_h = min(int(np.ceil(h / anchor_stride[1])), feat_h)
            valid_feat_w = min(int(np.ceil(w / anchor_stride[0])), feat_w)
            valid_x = torch.zeros(feat_w, dtype=torch.bool)
            valid_y = torch.zeros(feat_h, dtype=torch.bool)
            valid_x[:valid_feat_w] = 1
            valid_y[:valid_feat_h] = 1
            valid_xx, valid_yy = self._meshgrid(valid_x, valid_y)
            valid = valid_xx & valid_yy
            valid = valid[:, None].expand(valid.size(0), self.num_base_anchors[i]).contiguous().view(-1)
            multi_level_flags.append(valid)
        return multi_level_flags


# ------------------------------------------------------------------ boxes
def obb2hbb_oc(rbboxes):
    w = rbboxes[:, 2::5]
    h = rbboxes[:, 3::5]
    a = rbboxes[:, 4::5]
    cosa = torch.cos(a)
    sina = torch.sin(a)
    hbbox_w = cosa * w + sina * h
    hbbox_h = sina * w + cosa * h
    hbboxes = rbboxes.clone().detach()
    hbboxes[:, 2::5] = hbbox_h
    hbboxes[:, 3::5] = hbbox_w
    hbboxes[:, 4::5] = np.pi / 2
    return hbboxes


def rbbox_overlaps(bboxes1, bboxes2):
    rows, cols = bboxes1.size(0), bboxes2.size(0)
    if rows * cols == 0:
        return bboxes1.new(rows, cols)
    clamped_bboxes1 = bboxes1.detach().clone()
    clamped_bboxes2 = bboxes2.detach().clone()
    clamped_bboxes1[:, 2:4].clamp_(min=1e-3)
    clamped_bboxes2[:, 2:4].clamp_(min=1e-3)
    return box_iou_rotated(clamped_bboxes1, clamped_bboxes2)


def bbox2delta(proposals, gt):  # 'oc', means 0, stds 1, no edge swap, no proj_xy
    proposals = proposals.float()
    gt = gt.float()
    px, py, pw, ph, pa = proposals.unbind(dim=-1)
    gx, gy, gw, gh, ga = gt.unbind(dim=-1)
    dx = (gx - px) / pw
    dy = (gy - py) / ph
    da = ga - pa  # norm_angle(., 'oc') is the identity
    dw = torch.log(gw / pw)
    dh = torch.log(gh / ph)
    return torch.stack([dx, dy, dw, dh, da], dim=-1)


def delta2bbox(rois, deltas, max_shape=None, wh_ratio_clip=16 / 1000):
    dx = deltas[:, 0::5]
    dy = deltas[:, 1::5]
    dw = deltas[:, 2::5]
    dh = deltas[:, 3::5]
    da = deltas[:, 4::5]
    px = rois[:, 0].unsqueeze(1).expand_as(dx)
    py = rois[:, 1].unsqueeze(1).expand_as(dy)
    pw = rois[:, 2].unsqueeze(1).expand_as(dw)
    ph = rois[:, 3].unsqueeze(1).expand_as(dh)
    pa = rois[:, 4].unsqueeze(1).expand_as(da)
    dx_width = pw * dx
    dy_height = ph * dy
    max_ratio = np.abs(np.log(wh_ratio_clip))
    dw = dw.clamp(min=-max_ratio, max=max_ratio)
    dh = dh.clamp(min=-max_ratio, max=max_ratio)
    gw = pw * dw.exp()
    gh = ph * dh.exp()
    gx = px + dx_width
    gy = py + dy_height
    ga = pa + da
    if max_shape is not None:
        gx = gx.clamp(min=0, max=max_shape[1] - 1)
        gy = gy.clamp(min=0, max=max_shape[0] - 1)
    return torch.stack([gx, gy, gw, gh, ga], dim=-1).view(deltas.size())


# ------------------------------------------------------------------ assignment
def assign_wrt_overlaps(overlaps, pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0):
    """mmdet MaxIoUAssigner: gt index + 1 for positives, 0 negatives, -1 ignored."""
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
    for i in range(num_gts):
        if gt_max_overlaps[i] >= min_pos_iou:
            max_iou_inds = overlaps[i, :] == gt_max_overlaps[i]
            assigned_gt_inds[max_iou_inds] = i + 1
    return assigned_gt_inds


def unmap(data, count, inds, fill=0):
    if data.dim() == 1:
        ret = data.new_full((count,), fill)
        ret[inds.type(torch.bool)] = data
    else:
        new_size = (count,) + data.size()[1:]
        ret = data.new_full(new_size, fill)
        ret[inds.type(torch.bool), :] = data
    return ret


def images_to_levels(target, num_levels):
    target = torch.stack(target, 0)
    level_targets = []
    start = 0
    for n in num_levels:
        end = start + n
        level_targets.append(target[:, start:end])
        start = end
    return level_targets


# ------------------------------------------------------------------ losses
def weight_reduce_loss(loss, weight=None, reduction="mean", avg_factor=None):
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss
    if reduction == "mean":
        return loss.sum() / (avg_factor + EPS)
    return loss


def py_sigmoid_focal_loss(pred, target, weight=None, gamma=2.0, alpha=0.25, reduction="mean", avg_factor=None):
    pred_sigmoid = pred.sigmoid()
    target = target.type_as(pred)
    pt = (1 - pred_sigmoid) * target + pred_sigmoid * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
    if weight is not None and weight.shape != loss.shape:
        weight = weight.view(-1, 1)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def focal_loss(pred, target, weight, avg_factor):  # FocalLoss(use_sigmoid=True), CPU branch
    num_classes = pred.size(1)
    target = F.one_hot(target, num_classes=num_classes + 1)[:, :num_classes]
    return py_sigmoid_focal_loss(pred, target, weight, avg_factor=avg_factor)


def l1_loss(pred, target, weight, avg_factor):  # L1Loss
    if target.numel() == 0:
        return pred.sum() * 0
    return weight_reduce_loss(torch.abs(pred - target), weight, "mean", avg_factor)


def xy_wh_r_2_xy_sigma(xywhr):
    _shape = xywhr.shape
    assert _shape[-1] == 5
    xy = xywhr[..., :2]
    wh = xywhr[..., 2:4].clamp(min=1e-7, max=1e7).reshape(-1, 2)
    r = xywhr[..., 4]
    cos_r = torch.cos(r)
    sin_r = torch.sin(r)
    R = torch.stack((cos_r, -sin_r, sin_r, cos_r), dim=-1).reshape(-1, 2, 2)
    S = 0.5 * torch.diag_embed(wh)
    sigma = R.bmm(S.square()).bmm(R.permute(0, 2, 1)).reshape(_shape[:-1] + (2, 2))
    return xy, sigma


def kld_loss(pred, target, fun="log1p", tau=1.0):
    mu_p, sigma_p = pred
    mu_t, sigma_t = target
    mu_p = mu_p.reshape(-1, 2)
    mu_t = mu_t.reshape(-1, 2)
    sigma_p = sigma_p.reshape(-1, 2, 2)
    sigma_t = sigma_t.reshape(-1, 2, 2)
    delta = (mu_p - mu_t).unsqueeze(-1)
    sigma_t_inv = torch.inverse(sigma_t)
    term1 = delta.transpose(-1, -2).matmul(sigma_t_inv).matmul(delta).squeeze(-1)
    term2 = torch.diagonal(sigma_t_inv.matmul(sigma_p), dim1=-2, dim2=-1).sum(dim=-1, keepdim=True) + torch.log(
        torch.det(sigma_t) / torch.det(sigma_p)
    ).reshape(-1, 1)
    dis = term1 + term2 - 2
    kl_dis = dis.clamp(min=1e-6)
    if fun == "sqrt":
        kl_loss = 1 - 1 / (tau + torch.sqrt(kl_dis))
    else:
        kl_loss = 1 - 1 / (tau + torch.log1p(kl_dis))
    return kl_loss


def gdloss_v1_kld(pred, target, weight=None, avg_factor=None, fun="log1p", tau=1.0, loss_weight=1.0, **kwargs):
    """GDLoss_v1(loss_type='kld').forward (reduction 'mean' unused; avg_factor unused)."""
    reduction = "mean"
    if (weight is not None) and (not torch.any(weight > 0)) and (reduction != "none"):
        return (pred * weight).sum()
    if weight is not None and weight.dim() > 1:
        assert weight.shape == pred.shape
        weight = weight.mean(-1)
    _kwargs = deepcopy(kwargs)
    mask = (weight > 0).detach()
    pred = pred[mask]
    target = target[mask]
    pred = xy_wh_r_2_xy_sigma(pred)
    target = xy_wh_r_2_xy_sigma(target)
    return kld_loss(pred, target, fun=fun, tau=tau, **_kwargs) * loss_weight


# ------------------------------------------------------------------ RotatedAnchorHead.loss
def _get_targets_single(flat_anchors, valid_flags, gt_bboxes, gt_labels, num_classes, assign_by_circumhbbox,
                        reg_decoded_bbox):  # fmt: skip
    inside_flags = valid_flags  # allowed_border = -1
    anchors = flat_anchors[inside_flags, :]
    gt_bboxes_assign = obb2hbb_oc(gt_bboxes) if assign_by_circumhbbox is not None else gt_bboxes
    assigned_gt_inds = assign_wrt_overlaps(rbbox_overlaps(gt_bboxes_assign, anchors))
    # PseudoSampler
    pos_inds = torch.nonzero(assigned_gt_inds > 0, as_tuple=False).squeeze(-1).unique()
    neg_inds = torch.nonzero(assigned_gt_inds == 0, as_tuple=False).squeeze(-1).unique()
    pos_assigned_gt_inds = assigned_gt_inds[pos_inds] - 1
    pos_bboxes = anchors[pos_inds]
    pos_gt_bboxes = gt_bboxes[pos_assigned_gt_inds, :] if len(gt_bboxes) else gt_bboxes.new_zeros((0, 5))

    num_valid_anchors = anchors.shape[0]
    bbox_targets = torch.zeros_like(anchors)
    bbox_weights = torch.zeros_like(anchors)
    labels = anchors.new_full((num_valid_anchors,), num_classes, dtype=torch.long)
    label_weights = anchors.new_zeros(num_valid_anchors, dtype=torch.float)
    if len(pos_inds) > 0:
        pos_bbox_targets = bbox2delta(pos_bboxes, pos_gt_bboxes) if not reg_decoded_bbox else pos_gt_bboxes
        bbox_targets[pos_inds, :] = pos_bbox_targets
        bbox_weights[pos_inds, :] = 1.0
        labels[pos_inds] = gt_labels[pos_assigned_gt_inds]
        label_weights[pos_inds] = 1.0
    if len(neg_inds) > 0:
        label_weights[neg_inds] = 1.0
    num_total_anchors = flat_anchors.size(0)
    labels = unmap(labels, num_total_anchors, inside_flags, fill=num_classes)
    label_weights = unmap(label_weights, num_total_anchors, inside_flags)
    bbox_targets = unmap(bbox_targets, num_total_anchors, inside_flags)
    bbox_weights = unmap(bbox_weights, num_total_anchors, inside_flags)
    return labels, label_weights, bbox_targets, bbox_weights, pos_inds, neg_inds


def release_loss(cls_scores, bbox_preds, gt_bboxes, gt_labels, pad_shapes, *, num_classes,
                 assign_by_circumhbbox=None, kld=False):  # fmt: skip
    """``RotatedAnchorHead.loss`` + ``_parse_losses``: (loss_cls, loss_bbox). gt_bboxes in 'oc', labels 0-based."""
    reg_decoded_bbox = kld
    featmap_sizes = [featmap.size()[-2:] for featmap in cls_scores]
    generator = RotatedAnchorGenerator()
    multi_level_anchors = generator.grid_priors(featmap_sizes)
    num_imgs = len(gt_bboxes)
    anchor_list = [multi_level_anchors for _ in range(num_imgs)]
    valid_flag_list = [generator.valid_flags(featmap_sizes, pad) for pad in pad_shapes]
    # get_targets
    num_level_anchors = [anchors.size(0) for anchors in anchor_list[0]]
    results = [_get_targets_single(torch.cat(anchor_list[i]), torch.cat(valid_flag_list[i]), gt_bboxes[i],
                                   gt_labels[i], num_classes, assign_by_circumhbbox, reg_decoded_bbox)
               for i in range(num_imgs)]  # fmt: skip
    all_labels, all_label_weights, all_bbox_targets, all_bbox_weights, pos_inds_list, neg_inds_list = zip(*results)
    num_total_pos = sum([max(inds.numel(), 1) for inds in pos_inds_list])
    labels_list = images_to_levels(all_labels, num_level_anchors)
    label_weights_list = images_to_levels(all_label_weights, num_level_anchors)
    bbox_targets_list = images_to_levels(all_bbox_targets, num_level_anchors)
    bbox_weights_list = images_to_levels(all_bbox_weights, num_level_anchors)
    num_total_samples = num_total_pos  # FocalLoss: no sampling
    all_anchor_list = images_to_levels([torch.cat(a) for a in anchor_list], num_level_anchors)
    losses_cls, losses_bbox = [], []
    for cls_score, bbox_pred, anchors, labels, label_weights, bbox_targets, bbox_weights in zip(
        cls_scores, bbox_preds, all_anchor_list, labels_list, label_weights_list, bbox_targets_list, bbox_weights_list
    ):
        # loss_single
        labels = labels.reshape(-1)
        label_weights = label_weights.reshape(-1)
        cls_score = cls_score.permute(0, 2, 3, 1).reshape(-1, num_classes)
        losses_cls.append(focal_loss(cls_score, labels, label_weights, avg_factor=num_total_samples))
        bbox_targets = bbox_targets.reshape(-1, 5)
        bbox_weights = bbox_weights.reshape(-1, 5)
        bbox_pred = bbox_pred.permute(0, 2, 3, 1).reshape(-1, 5)
        if reg_decoded_bbox:
            anchors = anchors.reshape(-1, 5)
            bbox_pred = delta2bbox(anchors, bbox_pred)
            losses_bbox.append(gdloss_v1_kld(bbox_pred, bbox_targets, bbox_weights, avg_factor=num_total_samples))
        else:
            losses_bbox.append(l1_loss(bbox_pred, bbox_targets, bbox_weights, avg_factor=num_total_samples))
    # BaseDetector._parse_losses: a list becomes sum(_loss.mean())
    return sum(_loss.mean() for _loss in losses_cls), sum(_loss.mean() for _loss in losses_bbox)


# ------------------------------------------------------------------ inference
def multiclass_nms_rotated(multi_bboxes, multi_scores, score_thr, iou_thr, max_num=-1):
    num_classes = multi_scores.size(1) - 1
    bboxes = multi_bboxes[:, None].expand(multi_scores.size(0), num_classes, 5)
    scores = multi_scores[:, :-1]
    labels = torch.arange(num_classes, dtype=torch.long)
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
    _, keep = nms_rotated(bboxes_for_nms, scores, iou_thr)
    if max_num > 0:
        keep = keep[:max_num]
    return torch.cat([bboxes[keep], scores[keep][:, None]], 1), labels[keep]


def release_detections(cls_score_list, bbox_pred_list, img_shape, scale_factor, *, num_classes, nms_pre=2000,
                       score_thr=0.05, iou_thr=0.1, max_per_img=2000, rescale=False):  # fmt: skip
    """``RotatedAnchorHead._get_bboxes_single`` for one image (levels' ``[A K, H, W]``, ``[A 5, H, W]``): 'oc'."""
    generator = RotatedAnchorGenerator()
    mlvl_anchors = generator.grid_priors([c.shape[-2:] for c in cls_score_list])
    mlvl_bboxes = []
    mlvl_scores = []
    for cls_score, bbox_pred, anchors in zip(cls_score_list, bbox_pred_list, mlvl_anchors):
        cls_score = cls_score.permute(1, 2, 0).reshape(-1, num_classes)
        scores = cls_score.sigmoid()
        bbox_pred = bbox_pred.permute(1, 2, 0).reshape(-1, 5)
        if nms_pre > 0 and scores.shape[0] > nms_pre:
            max_scores, _ = scores.max(dim=1)
            _, topk_inds = max_scores.topk(nms_pre)
            anchors = anchors[topk_inds, :]
            bbox_pred = bbox_pred[topk_inds, :]
            scores = scores[topk_inds, :]
        bboxes = delta2bbox(anchors, bbox_pred, max_shape=img_shape)
        mlvl_bboxes.append(bboxes)
        mlvl_scores.append(scores)
    mlvl_bboxes = torch.cat(mlvl_bboxes)
    if rescale:
        mlvl_bboxes[:, :4] = mlvl_bboxes[:, :4] / mlvl_bboxes.new_tensor(scale_factor)
    mlvl_scores = torch.cat(mlvl_scores)
    padding = mlvl_scores.new_zeros(mlvl_scores.shape[0], 1)
    mlvl_scores = torch.cat([mlvl_scores, padding], dim=1)
    return multiclass_nms_rotated(mlvl_bboxes, mlvl_scores, score_thr, iou_thr, max_per_img)
