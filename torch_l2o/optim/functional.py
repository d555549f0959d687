"""Pure update rules, one per optimizer.

Each takes tensors and hyper-parameters and returns the new iterates. The optimizer
classes call them in place under ``no_grad`` (``inplace=True``: the fused kernel on
CUDA); meta-training calls the same functions out of place, differentiably. Batched:
a ``(B, n)`` iterate holds ``B`` instances when per-instance quantities (``lr``,
``t``) are shaped ``(B, 1)``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..kernels import prox_grad_step
from .stepsize import instance_shape, instance_sum

__all__ = ["ista_update", "fista_update", "fista_momentum"]


def ista_update(
    y: Tensor, g: Tensor, *, lr: float | Tensor, prox: str = "none",
    params: Mapping[str, Any] | None = None, inplace: bool = False,
) -> Tensor:
    r"""ISTA: :math:`x^+ = \operatorname{prox}_{\mathrm{lr}\, r}(x - \mathrm{lr}\,\nabla f(x))`.

    In place it writes ``x^+`` into ``y`` (for ISTA the gradient point is the iterate).
    """
    x_new, _ = prox_grad_step(y, g, y, lr=lr, a=0.0, prox=prox, params=params, inplace=inplace)
    return x_new


def fista_momentum(t: Tensor) -> tuple[Tensor, Tensor]:
    """``t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2`` and the weight ``(t_k - 1) / t_{k+1}``."""
    t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
    return t_next, (t - 1) / t_next


def fista_update(
    ys: Sequence[Tensor], gs: Sequence[Tensor], xs: Sequence[Tensor], t: Tensor, *,
    lrs: Sequence[float | Tensor], prox: str = "none", params: Mapping[str, Any] | None = None,
    restart: bool = False, instance_dims: int = 0, inplace: bool = False,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    r"""FISTA (Beck & Teboulle 2009), with optional adaptive restart; returns ``(xs+, ys+, t+)``.

    .. math::
        x_{k+1} = \operatorname{prox}_{s r}(y_k - s\nabla f(y_k)),\quad
        t_{k+1} = \tfrac{1 + \sqrt{1 + 4 t_k^2}}{2},\quad
        y_{k+1} = x_{k+1} + \tfrac{t_k - 1}{t_{k+1}}(x_{k+1} - x_k)

    over a list of tensors that form one variable (a param group). ``t`` is float64,
    one value per instance (shape ``y.shape[:instance_dims]``). With ``restart``
    (O'Donoghue & Candes 2015, gradient scheme) an instance whose
    ``(y_k - x_{k+1})^T (x_{k+1} - x_k) > 0`` restarts: ``y_{k+1} = x_{k+1}``, ``t_{k+1} = 1``.
    """
    k = instance_dims
    t_next, a = fista_momentum(t)
    olds = [(x.clone(), y.clone()) if restart and inplace else (x, y) for x, y in zip(xs, ys)]
    new = [
        prox_grad_step(y, g, x, lr=lr, a=a.reshape(instance_shape(y, k)), prox=prox, params=params,
                       inplace=inplace)
        for y, g, x, lr in zip(ys, gs, xs, lrs)
    ]
    xs_new, ys_new = [n[0] for n in new], [n[1] for n in new]
    if restart:
        c = sum(
            instance_sum((y0 - xn) * (xn - x0), k).reshape(t.shape)
            for (x0, y0), xn in zip(olds, xs_new)
        ) > 0
        t_next = torch.where(c, torch.ones_like(t_next), t_next)
        for i, (xn, yn) in enumerate(zip(xs_new, ys_new)):
            y_r = torch.where(c.reshape(instance_shape(yn, k)), xn, yn)
            if inplace:
                yn.copy_(y_r)
            else:
                ys_new[i] = y_r
    return xs_new, ys_new, t_next
