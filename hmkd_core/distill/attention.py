"""Local (windowed) multi-head cross-attention on feature maps.

HM's decoder lets each position's query look only at the w x w neighbourhood of keys/values
around it: small objects are local, and a full (HW x HW) attention matrix on a P2 grid would be
far too costly. The window is gathered with `F.unfold` (one batched op, no loop over positions),
so memory is `w*w` times that of K and V, never quadratic in H*W. Neighbours that fall outside
the map are masked out of the softmax rather than attended to as zero padding, so a constant
value map yields the same constant at the borders as in the interior.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _window_validity(h: int, w: int, window: int, device: torch.device) -> Tensor:
    """(1, 1, window*window, H*W) bool: which window slots of each position lie inside the map."""
    ones = torch.ones(1, 1, h, w, device=device)
    valid = F.unfold(ones, kernel_size=window, padding=window // 2)  # (1, w*w, H*W)
    return valid.bool()[:, None]


def window_attention(q: Tensor, k: Tensor, v: Tensor, *, window: int, heads: int) -> Tensor:
    """Scaled dot-product attention of each position to its `window` x `window` neighbourhood.

    q, k, v: (B, d, H, W) with d divisible by `heads`; window: odd side of the neighbourhood.
    Returns (B, d, H, W): per head, a convex combination of the values in the window, with
    weights `softmax(q . k / sqrt(d / heads))` over the in-bounds neighbours only. With
    window 1 the output is `v` exactly, whatever `q` and `k` are.
    """
    if window % 2 != 1:
        raise ValueError(f"window must be odd so it is centred on its position, got {window}")
    b, d, h, w = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must match")
    if d % heads:
        raise ValueError(f"channels ({d}) must be divisible by heads ({heads})")
    dh, n, hw = d // heads, window * window, h * w
    pad = window // 2
    k_win = F.unfold(k, kernel_size=window, padding=pad).view(b, heads, dh, n, hw)
    v_win = F.unfold(v, kernel_size=window, padding=pad).view(b, heads, dh, n, hw)
    q_pos = q.reshape(b, heads, dh, 1, hw)
    logits = (q_pos * k_win).sum(dim=2) * (1.0 / math.sqrt(dh))  # (B, heads, n, HW)
    if window > 1:
        valid = _window_validity(h, w, window, q.device)
        logits = logits.masked_fill(~valid, float("-inf"))
    attn = torch.softmax(logits, dim=2)
    out = (attn[:, :, None] * v_win).sum(dim=3)  # (B, heads, dh, HW)
    return out.reshape(b, d, h, w)


class WindowCrossAttention(nn.Module):
    """Keys and values projected by 1x1 convs from a feature map, attended by a given query.

    `forward(query (B, dim, H, W), source (B, in_channels, H, W)) -> (B, dim, H, W)`. The output
    is a mixture of `Wv(source)` alone: the query only chooses the mixing weights.
    """

    def __init__(self, in_channels: int, dim: int, *, window: int = 3, heads: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.window = window
        self.heads = heads
        self.key = nn.Conv2d(in_channels, dim, kernel_size=1)
        self.value = nn.Conv2d(in_channels, dim, kernel_size=1)

    def forward(self, query: Tensor, source: Tensor) -> Tensor:
        return window_attention(
            query, self.key(source), self.value(source), window=self.window, heads=self.heads
        )
