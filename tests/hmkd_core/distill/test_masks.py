"""Scale-aware foreground masks and feature attention maps on hand-made inputs."""

from __future__ import annotations

import pytest
import torch

from hmkd_core.distill.masks import (
    batch_masks,
    channel_attention,
    level_masks,
    scale_aware_mask,
    spatial_attention,
)


def test_box_covers_cells_whose_centres_lie_inside() -> None:
    # Stride 4: the box spans cells x in [1, 3], y in [1, 2] -> centres 1.5, 2.5 and 1.5.
    fg, weight = scale_aware_mask(torch.tensor([[4.0, 4.0, 12.0, 8.0]]), (8, 8), stride=4)
    expected = torch.zeros(8, 8)
    expected[1, 1:3] = 1.0
    assert torch.equal(fg, expected)
    assert torch.allclose(weight[fg.bool()], torch.full((2,), 1 / (2 * 1)))
    assert torch.allclose(weight[~fg.bool()], torch.full((62,), 1 / 62))


def test_overlap_takes_the_smallest_box() -> None:
    big = [0.0, 0.0, 32.0, 32.0]  # 8 x 8 cells, the whole grid
    small = [8.0, 8.0, 16.0, 16.0]  # 2 x 2 cells at rows/cols 2..3
    fg, weight = scale_aware_mask(torch.tensor([big, small]), (8, 8), stride=4)
    assert fg.sum() == 64
    assert torch.allclose(weight[2:4, 2:4], torch.full((2, 2), 1 / 4))
    assert weight[0, 0] == pytest.approx(1 / 64)
    assert weight[5, 5] == pytest.approx(1 / 64)


def test_tiny_box_still_covers_the_cell_of_its_centre() -> None:
    # Cells x, y in [2.25, 2.375]: no cell centre inside; the centre lies in cell (2, 2).
    fg, weight = scale_aware_mask(torch.tensor([[9.0, 9.0, 9.5, 9.5]]), (8, 8), stride=4)
    assert fg.sum() == 1 and fg[2, 2] == 1
    assert weight[2, 2] == pytest.approx(1.0)  # one cell covered: it carries the whole weight


def test_thin_box_covers_its_column() -> None:
    # Half a cell wide, four cells tall: one column of four cells, weight 1 / (1 * 4).
    fg, weight = scale_aware_mask(torch.tensor([[13.0, 0.0, 15.0, 16.0]]), (8, 8), stride=4)
    assert torch.equal(fg.nonzero()[:, 1], torch.full((4,), 3))
    assert torch.allclose(weight[0:4, 3], torch.full((4,), 0.25))


def test_small_and_large_boxes_weigh_about_the_same_in_total() -> None:
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0], [96.0, 96.0, 104.0, 104.0]])
    fg, weight = scale_aware_mask(boxes, (32, 32), stride=4)
    assert (weight[:16, :16]).sum() == pytest.approx(1.0)
    assert (weight[24:26, 24:26]).sum() == pytest.approx(1.0)
    assert (weight * (1 - fg)).sum() == pytest.approx(1.0)


def test_box_at_the_border_stays_on_the_grid() -> None:
    fg, _ = scale_aware_mask(torch.tensor([[30.0, 30.0, 32.0, 32.0]]), (8, 8), stride=4)
    assert fg[7, 7] == 1 and fg.sum() == 1


def test_no_boxes_is_all_background() -> None:
    fg, weight = scale_aware_mask(torch.zeros(0, 4), (4, 5), stride=8)
    assert fg.sum() == 0
    assert torch.allclose(weight, torch.full((4, 5), 1 / 20))


def test_batch_masks_stacks_per_image_masks() -> None:
    boxes = [torch.tensor([[4.0, 4.0, 12.0, 8.0]]), torch.zeros(0, 4)]
    fg, weight = batch_masks(boxes, (8, 8), stride=4)
    assert fg.shape == weight.shape == (2, 1, 8, 8)
    one_fg, one_w = scale_aware_mask(boxes[0], (8, 8), stride=4)
    assert torch.equal(fg[0, 0], one_fg) and torch.equal(weight[0, 0], one_w)
    assert fg[1].sum() == 0


def test_level_masks_follow_each_feature_grid() -> None:
    feats = {"p2": torch.zeros(1, 3, 16, 12), "p3": torch.zeros(1, 3, 8, 6)}
    masks = level_masks([torch.tensor([[0.0, 0.0, 16.0, 16.0]])], feats, ["p2", "p3"])
    assert masks["p2"][0].shape == (1, 1, 16, 12)
    assert masks["p2"][0].sum() == 16  # 4 x 4 cells at stride 4
    assert masks["p3"][0].sum() == 4  # 2 x 2 cells at stride 8


def test_attention_maps_average_to_one() -> None:
    feat = torch.randn(2, 6, 5, 7)
    s, c = spatial_attention(feat, 0.5), channel_attention(feat, 0.5)
    assert s.shape == (2, 1, 5, 7) and c.shape == (2, 6, 1, 1)
    assert torch.allclose(s.sum(dim=(1, 2, 3)), torch.full((2,), 35.0))
    assert torch.allclose(c.sum(dim=(1, 2, 3)), torch.full((2,), 6.0))
    uniform = torch.ones(1, 4, 3, 3)
    assert torch.allclose(spatial_attention(uniform, 0.5), torch.ones(1, 1, 3, 3))
    assert torch.allclose(channel_attention(uniform, 0.5), torch.ones(1, 4, 1, 1))


def test_spatial_attention_peaks_where_the_feature_is_strong() -> None:
    feat = torch.zeros(1, 2, 4, 4)
    feat[0, :, 1, 2] = -3.0  # |F| counts, not the sign
    s = spatial_attention(feat, 0.5)
    assert s[0, 0].argmax() == 1 * 4 + 2


def _reference_cover(lo: float, hi: float, size: int) -> list[int]:
    """Cells whose centre lies in [lo, hi), else the cell holding the box's centre: a loop."""
    cells = [i for i in range(size) if lo <= i + 0.5 < hi]
    return cells or [min(max(int((lo + hi) // 2), 0), size - 1)]


@pytest.mark.parametrize("side", [0.5, 1.0, 1.5, 2.0, 2.5, 3.75])
def test_box_weight_never_exceeds_one_at_any_sub_cell_offset(side: float) -> None:
    # The same box slid over a cell in eighths, edges landing on centres and borders included:
    # its cells sum to exactly one wherever it falls, and the cells are the reference's.
    stride, grid = 4, 12
    for ox in range(8):
        for oy in range(8):
            x0, y0 = 3.0 + ox / 8, 2.0 + oy / 8
            box = torch.tensor([[x0, y0, x0 + side, y0 + side * 2]]) * stride
            fg, weight = scale_aware_mask(box, (grid, grid), stride=stride)
            xs = _reference_cover(x0, x0 + side, grid)
            ys = _reference_cover(y0, y0 + side * 2, grid)
            expected = torch.zeros(grid, grid)
            expected[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1] = 1.0
            assert torch.equal(fg, expected), (side, ox, oy)
            assert float((weight * fg).sum()) == pytest.approx(1.0), (side, ox, oy)


def test_box_edge_on_a_cell_centre_adds_no_row() -> None:
    # x from 0.5 to 2.5 cells: centres 0.5 and 1.5 are inside, 2.5 (the right edge) is not.
    fg, _ = scale_aware_mask(torch.tensor([[2.0, 0.0, 10.0, 4.0]]), (4, 4), stride=4)
    assert fg[0].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_normalized_attention_ignores_the_feature_scale() -> None:
    feat = torch.randn(2, 8, 6, 6)
    for fn in (spatial_attention, channel_attention):
        small = fn(feat, 0.5, normalize=True)
        assert torch.allclose(small, fn(feat * 40.0, 0.5, normalize=True), atol=1e-5)
        # without normalisation a strong feature gives a sharper map
        assert not torch.allclose(fn(feat, 0.5), fn(feat * 40.0, 0.5), atol=1e-3)


def _reference_masks(boxes: torch.Tensor, h: int, w: int, stride: int) -> tuple:
    """One image's fg and weight by loops over boxes and cells, from `_reference_cover`."""
    fg, fg_weight = torch.zeros(h, w), torch.zeros(h, w)
    for x0, y0, x1, y1 in (boxes / stride).tolist():
        xs, ys = _reference_cover(x0, x1, w), _reference_cover(y0, y1, h)
        for y in ys:
            for x in xs:
                fg[y, x] = 1.0
                fg_weight[y, x] = max(fg_weight[y, x], 1.0 / (len(xs) * len(ys)))
    n_bg = max(float((1 - fg).sum()), 1.0)
    return fg, torch.where(fg > 0, fg_weight, torch.full_like(fg, 1.0 / n_bg))


@pytest.mark.parametrize("max_elements", [2**24, 1, 50])
def test_batch_masks_match_a_loop_reference_image_by_image(max_elements: int) -> None:
    # Overlapping boxes of every size, boxes narrower than a cell, boxes past the grid's edge,
    # images without boxes; in chunks of one box and of a few, as in one piece.
    g = torch.Generator().manual_seed(0)
    boxes = []
    for n in (7, 0, 1, 12, 0, 3):
        xy = torch.rand(n, 2, generator=g) * 70 - 6
        wh = torch.rand(n, 2, generator=g) ** 2 * 40 + 0.5
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    fg, weight = batch_masks(boxes, (14, 16), stride=4, max_elements=max_elements)
    assert fg.shape == weight.shape == (6, 1, 14, 16)
    for i, image_boxes in enumerate(boxes):
        ref_fg, ref_weight = _reference_masks(image_boxes, 14, 16, 4)
        assert torch.equal(fg[i, 0], ref_fg), i
        assert torch.allclose(weight[i, 0], ref_weight, rtol=0, atol=1e-7), i
