"""The learned optimizers as ``torch.optim`` optimizers.

Each drives a small coordinate-wise network (:mod:`torch_l2o.nets`) through one pure
update function (:mod:`torch_l2o.optim.functional`), the same function meta-training
differentiates. The network's recurrent state lives per parameter in ``self.state``,
float32 whatever the parameter's dtype, and starts at zero.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch

from ..weights import ARCH_NAMES, build_network
from .base import ProxOptimizer
from .functional import dm_update, mathgd_update, pa_update, rnnprop_update
from .safeguard import safeguarded_step

__all__ = ["LearnedOptimizer", "PA", "PAGRU", "PAMR", "L2ODM", "RNNProp", "MathGD"]


class LearnedOptimizer(ProxOptimizer):
    """Base of the learned optimizers: owns the network and its per-parameter state.

    Args (besides those of :class:`~torch_l2o.optim.base.ProxOptimizer`):
        weights: a pretrained name (``"lasso"``, ``"logistic"``, ...), a path to a
            ``.safetensors`` file, a state dict, ``"untrained"``, or ``None`` for the
            default pretrained weights.
        **options: the network's constructor arguments (e.g. ``window``, ``heads``,
            ``attend`` for PA-MR); they must match a weight file's.
    """

    arch: str = ""

    def __init__(self, params: Iterable, defaults: dict[str, Any], weights: Any = None, **options: Any) -> None:
        self.net, self.weights_info = build_network(self.arch, weights, **options)
        self._net_keys = tuple(self.net.init_state(0))
        self._nets: dict[torch.device, torch.nn.Module] = {}
        super().__init__(params, defaults)

    def _net_on(self, device: torch.device) -> torch.nn.Module:
        if device not in self._nets:
            self._nets[device] = copy.deepcopy(self.net).to(device)
        return self._nets[device]

    def _init_state(self, group, ps, states) -> None:
        super()._init_state(group, ps, states)
        for p, s in zip(ps, states):
            if self._net_keys[0] not in s:
                s.update(self.net.init_state(p.numel(), p.device))

    def _net_state(self, s: dict) -> dict:
        return {k: s[k] for k in self._net_keys}

    def __repr__(self) -> str:
        return f"{ARCH_NAMES[self.arch]} ({self.weights_info.get('weights')})\n" + super().__repr__()


class _PAFamily(LearnedOptimizer):
    auto_lr_scale = 0.5

    def __init__(self, params: Iterable, lr: Any = None, *, prox: str = "none", lam: float = 0.0,
                 prox_params: dict | None = None, weights: Any = None, safeguard: bool = False,
                 instance_dims: int | None = None, nonfinite: str = "raise", **options: Any) -> None:
        super().__init__(params, dict(lr=lr, prox=prox, lam=lam, prox_params=prox_params, safeguard=safeguard,
                                      instance_dims=instance_dims, nonfinite=nonfinite), weights, **options)

    def _init_state(self, group, ps, states) -> None:
        super()._init_state(group, ps, states)
        for p, s in zip(ps, states):
            if "x" not in s:
                s["x"] = p.detach().clone()

    def _update(self, group, ps, gs, states, lrs, prox_params, ctx) -> None:
        k = group["instance_dims"]
        if group["safeguard"]:
            def propose(grads):
                out = [pa_update(self._net_on(p.device), self._net_state(s), p.detach(), g, s["x"], lr=lr,
                                 prox=group["prox"], params=prox_params, instance_dims=k)
                       for p, g, s, lr in zip(ps, grads, states, lrs)]
                return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]

            safeguarded_step(ps, gs, states, lrs, group["prox"], prox_params, k, ctx["closure"], ctx["loss"], propose)
        else:
            for p, g, s, lr in zip(ps, gs, states, lrs):
                _, _, new = pa_update(self._net_on(p.device), self._net_state(s), p, g, s["x"], lr=lr,
                                      prox=group["prox"], params=prox_params, instance_dims=k, inplace=True)
                s.update(new)
        for s in states:
            s["step"] += 1


class PA(_PAFamily):
    r"""L2O-PA (Liu, Chen, Wang, Yin, Cai, "Towards constituting mathematical structures
    for learning to optimize", ICML 2023): a learned, per-coordinate proximal gradient
    step with learned extrapolation.

    .. math::
        o_k, h_k &= \mathrm{LSTM}([\nabla f(y_k), y_k], h_{k-1}),\quad
        z_k = \mathrm{ReLU}(W o_k + b),\\
        p_k &= 2\sigma(w_p^\top z_k + b_p),\quad a_k = 2\sigma(w_a^\top z_k + b_a),\\
        x_{k+1} &= \operatorname{prox}_{s p_k r}\big(y_k - s\, p_k \nabla f(y_k)\big),\quad
        y_{k+1} = x_{k+1} + a_k (x_{k+1} - x_k),

    ``s = lr`` (``0.9999 / L``; ``None``: estimated, see :mod:`torch_l2o.optim.stepsize`),
    ``x_0 = y_0``, ``h_0 = 0``. ``safeguard=True`` (with ``step(closure)``) accepts a
    learned step only where it decreases ``F`` as much as ISTA would guarantee, and takes
    the ISTA step elsewhere (:mod:`torch_l2o.optim.safeguard`). The network (LSTM 2 x 20) has 5,742 parameters. The
    parameter holds ``y_k``; :meth:`solution` returns ``x_k``.
    """

    arch = "pa"


class PAGRU(_PAFamily):
    r"""L2O-PA-GRU: L2O-PA with a 2 x 16 GRU instead of the LSTM (the ablation of Liu, 2026,
    seed 000). Same update as :class:`PA`; 2,898 parameters."""

    arch = "pagru"


class PAMR(_PAFamily):
    r"""L2O-PA-MR (Liu, "Enhancing the generalization ability of learning-based optimizers
    through GRU and multi-head attention", 2026): L2O-PA's update with a GRU, multi-head
    attention and feed-forward blocks.

    .. math::
        o_k, h_k &= \mathrm{GRU}([\nabla f(y_k), y_k], h_{k-1}),\quad
        u_k = \mathrm{MHA}(o_k),\quad v_k = \mathrm{FFN}(u_k),\quad
        (p_k, a_k) = \mathrm{MLP}(v_k),\\
        x_{k+1} &= \operatorname{prox}_{s p_k r}\big(y_k - s\, p_k \nabla f(y_k)\big),\quad
        y_{k+1} = x_{k+1} + a_k (x_{k+1} - x_k).

    By default each coordinate's GRU output attends to its own last ``window=8``
    outputs (kept in the state); ``attend="coordinates"`` attends across the
    coordinates of an instance instead. 4,594 parameters (``heads=4``).
    """

    arch = "pamr"


class _BlackBox(LearnedOptimizer):
    """L2O-DM and RNNProp: learned updates ``x+ = x + lr * net(...)`` with no prox; ``lr``
    scales the network's output (default 1)."""

    def __init__(self, params: Iterable, lr: float = 1.0, *, weights: Any = None,
                 instance_dims: int | None = None, nonfinite: str = "raise", **options: Any) -> None:
        super().__init__(params, dict(lr=lr, prox="none", lam=0.0, prox_params=None,
                                      instance_dims=instance_dims, nonfinite=nonfinite), weights, **options)

    def _check_group(self, group) -> None:
        name = type(self).__name__
        if group["prox"] != "none":
            raise ValueError(
                f"{name} learns an unconstrained update and applies no prox; for a composite "
                f"objective backpropagate F = f + r (its subgradient), or use PA / PAMR with prox={group['prox']!r}"
            )
        if group["lr"] is None:
            raise ValueError(f"{name}: lr scales the network's output and cannot be None (default 1.0)")
        super()._check_group(group)


class L2ODM(_BlackBox):
    r"""L2O-DM (Andrychowicz et al., "Learning to learn by gradient descent by gradient
    descent", NeurIPS 2016).

    .. math::
        x_{k+1} = x_k + \mathrm{lr}\cdot 0.1\, W\,\mathrm{LSTM}(\rho(\nabla f(x_k)), h_{k-1}),\quad
        \rho(g) = \begin{cases} (\log|g| / 10,\ \operatorname{sign} g) & |g| \ge e^{-10}\\
        (-1,\ e^{10} g) & \text{else}\end{cases}

    LSTM 2 x 20; 5,301 parameters. ``inputs="grad_x"`` feeds the raw ``[g, x]`` as the
    MS4L2O code does.
    """

    arch = "l2odm"

    def _update(self, group, ps, gs, states, lrs, prox_params, ctx) -> None:
        for p, g, s, lr in zip(ps, gs, states, lrs):
            _, new = dm_update(self._net_on(p.device), self._net_state(s), p, g, lr=lr, inplace=True)
            s.update(new)
            s["step"] += 1


class RNNProp(_BlackBox):
    r"""RNNProp (Lv, Jiang, Li, "Learning gradient descent: better generalization and longer
    horizons", ICML 2017).

    .. math::
        m_k, v_k &= \text{EMAs of } g, g^2 \ (\beta = 0.95),\ \text{bias-corrected } \hat m, \hat v,\\
        x_{k+1} &= x_k - 0.1\,\mathrm{lr}\,\tanh\!\Big(\mathrm{LSTM}\big(\mathrm{ELU}(W
        [g / (\sqrt{\hat v} + \epsilon),\ \hat m / (\sqrt{\hat v} + \epsilon)])\big)\Big)

    LSTM 2 x 20; 6,801 parameters.
    """

    arch = "rnnprop"

    def _update(self, group, ps, gs, states, lrs, prox_params, ctx) -> None:
        for p, g, s, lr in zip(ps, gs, states, lrs):
            _, new = rnnprop_update(self._net_on(p.device), self._net_state(s), p, g, lr=lr, step=s["step"],
                                    inplace=True)
            s.update(new)
            s["step"] += 1


class MathGD(LearnedOptimizer):
    r"""Math-L2O learned gradient descent (Song, Lin, Xu, "Learning provably improves the
    convergence of gradient descent", NeurIPS 2025).

    .. math::
        P_k = 2\sigmaig(W_3\,\mathrm{ReLU}(W_2\,\mathrm{ReLU}(W_1 [
abla f(x_k), x_k]))ig),\quad
        x_{k+1} = x_k - s\, P_k \odot 
abla f(x_k)

    (with a ``prox``: :math:`x_{k+1} = \operatorname{prox}_{s P_k r}(\cdot)`), ``s = lr``
    (``0.9999 / L``; ``None``: estimated). With ``weights="untrained"`` the deterministic
    initialisation (``init_scale`` = e, last layer zero) makes ``P = 1``: plain gradient
    descent, exactly. ``hidden``/``init_scale`` set the network (H = 5120, e = 100 in the paper).
    """

    arch = "mathgd"
    auto_lr_scale = 0.5

    def __init__(self, params: Iterable, lr: Any = None, *, prox: str = "none", lam: float = 0.0,
                 prox_params: dict | None = None, weights: Any = None, instance_dims: int | None = None,
                 nonfinite: str = "raise", **options: Any) -> None:
        super().__init__(params, dict(lr=lr, prox=prox, lam=lam, prox_params=prox_params,
                                      instance_dims=instance_dims, nonfinite=nonfinite), weights, **options)
        self._net_keys = ()

    def _init_state(self, group, ps, states) -> None:
        for s in states:
            s.setdefault("step", 0)

    def _update(self, group, ps, gs, states, lrs, prox_params, ctx) -> None:
        for p, g, s, lr in zip(ps, gs, states, lrs):
            mathgd_update(self._net_on(p.device), p, g, lr=lr, prox=group["prox"], params=prox_params, inplace=True)
            s["step"] += 1
