"""The float64 reference solver that gives ``F*`` for the benchmark metric, and
:func:`optimal_values`, which falls back on it where ``F*`` is not known in closed form.

Restarted FISTA in float64 until the optimality residual is small, then, for
``l1`` problems that give their Hessian, a Newton polish on the support with the
signs fixed (exact for LASSO, quadratically convergent for logistic regression).
The result carries its own certificate: the KKT residual

    max_j  |g_j + lam sign(x_j)|      for x_j != 0
           max(|g_j| - lam, 0)        for x_j == 0

scaled by ``max(lam, 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..prox import get_prox
from .base import Problem

__all__ = ["Solution", "reference_solve", "kkt_residual", "gradient_mapping", "optimal_values"]


@dataclass
class Solution:
    x: Tensor          # (B, n) float64 minimisers
    F: Tensor          # (B,) float64 optimal values F*
    kkt: Tensor        # (B,) KKT residuals (l1) or gradient-mapping norms (other proxes)
    iterations: int    # FISTA iterations before the polish


def kkt_residual(problem: Problem, x: Tensor) -> Tensor:
    """Per-instance optimality residual of ``x`` (see the module docstring)."""
    g = problem.grad(x)
    if problem.prox == "l1":
        lam = float(problem.prox_params.get("lam", 0.0))
        on = (g + lam * torch.sign(x)).abs()
        off = torch.clamp(g.abs() - lam, min=0)
        res = torch.where(x != 0, on, off)
        return res.amax(-1) / max(lam, 1.0)
    return gradient_mapping(problem, x, (1.0 / problem.lipschitz).unsqueeze(-1), g)


def default_step(problem: Problem) -> Tensor:
    """``problem.step_size()`` (``0.9999 / L``), with 1 where ``L = 0``: then ``grad f`` is
    constant and any step is exact."""
    s = problem.step_size()
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


def gradient_mapping(problem: Problem, x: Tensor, step: Tensor | None = None, grad: Tensor | None = None) -> Tensor:
    r"""``|G(x)|`` per instance, :math:`G(x) = (x - \operatorname{prox}_{s r}(x - s\nabla f(x))) / s`:
    zero exactly at the minimisers of a convex ``F``. ``step`` is ``s``, ``(B, 1)`` (default
    :func:`default_step`); ``grad`` is ``grad f(x)`` when the caller already has it."""
    s = default_step(problem) if step is None else step
    g = problem.grad(x) if grad is None else grad
    spec = get_prox(problem.prox)
    return torch.linalg.vector_norm((x - spec.prox(x - s * g, s, **spec.resolve(problem.prox_params))) / s, dim=-1)


def _polish_l1(problem: Problem, x: Tensor, max_newton: int = 30) -> Tensor:
    """Newton on each instance's support with the signs fixed; keeps an instance's
    FISTA point where the polished one breaks the signs or the KKT conditions. Each
    instance works on its own slice of the batch, so the cost is linear in the batch."""
    lam = float(problem.prox_params.get("lam", 0.0))
    out = x.clone()
    for i in range(x.shape[0]):
        idx = torch.nonzero(x[i]).squeeze(-1)
        if idx.numel() == 0:
            continue
        one = problem[i : i + 1]
        sgn = torch.sign(x[i, idx])
        xi = x[i : i + 1].clone()
        F0 = one.objective(xi)[0]
        for _ in range(max_newton):
            g = one.grad(xi)[0, idx] + lam * sgn
            d = torch.linalg.solve(one.hessian(xi, 0, idx), g)
            step = 1.0
            f_old = one.objective(xi)[0]
            while step > 1e-8:  # damped Newton keeps logistic steps safe
                trial = xi.clone()
                trial[0, idx] = xi[0, idx] - step * d
                if one.objective(trial)[0] <= f_old + 1e-15 * abs(float(f_old)):
                    break
                step *= 0.5
            xi = trial
            if float(d.abs().max()) * step <= 1e-15 * max(1.0, float(xi[0, idx].abs().max())):
                break
        ok_sign = bool((torch.sign(xi[0, idx]) == sgn).all())
        if ok_sign and float(kkt_residual(one, xi)[0]) <= 1e-9 and one.objective(xi)[0] <= F0 + 1e-14 * abs(float(F0)):
            out[i] = xi[0]
    return out


@torch.no_grad()
def reference_solve(problem: Problem, *, tol: float = 1e-10, max_iter: int = 50_000,
                    check_every: int = 50, polish: bool = True) -> Solution:
    """Solve every instance in float64: restarted FISTA to a KKT residual of ``tol``, then
    the Newton polish. Returns minimisers, ``F*`` and the final residuals."""
    p = problem.to(torch.float64)
    spec = get_prox(p.prox)
    params = spec.resolve(p.prox_params)
    s = (1.0 / p.lipschitz).unsqueeze(-1)
    x = p.x0()
    y = x.clone()
    t = torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)
    it = 0
    while it < max_iter:
        g = p.grad(y)
        x_new = spec.prox(y - s * g, s, **params)
        t_new = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        restart = ((y - x_new) * (x_new - x)).sum(-1, keepdim=True) > 0
        y = torch.where(restart, x_new, x_new + (t - 1) / t_new * (x_new - x))
        t = torch.where(restart, torch.ones_like(t_new), t_new)
        x = x_new
        it += 1
        if it % check_every == 0 and float(kkt_residual(p, x).max()) <= tol:
            break
    if polish and p.prox == "l1" and hasattr(p, "hessian"):
        x = _polish_l1(p, x)
    return Solution(x=x, F=p.objective(x), kkt=kkt_residual(p, x), iterations=it)


def optimal_values(problem: Problem) -> Tensor:
    """``F*`` per instance: known in closed form, or from the float64 reference solver."""
    known = problem.optimal_value()
    if known is not None:
        return known.double()
    return reference_solve(problem).F
