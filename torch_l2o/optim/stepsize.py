"""The automatic step size: what ``lr=None`` means for every optimizer here.

The step is ``1 / L_k`` with ``L_k`` an estimate of the Lipschitz constant of the
gradient, one per problem instance:

* **Secant estimate** (no closure): ``L_k = max(L_{k-1}, |g_k - g_{k-1}| / |y_k - y_{k-1}|)``
  from successive gradient points. Each secant is a lower bound of the true ``L``, so
  ``L_k`` never exceeds it; keeping the running maximum is the safeguard: a step that
  was too long excites the steep directions, whose next secant raises ``L_k``. The
  first step is a short probe (length ``1e-3 * max(|y_0|, 1)`` along ``-g_0``) whose
  only purpose is the first secant; a probe too short to move the gradient beyond
  rounding brings none, and is repeated ten times longer (a probe that does not move
  at all sits at a minimiser and is kept as it is).
* **Backtracking** (Beck & Teboulle 2009; with a closure that returns the smooth loss):
  starting from the secant estimate, ``L`` is multiplied by ``eta = 2`` until the plain
  prox-gradient point ``x+ = prox_{r/L}(y - g / L)`` satisfies the descent lemma
  ``f(x+) <= f(y) + <g, x+ - y> + L/2 |x+ - y|^2``. ``L`` never decreases. A loss that
  is NaN or Inf at the current point, or at every trial point, is :class:`NonFiniteLoss`.

Learned optimizers use the same estimate as their base step ``s = 1/L``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..kernels import compute_dtype, prox_grad_step_reference
from ..kernels.cpu_step import secant_sums

PROBE = 1e-3
ETA = 2.0
MAX_BACKTRACKS = 60
PROBE_TRIES = 4  # backtracking's first probe, lengthened ten times at each try
# The rounding noise of a gradient, in units of epsilon: NOISE of the compute dtype (the
# error accumulated by the sums that make it) or STORAGE_NOISE of its own dtype (its
# rounding to bfloat16 / float16, whose sums accumulate in float32), whichever is larger.
NOISE = 1e3
STORAGE_NOISE = 10.0
MAX_PROBE = 1e30  # a finite cap: the step times a float32 gradient must not overflow to NaN


class NonFiniteLoss(FloatingPointError):
    """Backtracking met a NaN or Inf loss it cannot step past; nothing was updated."""


def instance_shape(p: Tensor, k: int) -> tuple[int, ...]:
    """Shape of per-instance quantities for a parameter whose first ``k`` dims index instances."""
    return tuple(p.shape[:k]) + (1,) * (p.dim() - k)


def instance_sum(v: Tensor, k: int) -> Tensor:
    """Sum over the non-instance dims, keeping them (shape :func:`instance_shape`)."""
    dims = tuple(range(k, v.dim()))
    return v.sum(dim=dims, keepdim=True) if dims else v


def _joint(vs: Sequence[Tensor], k: int) -> Tensor:
    """The per-instance sums of ``vs`` added over the tensors, shaped as the first tensor's
    instances (:func:`instance_shape`): tensors of different ranks must not broadcast."""
    shape = instance_shape(vs[0], k)
    return sum(instance_sum(v, k).reshape(shape) for v in vs)


def _sq_norm(vs: Sequence[Tensor], k: int) -> Tensor:
    return _joint([v.double().square() for v in vs], k)


def _dot(us: Sequence[Tensor], vs: Sequence[Tensor], k: int) -> Tensor:
    return _joint([u.double() * v.double() for u, v in zip(us, vs)], k)


def _dist(us: Sequence[Tensor], vs: Sequence[Tensor], k: int) -> Tensor:
    """``|u - v|`` per instance, jointly over the tensors (subtracted in float64: the
    difference of two half-precision tensors would round to their dtype)."""
    return _sq_norm([u.double() - v.double() for u, v in zip(us, vs)], k).sqrt()


def noise_floor(dtype: torch.dtype) -> float:
    """Relative rounding noise of a gradient of ``dtype`` (see :data:`NOISE`)."""
    return max(NOISE * torch.finfo(compute_dtype(dtype)).eps, STORAGE_NOISE * torch.finfo(dtype).eps)


def secant(ys, gs, ys_prev, gs_prev, k: int, dy: Tensor | None = None) -> Tensor:
    """``|g - g_prev| / |y - y_prev|`` per instance, jointly over the tensors
    (``dy``: ``|y - y_prev|`` when the caller has it already).

    NaN where it carries no information: no move, or a change of gradient within the
    rounding noise (:func:`noise_floor`) of the gradients' size, where rounding would
    dominate the quotient (near convergence).
    """
    dy = _dist(ys, ys_prev, k) if dy is None else dy
    dg = _dist(gs, gs_prev, k)
    scale = _sq_norm(gs, k).sqrt() + _sq_norm(gs_prev, k).sqrt()
    return _quotient(torch, dy, dg, noise_floor(gs[0].dtype) * scale)


def _quotient(xp, dy, dg, floor):
    ok = (dy > 0) & (dg > floor)
    return xp.where(ok, dg / xp.where(ok, dy, 1.0), math.nan)


def probe_lr(ys, gs, k: int) -> Tensor:
    """Step of the first, probing move: length ``PROBE * max(|y|, 1)`` along ``-g``, and
    at least ten units of rounding of ``y``'s dtype (a shorter move would not change a
    bfloat16 ``y`` at all)."""
    ny = _sq_norm(ys, k).sqrt()
    ng = _sq_norm(gs, k).sqrt()
    length = max(PROBE, 10 * torch.finfo(ys[0].dtype).eps) * torch.clamp(ny, min=1.0)
    return torch.where(ng > 0, length / ng, torch.ones_like(ng))


def online_lipschitz(states: Sequence[dict], ys, gs, k: int) -> Tensor:
    """The step ``1/L_k`` from the secant estimate; updates ``states`` (one per tensor).

    Until a secant has been accepted the step is a probe, ten times longer at every step
    that brings none: a probe whose gradient change drowns in rounding gives no estimate.
    """
    s0 = states[0]
    prev = None
    if "lipschitz" not in s0:
        probe = probe_lr(ys, gs, k)
        L = torch.zeros_like(probe)
        lr = _advance(torch, None, None, None, L, probe)[2]
    else:
        ys_prev, gs_prev = [s["prev_y"] for s in states], [s["prev_g"] for s in states]
        floor = noise_floor(gs[0].dtype)
        # the four sums in one pass on CPU tensors (the fused loop's library), and the rule on
        # the per-instance numbers in numpy (torch's dispatch: ~100 us a step); else in PyTorch
        fused = secant_sums(ys, gs, ys_prev, gs_prev, k)
        records = (s0["lipschitz"], s0["probe_lr"])
        if fused is not None and all(t.dtype == torch.float64 and t.device.type == "cpu" for t in records):
            sums, *prev = fused
            dy, dg, ng, ngp = np.sqrt(sums.numpy()).T
            shape = records[0].shape
            L, probe, lr = (torch.from_numpy(v).reshape(shape) for v in _advance(
                np, dy, dg, floor * (ng + ngp), records[0].numpy().reshape(-1), records[1].numpy().reshape(-1)))
        else:
            dy = _dist(ys, ys_prev, k)
            dg = _dist(gs, gs_prev, k)
            L, probe, lr = _advance(torch, dy, dg, floor * (_sq_norm(gs, k).sqrt() + _sq_norm(gs_prev, k).sqrt()),
                                    *records)
    for i, (s, y, g) in enumerate(zip(states, ys, gs)):
        s["lipschitz"] = L
        s["probe_lr"] = probe
        # new copies, not copy_ into the old ones: under torch.compile (torch 2.13) a copy_
        # from the parameter, which the step then overwrites, stores the new value
        s["prev_y"] = y.detach().clone() if prev is None else prev[0][i]
        s["prev_g"] = g.detach().clone() if prev is None else prev[1][i]
    return lr


def _advance(xp, dy, dg, floor, L, probe):
    """The estimate's rule per instance, on tensors or numpy arrays (``xp`` their module):
    from ``|y - y_prev|``, ``|g - g_prev|`` and the rounding floor of ``dg`` (``dy is None``:
    the first step, no secant yet) and the previous ``L`` and probe, the new ``L``, probe
    and step."""
    if dy is not None:
        L = xp.fmax(L, _quotient(xp, dy, dg, floor))  # fmax ignores the NaN of a rejected secant
        # A probe that did not move at all hit a fixed point of the prox-gradient map: the
        # point is optimal (e.g. x = 0 when lam >= |grad f(0)|_inf), and a longer probe would
        # grow without end (to inf, then NaN). Lengthen only probes that moved.
        longer = 10 * probe
        probe = xp.where((L > 0) | (dy == 0), probe, xp.where(longer > MAX_PROBE, MAX_PROBE, longer))
    return L, probe, xp.where(L > 0, 1.0 / xp.where(L > 0, L, 1.0), probe)


def _as_values(f, inst: tuple[int, ...], k: int) -> Tensor:
    """A closure's value in float64: one per instance (shape ``inst``), or a scalar.

    A scalar means the instances are checked jointly (the sum of their losses).
    """
    if not isinstance(f, Tensor):
        f = torch.tensor(float(f), dtype=torch.float64)
    f = f.detach().double()
    if f.numel() == 1:
        return f.reshape(())
    if k and f.numel() == math.prod(inst[:k]):
        return f.reshape(inst)
    raise ValueError(
        f"the closure returned a loss of shape {tuple(f.shape)}; with lr=None it must return a "
        f"scalar, or one loss per instance (shape {tuple(inst[:k])})"
    )


def _evaluate(closure: Callable, params: Sequence[Tensor], points: Sequence[Tensor], k: int,
              inst: tuple[int, ...]) -> tuple[Tensor, list[Tensor]]:
    """f at ``points`` (params temporarily moved there) and its gradients; params restored."""
    saved = [p.detach().clone() for p in params]
    try:
        for p, z in zip(params, points):
            p.copy_(z)
        with torch.enable_grad():
            f = closure()
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)
    return _as_values(f, inst, k), grads


def backtracking_lipschitz(
    closure: Callable,
    params: Sequence[Tensor],
    states: Sequence[dict],
    gs: Sequence[Tensor],
    loss,
    prox: str,
    prox_params: dict,
    k: int,
) -> Tensor:
    """The constant ``L`` of Beck-Teboulle backtracking (the step is ``1/L``); reads
    ``states`` and leaves storing ``L`` to the caller.

    ``loss`` is the closure's value at the current point: a scalar, or one value per
    instance (then each instance backtracks on its own). Raises :class:`NonFiniteLoss`
    for a NaN or Inf loss at the current point or at every trial point, and
    ``RuntimeError`` when no trial satisfies the descent lemma.
    """
    inst = instance_shape(params[0], k)
    f_y = _as_values(loss, inst, k)
    if not bool(torch.isfinite(f_y).all()):
        raise NonFiniteLoss(
            f"the closure returned NaN or Inf at the current point{_which(~torch.isfinite(f_y))}; "
            "nothing was updated. Backtracking (lr=None with a closure) compares losses: look for "
            "an overflow or a log of zero in the loss, or pass nonfinite='skip' to skip such steps."
        )
    joint = f_y.dim() == 0
    ys = [p.detach() for p in params]
    s0 = states[0]
    if "lipschitz" not in s0:  # secant from a probe point gives the starting L
        lr0 = probe_lr(ys, gs, k)
        # A probe whose gradient change drowns in rounding (half precision) brings no secant:
        # ten times longer. Backtracking only raises L, so a start too small is the safe side.
        for _ in range(PROBE_TRIES):
            probe = [y - lr0.to(y.dtype) * g for y, g in zip(ys, gs)]
            _, g_probe = _evaluate(closure, params, probe, k, inst)
            L = secant(probe, g_probe, ys, gs, k)
            found = torch.isfinite(L) & (L > 0)
            if bool(found.all()):
                break
            lr0 = torch.where(found, lr0, 10 * lr0)
        L = torch.where(found, L, 1.0 / lr0)
    else:
        L = s0["lipschitz"].clone()
    tiny = 10 * torch.finfo(ys[0].dtype).eps
    seen = torch.zeros_like(f_y, dtype=torch.bool)  # a NaN or Inf loss at some trial point
    for _ in range(MAX_BACKTRACKS):
        cand = [prox_grad_step_reference(y, g, y, 1.0 / L, 1.0, 0.0, prox, prox_params)[0]
                for y, g in zip(ys, gs)]
        f_c, _ = _evaluate(closure, params, cand, k, inst)
        d = [c - y for c, y in zip(cand, ys)]
        model = _dot(gs, d, k) + 0.5 * L * _sq_norm(d, k)
        if joint:
            model = model.sum()
        ok = f_c <= f_y + model + tiny * f_y.abs()  # NaN or inf at the candidate: not ok
        seen |= ~torch.isfinite(f_c)
        if bool(ok.all()):
            break
        L = torch.where(ok, L, L * ETA)
    # Failed: no trial accepted, or, past NaN losses, only one too short to move the iterate.
    # Either would raise L for good and freeze the iterate silently.
    moved = _dist(cand, ys, k) > 0
    failed = ~ok | (seen & ~(moved.any() if joint else moved))
    if not bool(failed.any()):
        return L
    if bool((failed & seen).any()):
        raise NonFiniteLoss(
            f"the closure returned NaN or Inf at every trial point of backtracking{_which(failed & seen)}, "
            f"down to steps of {float((1 / L).min()):.1e}, though it is finite at the current point; "
            "nothing was updated. The loss overflows or leaves its domain along the step: look for an "
            "overflow in the loss, or pass nonfinite='skip' to skip such steps."
        )
    raise RuntimeError(
        f"backtracking found no step satisfying the descent lemma in {MAX_BACKTRACKS} trials"
        f"{_which(failed)}; nothing was updated. The closure's loss is noisier than a step's decrease, "
        "or does not match the gradient it leaves in .grad: it must return the smooth loss f (without "
        "r) whose gradient it computes, deterministically."
    )


def _which(bad: Tensor) -> str:
    """`` (instances i, j, ...)`` for per-instance flags; empty for one joint value."""
    if bad.numel() == 1:
        return ""
    idx = bad.reshape(-1).nonzero().flatten().tolist()
    return f" (instances {', '.join(map(str, idx[:5]))}{', ...' if len(idx) > 5 else ''})"
