"""Ground-truth masks and feature attention maps for the supplementary distillation module.

HMKD.md §2: a level's grid of cells is split into foreground (inside any ground-truth box) and
background. Foreground cells are weighted by the inverse area of the smallest box covering them,
so a small object weighs about as much in total as a large one instead of being drowned by it;
background cells share a total weight of one. The same weights drive HM's `WeightedMSE`.

All functions are pure tensor maths, vectorised over boxes and images by broadcasting (no loop
over cells or images; boxes are taken in chunks only when very many meet a fine grid), so they
stay cheap on a P2 grid with many boxes.
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
    centre instead of vanishing from the grid. The fallback is applied by arithmetic, not by a
    branch on its tensor: a branch would wait for the GPU at every image and level.
    """
    cells = torch.arange(size, device=lo.device)
    centres = cells.to(lo.dtype) + 0.5
    cover = (centres >= lo[:, None]) & (centres < hi[:, None])
    mid = ((lo + hi) * 0.5).floor().long().clamp_(0, size - 1)
    fallback = (cells == mid[:, None]) & ~cover.any(dim=1, keepdim=True)
    return cover | fallback


# Boxes whose (boxes x cells) products are built at once; more are taken in chunks, so a batch
# crowded with boxes on a fine grid costs time, not memory (2**24 floats are 64 MB).
_MAX_ELEMENTS = 2**24


def batch_masks(
    boxes_list: Sequence[Tensor],
    grid_hw: tuple[int, int],
    stride: int,
    *,
    device: torch.device | str | None = None,
    max_elements: int = _MAX_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Foreground masks and scale weights of a batch on one level's grid.

    boxes_list: per image, (N_i, 4) float xyxy in input pixels (N_i may be 0), moved to
    `device` (default: where the first image's boxes are). grid_hw: (H, W) of the level.
    stride: input pixels per cell. Returns fg (B, 1, H, W) in {0, 1} and weight (B, 1, H, W),
    float32:
    - on foreground, `1 / (h_b * w_b)` of the smallest box covering the cell, `h_b * w_b` being
      the number of cells the box covers (at least 1), so one box's cells sum to at most 1;
    - on background, `1 / N_bg` of its image; an image with no boxes is all background.

    The whole batch is one set of tensor ops (boxes of every image side by side, reduced per
    image), with no loop over images and no value read back to the host: on a GPU a training
    step is bound by how many ops the host launches, and a per-image loop here was most of a
    distiller's launches. (Boxes not yet on `device` are copied there first.) An empty batch
    (no images) is refused by `torch.cat`.
    """
    h, w = grid_hw
    if device is None:
        device = boxes_list[0].device
    # each image's boxes moved and made float before they meet: images may differ in device
    # or dtype, and a mixed concatenation would round them in the narrower one
    per_image = [b.reshape(-1, 4).to(device=device, dtype=torch.float32) for b in boxes_list]
    counts = [b.shape[0] for b in per_image]
    boxes = torch.cat(per_image) / float(stride)
    # built on the host from the host's counts (its size given, so nothing is read back)
    image = torch.repeat_interleave(
        torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long), output_size=sum(counts)
    )
    image = image.to(device, non_blocking=True)
    cover_x = _axis_cover(boxes[:, 0], boxes[:, 2], w)  # (N, W)
    cover_y = _axis_cover(boxes[:, 1], boxes[:, 3], h)  # (N, H)
    # Each box's cells share a weight of one (FGD's rule): the inverse of the number of cells
    # it covers, so its total does not swing with where it falls on the grid.
    inv_area = 1.0 / (cover_x.sum(dim=1) * cover_y.sum(dim=1)).float()  # (N,)
    # Per image, the smallest covering box has the largest inverse area; 0 where none covers.
    fg_weight = torch.zeros(len(counts), h * w, device=device)
    chunk = max(1, max_elements // (h * w))
    for start in range(0, boxes.shape[0], chunk):
        part = slice(start, start + chunk)
        covered = cover_y[part, :, None] & cover_x[part, None, :]  # (n, H, W)
        values = (covered * inv_area[part, None, None]).reshape(-1, h * w)
        index = image[part, None].expand_as(values)
        fg_weight.scatter_reduce_(0, index, values, reduce="amax")
    fg = (fg_weight > 0).float()  # every covering box's inverse area is positive
    n_bg = (1.0 - fg).sum(dim=1, keepdim=True).clamp(min=1.0)
    weight = fg_weight * fg + (1.0 - fg) / n_bg
    return fg.reshape(-1, 1, h, w), weight.reshape(-1, 1, h, w)


def scale_aware_mask(boxes: Tensor, grid_hw: tuple[int, int], stride: int) -> tuple[Tensor, Tensor]:
    """`batch_masks` of one image: (N, 4) boxes -> fg (H, W), weight (H, W)."""
    fg, weight = batch_masks([boxes], grid_hw, stride)
    return fg[0, 0], weight[0, 0]


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
