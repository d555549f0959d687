"""ISTA and FISTA as ``torch.optim`` optimizers."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .base import ProxOptimizer
from .functional import fista_update, ista_update

__all__ = ["ISTA", "FISTA"]


class ISTA(ProxOptimizer):
    r"""Proximal gradient descent (ISTA) on ``F = f + r``.

    .. math::
        x_{k+1} = \operatorname{prox}_{s r}\big(x_k - s\,\nabla f(x_k)\big)

    Args:
        params: parameters or param groups.
        lr: the step ``s`` (``0.9999 / L`` for an ``L``-smooth ``f``); a tensor gives
            one step per instance (``(B, 1)`` for ``B`` instances in a ``(B, n)``
            parameter); ``None`` finds it automatically (:mod:`torch_l2o.optim.stepsize`),
            and the group's ``lr`` becomes ``1.0``, a multiplier of that step that LR
            schedulers scale.
        prox, lam, prox_params: the non-smooth ``r``, see :mod:`torch_l2o.prox`; a prox
            with a strength (``"l1"``, ...) needs ``lam`` (or ``prox_params["lam"]``).
        instance_dims, nonfinite: see :class:`~torch_l2o.optim.base.ProxOptimizer`.

    For ISTA the parameter is the prox iterate itself.
    """

    def __init__(self, params: Iterable, lr: Any = None, *, prox: str = "none", lam: float | None = None,
                 prox_params: dict | None = None, instance_dims: int | None = None,
                 nonfinite: str = "raise") -> None:
        super().__init__(params, dict(lr=lr, prox=prox, lam=lam, prox_params=prox_params,
                                      instance_dims=instance_dims, nonfinite=nonfinite))

    def _update(self, group, ps, gs, states, lrs, prox_params, ctx) -> None:
        for p, g, s, lr in zip(ps, gs, states, lrs):
            ista_update(p, g, lr=lr, prox=group["prox"], params=prox_params, inplace=True)
            s["step"] += 1


class FISTA(ProxOptimizer):
    r"""FISTA (Beck & Teboulle 2009) on ``F = f + r``, with optional adaptive restart.

    .. math::
        x_{k+1} = \operatorname{prox}_{s r}(y_k - s\nabla f(y_k)),\quad
        t_{k+1} = \tfrac{1 + \sqrt{1 + 4 t_k^2}}{2},\quad
        y_{k+1} = x_{k+1} + \tfrac{t_k - 1}{t_{k+1}}(x_{k+1} - x_k),

    with ``t_0 = 1`` and ``x_0 = y_0`` the parameter's initial value. The parameter
    holds ``y_k`` (where the gradient is taken); read the solution ``x_k`` with
    :meth:`solution`.

    Args:
        params: parameters or param groups.
        lr: the step ``s`` (``0.9999 / L``); a tensor gives one step per instance;
            ``None`` finds it automatically: backtracking when ``step`` gets a closure,
            a secant estimate otherwise (:mod:`torch_l2o.optim.stepsize`); the group's
            ``lr`` then becomes ``1.0``, a multiplier of that step that LR schedulers scale.
        prox, lam, prox_params: the non-smooth ``r``, see :mod:`torch_l2o.prox`; a prox
            with a strength (``"l1"``, ...) needs ``lam`` (or ``prox_params["lam"]``).
        restart: adaptive restart (O'Donoghue & Candes 2015, gradient scheme), per instance.
        instance_dims, nonfinite: see :class:`~torch_l2o.optim.base.ProxOptimizer`.

    Example::

        x = torch.zeros(n, requires_grad=True)
        opt = torch_l2o.FISTA([x], prox="l1", lam=0.1, lr=0.9999 / L)
        for _ in range(100):
            opt.zero_grad()
            (0.5 * (A @ x - b).square().sum()).backward()
            opt.step()
        x_hat = opt.solution(x)
    """

    def __init__(self, params: Iterable, lr: Any = None, *, prox: str = "none", lam: float | None = None,
                 prox_params: dict | None = None, restart: bool = False,
                 instance_dims: int | None = None, nonfinite: str = "raise") -> None:
        super().__init__(params, dict(lr=lr, prox=prox, lam=lam, prox_params=prox_params, restart=restart,
                                      instance_dims=instance_dims, nonfinite=nonfinite))

    def _init_state(self, group, ps, states) -> None:
        super()._init_state(group, ps, states)
        if "x" in states[0]:
            return
        t = torch.ones(ps[0].shape[: group["instance_dims"]], dtype=torch.float64, device=ps[0].device)
        for p, s in zip(ps, states):
            s["x"] = p.detach().clone()
            s["t"] = t

    def _update(self, group, ps, gs, states, lrs, prox_params, ctx) -> None:
        _, _, t = fista_update(
            ps, gs, [s["x"] for s in states], states[0]["t"], lrs=lrs, prox=group["prox"],
            params=prox_params, restart=group["restart"], instance_dims=group["instance_dims"],
            inplace=True,
        )
        for s in states:
            s["t"] = t
            s["step"] += 1
