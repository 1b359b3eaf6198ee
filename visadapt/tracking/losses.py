"""LoRAT's label assignment and losses (arXiv 2403.05231; official code github.com/LitingLin/LoRAT:
``trackit/criteria/methods/box_with_score_map`` and the ``box_with_score_map_label_gen`` data plugin).

Positives: every cell of the search grid the ground-truth box touches. Classification: BCE with logits on all cells
against an IoU-aware soft target (IoU of the cell's predicted box with the GT on positives, 0 elsewhere).
Regression: GIoU loss on positives. Both are divided by the number of positives in the batch (clamped ≥ 1).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .geometry import rasterise


def positive_cells(gt_boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """gt_boxes (B, 4) normalised xyxy in the search crop → (B, H, W) bool positives."""
    scale = gt_boxes.new_tensor([grid[1], grid[0]] * 2)
    return rasterise(gt_boxes * scale, grid)


def box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Aligned IoU of continuous xyxy boxes (..., 4) (mmdet ``bbox_overlaps``, union clamped ≥ eps)."""
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = (a[..., 2:] - a[..., :2]).prod(-1) + (b[..., 2:] - b[..., :2]).prod(-1)
    return inter / (area - inter).clamp(min=eps)


def giou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-box 1 − GIoU (..., ) of continuous xyxy boxes."""
    lt, rb = torch.maximum(pred[..., :2], target[..., :2]), torch.minimum(pred[..., 2:], target[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = ((pred[..., 2:] - pred[..., :2]).prod(-1) + (target[..., 2:] - target[..., :2]).prod(-1) - inter)
    union = union.clamp(min=eps)
    hull = (torch.maximum(pred[..., 2:], target[..., 2:]) - torch.minimum(pred[..., :2], target[..., :2]))
    hull = hull.clamp(min=0).prod(-1).clamp(min=eps)
    return 1 - (inter / union - (hull - union) / hull)


def lorat_loss(outputs: dict[str, torch.Tensor], gt_boxes: torch.Tensor,
               num_positives: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """outputs: ``score_map`` (B, H, W) logits, ``boxes`` (B, H, W, 4) normalised xyxy; gt_boxes (B, 4).

    ``num_positives``: the normaliser (e.g. all-reduced mean over processes); by default this batch's count.
    Returns {``loss``, ``cls``, ``reg``}, weights 1 and 1 as in the official configs.
    """
    score = outputs["score_map"].float()
    boxes = outputs["boxes"].float()
    grid = tuple(score.shape[1:])
    pos = positive_cells(gt_boxes.float(), grid)
    n_pos = (pos.sum() if num_positives is None else num_positives).float().clamp(min=1)
    gt = gt_boxes.float()[:, None, None].expand_as(boxes)
    with torch.no_grad():
        target = torch.where(pos, box_iou(boxes, gt), torch.zeros_like(score))
    cls = F.binary_cross_entropy_with_logits(score, target, reduction="sum") / n_pos
    reg = giou_loss(boxes[pos], gt[pos]).sum() / n_pos
    return {"loss": cls + reg, "cls": cls, "reg": reg}
