"""The fused prox-gradient step as one Triton kernel.

One launch per tensor reads ``y, g, x`` (and the optional per-coordinate or
per-instance tensors ``lr, p, a``) once and writes ``x, y`` once, computing in
float32 whatever the storage (float32, bfloat16, float16). Step sizes and
strengths are runtime arguments, so changing them never recompiles; the prox kind
and which operands are tensors are compile-time constants (a handful of variants).
The prox kinds, their codes and their strength slots are those of
:data:`torch_l2o.prox.KERNEL_PROX`.

Runs on CUDA devices, and on the CPU under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from ..prox import KERNEL_CODES, KERNEL_SLOTS

try:  # triton is optional: CPU-only installs use the PyTorch reference
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised on installs without triton
    triton = None
    tl = None
    HAVE_TRITON = False

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if HAVE_TRITON:
    # The branch codes, from the table; a @triton.jit function reads only constexpr globals.
    L1, NONNEG, NONNEG_L1, ELASTIC_NET, L2SQ, BOX = (
        tl.constexpr(KERNEL_CODES[name]) for name in ("l1", "nonneg", "nonneg_l1", "elastic_net", "l2sq", "box")
    )

    @triton.jit
    def prox_apply(z, t, s0, s1, PROX: tl.constexpr):
        """``prox_{t r}(z)`` for the kernel prox ``PROX`` with strengths ``s0, s1``: the one
        Triton implementation of the table's proxes, shared by every kernel."""
        # `z * 0.0` rather than 0.0 where the prox is zero, so NaN propagates as in torch
        if PROX == L1:  # soft-thresholding; lam
            thr = t * s0
            xn = tl.where(z > thr, z - thr, tl.where(z < -thr, z + thr, z * 0.0))
        elif PROX == NONNEG:
            xn = tl.where(z < 0.0, 0.0, z)
        elif PROX == NONNEG_L1:  # lam
            w = z - t * s0
            xn = tl.where(w < 0.0, 0.0, w)
        elif PROX == ELASTIC_NET:  # lam, lam2
            thr = t * s0
            s = tl.where(z > thr, z - thr, tl.where(z < -thr, z + thr, z * 0.0))
            xn = s / (1 + t * s1)
        elif PROX == L2SQ:  # lam
            xn = z / (1 + t * s0)
        elif PROX == BOX:  # lo, hi
            w = tl.where(z < s0, s0, z)
            xn = tl.where(w > s1, s1, w)
        else:  # none
            xn = z
        return xn

    # s0, s1 are the KERNEL_SLOTS strength slots: PROX's strengths in its table order.
    @triton.jit
    def _fused_prox_step_kernel(
        x_ptr, y_ptr, g_ptr, lr_ptr, p_ptr, a_ptr,
        n_elements, lr_div, p_div, a_div,
        t_scale, a_scale, s0, s1,
        HAS_LR: tl.constexpr, HAS_P: tl.constexpr, HAS_A: tl.constexpr,
        PROX: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)

        # t = lr * p in the reference's order: tensor factors times the scalar ones
        if HAS_LR:
            t = tl.load(lr_ptr + offs // lr_div, mask=mask, other=0.0).to(tl.float32) * t_scale
        else:
            t = t_scale + tl.zeros_like(y)
        if HAS_P:
            t = t * tl.load(p_ptr + offs // p_div, mask=mask, other=0.0).to(tl.float32)
        if HAS_A:
            a = tl.load(a_ptr + offs // a_div, mask=mask, other=0.0).to(tl.float32)
        else:
            a = a_scale

        xn = prox_apply(y - t * g, t, s0, s1, PROX)
        yn = xn + a * (xn - x)
        tl.store(x_ptr + offs, xn.to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(y_ptr + offs, yn.to(y_ptr.dtype.element_ty), mask=mask)


def broadcast_divisor(v: Tensor, like: Tensor) -> int | None:
    """How many consecutive elements of ``like`` share one element of ``v``.

    ``v`` must be contiguous and either ``like``'s shape (divisor 1), a single
    element, or a leading prefix of ``like``'s shape followed by ones, such as
    ``(B, 1)`` for ``(B, n)`` (divisor ``n``). ``None`` for anything else.
    """
    if not v.is_contiguous():
        return None
    if tuple(v.shape) == tuple(like.shape):
        return 1
    if v.numel() == 1:
        return max(like.numel(), 1)
    if v.dim() != like.dim():
        return None
    k = v.dim()
    while k > 0 and v.shape[k - 1] == 1:
        k -= 1
    if tuple(v.shape[:k]) != tuple(like.shape[:k]):
        return None
    return math.prod(like.shape[k:])


def launch(
    x: Tensor, y: Tensor, g: Tensor,
    lr: Tensor | None, p: Tensor | None, a: Tensor | None,
    t_scale: float, a_scale: float, kind: int, strengths: list[float],
    wrap=None,
) -> None:
    """Launch the kernel (``wrap`` is ``torch.library.wrap_triton`` inside the op).

    ``kind`` is a code of KERNEL_PROX and ``strengths`` its entry's strengths, in order.
    """
    n = y.numel()
    if n == 0:
        return
    divs = [broadcast_divisor(v, y) if v is not None else 1 for v in (lr, p, a)]
    kernel = _fused_prox_step_kernel if wrap is None else wrap(_fused_prox_step_kernel)
    grid = (triton.cdiv(n, BLOCK),)
    # Unused slots are 0; a table that outgrows the kernel's two slots fails here.
    s0, s1 = [float(v) for v in strengths] + [0.0] * (KERNEL_SLOTS - len(strengths))
    kernel[grid](
        x, y, g,
        lr if lr is not None else y, p if p is not None else y, a if a is not None else y,
        n, divs[0], divs[1], divs[2],
        float(t_scale), float(a_scale), s0, s1,
        HAS_LR=lr is not None, HAS_P=p is not None, HAS_A=a is not None,
        PROX=kind, BLOCK=BLOCK,
    )
