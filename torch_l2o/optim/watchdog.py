r"""The watchdog: a learned step that diverges without a closure is caught and replaced.

Without a closure the objective is unknown, but every step has the prox-gradient
residual at its gradient point,

.. math::
    G_k = \|T y_k - y_k\| / s,\qquad T y = \operatorname{prox}_{s r}(y - s\nabla f(y)),

which tends to zero for any convergent method and is what FISTA would step to. Per
instance, the watchdog keeps the running minimum ``m_k`` of ``G`` and the gradient
point ``y*`` where it was reached; an instance whose residual jumps above
``KAPPA * max(m_{k-1}, EPS * G_0)`` is *diverging*, and one whose running minimum has not
halved in ``PATIENCE`` steps while above ``STALL_EPS * G_0`` is *stalled*. From then on it
leaves the learned step for good: it restarts at ``y*`` and takes FISTA steps with adaptive restart
(O'Donoghue & Candes), which converge on every convex problem with ``s <= 1/L``;
ISTA steps for architectures without a separate prox iterate. The optimizer warns at
the first such instance of a param group and marks every one in ``state[p]["watchdog"]``
(``p`` the group's first parameter).

**Handoff.** The same record serves a second, planned exit: with ``handoff=h`` an
instance whose residual reaches ``G_k <= h G_0`` leaves the learned step for good and
continues with FISTA-restart steps *from where it is* (the step that hands off is
FISTA-restart's from ``(y_k, x_k)`` with ``t = 1``, a restart; ISTA steps from ``y_k`` for
architectures without a separate prox iterate, such as MathGD), without a warning; it is
marked in ``state[p]["handoff"]``, not in ``"watchdog"``. Why: out of their training
family the learned steps gain most early and least late (PA-GRU's mixture weights reach
1e-3 relative error in 0.56-0.89x FISTA-restart's iterations on the ood suite's twelve
sets, median 0.68, and 1e-6 in 0.72-1.23x), where FISTA-restart, on an identified
support, converges linearly. The threshold is calibrated
per weights on held instances of their own family (``pretrained/train.py
--calibrate-handoff``) and read from the card; the single-family weights, faster than
FISTA-restart to the end in their family, have none.

``KAPPA = 10`` and ``EPS = 1e-6`` come from measurement: with the shipped LASSO weights in
distribution (64 instances, 1000 iterations, PA, PA-GRU, PA-MR, known and estimated
steps) the residual never rose above 2.1x its running minimum; on the failures it is
built for (lam / 5, Gaussian ``A`` and ``b``) it rose 54x to 1e18x. ``EPS`` keeps the
float32 noise floor of a converged run from counting as a jump; in lower precision the
floors are ``10 eps`` and ``100 eps`` of the dtype (bf16: 0.08 and 0.8). The stall rule catches
PA-MR on Gaussian ``A`` and ``b``, where half the instances oscillate at relative error
~10 with the residual between 0.1x and 1.5x its start, never jumping.

L2O-DM and RNNProp have neither a prox-gradient map nor a step size to fall back with:
for them :func:`watch_gradient` watches the gradient norm and only reports.

Cost: one prox-gradient evaluation and a per-instance norm per step (on CPU tensors one
pass of the fused loop's prox, :func:`torch_l2o.kernels.cpu_step.prox_residuals`), plus
one copy of the parameters (``y*``); none once every instance of a group has fallen back
or handed off (the optimizer then skips the network too). ``G`` is computed in the compute dtype
(float32 for bf16/fp16 parameters), not rounded to the storage dtype: at a half-precision
fixed point it is the rounding's small residual, not 0, so a half-precision run near its
floor is handed to FISTA-restart sooner. The per-instance bookkeeping (:func:`_records`)
runs in torch on a GPU and in numpy on the records' memory on the CPU; for a group of one
CPU tensor the residual, the records and the best point's copy take one call of the fused
loop's library (:func:`torch_l2o.kernels.cpu_step.watch_records`, tested against
:func:`_records`): on a 10-coordinate problem the numpy path cost ~150 us a step, more
than half the learned step, and the one call ~60 us.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..kernels.cpu_step import prox_residuals, watch_records
from ..kernels.reference import prox_point_reference
from .functional import fista_update
from .stepsize import instance_shape

KAPPA = 10.0
EPS = 1e-6
PATIENCE = 30
STALL_EPS = 1e-5
# L2O-DM and RNNProp: no prox-gradient map and no step size, so no classical step to fall
# back to; the gradient norm is watched and a jump is reported (see watch_gradient)
KAPPA_GRAD = 100.0
FLOOR_GRAD = 1e-4


@dataclass
class Plan:
    """What to write after the learned step: instances ``mask`` (per instance) take ``xs``,
    ``ys``; ``done``: every instance is off the learned step and the fallback step has
    already been taken in place (nothing to write, no network to run)."""

    mask: Tensor
    xs: list[Tensor]
    ys: list[Tensor]
    done: bool = False


_LIBRARIES = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(torch.__file__))


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the caller's ``opt.step()`` line, past our
    frames and torch's optimizer wrappers (their depth varies with torch's version)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        frame, level = frame.f_back, level + 1
    return level


def _per_instance(v: Tensor, p: Tensor, k: int) -> Tensor:
    return v.reshape(instance_shape(p, k))


def _sq_norm(vs, k: int, shape: tuple[int, ...]) -> Tensor:
    """Squared norm per instance (shape ``shape``) of the tensors ``vs`` taken together, in
    float64, one tensor at a time (``vs`` may be a generator). Few ops on purpose: on a
    small problem each costs ~4 us of dispatch, more than the learned step itself."""
    G2 = None
    for v in vs:
        dims = tuple(range(k, v.dim()))
        n2 = torch.linalg.vector_norm(v, dim=dims, dtype=torch.float64).reshape(shape).square() if dims else \
            v.double().square().reshape(shape)
        G2 = n2 if G2 is None else G2 + n2
    return G2


def check(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict], lrs: Sequence,
          prox: str, prox_params: dict, k: int, extrapolates: bool, name: str, s0: dict,
          handoff: float | None = None) -> Plan | None:
    """Watch one param group's step (before the learned update writes anything); returns
    the fallback to apply after it, or ``None`` while every instance behaves. ``s0`` holds
    the group's per-instance record (the state of its first parameter); ``handoff``: the
    relative residual ``G / G_0`` at which an instance hands off to FISTA-restart (``None``:
    never)."""
    ys = [p.detach() for p in params]
    for s, y in zip(states, ys):
        if "wd_best" not in s:
            s["wd_best"] = y.clone()
    if "watchdog" in s0:
        if "handoff" not in s0:  # a state from before the handoff (not setdefault: no tensor per step)
            s0["handoff"] = torch.zeros_like(s0["watchdog"])
        off = _off(s0)
        if bool(_host(off).all()):  # all left the learned step for good: nothing left to watch
            return _fallback(ys, grads, states, lrs, prox, prox_params, k, extrapolates, s0, off,
                             torch.zeros_like(off), inplace=True)
    eps = torch.finfo(params[0].dtype).eps
    if "wd_min" in s0 and len(ys) == 1:  # the common case in one call of the fused CPU loop's library
        done = watch_records(ys[0], grads[0], lrs[0], prox, prox_params, k, s0, states[0]["wd_best"], _rule(eps),
                             handoff or 0.0)
        if done is not None:
            count, new = done
            if count == 0:
                return None
            return _verdict(ys, grads, states, lrs, prox, prox_params, k, extrapolates, name, s0, _off(s0), new)
    # G per instance in float64: one pass of the fused CPU loop's prox where it serves
    shape = tuple(params[0].shape[:k])
    G2 = prox_residuals(ys, grads, lrs, prox, prox_params, k)
    if G2 is None:
        G2 = _sq_norm(((prox_point_reference(y, g, lr, 1.0, prox, prox_params) - y) for y, g, lr in zip(ys, grads, lrs)),
                      k, shape)
    G2 = G2.reshape(shape)
    if "wd_min" not in s0:
        G = _residual(torch, G2, lrs[0], shape)
        s0.update(wd_G0=G.clone(), wd_min=G.clone(), wd_mark=G.clone(), wd_t=torch.ones_like(G),
                  wd_since=torch.zeros(shape, dtype=torch.int64, device=G.device),
                  watchdog=torch.zeros(shape, dtype=torch.bool, device=G.device),
                  handoff=torch.zeros(shape, dtype=torch.bool, device=G.device))
        return None
    # The per-instance bookkeeping: a few dozen operations on B numbers. On the CPU they run in
    # numpy on the records' own memory (about 1 us each against torch's ~4 us of dispatch: a
    # third of a small problem's learned step); on a GPU in torch.
    cpu = G2.device.type == "cpu"
    xp = np if cpu else torch
    rec = {key: _host(s0[key]) if cpu else s0[key]
           for key in ("wd_min", "wd_mark", "wd_since", "wd_G0", "watchdog", "handoff")}
    G = _residual(xp, _host(G2) if cpu else G2, lrs[0], shape)
    better, new = _records(xp, G, rec, eps, handoff)
    if not cpu or better.any():
        b = torch.as_tensor(better) if cpu else better  # numpy gives scalars for 0-dim records
        for s, y in zip(states, ys):
            s["wd_best"] = torch.where(_per_instance(b, y, k), y, s["wd_best"])
    new = torch.as_tensor(new) if cpu else new
    off = _off(s0)  # after the records: those handed off now included
    if not bool((off | new).any()):
        return None
    return _verdict(ys, grads, states, lrs, prox, prox_params, k, extrapolates, name, s0, off, new)


def _off(s0: dict) -> Tensor:
    """The instances that have left the learned step for good: fallen back, or handed off."""
    return s0["watchdog"] | s0["handoff"]


def _verdict(ys, grads, states, lrs, prox, prox_params, k, extrapolates, name, s0, off, new) -> Plan:
    """Some instance has left the learned step (``off``: fallen back or handed off) or falls
    back now (``new``): warn at the group's first failure, and plan the fallback step."""
    if bool(new.any()) and not bool(s0["watchdog"].any()):  # once per group: later ones are only counted
        warnings.warn(
            f"{name}: the learned step diverged or stalled on {int(new.sum())} instance(s) (prox-gradient "
            f"residual over {KAPPA:g}x its running minimum, or not halved in {PATIENCE} steps); they continue "
            f"from their best point with "
            f"{'FISTA-restart' if extrapolates else 'ISTA'} steps. This problem is likely outside the weights' "
            "training family, or so ill-conditioned that the learned step gains nothing: see "
            "state[p]['watchdog'], or pass watchdog=False to turn this off.",
            RuntimeWarning, stacklevel=_user_stacklevel())
    return _fallback(ys, grads, states, lrs, prox, prox_params, k, extrapolates, s0, off, new)


def _host(t: Tensor):
    """A CPU tensor's numpy view (same memory: writes go to the tensor)."""
    return t.detach().numpy() if t.device.type == "cpu" else t


def _residual(xp, G2, step, shape):
    """``G = sqrt(G2) / s`` per instance (float64; NaN counts as infinite). ``step`` is read
    every step: ``lr=None`` estimates it, a scheduler may change it."""
    if isinstance(step, Tensor):
        step = step.detach().to(torch.float64)
        step = step.reshape(()) if step.numel() == 1 else step.reshape(shape)
        step = _host(step) if xp is np else step
    G = xp.sqrt(G2) / step
    if xp is torch:
        return torch.nan_to_num(G, nan=torch.inf)
    # as torch.nan_to_num(nan=inf) (numpy's costs ~15 us of Python): NaN -> inf, inf -> the largest float
    return np.where(np.isnan(G), np.inf, np.minimum(G, np.finfo(np.float64).max))


def _rule(eps: float) -> tuple[float, float, float, int]:
    """``(KAPPA, jump floor, stall floor, PATIENCE)`` for iterates of machine epsilon ``eps``."""
    return KAPPA, KAPPA * max(EPS, 10 * eps), max(STALL_EPS, 100 * eps), PATIENCE


def _records(xp, G, rec, eps, handoff=None):
    """Update the running minimum, its mark and the steps since it last halved, in place
    (``rec``: the arrays of ``wd_min``, ``wd_mark``, ``wd_since``, ``wd_G0``, ``watchdog``,
    ``handoff``; numpy views or tensors, ``xp`` their module), and mark in ``handoff`` the
    instances whose residual reached ``handoff * G_0`` now; returns ``better`` (a new
    minimum) and ``new`` (diverging or stalled now, not off the learned step before)."""
    off, wd_min, G0 = rec["watchdog"] | rec["handoff"], rec["wd_min"], rec["wd_G0"]
    kappa, jump_floor, stall_floor, patience = _rule(eps)
    jump = G > xp.maximum(kappa * wd_min, jump_floor * G0)
    better = (G < wd_min) & ~(off | jump)
    wd_min[...] = xp.where(better, G, wd_min)
    halved = wd_min <= 0.5 * rec["wd_mark"]
    rec["wd_mark"][...] = xp.where(halved, wd_min, rec["wd_mark"])
    since = rec["wd_since"]
    since[...] = xp.where(halved, 0, since + 1)
    stall = (since >= patience) & (wd_min > stall_floor * G0)
    new = (jump | stall) & ~off
    if handoff:
        rec["handoff"][...] = rec["handoff"] | ((G <= handoff * G0) & ~(off | new))
    return better, new


def _fallback(ys, grads, states, lrs, prox, prox_params, k, extrapolates, s0, off, new, inplace=False) -> Plan:
    """The instances already off the learned step (``off``; one handed off this step
    included: its ``t`` is still 1, a restart) take the FISTA-restart step (the optimizer's
    own update function), or the ISTA step T y_k; those falling back now (``new``) restart
    at their best point; the state of the others is left as it is. ``inplace`` (every
    instance off, none new): FISTA-restart's step is taken in place, as ``torch_l2o.FISTA``
    takes it, and the plan is done (an out-of-place step and its copy-back cost 1.5x)."""
    t = s0["wd_t"]
    if inplace and extrapolates:
        _, _, s0["wd_t"] = fista_update(ys, grads, [s["x"] for s in states], t, lrs=lrs, prox=prox,
                                        params=prox_params, restart=True, instance_dims=k, inplace=True)
        return Plan(off, [], [], done=True)
    if extrapolates:
        xs_f, ys_f, t_f = fista_update(ys, grads, [s["x"] for s in states], t, lrs=lrs, prox=prox,
                                       params=prox_params, restart=True, instance_dims=k)
    else:
        zs = [prox_point_reference(y, g, lr, 1.0, prox, prox_params).to(y.dtype) for y, g, lr in zip(ys, grads, lrs)]
        xs_f, ys_f, t_f = zs, zs, t
    s0["wd_t"] = torch.where(new, torch.ones_like(t), torch.where(off, t_f, t))
    xs_new, ys_new = [], []
    for x_f, y_f, s in zip(xs_f, ys_f, states):
        nw = _per_instance(new, x_f, k)
        xs_new.append(torch.where(nw, s["wd_best"], x_f))  # a diverging instance restarts at its best point
        ys_new.append(torch.where(nw, s["wd_best"], y_f))
    s0["watchdog"] = s0["watchdog"] | new
    return Plan(off | new, xs_new, ys_new)


def apply(plan: Plan, params: Sequence[Tensor], states: Sequence[dict], k: int, extrapolates: bool) -> None:
    """Overwrite the fallen-back instances with the fallback's iterates (after the learned step)."""
    if plan.done:
        return
    for p, s, x, y in zip(params, states, plan.xs, plan.ys):
        m = _per_instance(plan.mask, p, k)
        p.copy_(torch.where(m, y, p))
        if extrapolates:
            s["x"].copy_(torch.where(m, x, s["x"]))


def watch_gradient(grads: Sequence[Tensor], k: int, name: str, horizon: int | None, step: int, s0: dict) -> None:
    r"""Warn-only watch for the output-scaled architectures (L2O-DM, RNNProp), which have no
    prox-gradient residual and no step size, so no classical step with a guarantee to fall
    back to. Per instance it keeps the running minimum ``m_k`` of the gradient norm
    ``G_k = |\nabla f(x_k)|``; a jump above ``KAPPA_GRAD * max(m_{k-1}, FLOOR_GRAD * G_0)``
    marks the instance in ``s0["watchdog"]`` and warns once per param group. Nothing is
    changed: the step is the learned one either way.

    The threshold comes from measurement (``python benchmarks/gradient_watch.py``, 64
    instances, 1000 steps): on the shipped weights' training families within their
    100-step horizon the ratio stays below 53 (L2O-DM on its MLPs; RNNProp 3.7, Adam 3.8
    there and 15 on ReLU MLPs), and on LASSO and L1 logistic (subgradients) below 2; past
    the horizon L2O-DM's jumps reach 1.7e5 on 62 of 64 MLPs (loss from 4e-8 to 2e-3), and
    out of family (ReLU MLPs) both architectures' reach 1e5-1e6 from step ~24 on every
    instance. ``FLOOR_GRAD`` keeps a run already at ``1e-4 G_0`` from being flagged for
    noise at its floor. A stall (L2O-DM and RNNProp on LASSO stop near 1e-3 relative
    error) is not a jump and is not reported."""
    G = torch.nan_to_num(_sq_norm(grads, k, tuple(grads[0].shape[:k])).sqrt_(), nan=torch.inf)
    if "wd_min" not in s0:
        s0.update(wd_G0=G.clone(), wd_min=G.clone(), watchdog=torch.zeros_like(G, dtype=torch.bool))
        return
    off = s0["watchdog"]
    jump = G > KAPPA_GRAD * torch.maximum(s0["wd_min"], FLOOR_GRAD * s0["wd_G0"])
    s0["wd_min"] = torch.where(jump, s0["wd_min"], torch.minimum(s0["wd_min"], G))
    new = jump.logical_and_(~off)
    if not bool(new.any()):
        return
    if not bool(off.any()):  # once per group: later instances are only marked
        trained = (f"Its weights were trained on {horizon}-step runs of one problem family; past that horizon "
                   "or outside that family they need not converge.") if horizon else \
            "A learned step need not converge outside the family and horizon it was trained on."
        warnings.warn(
            f"{name}: at step {step} the gradient norm of {int(new.sum())} instance(s) jumped above "
            f"{KAPPA_GRAD:g}x its running minimum: the learned step is diverging. {trained} Stop earlier and keep the "
            "best iterate, or use a hand-designed optimizer (Adam) for this problem. The instances are marked "
            "in state[p]['watchdog']; watchdog=False turns this off.",
            RuntimeWarning, stacklevel=_user_stacklevel())
    s0["watchdog"] = off | new
