"""The prox-gradient step with extrapolation, in plain PyTorch.

This is the mathematics of the fused kernel, and the path for CPU tensors, float64,
non-elementwise proxes and autograd (meta-training differentiates through it).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from ..prox import get_prox

Operand = float | Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision storage computes in float32; float32 and float64 in themselves."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _cast(v: Operand, dtype: torch.dtype) -> Operand:
    return v.to(dtype) if isinstance(v, Tensor) else v


def step_size(lr: Operand, p: Operand, like: Tensor) -> Tensor:
    """``t = lr * p`` in ``like``'s dtype, rounded as the kernel rounds it.

    Two Python numbers multiply in double and round once; a scalar step becomes a
    0-dim tensor so that ``t * lam`` inside a prox rounds in ``like``'s dtype too.
    """
    t = _cast(lr, like.dtype) * _cast(p, like.dtype)
    if not isinstance(t, Tensor):
        t = torch.full((), t, dtype=like.dtype, device=like.device)
    return t


def prox_point_reference(y: Tensor, g: Tensor, lr: Operand, p: Operand = 1.0, prox: str = "none",
                         params: Mapping[str, Any] | None = None) -> Tensor:
    r""":math:`\operatorname{prox}_{t r}(y - t g)` with ``t = lr p``, in :func:`compute_dtype`
    (not rounded back to ``y``'s dtype): the prox-gradient point, without extrapolation."""
    cdt = compute_dtype(y.dtype)
    yc = y.to(cdt)
    t = step_size(lr, p, yc)
    return get_prox(prox).prox(yc - t * g.to(cdt), t, **(params or {}))


def prox_grad_step_reference(
    y: Tensor,
    g: Tensor,
    x: Tensor,
    lr: Operand,
    p: Operand,
    a: Operand,
    prox: str = "none",
    params: Mapping[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Out-of-place, differentiable:

    .. math::
        t = \mathrm{lr}\, p,\qquad
        x^+ = \operatorname{prox}_{t r}(y - t\, g),\qquad
        y^+ = x^+ + a\,(x^+ - x)

    ``lr``, ``p`` and ``a`` are Python numbers or tensors broadcasting against ``y``.
    Arithmetic is in :func:`compute_dtype`; results come back in ``y``'s dtype.
    """
    cdt = compute_dtype(y.dtype)
    x_new = prox_point_reference(y, g, lr, p, prox, params)
    y_new = x_new + _cast(a, cdt) * (x_new - x.to(cdt))
    return x_new.to(y.dtype), y_new.to(y.dtype)
