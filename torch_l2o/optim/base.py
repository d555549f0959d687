"""What every optimizer of ``F = f + r`` here shares: groups, checks, step sizes, state.

The parameter holds ``y``, the point where autograd takes the gradient of the smooth
loss ``f``; the prox iterate ``x`` (where ``r`` is evaluated, the sparse point) lives
in ``self.state[param]["x"]`` and :meth:`ProxOptimizer.solution` returns it.
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..prox import get_prox
from . import stepsize

_NONFINITE = ("raise", "skip")


def _fits(shape, target) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without enlarging it."""
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _strip_trailing_ones(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    while shape and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _all_finite(g: Tensor) -> Tensor:
    """Whether every element of ``g`` is finite, as a 0-dim bool tensor (no sync). Below
    float64 the float64 sum is exact for this (it cannot overflow: |sum| <= n * 3.4e38,
    and NaN or +-Inf propagate into it) and 2-4x faster than ``isfinite(g).all()`` from
    1e4 elements on a CPU: no boolean tensor is written. Devices without float64 (MPS)
    take ``isfinite(g).all()``."""
    if g.dtype == torch.float64 or g.device.type not in ("cpu", "cuda"):
        return torch.isfinite(g).all()
    return torch.isfinite(g.sum(dtype=torch.float64))


class ProxOptimizer(Optimizer):
    """Base class: a ``torch.optim.Optimizer`` for composite objectives ``f + r``.

    Group options common to all subclasses:

    * ``lr``: the step size (a number, a tensor with one value per instance such as
      ``(B, 1)`` for a ``(B, n)`` parameter, or ``None`` for the automatic step of
      :mod:`torch_l2o.optim.stepsize`). A group given ``lr=None`` holds ``lr=1.0`` and
      ``lr_auto=True``: its ``lr`` then multiplies the automatic step, so that LR
      schedulers scale it;
    * ``prox``, ``lam``, ``prox_params``: the non-smooth term, by registered name, its
      strength ``lam`` and any further strengths (``lo``, ``hi``, ``lam2``, ``dim``).
      A prox with a strength ``lam`` needs it, as ``lam`` or in ``prox_params``;
    * ``instance_dims``: how many leading dims of each parameter index independent
      problem instances (inferred from a tensor ``lr``; else 0);
    * ``nonfinite``: ``"raise"`` (default) or ``"skip"`` when a gradient holds NaN or
      Inf, or when backtracking meets a loss that is NaN or Inf. Either way nothing is
      written; a skipped step is counted in ``state[p]["skipped_steps"]``.
    """

    # lr=None: the step is auto_lr_scale / L_estimate. Learned optimizers that scale the step
    # by p in (0, 2) halve it by default: the secant estimate runs below L (about 0.7 L on
    # LASSO), and 2 / (0.7 L) is past the stability limit 2 / L; weights whose card records
    # a calibrated multiplier use that.
    auto_lr_scale: float = 1.0
    # state that lives in the parameter's dtype; load_state_dict keeps every other
    # state tensor's saved dtype (torch would cast them all to the parameter's)
    _param_like_keys: tuple[str, ...] = ("x", "prev_y", "prev_g", "sg_T")

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        defaults.setdefault("prox", "none")
        defaults.setdefault("lam", None)
        defaults.setdefault("prox_params", None)
        defaults.setdefault("instance_dims", None)
        defaults.setdefault("nonfinite", "raise")
        super().__init__(params, defaults)

    # ------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        ps = group["params"]
        group["params"] = [ps] if isinstance(ps, Tensor) else list(ps)
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        self._check_group(group)  # before torch stores it: a bad group leaves nothing behind
        super().add_param_group(group)

    def _check_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        for p in group["params"]:
            if isinstance(p, Tensor) and (p.is_complex() or not p.is_floating_point()):
                raise TypeError(
                    f"{name} optimizes real floating-point tensors, got dtype {p.dtype}; "
                    "for complex parameters optimize torch.view_as_real(param) instead"
                )
        if group["nonfinite"] not in _NONFINITE:
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {group['nonfinite']!r}")
        pp = self.prox_params(group)  # unknown names and bad strengths fail here
        lr = group["lr"]
        if lr is None:  # a number, for LR schedulers to scale: the multiplier of the automatic step
            lr = group["lr"] = 1.0
            group["lr_auto"] = True
        group.setdefault("lr_auto", False)
        if isinstance(lr, Tensor):
            if not lr.is_floating_point() or not bool(torch.isfinite(lr).all()) or bool((lr <= 0).any()):
                raise ValueError(f"{name}: lr must be positive and finite")
            if group["instance_dims"] is None:
                group["instance_dims"] = len(_strip_trailing_ones(lr.shape))
        else:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
                raise ValueError(
                    f"{name}: lr must be a positive finite number, a tensor of per-instance steps, "
                    f"or None for the automatic step size; got {lr!r}"
                )
        if group["instance_dims"] is None:
            group["instance_dims"] = 0
        k = group["instance_dims"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"{name}: instance_dims must be an int >= 0, got {k!r}")
        lead = None
        for p in group["params"]:
            if p.dim() <= k:
                # every entry its own problem, with its own step and restarts: almost always a
                # 1-D parameter meant as one problem, which would run on silently and worse
                raise ValueError(
                    f"{name}: a parameter of shape {tuple(p.shape)} with instance_dims={k} leaves no dims "
                    f"for the coordinates of an instance; for one problem use instance_dims=0 (the default), "
                    f"for a batch of scalar problems give the parameter a trailing dim of size 1"
                )
            if lead is None:
                lead = tuple(p.shape[:k])
            elif tuple(p.shape[:k]) != lead:
                raise ValueError(
                    f"{name}: parameters of one group must share their instance dims, got "
                    f"{lead} and {tuple(p.shape[:k])}"
                )
            if isinstance(lr, Tensor):
                self._lr_for(lr, p, k)
            for key, v in pp.items():  # per-instance or per-coordinate strengths must fit every parameter
                if isinstance(v, Tensor) and v.dim() and not _fits(v.shape, p.shape):
                    raise ValueError(
                        f"{name}: prox parameter {key!r} of shape {tuple(v.shape)} does not broadcast to the "
                        f"parameter's shape {tuple(p.shape)}; give a number, one value per instance shaped "
                        f"{tuple(p.shape[:k]) + (1,) * (p.dim() - k)}, or one per coordinate"
                    )

    @staticmethod
    def _lr_for(lr: float | Tensor | None, p: Tensor, k: int):
        """``lr`` shaped for parameter ``p``: a number, or a tensor of its instance shape."""
        if not isinstance(lr, Tensor):
            return lr
        if _strip_trailing_ones(lr.shape) != _strip_trailing_ones(p.shape[:k]):
            raise ValueError(
                f"lr of shape {tuple(lr.shape)} does not fit a parameter of shape {tuple(p.shape)} "
                f"with instance_dims={k}: give one step per instance, shaped {tuple(p.shape[:k]) + (1,)}"
            )
        return lr.detach().to(p.device).reshape(stepsize.instance_shape(p, k))

    @staticmethod
    def prox_params(group: dict[str, Any]) -> dict[str, Any]:
        """The group's prox strengths, resolved and checked."""
        spec = get_prox(group["prox"])
        params = dict(group.get("prox_params") or {})
        lam = group.get("lam")
        if "lam" in spec.defaults:
            if lam is not None:
                params.setdefault("lam", lam)
            elif "lam" not in params:  # a default of 0 would silently drop r
                raise ValueError(f"prox {spec.name!r} needs its strength: pass lam=... "
                                 "(or prox_params={'lam': ...}; lam=0 for none)")
        elif lam not in (0, 0.0, None):
            accepted = ", ".join(spec.defaults) or "none"
            raise ValueError(f"prox {spec.name!r} takes no strength lam (its parameters: {accepted})")
        return spec.resolve(params)

    # ------------------------------------------------------------ reading x

    def solution(self, p: Tensor) -> Tensor:
        """The prox iterate ``x_k`` of parameter ``p``: the point to use at the end.

        The parameter itself holds ``y_k``, where the gradient is taken (for FISTA and
        the learned optimizers an extrapolated point, not sparse). Before any step
        this is ``p`` itself.
        """
        if not any(p is q for g in self.param_groups for q in g["params"]):
            raise ValueError("solution(p): p is not a parameter of this optimizer")
        x = self.state[p].get("x") if p in self.state else None
        return (x if x is not None else p).detach()

    # ------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One step. ``closure`` (optional) re-evaluates the smooth loss and its gradient;
        with ``lr=None`` it enables backtracking (it must then return the smooth loss,
        a scalar or one value per instance)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for gi, group in enumerate(self.param_groups):
            ps, gs = [], []
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients (group {gi}, "
                        f"parameter {pi}); use a dense gradient (e.g. nn.Embedding(sparse=False))"
                    )
                if g.is_complex():
                    raise RuntimeError(
                        f"{type(self).__name__} got a complex gradient (group {gi}, parameter {pi}); "
                        "optimize torch.view_as_real(param) instead"
                    )
                ps.append(p)
                gs.append(g)
            work.append((group, ps, gs))
        if self._skip_nonfinite(work):
            return loss
        # every group's step first, then the updates: a step refused in a later group
        # (backtracking on a NaN loss) leaves the earlier ones unwritten
        plans = []
        for gi, (group, ps, gs) in enumerate(work):
            if not ps:
                continue
            pp = self.prox_params(group)
            states = [self.state[p] for p in ps]
            self._init_state(group, ps, states)
            lr, L = group["lr"], None
            if lr is None or group.get("lr_auto"):  # None: set by hand, or from an older state dict
                try:
                    auto, gs, L = self._auto_lr(group, ps, gs, states, pp, closure, loss)
                except stepsize.NonFiniteLoss as e:
                    if group["nonfinite"] == "raise":
                        raise stepsize.NonFiniteLoss(f"{type(self).__name__}, group {gi}: {e}") from None
                    self._count_skipped(work)
                    return loss
                lr = auto if lr is None else auto * lr
            plans.append((group, ps, gs, states, lr, L, pp))
        for group, ps, gs, states, lr, L, pp in plans:
            if L is not None:
                for s in states:
                    s["lipschitz"] = L
            k = group["instance_dims"]
            self._update(group, ps, gs, states, [self._lr_for(lr, p, k) for p in ps], pp,
                         {"closure": closure, "loss": loss})
        return loss

    def _skip_nonfinite(self, work) -> bool:
        """Check every gradient before anything is written; one device sync."""
        # meta tensors hold no values to check (shape-only runs, as torch.optim allows them)
        flat = [(group, p, g) for group, ps, gs in work for p, g in zip(ps, gs) if g.device.type != "meta"]
        if not flat:
            return False
        if len(flat) == 1 and bool(_all_finite(flat[0][2])):  # one tensor: no stack and copy (~10 us)
            return False
        finite = torch.stack([_all_finite(g) for _, _, g in flat]).cpu()
        if bool(finite.all()):
            return False
        bad = [(group, p) for (group, p, _), ok in zip(flat, finite.tolist()) if not ok]
        if any(group["nonfinite"] == "raise" for group, _ in bad):
            gi = next(i for i, g in enumerate(self.param_groups) if g is bad[0][0])
            pi = next(i for i, q in enumerate(bad[0][0]["params"]) if q is bad[0][1])
            raise FloatingPointError(
                f"{type(self).__name__}: the gradient of parameter {pi} in group {gi} holds NaN or Inf; "
                "nothing was updated. Look for an overflow or a division by zero in the loss, "
                "lower the step size, or pass nonfinite='skip' to skip such steps."
            )
        self._count_skipped(work)
        return True

    def _count_skipped(self, work) -> None:
        for _, ps, _ in work:
            for p in ps:
                st = self.state[p]
                st["skipped_steps"] = st.get("skipped_steps", 0) + 1

    def _auto_lr(self, group, ps, gs, states, pp, closure,
                 loss) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """The automatic step, the gradients to step with, and (backtracking) the constant
        ``L`` for the state, stored once every group has its step."""
        k = group["instance_dims"]
        if closure is None:
            lr = stepsize.online_lipschitz(states, [p.detach() for p in ps], gs, k)
            return self.auto_lr_scale * lr, gs, None
        gs = [g.clone() for g in gs]  # backtracking calls the closure, which may zero p.grad in place
        try:
            L = stepsize.backtracking_lipschitz(closure, ps, states, gs, loss, group["prox"], pp, k)
            # 1/L passed the descent lemma; a longer step would void what rests on it (the
            # safeguard's guarantee), so a multiplier above 1 applies to the secant estimate only
            return min(self.auto_lr_scale, 1.0) / L, gs, L
        finally:
            for p, g in zip(ps, gs):
                p.grad = g  # the gradient at y, as the user's closure left it

    # ------------------------------------------------------------ subclasses

    def _init_state(self, group, ps, states) -> None:
        """Create the per-parameter state at a parameter's first step."""
        for s in states:
            s.setdefault("step", 0)

    def _update(self, group, ps, gs, states, lrs, prox_params, ctx) -> None:
        """Apply the update rule in place; ``ctx`` holds the step's ``closure`` and ``loss``."""
        raise NotImplementedError

    # ------------------------------------------------------------ state dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, except that only the iterates
        (``x`` and the step-size mechanism's copies) are cast to the parameter's dtype:
        momentum and step-size sequences (float64), recurrent states (float32) and
        counters keep their saved dtype. An option the saved groups lack (a state saved
        before it existed, such as ``handoff``) keeps this optimizer's value, as torch's
        optimizers default a new option in ``__setstate__``."""
        current = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        keep, cast = {}, {}
        for sid, p in zip(saved_ids, params):
            st = state_dict["state"].get(sid, {})
            keep[p] = {k: v for k, v in st.items() if k not in self._param_like_keys and isinstance(v, Tensor)}
            cast[p] = {k: v for k, v in st.items() if k in self._param_like_keys and isinstance(v, Tensor)}
        super().load_state_dict(state_dict)
        for group, options in zip(self.param_groups, current):
            for k, v in options.items():
                group.setdefault(k, v)
        for p, vals in keep.items():
            for k, v in vals.items():
                self.state[p][k] = v.detach().clone().to(p.device)
        for p, vals in cast.items():  # a cast that changed nothing returns the saved tensor itself:
            for k, v in vals.items():  # a live optimizer's state_dict would then share (and race on) it
                if self.state[p][k].data_ptr() == v.data_ptr():
                    self.state[p][k] = self.state[p][k].clone()
