r"""Safeguarded learned steps: a learned optimizer that cannot do worse than ISTA.

In the spirit of Heaton et al., "Safeguarded learned convex optimization" (AAAI 2023),
with the objective as the merit function. With ``T(x) = prox_{s r}(x - s\nabla f(x))``
and ``s <= 1/L``, an ISTA step guarantees

.. math::
    F(T x_k) \le F(x_k) - \tfrac{1}{2s}\,\|T x_k - x_k\|^2 .

Each step proposes the learned iterate ``x_L`` and accepts it (per instance) only if
``F(x_L) <= F(x_k) - |T x_k - x_k|^2 / (2s)``; otherwise it takes ``x_{k+1} = T x_k``
and restarts the extrapolation (``y_{k+1} = x_{k+1}``). Every step therefore decreases
``F`` at least as much as ISTA's guarantee, so the iterates converge on every convex
problem (``F(x_k) - F^* = O(1/k)`` with bounded level sets), at the learned speed
wherever the learned step is good.

Cost: one extra closure evaluation per step (at ``x_L``); its gradient gives
``T x_L`` for the next step's test, and after a fallback the next gradient, taken at
``y = x``, gives ``T x``. Fallbacks are counted per instance in ``state[p]["fallbacks"]``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ..kernels import prox_grad_step_reference
from ..prox import get_prox
from .stepsize import _as_values, _evaluate, instance_shape, instance_sum



def _r(prox: str, params: dict, xs: Sequence[Tensor], k: int) -> Tensor:
    spec = get_prox(prox)
    return sum(spec.r(x.double(), k, **params).reshape(x.shape[:k]) for x in xs)


def _ista(ys, gs, lrs, prox, params) -> list[Tensor]:
    return [prox_grad_step_reference(y, g, y, lr, 1.0, 0.0, prox, params)[0] for y, g, lr in zip(ys, gs, lrs)]


def _sq(us: Sequence[Tensor], vs: Sequence[Tensor], k: int) -> Tensor:
    return sum(instance_sum((u.double() - v.double()).square(), k).reshape(u.shape[:k]) for u, v in zip(us, vs))


def safeguarded_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict],
    lrs: Sequence,
    prox: str,
    prox_params: dict,
    k: int,
    closure: Callable,
    loss,
    propose: Callable[[Sequence[Tensor]], tuple[list[Tensor], list[Tensor]]],
) -> None:
    """One safeguarded step of a learned optimizer over one param group, in place.

    ``propose(grads)`` returns the learned proposal ``(xs, ys)`` without writing
    anything (the caller commits the network's new state, kept whichever is taken); ``loss`` is the closure's value at the current parameters (one
    value per instance, or a scalar: then the instances are accepted or refused together).
    """
    if closure is None:
        raise RuntimeError("safeguard=True needs step(closure) with a closure that returns the smooth loss "
                           "(a scalar, or one value per instance)")
    grads = [g.clone() for g in grads]  # the closure below may zero p.grad in place
    inst = instance_shape(params[0], k)
    shape = tuple(params[0].shape[:k])
    dev = params[0].device
    xs = [s["x"] for s in states]
    ys = [p.detach() for p in params]
    s0 = states[0]
    f_y = _as_values(loss, inst, k)
    joint = f_y.dim() == 0 and len(shape) > 0

    def agg(v: Tensor) -> Tensor:  # per instance, or summed when the closure is joint
        v = v.reshape(shape)
        return v.sum() if joint else v

    step = [torch.as_tensor(lr, dtype=torch.float64, device=dev) for lr in lrs][0]
    step = step.reshape(()) if step.numel() == 1 else step.reshape(shape)

    # F(x_k) and T(x_k): kept from the last step, or computed now where y == x ("stale")
    F_now = (f_y if joint else f_y.reshape(shape)) + agg(_r(prox, prox_params, ys, k))
    T_now = _ista(ys, grads, lrs, prox, prox_params)
    stale = s0.get("sg_stale", torch.ones(shape, dtype=torch.bool, device=dev))
    if "sg_F" in s0:
        F_x = torch.where(stale.all() if joint else stale, F_now, s0["sg_F"])
        T_x = [torch.where(stale.reshape(instance_shape(p, k)), t, s["sg_T"])
               for p, t, s in zip(params, T_now, states)]
    else:
        F_x, T_x = F_now, T_now

    xs_L, ys_L = propose(grads)
    f_L, g_L = _evaluate(closure, params, xs_L, k, inst)
    F_L = (f_L if joint else f_L.reshape(shape)) + agg(_r(prox, prox_params, xs_L, k))
    decrease = agg(_sq(T_x, xs, k) / (2 * step))
    # strict: where rounding blurs the test, refusing costs one ISTA step, accepting could
    # let F creep up step after step
    accept = F_L <= F_x - decrease  # NaN or inf at x_L: refused
    accept_i = accept.expand(shape) if joint else accept
    T_L = _ista(xs_L, g_L, lrs, prox, prox_params)
    fallbacks = s0.get("fallbacks", torch.zeros(shape, dtype=torch.int64, device=dev)) + (~accept_i).long()
    for p, g, s, x_l, y_l, t_l, t_x in zip(params, grads, states, xs_L, ys_L, T_L, T_x):
        a = accept_i.reshape(instance_shape(p, k))
        s["x"].copy_(torch.where(a, x_l, t_x))
        p.copy_(torch.where(a, y_l, t_x))  # after a fallback: y = x, no extrapolation
        s["sg_T"] = torch.where(a, t_l, t_x)  # T(x_{k+1}) where accepted; recomputed next step elsewhere
        s["sg_F"] = torch.where(accept, F_L, F_x)
        s["sg_stale"] = ~accept_i
        s["fallbacks"] = fallbacks
        p.grad = g  # the gradient at y, as the user's closure left it
