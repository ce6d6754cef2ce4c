"""Local (windowed) multi-head cross-attention on feature maps.

HM's decoder lets each position's query look only at the w x w neighbourhood of keys/values
around it: small objects are local, and a full (HW x HW) attention matrix on a P2 grid would be
far too costly. Each window slot is a shifted view of the padded K and V, so memory and time
are linear in H*W (about `w*w` whole-map elementwise ops), never quadratic. Neighbours that
fall outside the map are masked out of the softmax rather than attended to as zero padding, so
a constant value map yields the same constant at the borders as in the interior.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _window_offsets(window: int) -> list[tuple[int, int]]:
    """(dy, dx) of each window slot into a map padded by `window // 2` on every side."""
    return [(dy, dx) for dy in range(window) for dx in range(window)]


def _window_validity(h: int, w: int, window: int, device: torch.device) -> Tensor:
    """(window*window, H, W) bool: which window slots of each position lie inside the map."""
    pad = window // 2
    inside = F.pad(torch.ones(h, w, device=device, dtype=torch.bool), (pad,) * 4)
    return torch.stack([inside[dy : dy + h, dx : dx + w] for dy, dx in _window_offsets(window)])


def _slot(x: Tensor, dy: int, dx: int, h: int, w: int) -> Tensor:
    """The (..., H, W) view of a padded map that window slot (dy, dx) sees at each position."""
    return x[..., dy : dy + h, dx : dx + w]


def _slot_dots(x: Tensor, padded: Tensor, offsets: list[tuple[int, int]], *, out: Tensor) -> Tensor:
    """Per-slot dot products over the head channels, written into `out`.

    x: (B, heads, dh, H, W); padded: (B, heads, dh, H + 2p, W + 2p); out: (B, heads, n, H, W)
    gets `out[:, :, i] = sum_dh x * slot_i(padded)`. One scratch buffer serves every slot: on
    CPU a fresh multi-MB temporary per slot costs more in page faults than the arithmetic.
    """
    h, w = x.shape[-2:]
    scratch = torch.empty_like(x)
    for i, (dy, dx) in enumerate(offsets):
        torch.mul(x, _slot(padded, dy, dx, h, w), out=scratch)
        torch.sum(scratch, dim=2, out=out[:, :, i])
    return out


class _WindowAttentionFn(torch.autograd.Function):
    """Window attention with a hand-written backward.

    Autograd through `window**2` shifted slices would allocate a zero-filled padded gradient per
    slice and keep every product alive; here the gradients of K and V are accumulated in place
    into one padded buffer each, which makes the step several times cheaper on CPU. Under CUDA
    autocast the inputs are cast to float32: the softmax over a few logits wants the precision.
    `own_value_grad` sends V only the gradient of its own position's output (the centre slot),
    as if every other slot's value were detached: the forward is unchanged.
    Shapes: q, k, v (B, heads, dh, H, W), any strides; out (B, heads, dh, H, W).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(  # type: ignore[override]
        ctx, q: Tensor, k: Tensor, v: Tensor, window: int, own_value_grad: bool = False
    ) -> Tensor:
        b, heads, dh, h, w = q.shape
        pad, offsets, scale = window // 2, _window_offsets(window), 1.0 / math.sqrt(dh)
        k_pad = F.pad(k, (pad,) * 4)
        v_pad = F.pad(v, (pad,) * 4)
        logits = q.new_empty(b, heads, len(offsets), h, w)
        _slot_dots(q, k_pad, offsets, out=logits)
        logits.mul_(scale)
        if window > 1:
            logits.masked_fill_(~_window_validity(h, w, window, q.device), float("-inf"))
        attn = torch.softmax(logits, dim=2)  # (B, heads, n, H, W); 0 on out-of-bounds slots
        out = attn[:, :, :1] * _slot(v_pad, *offsets[0], h, w)
        for i, (dy, dx) in enumerate(offsets[1:], start=1):
            out.addcmul_(attn[:, :, i : i + 1], _slot(v_pad, dy, dx, h, w))
        ctx.save_for_backward(q, k_pad, v_pad, attn)
        ctx.window = window
        ctx.own_value_grad = own_value_grad
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k_pad, v_pad, attn = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        _, _, dh, h, w = q.shape
        pad, offsets = ctx.window // 2, _window_offsets(ctx.window)
        grad_out = grad_out.contiguous()
        grad_attn = _slot_dots(grad_out, v_pad, offsets, out=torch.empty_like(attn))
        # softmax backward; out-of-bounds slots have attn 0 and so get no gradient
        grad_logits = attn * (grad_attn - (grad_attn * attn).sum(dim=2, keepdim=True))
        grad_logits.mul_(1.0 / math.sqrt(dh))
        grad_q = torch.zeros_like(q) if need_q else None
        grad_k = torch.zeros_like(k_pad) if need_k else None
        grad_v = torch.zeros_like(v_pad) if need_v else None
        for i, (dy, dx) in enumerate(offsets):
            g_i = grad_logits[:, :, i : i + 1]
            if grad_q is not None:
                grad_q.addcmul_(g_i, _slot(k_pad, dy, dx, h, w))
            if grad_k is not None:
                _slot(grad_k, dy, dx, h, w).addcmul_(g_i, q)
            if grad_v is not None and (not ctx.own_value_grad or (dy, dx) == (pad, pad)):
                _slot(grad_v, dy, dx, h, w).addcmul_(attn[:, :, i : i + 1], grad_out)
        inner = (slice(None),) * 3 + (slice(pad, pad + h), slice(pad, pad + w))
        return (
            grad_q,
            None if grad_k is None else grad_k[inner],
            None if grad_v is None else grad_v[inner],
            None,
            None,
        )


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, *, window: int, heads: int, own_value_grad: bool = False
) -> Tensor:
    """Scaled dot-product attention of each position to its `window` x `window` neighbourhood.

    q, k, v: (B, d, H, W) with d divisible by `heads`; window: odd side of the neighbourhood.
    Returns (B, d, H, W): per head, a convex combination of the values in the window, with
    weights `softmax(q . k / sqrt(d / heads))` over the in-bounds neighbours only. With
    window 1 the output is `v` exactly, whatever `q` and `k` are. `own_value_grad`: see
    `_WindowAttentionFn`; it changes only the gradient that reaches `v`.

    Implementation: K and V are zero-padded once and each of the `window**2` slots is a shifted
    view of them, so every op is a whole-map elementwise product or sum (B, heads, d/heads, H, W)
    and nothing of size `window**2 * d * H * W` is ever built. The loop is over window slots
    (9 for w = 3), not over positions; the backward is written by hand (`_WindowAttentionFn`).
    """
    if window % 2 != 1:
        raise ValueError(f"window must be odd so it is centred on its position, got {window}")
    b, d, h, w = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must match")
    if d % heads:
        raise ValueError(f"channels ({d}) must be divisible by heads ({heads})")
    split = (b, heads, d // heads, h, w)
    out = _WindowAttentionFn.apply(
        q.reshape(split), k.reshape(split), v.reshape(split), window, own_value_grad
    )
    return out.view(b, d, h, w)


class WindowCrossAttention(nn.Module):
    """Keys and values projected by 1x1 convs from a feature map, attended by a given query.

    `forward(query (B, dim, H, W), source (B, in_channels, H, W)) -> (B, dim, H, W)`. The output
    is a mixture of `Wv(source)` alone: the query only chooses the mixing weights.
    """

    def __init__(
        self,
        in_channels: int,
        dim: int,
        *,
        window: int = 3,
        heads: int = 4,
        own_value_grad: bool = False,
    ) -> None:
        super().__init__()
        self.own_value_grad = own_value_grad
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.window = window
        self.heads = heads
        self.key_value = nn.Conv2d(in_channels, 2 * dim, kernel_size=1)  # Wk and Wv in one GEMM

    def forward(self, query: Tensor, source: Tensor, *, adapter: nn.Conv2d | None = None) -> Tensor:
        """With `adapter` (a 1x1 conv with bias), `source` is the adapter's *input* and the keys
        and values are `Wkv(adapter(source))`, computed as one conv with the composed weights:
        the same linear map, cheaper when the adapter widens its input (e.g. a 64-channel
        student aligned to a 128-channel teacher), and gradients reach both convs' parameters.
        """
        if adapter is None:
            kv = self.key_value(source)
        else:
            w_kv = self.key_value.weight.flatten(1)  # (2*dim, in_channels)
            weight = (w_kv @ adapter.weight.flatten(1))[:, :, None, None]
            bias = self.key_value.bias
            if adapter.bias is not None:
                bias = w_kv @ adapter.bias + bias
            kv = F.conv2d(source, weight, bias)
        key, value = kv.chunk(2, dim=1)
        return window_attention(
            query,
            key,
            value,
            window=self.window,
            heads=self.heads,
            own_value_grad=self.own_value_grad,
        )
