"""Pure update rules, one per optimizer.

Each takes tensors and hyper-parameters and returns the new iterates. The optimizer
classes call them in place under ``no_grad`` (``inplace=True``: the fused prox-step
kernel on CUDA, and for the learned updates a fused step backend of
:mod:`torch_l2o.kernels.fused` when one serves the call, with this code as its tested
reference); meta-training calls the same functions out of place, differentiably. Batched:
a ``(B, n)`` iterate holds ``B`` instances when per-instance quantities (``lr``,
``t``) are shaped ``(B, 1)``.

The learned updates share one signature (what :mod:`torch_l2o.registry` registers)::

    update(net, state, ys, gs, xs, *, lr, prox, params, step, instance_dims, inplace)
        -> (xs_new, ys_new, state_new)

``ys`` (gradient points), ``gs`` (their gradients) and ``xs`` (prox iterates; the
``ys`` themselves for updates that do not extrapolate) are lists of tensors that run
as one batch of coordinates: the network is called once on all of them, its state
``state`` holding every coordinate in list order. ``lr`` is one value for all tensors
or a list with one per tensor; ``step`` counts the steps taken before this one.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..kernels import prox_grad_step
from ..kernels.fused import fused_update
from ..kernels.reference import prox_point_reference
from ..nets import run_network
from ..prox import get_prox
from .stepsize import instance_shape, instance_sum

__all__ = ["ista_update", "fista_update", "fista_momentum", "pa_features", "pa_input_scale", "pa_update", "pafr_update",
           "held_coordinates", "dm_update", "rnnprop_update", "mathgd_update"]


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
        c = _restart(olds, xs_new, ys_new, k, t.shape, inplace)
        t_next = torch.where(c, torch.ones_like(t_next), t_next)
    return xs_new, ys_new, t_next


def _restart(olds: Sequence[tuple[Tensor, Tensor]], xs_new: list[Tensor], ys_new: list[Tensor], k: int,
             shape: tuple[int, ...], inplace: bool) -> Tensor:
    """O'Donoghue-Candes' gradient restart over a group: per instance, whether
    ``(y_k - x_{k+1})^T (x_{k+1} - x_k) > 0`` (shaped ``shape``; ``olds`` holds ``(x_k, y_k)``
    per tensor); there ``y_{k+1} = x_{k+1}``, written into ``ys_new`` (in place, or replacing
    its entries)."""
    with torch.no_grad():
        c = sum(instance_sum((y0.detach() - xn.detach()) * (xn.detach() - x0.detach()), k).reshape(shape)
                for (x0, y0), xn in zip(olds, xs_new)) > 0
    for i, (xn, yn) in enumerate(zip(xs_new, ys_new)):
        y_r = torch.where(c.reshape(instance_shape(yn, k)), xn, yn)
        if inplace:
            yn.copy_(y_r)
        else:
            ys_new[i] = y_r
    return c


# ---------------------------------------------------------------- learned optimizers
# Features are detached: the network sees the optimization, it is not differentiated
# through its inputs; meta-training differentiates through its outputs (p, a, the update).

Lr = float | Tensor


def _instances(y: Tensor, instance_dims: int) -> int:
    n = 1
    for s in y.shape[:instance_dims]:
        n *= s
    return n


def _flat(ts: Sequence[Tensor]) -> Tensor:
    """The tensors' elements as one detached vector, in list order (no copy for one tensor)."""
    if len(ts) == 1:
        return ts[0].detach().reshape(-1)
    return torch.cat([t.detach().reshape(-1) for t in ts])


def _split(v: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """A per-coordinate vector back into tensors shaped as ``like``."""
    if len(like) == 1:
        return [v.view(like[0].shape)]
    return [u.view(t.shape) for u, t in zip(v.split([t.numel() for t in like]), like)]


def _lrs(lr: Lr | Sequence[Lr], n: int) -> Sequence[Lr]:
    return lr if isinstance(lr, (list, tuple)) else [lr] * n


def pa_features(ys: Sequence[Tensor], gs: Sequence[Tensor], lrs: Sequence[Lr], *, inputs: str = "raw",
                instance_dims: int = 0, prox: str = "none", params: Mapping[str, Any] | None = None) -> Tensor:
    r"""The PA networks' per-coordinate inputs, ``(N, 2)`` float32, detached.

    ``"raw"`` (the papers): :math:`[\nabla f(y), y]`. ``"scaled"``: the gradient step and
    the iterate in the units of the iterate, divided by a per-instance scale,

    .. math::
        \bigl[s\,\nabla f(y) / \sigma,\ y / \sigma\bigr],\qquad
        \sigma = \operatorname{RMS}_j \max(|y_j|, |s\,\nabla_j f(y)|)

    over each instance's coordinates of one tensor (``instance_dims`` leading dims index
    instances; a tensor without them is one instance). Both features are invariant to
    rescaling the problem (``b -> c b, lam -> c lam`` in a LASSO; ``A -> c A`` with
    ``s = 1/L``), so a network trained at one scale sees the same inputs at any other.
    A zero ``sigma`` (``y = 0`` and ``g = 0``: already optimal) gives zero features.
    ``"prox"`` (a study): the scaled pair and the prox-gradient step
    :math:`(\operatorname{prox}_{s r}(y - s\nabla f(y)) - y) / \sigma`, the one input that
    knows the regulariser's strength (``prox``, ``params``: the step's).
    """
    if inputs == "raw":
        return torch.stack([_flat(gs), _flat(ys)], -1).float()
    if inputs not in ("scaled", "prox"):
        raise ValueError(f"inputs must be 'raw', 'scaled' or 'prox', got {inputs!r}")
    cols = []
    for y, g, s in zip(ys, gs, lrs):
        inv, sg = _input_scale(y, g, s, instance_dims)
        inst = inv.shape[0]
        yd = y.detach()
        f = [sg.reshape(inst, -1) * inv, yd.float().reshape(inst, -1) * inv]
        if inputs == "prox":
            step = prox_point_reference(yd, g.detach(), s, 1.0, prox, params) - yd
            f.append(step.float().reshape(inst, -1) * inv)
        cols.append(torch.stack([c.reshape(-1) for c in f], -1))
    return cols[0] if len(cols) == 1 else torch.cat(cols)


def _input_scale(y: Tensor, g: Tensor, s: Lr, instance_dims: int) -> tuple[Tensor, Tensor]:
    """``1 / sigma`` per instance of one tensor, ``(instances, 1)`` float32 (0 where sigma
    is 0), and ``s g`` in float32: the scaled inputs' reduction, shared with the fused
    kernels (which take ``1 / sigma`` and compute the rest per coordinate)."""
    y, g = y.detach().float(), g.detach().float()
    sg = g * (s.detach().float() if isinstance(s, Tensor) else s)
    m = torch.maximum(y.abs(), sg.abs()).reshape(_instances(y, instance_dims), -1)
    sigma = m.square().mean(1, keepdim=True).sqrt()
    inv = torch.where(sigma > 0, 1 / sigma.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(sigma))
    return inv, sg


def pa_input_scale(y: Tensor, g: Tensor, s: Lr, instance_dims: int = 0) -> Tensor:
    """``1 / sigma`` of :func:`pa_features` ``"scaled"`` per instance of one tensor, shape
    ``(instances,)`` float32: what a fused kernel needs besides ``s``, ``g`` and ``y``."""
    return _input_scale(y, g, s, instance_dims)[0].reshape(-1)


def pa_update(
    net, state: dict, ys: Sequence[Tensor], gs: Sequence[Tensor], xs: Sequence[Tensor], *,
    lr: Lr | Sequence[Lr], prox: str = "none", params: Mapping[str, Any] | None = None, step: int = 0,
    instance_dims: int = 0, inplace: bool = False,
) -> tuple[list[Tensor], list[Tensor], dict]:
    r"""L2O-PA, L2O-PA-GRU and L2O-PA-MR (they differ only in ``net``).

    .. math::
        (p_k, a_k), h_k = \mathrm{net}(\phi(\nabla f(y_k), y_k), h_{k-1}),\quad
        x_{k+1} = \operatorname{prox}_{s p_k r}(y_k - s p_k \nabla f(y_k)),\quad
        y_{k+1} = x_{k+1} + a_k (x_{k+1} - x_k)

    with ``s = lr`` (``0.9999 / L``), ``p_k, a_k`` in (0, 2) per coordinate, and the
    inputs :math:`\phi` of :func:`pa_features` (``net.inputs``: the papers' raw
    ``[g, y]``, or the scale-free ``[s g, y] / sigma``).

    With ``net.hold_fixed`` (the default) and an elementwise built-in prox, a coordinate
    with :math:`x_k = y_k = \operatorname{prox}_{s r}(y_k - s \nabla f(y_k))` (in the
    iterates' arithmetic; for LASSO: zero, and :math:`|\nabla f| \le \lambda`) keeps its
    iterates and its recurrent state: the step moves it nowhere whatever ``p_k, a_k`` are
    (the fixed points of :math:`\operatorname{prox}_{c r}(\cdot - c \nabla f)` do not
    depend on :math:`c > 0`), so only its state would change. A fused step skips its
    network; on sparse problems 80-90 % of the coordinates are held late in a run.
    """
    if (out := fused_update("pa", net, state, ys, gs, xs, inplace=inplace, lr=lr, prox=prox, params=params,
                            step=step, instance_dims=instance_dims)) is not None:
        return out
    lrs = _lrs(lr, len(ys))
    held = held_coordinates(ys, gs, xs, lrs, prox, params) if getattr(net, "hold_fixed", False) else None
    feats = pa_features(ys, gs, lrs, inputs=getattr(net, "inputs", "raw"), instance_dims=instance_dims,
                        prox=prox, params=params)
    (p, a), new_state = run_network(net, feats, state, instances=_instances(ys[0], instance_dims))
    if held is None:
        out = [prox_grad_step(y, g, x, lr=s, p=pi, a=ai, prox=prox, params=params, inplace=inplace)
               for y, g, x, s, pi, ai in zip(ys, gs, xs, lrs, _split(p, ys), _split(a, ys))]
        return [o[0] for o in out], [o[1] for o in out], new_state
    dims = net.coordinate_dims()
    for k, d in dims.items():
        if d is not None:
            new_state[k] = torch.where(held.reshape([-1 if i == d else 1 for i in range(state[k].dim())]),
                                       state[k], new_state[k])
    xs_new, ys_new = [], []
    for y, g, x, s, pi, ai, hi in zip(ys, gs, xs, lrs, _split(p, ys), _split(a, ys), _split(held, ys)):
        xn, yn = prox_grad_step(y, g, x, lr=s, p=pi, a=ai, prox=prox, params=params)
        xn, yn = torch.where(hi, y, xn), torch.where(hi, y, yn)  # exactly y: rounding may not give it
        if inplace:
            x.copy_(xn)
            y.copy_(yn)
            xn, yn = x, y
        xs_new.append(xn)
        ys_new.append(yn)
    return xs_new, ys_new, new_state


def pafr_update(
    net, state: dict, ys: Sequence[Tensor], gs: Sequence[Tensor], xs: Sequence[Tensor], *,
    lr: Lr | Sequence[Lr], prox: str = "none", params: Mapping[str, Any] | None = None, step: int = 0,
    instance_dims: int = 0, inplace: bool = False,
) -> tuple[list[Tensor], list[Tensor], dict]:
    r"""L2O-PA-FR (a study): FISTA with adaptive restart, its step and momentum scaled per
    coordinate by the network (:class:`~torch_l2o.nets.PAFRNet`),

    .. math::
        x_{k+1} = \operatorname{prox}_{s p_k r}(y_k - s p_k \nabla f(y_k)),\quad
        y_{k+1} = x_{k+1} + a_k \tfrac{t_k - 1}{t_{k+1}} (x_{k+1} - x_k),

    and per instance, where :math:`(y_k - x_{k+1})^T (x_{k+1} - x_k) > 0`,
    :math:`y_{k+1} = x_{k+1}`, :math:`t_{k+1} = 1` (O'Donoghue-Candes). ``p = a = 1`` is
    FISTA-restart. The PA step (:func:`pa_update`) with the network's momentum, then the restart."""
    k = instance_dims
    inst = _instances(ys[0], k)
    # t before the step (a fused step advances the state's t in place), and the iterates
    # the restart test compares with
    t = state["t"][: ys[0].numel()].reshape(inst, -1)[:, 0].clone()
    olds = [(x.detach().clone(), y.detach().clone()) if inplace else (x, y) for x, y in zip(xs, ys)]
    xs_new, ys_new, new_state = pa_update(net, state, ys, gs, xs, lr=lr, prox=prox, params=params, step=step,
                                          instance_dims=k, inplace=inplace)
    c = _restart(olds, xs_new, ys_new, k, (inst,), inplace)
    with torch.no_grad():
        t_next = torch.where(c, torch.ones_like(t), fista_momentum(t)[0])
        new_state["t"] = torch.cat([t_next.repeat_interleave(y.numel() // inst) for y in ys])
    return xs_new, ys_new, new_state


def held_coordinates(ys: Sequence[Tensor], gs: Sequence[Tensor], xs: Sequence[Tensor], lrs: Sequence[Lr],
                     prox: str, params: Mapping[str, Any] | None) -> Tensor | None:
    r"""Per coordinate (flat, in list order), whether :math:`x = y = \operatorname{prox}_{s r}
    (y - s g)` in the iterates' arithmetic: where :func:`pa_update` with ``hold_fixed``
    keeps iterates and state. ``None`` for a prox that is not a built-in elementwise one
    (for a group or matrix prox a per-coordinate fixed point means nothing)."""
    if get_prox(prox).kernel is None:
        return None
    with torch.no_grad():
        return _flat([(prox_point_reference(y.detach(), g.detach(), s, 1.0, prox, params) == y.detach())
                      & (x.detach() == y.detach()) for y, g, x, s in zip(ys, gs, xs, lrs)])


def dm_update(
    net, state: dict, ys: Sequence[Tensor], gs: Sequence[Tensor], xs: Sequence[Tensor], *,
    lr: Lr | Sequence[Lr] = 1.0, prox: str = "none", params: Mapping[str, Any] | None = None, step: int = 0,
    instance_dims: int = 0, inplace: bool = False,
) -> tuple[list[Tensor], list[Tensor], dict]:
    r"""L2O-DM (Andrychowicz et al. 2016): :math:`x_{k+1} = \operatorname{prox}_{\mathrm{lr}\,r}
    (x_k + \mathrm{lr}\cdot m(\nabla f(x_k)))`; the prox is the identity for L2O-DM itself
    and a block's prox for GSO. No extrapolation: ``xs`` are the ``ys``."""
    if (out := fused_update("dm", net, state, ys, gs, xs, inplace=inplace, lr=lr, prox=prox, params=params,
                            step=step, instance_dims=instance_dims)) is not None:
        return out
    out, new_state = run_network(net, net.features(_flat(gs).float(), _flat(ys).float()), state)
    # x + lr * out is a gradient step along -out: the same fused step as every optimizer
    xs_new = [prox_grad_step(y, -o.to(y.dtype), x, lr=s, prox=prox, params=params, inplace=inplace)[0]
              for y, x, s, o in zip(ys, xs, _lrs(lr, len(ys)), _split(out, ys))]
    return xs_new, xs_new, new_state


def rnnprop_update(
    net, state: dict, ys: Sequence[Tensor], gs: Sequence[Tensor], xs: Sequence[Tensor], *,
    lr: Lr | Sequence[Lr] = 1.0, prox: str = "none", params: Mapping[str, Any] | None = None, step: int = 0,
    instance_dims: int = 0, inplace: bool = False, betas: tuple[float, float] = (0.95, 0.95), eps: float = 1e-8,
) -> tuple[list[Tensor], list[Tensor], dict]:
    r"""RNNProp (Lv et al. 2017): bias-corrected moments :math:`\hat m, \hat v` (beta 0.95),
    :math:`x_{k+1} = x_k - 0.1\,\mathrm{lr}\tanh(m([g / (\sqrt{\hat v} + \epsilon),
    \hat m / (\sqrt{\hat v} + \epsilon)]))`. It applies no prox (``prox`` must be
    ``"none"``); no extrapolation: ``xs`` are the ``ys``."""
    if betas == (0.95, 0.95) and eps == 1e-8 and (out := fused_update(
            "rnnprop", net, state, ys, gs, xs, inplace=inplace, lr=lr, prox=prox, params=params, step=step,
            instance_dims=instance_dims)) is not None:
        return out
    b1, b2 = betas
    gf = _flat(gs).float()
    m = b1 * state["m"].float() + (1 - b1) * gf
    v = b2 * state["v"].float() + (1 - b2) * gf * gf
    m_hat = m / (1 - b1 ** (step + 1))
    denom = torch.sqrt(v / (1 - b2 ** (step + 1))) + eps
    net_state = {k: t for k, t in state.items() if k not in ("m", "v")}
    out, new_state = run_network(net, torch.stack([gf / denom, m_hat / denom], -1), net_state)
    xs_new = [prox_grad_step(y, (0.1 * o).to(y.dtype), x, lr=s, inplace=inplace)[0]
              for y, x, s, o in zip(ys, xs, _lrs(lr, len(ys)), _split(out, ys))]
    new_state.update(m=m.to(state["m"].dtype), v=v.to(state["v"].dtype))
    return xs_new, xs_new, new_state


def mathgd_update(
    net, state: dict, ys: Sequence[Tensor], gs: Sequence[Tensor], xs: Sequence[Tensor], *,
    lr: Lr | Sequence[Lr], prox: str = "none", params: Mapping[str, Any] | None = None, step: int = 0,
    instance_dims: int = 0, inplace: bool = False,
) -> tuple[list[Tensor], list[Tensor], dict]:
    r"""Math-L2O learned gradient descent (Song, Lin, Xu 2025):
    :math:`x_{k+1} = \operatorname{prox}_{s P_k r}(x_k - s P_k \nabla f(x_k))`,
    :math:`P_k = \mathrm{net}([\nabla f(x_k), x_k]) \in (0, 2)` per coordinate, ``s = lr``.
    No recurrent state (``state`` is ``{}``), no extrapolation: ``xs`` are the ``ys``."""
    p, _ = run_network(net, torch.stack([_flat(gs), _flat(ys)], -1).float(), {})
    xs_new = [prox_grad_step(y, g, x, lr=s, p=pi, a=0.0, prox=prox, params=params, inplace=inplace)[0]
              for y, g, x, s, pi in zip(ys, gs, xs, _lrs(lr, len(ys)), _split(p, ys))]
    return xs_new, xs_new, state
