"""Hierarchical matching (HMKD.md §1): teacher-side queries read the student's fine features.

An encoder condenses the deep, semantic levels into a query at the coarsest distilled level.
A decoder walks back to the finest level; at each level the query attends (windowed, multi-head)
to keys and values computed from the *aligned student* feature, and the attended values are
mapped to the teacher's channels and compared to the teacher's feature there.

The invariant that makes this distillation rather than reconstruction: a level's prediction
`D_l = Wout_l(A_l)` is a mixture of the student's values `Wv_l(Align_l(S_l))` only; the
teacher steers the mixing weights through the query and never reaches `D_l` by a residual path.
If the student's features are all zero, `D_l` is the same vector at every position. The
MGD-style options keep the teacher out of `D_l`'s values: `mask_ratio` zeroes some of the
student's positions before they are read, and `generator` maps the mixture through a small conv
net that sees nothing else (a zero student then gives one map whatever the teacher).
`query_pool: image` averages the encoder's query over each image: the teacher still steers the
weights, but by one vector per image rather than a map, so it cannot pick neighbours per cell.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmkd_core.distill.attention import WindowCrossAttention
from hmkd_core.distill.base import level_stride
from hmkd_core.distill.mgd import Generator, random_spatial_mask
from hmkd_core.spec import HMOptions, deep_levels, resolve_level_weights


def group_count(channels: int, max_groups: int = 32) -> int:
    """The largest number of GroupNorm groups, at most `max_groups`, that divides `channels`."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def consecutive_levels(levels: Sequence[str]) -> tuple[str, ...]:
    """`levels` ordered finest first; refuses gaps, since the encoder halves the grid per step."""
    ordered = tuple(sorted(levels, key=level_stride))
    for fine, coarse in pairwise(ordered):
        if level_stride(coarse) != 2 * level_stride(fine):
            raise ValueError(
                f"hierarchical matching needs consecutive FPN levels, got {list(levels)}; "
                "distil e.g. p2,p3,p4 or p3,p4,p5, or turn hm off"
            )
    return ordered


def hm_weights(fg: Tensor, weight: Tensor, background_weight: float) -> Tensor:
    """HM's per-cell weights from the SDM masks: `fg*W + background_weight*(1-fg)*W`.

    fg, weight: (B, 1, H, W) -> (B, 1, H, W).
    """
    return weight * (fg + background_weight * (1.0 - fg))


def weighted_mse(pred: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """sum over positions and channels of `weights * (pred - target)^2`, divided by batch size.

    pred, target: (B, C, H, W); weights: (B, 1, H, W), broadcast over channels.
    """
    per_pos = (pred - target).pow(2).sum(dim=1, keepdim=True)
    return (per_pos * weights).sum() / pred.shape[0]


class ConvNormAct(nn.Sequential):
    """3x3 conv, GroupNorm, ReLU, keeping the channel count and the grid."""

    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(group_count(channels), channels),
            nn.ReLU(inplace=True),
        )


class HierarchicalEncoder(nn.Module):
    """Fine-to-coarse encoder: `e_0 = lat_0(X_0)`, `e_i = lat_i(X_i) + down_i(e_{i-1})`.

    Input: level -> (B, in_channels, H_l, W_l) for consecutive levels; output: the query
    `ConvNormAct(e_coarsest)`, (B, dim, H_c, W_c), at the coarsest level's grid.
    """

    def __init__(self, levels: Sequence[str], in_channels: int, dim: int) -> None:
        super().__init__()
        self.levels = consecutive_levels(levels)
        self.lateral = nn.ModuleDict({lv: nn.Conv2d(in_channels, dim, 1) for lv in self.levels})
        self.down = nn.ModuleDict(
            {lv: nn.Conv2d(dim, dim, 3, stride=2, padding=1) for lv in self.levels[1:]}
        )
        self.head = ConvNormAct(dim)

    def forward(self, feats: Mapping[str, Tensor]) -> Tensor:
        e = self.lateral[self.levels[0]](feats[self.levels[0]])
        for lv in self.levels[1:]:
            lat = self.lateral[lv](feats[lv])
            down = self.down[lv](e)
            if down.shape[-2:] != lat.shape[-2:]:  # odd grids: follow the FPN level's size
                down = F.interpolate(down, size=lat.shape[-2:], mode="nearest")
            e = lat + down
        return self.head(e)


class DeepEncoder(nn.Module):
    """Coarse-to-fine encoder over the teacher's deep levels only: `e = lat(X_coarsest)`, then
    `e = lat(X_l) + up(e)` down to the finest of them, and `ConvNormAct(e)`.

    This is the paper's "deep, low-resolution semantic" query read literally: the distilled
    levels' own teacher features never feed the query matched against them. The output lies on
    the finest deep level's grid; the decoder brings it up to the coarsest distilled level.
    """

    def __init__(self, levels: Sequence[str], in_channels: int, dim: int) -> None:
        super().__init__()
        self.levels = consecutive_levels(levels)
        self.lateral = nn.ModuleDict({lv: nn.Conv2d(in_channels, dim, 1) for lv in self.levels})
        self.head = ConvNormAct(dim)

    def forward(self, feats: Mapping[str, Tensor]) -> Tensor:
        missing = [lv for lv in self.levels if lv not in feats]
        if missing:
            raise KeyError(
                f"hm.query_levels 'deep' reads teacher level(s) {missing}, which the teacher does "
                f"not produce (it has {sorted(feats)}); use query_levels: distilled"
            )
        e = self.lateral[self.levels[-1]](feats[self.levels[-1]])
        for lv in reversed(self.levels[:-1]):
            lat = self.lateral[lv](feats[lv])
            e = lat + F.interpolate(e, size=lat.shape[-2:], mode="nearest")
        return self.head(e)


class DecoderLevel(nn.Module):
    """One decoding step: query (B, dim, H, W) and aligned student (B, C_t, H, W) ->
    (D (B, C_t, H, W), h (B, dim, H, W) or None).

    `A = WindowAttention(Q, Wk(S'), Wv(S'))`, `D = Wout(A)` (or `G(Wout(A))` with
    `opts.generator`), `h = GroupNorm(Q + Wproj(A))`.
    `D` depends on the query only through the attention weights. The finest level
    (`hands_on=False`) has nobody to hand `h` to, so it has no `Wproj`/norm: a parameter that
    never gets a gradient would trip DDP.
    """

    def __init__(self, channels: int, opts: HMOptions, *, hands_on: bool = True) -> None:
        super().__init__()
        self.attend = WindowCrossAttention(
            channels,
            opts.dim,
            window=opts.window,
            heads=opts.heads,
            own_value_grad=opts.value_grad == "own",
        )
        self.out = nn.Conv2d(opts.dim, channels, 1)
        self.generate = Generator(channels, opts.generator_kernel) if opts.generator else None
        self.proj = nn.Conv2d(opts.dim, opts.dim, 1) if hands_on else None
        self.norm = nn.GroupNorm(group_count(opts.dim), opts.dim) if hands_on else None

    def forward(
        self, query: Tensor, aligned: Tensor, raw: tuple[Tensor, nn.Conv2d] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """raw: optionally (S_l, Align_l) such that `aligned == Align_l(S_l)`; K/V then come
        from S_l through the composed 1x1 map (same values, fewer multiply-adds)."""
        if raw is None:
            attended = self.attend(query, aligned)
        else:
            attended = self.attend(query, raw[0], adapter=raw[1])
        pred = self.out(attended)
        if self.generate is not None:
            pred = self.generate(pred)
        if self.proj is None or self.norm is None:
            return pred, None
        return pred, self.norm(query + self.proj(attended))


class HierarchicalMatching(nn.Module):
    """HM over consecutive levels: `decode` gives each level's D_l, `forward` the losses.

    levels: the distilled levels (any order; they must be consecutive). channels: the teacher's
    channel count, which the aligned student features already have.
    """

    def __init__(self, levels: Sequence[str], channels: int, opts: HMOptions) -> None:
        super().__init__()
        self.levels = consecutive_levels(levels)
        self.query_source = opts.query_source
        self.background_weight = opts.background_weight
        self.uniform = opts.cell_weights == "uniform"
        self.mask_ratio = opts.mask_ratio
        self.query_pool = opts.query_pool
        self.level_weights = resolve_level_weights(
            self.levels, opts.level_weights, "hm.level_weights"
        )
        self.query_levels = deep_levels(self.levels) if opts.query_levels == "deep" else self.levels
        self.encoder: nn.Module = (
            DeepEncoder(self.query_levels, channels, opts.dim)
            if opts.query_levels == "deep"
            else HierarchicalEncoder(self.levels, channels, opts.dim)
        )
        self.decoder = nn.ModuleDict(
            {lv: DecoderLevel(channels, opts, hands_on=lv != self.levels[0]) for lv in self.levels}
        )

    def decode(
        self,
        aligned: Mapping[str, Tensor],
        query_feats: Mapping[str, Tensor],
        raw: Mapping[str, tuple[Tensor, nn.Conv2d]] | None = None,
    ) -> dict[str, Tensor]:
        """aligned: level -> Align_l(S_l) (B, C_t, H_l, W_l); query_feats: what the encoder
        reads (teacher features, or the aligned student for `query_source: student`); raw:
        optionally level -> (S_l, Align_l), see `DecoderLevel.forward`.
        Returns level -> D_l (B, C_t, H_l, W_l), decoded coarse to fine.
        """
        query = self.encoder(query_feats)
        if self.query_pool == "image":
            query = query.mean(dim=(-2, -1), keepdim=True).expand_as(query)
        if self.mask_ratio > 0:  # the mask falls on Align_l(S_l), so the composed map can't serve
            aligned = {
                lv: aligned[lv] * random_spatial_mask(aligned[lv], self.mask_ratio)
                for lv in self.levels
            }
            raw = None
        preds: dict[str, Tensor] = {}
        for lv in reversed(self.levels):
            if query.shape[-2:] != aligned[lv].shape[-2:]:  # up2(h_{l+1}) onto this grid
                query = F.interpolate(query, size=aligned[lv].shape[-2:], mode="nearest")
            level_raw = raw[lv] if raw is not None else None
            preds[lv], handed_on = self.decoder[lv](query, aligned[lv], level_raw)
            if handed_on is not None:  # None only after the finest level
                query = handed_on
        return preds

    def forward(
        self,
        aligned: Mapping[str, Tensor],
        teacher: Mapping[str, Tensor],
        masks: Mapping[str, tuple[Tensor, Tensor]],
        raw: Mapping[str, tuple[Tensor, nn.Conv2d]] | None = None,
    ) -> dict[str, Tensor]:
        """Per-level `lambda_l * WeightedMSE(D_l, T_l)`; masks: level -> (fg, W) (B, 1, H, W).

        teacher: at least the distilled levels, and the deep ones for `query_levels: deep`.
        """
        query_feats = teacher if self.query_source == "teacher" else aligned
        preds = self.decode(aligned, query_feats, raw)
        losses = {}
        for lv in self.levels:
            fg, weight = masks[lv]
            if self.uniform:
                weights = torch.ones_like(fg)
            else:
                weights = hm_weights(fg, weight, self.background_weight)
            losses[lv] = self.level_weights[lv] * weighted_mse(preds[lv], teacher[lv], weights)
        return losses
