"""H2RBox-v2+'s head: a rotated FCOS head with a PSC angle branch, its point assignment and losses.

The release's ``H2RBoxV2PHead`` (mmrotate 0.3 ``RotatedAnchorFreeHead`` / mmdet 2.x
``AnchorFreeHead``) with the H2RBox-v2+ configuration: two towers of four (3x3 conv, GN 32, ReLU),
classification logits, distances (l, t, r, b) in stride units through a per-level ``Scale`` and a
clamp at 0 (``norm_on_bbox``), a 3-channel PSC angle code and the centerness, both on the
regression tower (``centerness_on_reg``). Points are ((j + 0.5) s, (i + 0.5) s). Parameter names
are the release's (``cls_convs.0.conv``, ``cls_convs.0.gn``, ``conv_cls``, ``conv_reg``, ``conv_angle``,
``conv_centerness``, ``scales.0.scale``), so its ``bbox_head.*`` weights load by name.

Assignment (:func:`fcos_targets`) is mmrotate's rotated FCOS with centre sampling (radius 1.5)
and the per-level regression ranges; the losses are focal (classes), the projection IoU loss
(boxes, angle detached), centerness BCE and the symmetry loss, normalised as the release does.
torchvision's ``FCOSHead`` differs (no angle, GIoU, shared assignment code with another
centre-sampling rule), so the head is written here from torch layers.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from .losses import AVG_EPS, centerness_targets, distance_to_le90, projection_iou_loss, reduce_mean, symmetry_loss
from .psc import PSC_STEPS, psc_decode

__all__ = ["INF", "STRIDES", "REGRESS_RANGES", "Scale", "ConvGNReLU", "H2RBoxHead", "grid_points", "fcos_targets"]

INF = 1e8
STRIDES = (8, 16, 32, 64, 128)
REGRESS_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF))


class Scale(nn.Module):
    """A learnable scalar factor (mmcv ``Scale``)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class ConvGNReLU(nn.Module):
    """3x3 conv without bias, GroupNorm, ReLU: mmcv's ``ConvModule`` with GN (same parameter names)."""

    def __init__(self, in_channels: int, channels: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(groups, channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.gn(self.conv(x)))


def _tower(in_channels: int, channels: int, depth: int, groups: int) -> nn.Sequential:
    return nn.Sequential(*[ConvGNReLU(in_channels if i == 0 else channels, channels, groups) for i in range(depth)])


def grid_points(sizes: Sequence[tuple[int, int]], strides: Sequence[int], *, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> list[Tensor]:  # fmt: skip
    """Each level's points ((j + 0.5) s, (i + 0.5) s), row-major (mmdet ``MlvlPointGenerator``, offset 0.5)."""
    points = []
    for (h, w), s in zip(sizes, strides):
        xs = (torch.arange(w, device=device).to(dtype) + 0.5) * s
        ys = (torch.arange(h, device=device).to(dtype) + 0.5) * s
        points.append(torch.stack([xs.repeat(h), ys[:, None].repeat(1, w).reshape(-1)], dim=-1))
    return points


def fcos_targets(
    points: Tensor,
    point_strides: Tensor,
    regress_ranges: Tensor,
    boxes: Tensor,
    labels: Tensor,
    ids: Tensor,
    *,
    num_classes: int,
    radius: float = 1.5,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Assign one image's points to its ground truth (mmrotate rotated FCOS, centre sampling).

    A point p is a candidate for box g if, with (dx, dy) = R(-theta)(p - c) and
    l = w/2 + dx, t = h/2 + dy, r = w/2 - dx, b = h/2 - dy: min(l, t, r, b) > 0,
    |dx| and |dy| < radius * stride, and max(l, t, r, b) is inside the point's regression range
    (inclusive). Among candidates the smallest w * h wins; points without one are background.

    Args:
        points: ``[P, 2]`` all levels' points.
        point_strides: ``[P]`` each point's stride.
        regress_ranges: ``[P, 2]`` each point's (low, high) range.
        boxes: ``[G, 5]`` le90 boxes (the angle need not be wrapped).
        labels: ``[G]`` 0-based classes.
        ids: ``[G]`` object ids (float).
        num_classes: K; background points get label K.
        radius: Centre-sampling radius in strides.

    Returns:
        labels ``[P]``, distances ``[P, 4]`` (l, t, r, b in pixels), angles ``[P, 1]``, ids ``[P]``.
    """
    num_points, num_gts = len(points), len(labels)
    if num_gts == 0:
        return (labels.new_full((num_points,), num_classes), boxes.new_zeros((num_points, 4)),
                boxes.new_zeros((num_points, 1)), boxes.new_zeros((num_points,)))  # fmt: skip
    areas = (boxes[:, 2] * boxes[:, 3])[None].repeat(num_points, 1)  # P, G
    ctr, wh, theta = boxes[None, :, :2], boxes[None, :, 2:4], boxes[None, :, 4:5].expand(num_points, num_gts, 1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    rotation = torch.cat([cos, sin, -sin, cos], dim=-1).reshape(num_points, num_gts, 2, 2)  # R(-theta)
    offset = torch.matmul(rotation, (points[:, None, :] - ctr)[..., None]).squeeze(-1)  # P, G, 2
    w, h = wh[..., 0], wh[..., 1]
    dx, dy = offset[..., 0], offset[..., 1]
    distances = torch.stack((w / 2 + dx, h / 2 + dy, w / 2 - dx, h / 2 - dy), -1)  # P, G, 4
    inside = distances.min(-1).values > 0
    inside &= (offset.abs() < (point_strides * radius)[:, None, None]).all(dim=-1)
    farthest = distances.max(-1).values
    in_range = (farthest >= regress_ranges[:, None, 0]) & (farthest <= regress_ranges[:, None, 1])
    areas[~inside] = INF
    areas[~in_range] = INF
    min_area, best = areas.min(dim=1)
    point_labels = labels[best]
    point_labels[min_area == INF] = num_classes
    everyone = torch.arange(num_points, device=points.device)
    return point_labels, distances[everyone, best], theta[everyone, best], ids[best]


class H2RBoxHead(nn.Module):
    """The H2RBox-v2+ head (``H2RBoxV2PHead`` as the release configures it).

    Args:
        num_classes: Object classes K (sigmoid outputs, no background channel).
        in_channels: The FPN's width.
        feat_channels: The towers' width (release: 256).
        stacked_convs: Convolutions per tower (4).
        strides: The levels' strides (8 .. 128).
        regress_ranges: Per level, the (low, high) range of a positive point's largest distance.
        center_sample_radius: Centre-sampling radius in strides (1.5).
        square_classes: 0-based classes treated as squares (angle 0 in the box loss and at inference,
            no symmetry loss).
        num_groups: GroupNorm groups (32).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        *,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        strides: Sequence[int] = STRIDES,
        regress_ranges: Sequence[tuple[float, float]] = REGRESS_RANGES,
        center_sample_radius: float = 1.5,
        square_classes: Sequence[int] = (),
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        if len(strides) != len(regress_ranges):
            raise ValueError(f"one regression range per stride is needed, got {len(strides)} strides and {len(regress_ranges)} ranges")
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.regress_ranges = tuple(tuple(r) for r in regress_ranges)
        self.center_sample_radius = center_sample_radius
        self.square_classes = tuple(int(c) for c in square_classes)
        self.cls_convs = _tower(in_channels, feat_channels, stacked_convs, num_groups)
        self.reg_convs = _tower(in_channels, feat_channels, stacked_convs, num_groups)
        self.conv_cls = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.conv_reg = nn.Conv2d(feat_channels, 4, 3, padding=1)
        self.conv_angle = nn.Conv2d(feat_channels, PSC_STEPS, 3, padding=1)
        self.conv_centerness = nn.Conv2d(feat_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides])
        for conv in (m for m in self.modules() if isinstance(m, nn.Conv2d)):  # init_cfg Normal(std=0.01)
            nn.init.normal_(conv.weight, std=0.01)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        nn.init.constant_(self.conv_cls.bias, -math.log((1 - 0.01) / 0.01))  # bias_prob 0.01

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Per level: class logits ``[N, K, H, W]``, distances ``[N, 4, H, W]`` (stride units, >= 0),
        PSC codes ``[N, 3, H, W]`` and centerness logits ``[N, 1, H, W]``."""
        if len(feats) != len(self.strides):
            raise ValueError(f"the head has {len(self.strides)} levels (strides {self.strides}), got {len(feats)} maps")
        cls_scores, bbox_preds, angle_preds, centernesses = [], [], [], []
        for x, scale in zip(feats, self.scales):
            cls_feat, reg_feat = self.cls_convs(x), self.reg_convs(x)
            cls_scores.append(self.conv_cls(cls_feat))
            bbox_preds.append(scale(self.conv_reg(reg_feat)).float().clamp(min=0))
            angle_preds.append(self.conv_angle(reg_feat))
            centernesses.append(self.conv_centerness(reg_feat))
        return cls_scores, bbox_preds, angle_preds, centernesses

    def targets(
        self, sizes: Sequence[tuple[int, int]], boxes: Sequence[Tensor], labels: Sequence[Tensor], ids: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Targets for a batch with maps of ``sizes``, flattened level-major as mmdet (level, image, point).

        Returns:
            points ``[M, 2]``, labels ``[M]`` (K = background), distances ``[M, 4]`` in stride units,
            angles ``[M, 1]`` and ids ``[M]``, M = images x points.
        """
        device = boxes[0].device
        points = grid_points(sizes, self.strides, device=device)
        counts = [len(p) for p in points]
        all_points = torch.cat(points)
        strides = torch.cat([all_points.new_full((n,), float(s)) for n, s in zip(counts, self.strides)])
        ranges = torch.cat([all_points.new_tensor(r)[None].expand(n, 2) for n, r in zip(counts, self.regress_ranges)])
        per_image = [
            fcos_targets(all_points, strides, ranges, b, lab, i, num_classes=self.num_classes, radius=self.center_sample_radius)
            for b, lab, i in zip(boxes, labels, ids)
        ]
        split = [[t.split(counts) for t in image] for image in per_image]  # image -> field -> level
        out_points, out = [], [[] for _ in range(4)]
        for level, stride in enumerate(self.strides):
            out_points.append(points[level].repeat(len(per_image), 1))
            for field in range(4):
                value = torch.cat([image[field][level] for image in split])
                out[field].append(value / stride if field == 1 else value)
        return (torch.cat(out_points), *(torch.cat(v) for v in out))  # type: ignore[return-value]

    def loss(
        self,
        outputs: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]],
        boxes: Sequence[Tensor],
        labels: Sequence[Tensor],
        ids: Sequence[Tensor],
        view: tuple[str, float],
    ) -> dict[str, Tensor]:
        """The four H2RBox-v2+ losses for a batch of originals and views (``H2RBoxV2PHead.loss``).

        Args:
            outputs: :meth:`forward`'s output for the 2B images.
            boxes: Per image, ``[G, 5]`` le90 horizontal boxes (views: turned, angle unwrapped).
            labels: Per image, ``[G]`` 0-based classes.
            ids: Per image, ``[G]`` object ids (k in an original, k + 0.5 in its view).
            view: ``("rot", angle)`` or ``("flp", 0)``.

        Returns:
            ``loss_cls``, ``loss_bbox``, ``loss_centerness``, ``loss_ss`` (weights applied).
        """
        cls_scores, bbox_preds, angle_preds, centernesses = (
            [t.float() for t in level_maps] for level_maps in outputs
        )
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        points, flat_labels, flat_distances, flat_angles, flat_ids = self.targets(sizes, boxes, labels, ids)
        flat_cls = torch.cat([c.permute(0, 2, 3, 1).reshape(-1, self.num_classes) for c in cls_scores])
        flat_bbox = torch.cat([b.permute(0, 2, 3, 1).reshape(-1, 4) for b in bbox_preds])
        flat_angle = torch.cat([a.permute(0, 2, 3, 1).reshape(-1, PSC_STEPS) for a in angle_preds])
        flat_ctr = torch.cat([c.permute(0, 2, 3, 1).reshape(-1) for c in centernesses])

        pos = torch.nonzero((flat_labels >= 0) & (flat_labels < self.num_classes)).reshape(-1)
        num_pos = max(reduce_mean(torch.tensor(len(pos), dtype=torch.float, device=flat_cls.device)), 1.0)
        goal = torch.zeros_like(flat_cls)
        goal[pos, flat_labels[pos]] = 1.0
        loss_cls = sigmoid_focal_loss(flat_cls, goal, alpha=0.25, gamma=2.0, reduction="sum") / (num_pos + AVG_EPS)

        pos_bbox, pos_angle, pos_ctr = flat_bbox[pos], flat_angle[pos], flat_ctr[pos]
        pos_distances, pos_theta, pos_labels, pos_ids = flat_distances[pos], flat_angles[pos], flat_labels[pos], flat_ids[pos]
        ctr_targets = centerness_targets(pos_distances)
        ctr_denorm = max(reduce_mean(ctr_targets.sum().detach()), 1e-6)
        if len(pos) == 0:  # + 0 x angle codes: every branch stays in the graph (DDP without unused parameters)
            zero = pos_bbox.sum()
            return {"loss_cls": loss_cls, "loss_bbox": zero, "loss_centerness": pos_ctr.sum(),
                    "loss_ss": zero + 0 * pos_angle.sum()}  # fmt: skip
        pos_points = points[pos]
        pred_theta = psc_decode(pos_angle).detach()
        target_theta = pos_theta[:, 0].clone()
        square = torch.isin(pos_labels, torch.tensor(self.square_classes, dtype=pos_labels.dtype, device=pos.device))
        pred_theta = torch.where(square, torch.zeros_like(pred_theta), pred_theta)
        square_target = torch.where(target_theta.abs() < math.pi / 4, 0.0, -math.pi / 2).to(target_theta)
        target_theta = torch.where(square, square_target, target_theta)
        loss_bbox = projection_iou_loss(distance_to_le90(pos_points, pos_bbox, pred_theta),
                                        distance_to_le90(pos_points, pos_distances, target_theta),
                                        ctr_targets, ctr_denorm)  # fmt: skip
        loss_ctr = F.binary_cross_entropy_with_logits(pos_ctr, ctr_targets, reduction="sum") / (num_pos + AVG_EPS)
        loss_ss = symmetry_loss(pos_angle, pos_ids, pos_labels, view, self.square_classes)
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_centerness": loss_ctr, "loss_ss": loss_ss}
