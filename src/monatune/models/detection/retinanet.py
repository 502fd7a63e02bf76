"""RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017) as the release's
mmdetection 2.11 ``RetinaHead`` trains and runs it, on torchvision's ``RetinaNet``.

torchvision's network (head, focal loss, box coder, transform) is kept; what differs from the
release's VOC model is changed here:

- a sigmoid classifier over the object classes only (20 on VOC): no background channel.
  Labels stay 1-based at the interface (torchvision's convention), 0 never occurs;
- anchors and assignment: :class:`~.anchors.MMDetAnchorGenerator` (octave scales 4·2^(k/3),
  unrounded, configured strides) and :class:`~.assign.MaxIoUAssigner` (positive at IoU >= 0.5,
  negative below 0.4, each ground truth's best anchors positive whatever their IoU);
- the losses (focal, gamma 2, alpha 0.25; L1 on the deltas) are summed over the batch and divided
  by the batch's number of positives (mmdet's ``avg_factor``); torchvision divides per image and
  averages the images. Anchors over another image's padding in the batch take no part (mmdet's
  ``valid_flags``);
- inference keeps, per level, the 1,000 anchors with the highest best-class score (torchvision:
  the top 1,000 anchor-class pairs above the threshold), then every (anchor, class) above 0.05
  goes to a per-class NMS at 0.5 over all levels, and the best 100 stay (torchvision: 300).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.ops import boxes as box_ops, sigmoid_focal_loss

from .anchors import MMDetAnchorGenerator
from .assign import MaxIoUAssigner
from .transform import MMDetTransform

__all__ = ["MMDetRetinaNet"]


class MMDetRetinaNet(RetinaNet):
    """torchvision's ``RetinaNet`` with the release's classifier, anchors, assigner, loss and inference.

    Args:
        backbone: Module with an int ``out_channels`` returning five maps (strides 8-128).
        num_classes: Object classes, *not* counting a background (VOC: 20); labels are 1..num_classes.
        min_size, max_size: The evaluation resize (the release's VOC: 600, 1000).
        nms_pre: Anchors kept per level before NMS at inference (by their best class score).
        focal_alpha, focal_gamma: The focal loss's.
        **kwargs: ``RetinaNet``'s (``score_thresh`` 0.05, ``nms_thresh`` 0.5, ``detections_per_img``
            100 here, ``image_mean``, ``image_std``, ...).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        min_size: int | Sequence[int] = 800,
        max_size: int = 1333,
        nms_pre: int = 1000,
        detections_per_img: int = 100,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("anchor_generator", MMDetAnchorGenerator(
            (8, 16, 32, 64, 128), (0.5, 1.0, 2.0), octave_base_scale=4, scales_per_octave=3))
        kwargs.setdefault("proposal_matcher", MaxIoUAssigner(0.5, 0.4, min_pos_iou=0.0))
        super().__init__(backbone, num_classes, min_size=min_size, max_size=max_size,
                         detections_per_img=detections_per_img, topk_candidates=nms_pre, **kwargs)  # fmt: skip
        old = self.transform
        self.transform = MMDetTransform(old.min_size, old.max_size, old.image_mean, old.image_std,
                                        size_divisible=old.size_divisible)  # fmt: skip
        self.num_classes = num_classes
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def compute_loss(
        self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor]
    ) -> dict[str, Tensor]:
        """mmdet 2.11 ``AnchorHead.loss``: sums over the batch, divided by the batch's positives."""
        logits_all, deltas_all = head_outputs["cls_logits"], head_outputs["bbox_regression"]
        cls_sum = logits_all.new_zeros(())
        box_sum = deltas_all.new_zeros(())
        positives = 0
        for i, (target, logits, deltas, anchor) in enumerate(zip(targets, logits_all, deltas_all, anchors)):
            valid = self._valid_anchors(i, anchor.device)
            logits, deltas, anchor = logits[valid], deltas[valid], anchor[valid]
            boxes, labels = target["boxes"], target["labels"]
            if boxes.numel() == 0:
                matched = torch.full((len(anchor),), MaxIoUAssigner.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=anchor.device)
            else:
                matched = self.proposal_matcher(box_ops.box_iou(boxes, anchor))
            fg = matched >= 0
            positives += int(fg.sum())
            goal = torch.zeros_like(logits)
            goal[fg, labels[matched[fg]] - 1] = 1.0  # labels 1..K -> channels 0..K-1: no background channel
            valid = matched != MaxIoUAssigner.BETWEEN_THRESHOLDS
            cls_sum = cls_sum + sigmoid_focal_loss(
                logits[valid], goal[valid], alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
            )
            target_deltas = self.box_coder.encode_single(boxes[matched[fg]], anchor[fg])
            box_sum = box_sum + (deltas[fg] - target_deltas).abs().sum()
        norm = max(positives, 1)
        return {"classification": cls_sum / norm, "bbox_regression": box_sum / norm}

    def _valid_anchors(self, i: int, device: torch.device) -> Tensor:
        """Image ``i``'s anchors inside its own padded shape (all of them where the generator cannot tell)."""
        generator, sizes = self.anchor_generator, getattr(self.transform, "last_image_sizes", None)
        if not isinstance(generator, MMDetAnchorGenerator) or sizes is None:
            return slice(None)  # type: ignore[return-value]
        d = self.transform.size_divisible
        h, w = sizes[i]
        return generator.valid_flags((-(-h // d) * d, -(-w // d) * d), device)

    def postprocess_detections(
        self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """mmdet 2.11 ``AnchorHead._get_bboxes`` + ``multiclass_nms``."""
        detections = []
        for index, shape in enumerate(image_shapes):
            boxes, scores = [], []
            for logits, deltas, anchor in zip(head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors[index]):
                s = logits[index].sigmoid()  # (HWA, K)
                d = deltas[index]
                if len(s) > self.topk_candidates:
                    top = s.max(dim=1).values.topk(self.topk_candidates).indices
                    s, d, anchor = s[top], d[top], anchor[top]
                boxes.append(box_ops.clip_boxes_to_image(self.box_coder.decode_single(d, anchor), shape))
                scores.append(s)
            b, s = torch.cat(boxes), torch.cat(scores)
            k = s.shape[1]
            labels = torch.arange(1, k + 1, device=s.device).expand(len(s), -1).reshape(-1)
            b = b[:, None].expand(-1, k, -1).reshape(-1, 4)
            s = s.reshape(-1)
            keep = torch.where(s > self.score_thresh)[0]
            b, s, labels = b[keep], s[keep], labels[keep]
            keep = box_ops.batched_nms(b, s, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": b[keep], "scores": s[keep], "labels": labels[keep]})
        return detections
