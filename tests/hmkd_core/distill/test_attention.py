"""Windowed cross-attention against a naive reference with explicit loops."""

from __future__ import annotations

import math

import pytest
import torch

from hmkd_core.distill.attention import WindowCrossAttention, window_attention


def naive_window_attention(q, k, v, window: int, heads: int, own_value_grad: bool = False):
    """Loops over images, heads and positions; only in-bounds neighbours take part.
    `own_value_grad` detaches every neighbour's value but the position's own."""
    b, d, h, w = q.shape
    dh, r = d // heads, window // 2
    out = torch.zeros_like(q)
    for n in range(b):
        for g in range(heads):
            ch = slice(g * dh, (g + 1) * dh)
            for i in range(h):
                for j in range(w):
                    keys, vals = [], []
                    for di in range(-r, r + 1):
                        for dj in range(-r, r + 1):
                            y, x = i + di, j + dj
                            if 0 <= y < h and 0 <= x < w:
                                keys.append(k[n, ch, y, x])
                                val = v[n, ch, y, x]
                                own = (di, dj) == (0, 0)
                                vals.append(val.detach() if own_value_grad and not own else val)
                    logits = torch.stack([q[n, ch, i, j] @ kk for kk in keys]) / math.sqrt(dh)
                    weights = torch.softmax(logits, dim=0)
                    out[n, ch, i, j] = sum(wt * vv for wt, vv in zip(weights, vals, strict=True))
    return out


def test_window_one_returns_v_exactly_whatever_q() -> None:
    v = torch.randn(2, 8, 5, 6)
    for _ in range(2):
        q, k = torch.randn(2, 8, 5, 6) * 10, torch.randn(2, 8, 5, 6)
        assert torch.equal(window_attention(q, k, v, window=1, heads=2), v)


@pytest.mark.parametrize("window", [3, 5])
def test_matches_naive_reference(window: int) -> None:
    q, k, v = (torch.randn(2, 4, 5, 6, dtype=torch.float64) for _ in range(3))
    got = window_attention(q, k, v, window=window, heads=2)
    assert torch.allclose(got, naive_window_attention(q, k, v, window, heads=2), atol=1e-12)


def test_borders_mask_out_of_bounds_neighbours() -> None:
    # A constant value map must come back unchanged at the borders too; attending to zero
    # padding would shrink the corner outputs towards zero.
    q, k = torch.randn(1, 4, 5, 6), torch.randn(1, 4, 5, 6)
    v = torch.arange(4.0).reshape(1, 4, 1, 1).expand(1, 4, 5, 6)
    out = window_attention(q, k, v, window=3, heads=2)
    assert torch.allclose(out, v, atol=1e-6)


def test_gradients_match_finite_differences() -> None:
    q, k, v = (torch.randn(1, 4, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda a, b, c: window_attention(a, b, c, window=3, heads=2), (q, k, v)
    )


def test_rejects_bad_arguments() -> None:
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="odd"):
        window_attention(x, x, x, window=2, heads=2)
    with pytest.raises(ValueError, match="divisible"):
        window_attention(x, x, x, window=3, heads=3)
    with pytest.raises(ValueError, match="must match"):
        window_attention(x, x, torch.randn(1, 4, 3, 4), window=3, heads=2)


def test_module_output_mixes_projected_values_only() -> None:
    attend = WindowCrossAttention(6, 8, window=3, heads=2)
    source = torch.zeros(1, 6, 4, 4)  # values are Wv(0) = bias at every position
    out = attend(torch.randn(1, 8, 4, 4), source)
    value_bias = attend.key_value.bias[8:].reshape(1, 8, 1, 1)
    assert torch.allclose(out, value_bias.expand_as(out), atol=1e-6)


def test_own_value_grad_keeps_the_forward_and_sends_values_only_their_own_cell() -> None:
    q, k, v = (torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True) for _ in range(3))
    weights = torch.randn(2, 4, 5, 6, dtype=torch.float64)

    def grads(fn) -> tuple[torch.Tensor, ...]:
        out = fn(q, k, v)
        return (out.detach(), *torch.autograd.grad((out * weights).sum(), (q, k, v)))

    fast = grads(lambda a, b, c: window_attention(a, b, c, window=3, heads=2, own_value_grad=True))
    naive = grads(lambda a, b, c: naive_window_attention(a, b, c, 3, heads=2, own_value_grad=True))
    for got, want in zip(fast, naive, strict=True):
        assert torch.allclose(got, want, atol=1e-12)
    full = grads(lambda a, b, c: window_attention(a, b, c, window=3, heads=2))
    assert torch.equal(full[0], fast[0])  # the same forward
    assert torch.allclose(full[1], fast[1]) and torch.allclose(full[2], fast[2])
    assert not torch.allclose(full[3], fast[3])  # only the values' gradient differs
