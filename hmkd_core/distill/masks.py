"""Ground-truth masks and feature attention maps for the supplementary distillation module.

HMKD.md §2: a level's grid of cells is split into foreground (inside any ground-truth box) and
background. Foreground cells are weighted by the inverse area of the smallest box covering them,
so a small object weighs about as much in total as a large one instead of being drowned by it;
background cells share a total weight of one. The same weights drive HM's `WeightedMSE`.

All functions are pure tensor maths, vectorised over boxes by broadcasting (no loop over cells
or over boxes), so they stay cheap on a P2 grid with many boxes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hmkd_core.distill.base import level_stride


def _axis_cover(lo: Tensor, hi: Tensor, size: int) -> Tensor:
    """Which cells along one axis each box covers: (N,) bounds in cells -> (N, size) bool.

    A cell `i` is covered when its centre `i + 0.5` lies in the half-open `[lo, hi)`, so a box
    whose edge lands exactly on a cell centre does not gain an extra row or column, and a box
    covers as many cells as its side spans (give or take one, by position). A box that holds no
    cell centre (narrower than a cell, or between two centres) covers the cell holding its
    centre instead of vanishing from the grid.
    """
    centres = torch.arange(size, device=lo.device, dtype=lo.dtype) + 0.5
    cover = (centres >= lo[:, None]) & (centres < hi[:, None])
    empty = ~cover.any(dim=1)
    if empty.any():
        mid = ((lo + hi) * 0.5).floor().long().clamp_(0, size - 1)
        rows = torch.arange(lo.shape[0], device=lo.device)[empty]
        cover[rows, mid[empty]] = True
    return cover


def scale_aware_mask(boxes: Tensor, grid_hw: tuple[int, int], stride: int) -> tuple[Tensor, Tensor]:
    """Foreground mask and scale weights of one image on one level's grid.

    boxes: (N, 4) float xyxy in input pixels (N may be 0). grid_hw: (H, W) of the level.
    stride: input pixels per cell.
    Returns fg (H, W) in {0, 1} and weight (H, W), both float32 on the boxes' device:
    - on foreground, `1 / (h_b * w_b)` of the smallest box covering the cell, `h_b * w_b` being
      the number of cells the box covers (at least 1), so one box's cells sum to at most 1;
    - on background, `1 / N_bg`; with no boxes every cell is background.
    """
    h, w = grid_hw
    boxes = boxes.reshape(-1, 4).float()
    if boxes.shape[0] == 0:
        fg = torch.zeros(h, w, device=boxes.device)
        return fg, torch.full((h, w), 1.0 / (h * w), device=boxes.device)
    cells = boxes / float(stride)
    cover_x = _axis_cover(cells[:, 0], cells[:, 2], w)  # (N, W)
    cover_y = _axis_cover(cells[:, 1], cells[:, 3], h)  # (N, H)
    # Each box's cells share a weight of one (FGD's rule): the inverse of the number of cells
    # it covers, so its total does not swing with where it falls on the grid.
    inv_area = 1.0 / (cover_x.sum(dim=1) * cover_y.sum(dim=1)).float()  # (N,)
    covered = cover_y[:, :, None] & cover_x[:, None, :]  # (N, H, W)
    # The smallest covering box has the largest inverse area; uncovered boxes contribute 0.
    fg_weight = (covered * inv_area[:, None, None]).amax(dim=0)  # (H, W)
    fg = covered.any(dim=0).float()
    n_bg = (1.0 - fg).sum().clamp(min=1.0)
    weight = fg_weight * fg + (1.0 - fg) / n_bg
    return fg, weight


def batch_masks(
    boxes_list: Sequence[Tensor],
    grid_hw: tuple[int, int],
    stride: int,
    *,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """`scale_aware_mask` for a batch: B tensors of (N_i, 4) boxes -> fg, weight (B, 1, H, W).

    Boxes are moved to `device` (default: where they are) before the masks are built.
    """
    fgs, weights = [], []
    for boxes in boxes_list:
        if device is not None:
            boxes = boxes.to(device)
        fg, weight = scale_aware_mask(boxes, grid_hw, stride)
        fgs.append(fg)
        weights.append(weight)
    return torch.stack(fgs)[:, None], torch.stack(weights)[:, None]


def _scaled(activity: Tensor, normalize: bool) -> Tensor:
    """(B, N) activity per position or channel, divided by its per-image mean when asked.

    Raw `mean |F|` follows the teacher's feature scale, so a fixed temperature means a sharp
    softmax on a strong teacher and a flat one on a weak one; divided by its mean, the logits
    are relative activity and `tau` means the same contrast whatever the scale.
    """
    if not normalize:
        return activity
    return activity / activity.mean(dim=1, keepdim=True).clamp(min=1e-6)


def spatial_attention(feat: Tensor, tau: float, *, normalize: bool = False) -> Tensor:
    """Where the feature map is active: (B, C, H, W) -> (B, 1, H, W), summing to H*W per image.

    `H*W * softmax_hw(mean_c |F| / tau)`: a mean of one means "an average position", so the map
    can multiply a squared error without changing its overall scale. `normalize` divides the
    activity by its per-image mean first (`_scaled`).
    """
    b, _, h, w = feat.shape
    logits = _scaled(feat.abs().mean(dim=1).reshape(b, h * w), normalize) / tau
    return (h * w * torch.softmax(logits, dim=1)).reshape(b, 1, h, w)


def channel_attention(feat: Tensor, tau: float, *, normalize: bool = False) -> Tensor:
    """Which channels are active: (B, C, H, W) -> (B, C, 1, 1), summing to C per image.

    `C * softmax_c(mean_hw |F| / tau)`, the channel counterpart of `spatial_attention`.
    """
    b, c = feat.shape[:2]
    logits = _scaled(feat.abs().mean(dim=(2, 3)), normalize) / tau
    return (c * torch.softmax(logits, dim=1)).reshape(b, c, 1, 1)


def level_masks(
    boxes_list: Sequence[Tensor], feats: Mapping[str, Tensor], levels: Sequence[str]
) -> dict[str, tuple[Tensor, Tensor]]:
    """fg and weight masks (B, 1, H_l, W_l) for each level, on its features' grid and device.

    The grid is read from the feature map (not image size / stride), so it always matches.
    """
    out = {}
    for lv in levels:
        feat = feats[lv]
        out[lv] = batch_masks(boxes_list, feat.shape[-2:], level_stride(lv), device=feat.device)
    return out
