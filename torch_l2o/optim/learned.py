"""The learned optimizers as ``torch.optim`` optimizers.

Each drives a small coordinate-wise network (:mod:`torch_l2o.nets`) through its
architecture's pure update function (:mod:`torch_l2o.optim.functional`), the same
function meta-training differentiates; both are looked up in :mod:`torch_l2o.registry`.
One step calls the network once per param group (per batch of the group's tensors
that share device, dtype and step count), like ``torch.optim``'s multi-tensor paths.
The network's recurrent state lives per parameter in ``self.state``, float32 (or the
``state_dtype`` asked for) whatever the parameter's dtype, and starts at zero.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Iterable

import torch
from torch import Tensor

from ..registry import Architecture, get_architecture
from ..weights import _check_options, build_network
from . import watchdog
from .base import ProxOptimizer
from .safeguard import safeguarded_step

__all__ = ["LearnedOptimizer", "ProxLearnedOptimizer", "OutputLearnedOptimizer", "PA", "PAGRU", "PAMR", "L2ODM",
           "RNNProp", "MathGD"]


STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def gather_state(dims: dict[str, int | None], states: list[dict]) -> dict[str, Tensor]:
    """The network state of several parameters as one batch of coordinates, in order."""
    if len(states) == 1:
        return {k: states[0][k] for k in dims}
    return {k: torch.cat([s[k] for s in states], d) if d is not None else states[0][k] for k, d in dims.items()}


def scatter_state(dims: dict[str, int | None], new: dict[str, Tensor], states: list[dict], sizes: list[int]) -> None:
    """Write a batch's new network state back into each parameter's state (own storage:
    a view of the batch would make ``state_dict`` save the whole batch per parameter)."""
    if len(states) == 1:
        states[0].update(new)
        return
    for k, v in new.items():
        d = dims[k]
        parts = v.split(sizes, d) if d is not None else [v] * len(states)
        for s, part in zip(states, parts):
            s[k] = part.clone(memory_format=torch.contiguous_format) if d is not None else part


_COMMON_ARGS = """
        instance_dims: how many leading dims of each parameter index independent problem
            instances (a ``(B, n)`` parameter with ``instance_dims=1`` holds ``B`` problems;
            default 0, or inferred from a tensor ``lr``).
        nonfinite: ``"raise"`` (default) or ``"skip"`` for a NaN or Inf gradient; nothing is
            written either way.
        weights: a shipped name (``torch_l2o.weights.available_weights(arch)``; the PA family's
            ``"lasso-mix"`` and ``"logistic-mix"`` for problems unlike the papers' families), a
            path to a ``.safetensors`` file, a state dict, ``"untrained"``, or ``None`` for the
            architecture's default weights.
        state_dtype: storage of the recurrent state (``torch.float32``, ``bfloat16``, ``float16``).
        **options: the network's constructor arguments; they must match the weights'.
"""

_PROX_ARGS = """
    Args:
        params: tensors or param groups to optimize; each holds ``y_k``, where the gradient
            of the smooth loss is taken (:meth:`solution` returns the prox iterate ``x_k``).
        lr: the base step ``s`` (``0.9999 / L`` for an ``L``-smooth ``f``; a number or one
            value per instance), or ``None`` (default): the secant estimate of ``1/L`` times
            the weights' calibrated ``auto_lr_scale`` (with ``step(closure)``: backtracking).
        prox, lam, prox_params: the non-smooth term ``r`` by registered name and its
            strengths (``prox="l1", lam=0.1``); a prox with a strength needs it.
        safeguard: accept a learned step only where it is no worse than FISTA-restart's
            model (needs ``step(closure)``; extrapolating architectures).
        watchdog: move an instance whose learned steps diverge or stall to the classical
            step from its best point, with one warning (default ``True``).
        handoff: hand an instance to FISTA-restart steps (ISTA for an architecture without
            a separate prox iterate), from where it is, once its prox-gradient residual is
            ``handoff`` times its first (a number in (0, 1), or ``None``: never); default
            ``"calibrated"``, the weights' card's value (the mixture weights: 1e-2; none for
            the others). Needs the watchdog.""" + _COMMON_ARGS

_OUTPUT_ARGS = """
    Args:
        params: tensors or param groups to optimize.
        lr: multiplies the network's output (default 1).
        prox, lam, prox_params: a non-smooth term, for architectures that apply a prox
            (``"none"`` otherwise: give them the subgradient of ``F = f + r``).
        watchdog: report (warn once, mark in ``state[p]["watchdog"]``) an instance whose
            gradient norm jumps 100x above its running minimum (default ``True``).""" + _COMMON_ARGS


def _with_args(cls, args: str) -> None:
    """Append the shared argument docs to a concrete class that documents none of its own."""
    if cls.__doc__ and "Args:" not in cls.__doc__:
        cls.__doc__ = cls.__doc__.rstrip() + "\n" + args


class LearnedOptimizer(ProxOptimizer):
    """Base of the learned optimizers: owns the network and its per-parameter state.

    Subclasses name their architecture (``arch``, a key of :mod:`torch_l2o.registry`);
    the update rule, the network and the default weights come from its entry.

    Args (besides those of :class:`~torch_l2o.optim.base.ProxOptimizer`):
        weights: a pretrained name (``"lasso"``, ``"logistic"``, ...), a path to a
            ``.safetensors`` file, a state dict, ``"untrained"``, or ``None`` for the
            default pretrained weights.
        state_dtype: storage of the network's recurrent state (``torch.bfloat16`` halves
            the bytes a step moves; it is computed in float32 either way, and rounded
            to the storage once per step). Its effect on iterations is on the cards.
        **options: the network's constructor arguments (e.g. ``window``, ``heads``,
            ``attend`` for PA-MR; ``inputs="scaled"`` for the PA family's scale-free
            inputs); they must match a weight file's, which sets them when omitted.
    """

    arch: str = ""

    def __init__(self, params: Iterable, defaults: dict[str, Any], weights: Any = None,
                 state_dtype: torch.dtype = torch.float32, **options: Any) -> None:
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {', '.join(map(str, STATE_DTYPES))}, got {state_dtype!r}")
        self.state_dtype = state_dtype
        self.architecture: Architecture = get_architecture(self.arch)
        own = [n for n, q in inspect.signature(type(self).__init__).parameters.items()
               if n not in ("self", "params") and q.kind is not q.VAR_KEYWORD]
        _check_options(self.architecture, options, keywords=own)  # a misspelt keyword lands in options
        self.net, self.weights_info = build_network(self.arch, weights, **options)
        self._dims = self.net.coordinate_dims()
        self._nets: dict[torch.device, torch.nn.Module] = {}
        super().__init__(params, defaults)

    def _net_on(self, device: torch.device) -> torch.nn.Module:
        if device not in self._nets:
            self._nets[device] = copy.deepcopy(self.net).to(device)
        return self._nets[device]

    def _group_index(self, group) -> int:
        return next(i for i, g in enumerate(self.param_groups) if g is group)

    def _init_state(self, group, ps, states) -> None:
        net = self.net.block(self._group_index(group))
        for p, s in zip(ps, states):
            if "step" in s:
                continue
            s["step"] = 0
            s.update({k: v.to(self.state_dtype) if v.is_floating_point() else v
                      for k, v in net.init_state(p.numel(), p.device).items()})
            if self.architecture.extrapolates:
                s["x"] = p.detach().clone()

    # Coordinates per network call off CUDA. One call per group is right where launches
    # dominate (GPUs); on a CPU a batch past the caches runs slower (PA's LSTM: 100 ms for
    # 104k coordinates at once, 56-62 ms in batches of 4-8k) and gathering the state costs
    # copies, so there consecutive small tensors share a call and large ones run alone.
    cpu_batch: int = 4096

    def _batches(self, ps, states) -> list[list[int]]:
        """Indices of the tensors that run as one network call: same device, dtype and
        step count (state shared by all coordinates, such as PA-MR's window fill, is
        then the same), at most :attr:`cpu_batch` coordinates off CUDA; one tensor per
        call when the network mixes coordinates."""
        if not self.net.coordinatewise:
            return [[i] for i in range(len(ps))]
        groups: dict[tuple, list[int]] = {}
        for i, (p, s) in enumerate(zip(ps, states)):
            groups.setdefault((p.device, p.dtype, s["step"]), []).append(i)
        batches = []
        for (device, _, _), idx in groups.items():
            if device.type == "cuda":
                batches.append(idx)
                continue
            cur, size = [], 0
            for i in idx:
                if cur and size + ps[i].numel() > self.cpu_batch:
                    batches.append(cur)
                    cur, size = [], 0
                cur.append(i)
                size += ps[i].numel()
            batches.append(cur)
        return batches

    def _run(self, group, ps, gs, states, lrs, prox_params, inplace: bool):
        """The update over the group, one network call per batch. Returns the new
        ``xs``, ``ys`` (written in place when ``inplace``) and the batches' new network
        states, to be committed with :func:`scatter_state`."""
        gi = self._group_index(group)
        xs_all: list[Tensor] = [None] * len(ps)  # type: ignore[list-item]
        ys_all: list[Tensor] = [None] * len(ps)  # type: ignore[list-item]
        commits = []
        for idx in self._batches(ps, states):
            P, S = [ps[i] for i in idx], [states[i] for i in idx]
            net = self._net_on(P[0].device).block(gi)
            xs = [s["x"] for s in S] if self.architecture.extrapolates else P
            xn, yn, new = self.architecture.update(
                net, gather_state(self._dims, S), P, [gs[i] for i in idx], xs, lr=[lrs[i] for i in idx],
                prox=group["prox"], params=prox_params, step=S[0]["step"], instance_dims=group["instance_dims"],
                inplace=inplace)
            for j, i in enumerate(idx):
                xs_all[i], ys_all[i] = xn[j], yn[j]
            commits.append((S, new, [p.numel() for p in P]))
        return xs_all, ys_all, commits

    def _watch(self, group, ps, gs, states, lrs, prox_params) -> watchdog.Plan | None:
        """The watchdog's verdict on this step, before the learned update writes anything:
        the fallback to apply after it, or ``None``."""
        return watchdog.check(ps, gs, states, lrs, group["prox"], prox_params, group["instance_dims"],
                              self.architecture.extrapolates, type(self).__name__, self.state[group["params"][0]],
                              group.get("handoff"))

    def _update(self, group, ps, gs, states, lrs, prox_params, ctx) -> None:
        if group.get("safeguard"):
            commits = []

            def propose(grads):
                xs, ys, commits[:] = self._run(group, ps, grads, states, lrs, prox_params, inplace=False)
                return xs, ys

            safeguarded_step(ps, gs, states, lrs, group["prox"], prox_params, group["instance_dims"],
                             ctx["closure"], ctx["loss"], propose)
        else:
            # meta tensors (shape-only runs) hold no values for the watchdog to read
            watch = group.get("watchdog") and ps[0].device.type != "meta"
            plan = self._watch(group, ps, gs, states, lrs, prox_params) if watch else None
            if plan is not None and bool(plan.mask.all()):
                # every instance has left the learned step for good: its output would be
                # overwritten, so the network is not run (the step costs FISTA-restart's)
                commits = []
            else:
                _, _, commits = self._run(group, ps, gs, states, lrs, prox_params, inplace=True)
            if plan is not None:
                watchdog.apply(plan, ps, states, group["instance_dims"], self.architecture.extrapolates)
        for S, new, sizes in commits:
            scatter_state(self._dims, new, S, sizes)
        for s in states:
            s["step"] += 1

    def __repr__(self) -> str:
        return f"{self.architecture.display_name} ({self.weights_info.get('weights')})\n" + super().__repr__()


class ProxLearnedOptimizer(LearnedOptimizer):
    """A learned optimizer whose ``lr`` is the base step ``s = 1/L`` (``None``: estimated)
    and that applies the prox of ``r`` (the PA family, MathGD, and by default an
    architecture you register).

    ``safeguard=True`` (extrapolating architectures, with ``step(closure)``) accepts a
    learned step only where it beats FISTA-restart (run alongside in the state) and takes
    FISTA-restart's step elsewhere: never behind FISTA-restart's model, O(1/k^2) on convex
    problems (:mod:`torch_l2o.optim.safeguard`). Without it, ``watchdog=True`` (the default)
    catches an instance whose learned steps diverge and moves it to FISTA-restart steps
    from its best point, with a warning (:mod:`torch_l2o.optim.watchdog`); with
    ``handoff=h`` (the mixture weights' cards calibrate one) it also hands an instance to
    FISTA-restart, from where it is and without a warning, once its prox-gradient residual
    is ``h`` times its first: the learned step for the early iterations, where it gains
    most, FISTA-restart's linear tail after.

    With ``lr=None`` the base step is ``auto_lr_scale / L_k`` (``L_k`` the secant estimate,
    :mod:`torch_l2o.optim.stepsize`): the multiplier calibrated for the weights on their
    held instances where their card records one (``auto_lr_scale``), else 0.5. With a
    closure (backtracking) the multiplier is capped at 1: ``1/L_k`` is then a step that
    passed the descent lemma, which the safeguard's guarantee needs.

    The PA family's network option ``hold_fixed=True`` (default) keeps the iterates and
    recurrent state of the coordinates at a fixed point of the prox-gradient map (for
    LASSO: zero with ``|g| <= lam``), where the step moves nothing whatever the network
    says; the fused CPU step then skips their network (3-6x cheaper on sparse problems).
    ``hold_fixed=False``: the papers' recurrence (:func:`~torch_l2o.optim.functional.pa_update`)."""

    # lr=None: the network's p in (0, 2) scales the step, so half the estimated 1/L unless
    # the weights' card says otherwise (pretrained/train.py --calibrate-step measures it)
    auto_lr_scale = 0.5
    _param_like_keys = ProxOptimizer._param_like_keys + ("wd_best",)

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        _with_args(cls, _PROX_ARGS)

    def __init__(self, params: Iterable, lr: Any = None, *, prox: str = "none", lam: float | None = None,
                 prox_params: dict | None = None, weights: Any = None, safeguard: bool = False,
                 watchdog: bool = True, handoff: Any = "calibrated", instance_dims: int | None = None,
                 nonfinite: str = "raise", state_dtype: torch.dtype = torch.float32, **options: Any) -> None:
        super().__init__(params, dict(lr=lr, prox=prox, lam=lam, prox_params=prox_params, safeguard=safeguard,
                                      watchdog=watchdog, handoff=handoff, instance_dims=instance_dims,
                                      nonfinite=nonfinite),
                         weights, state_dtype, **options)
        calibrated = (self.weights_info.get("card") or {}).get("auto_lr_scale")
        if calibrated is not None:
            self.auto_lr_scale = float(calibrated)

    def _check_group(self, group) -> None:
        name = type(self).__name__
        if group.get("safeguard") and not self.architecture.extrapolates:
            raise ValueError(f"{name}: safeguard=True needs an architecture with a prox iterate "
                             f"apart from the gradient point; {self.architecture.display_name} has none")
        h = group.get("handoff")
        watched = group.get("watchdog") and not group.get("safeguard")  # the watchdog measures the residual
        if h == "calibrated":  # the card's threshold, where the watchdog runs
            h = (self.weights_info.get("card") or {}).get("handoff")
            group["handoff"] = float(h) if h is not None and watched else None
        elif h is not None:
            if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 < h < 1:
                raise ValueError(f"{name}: handoff must be a number in (0, 1) (the residual, relative to the "
                                 f"first, at which an instance hands off to FISTA-restart), None (never) or "
                                 f"'calibrated' (the weights' card); got {h!r}")
            if not watched:
                raise ValueError(f"{name}: handoff={h!r} needs the watchdog, which measures the residual, and no "
                                 "safeguard (which runs FISTA-restart alongside instead): pass watchdog=True and "
                                 "safeguard=False, or handoff=None")
            group["handoff"] = float(h)
        super()._check_group(group)


class OutputLearnedOptimizer(LearnedOptimizer):
    """A learned optimizer whose ``lr`` scales the network's output (default 1): L2O-DM,
    RNNProp, GSO. Architectures that apply no prox refuse one: give them the
    subgradient of ``F = f + r``.

    There is no classical step to fall back to (no prox-gradient map, no step size), so
    ``watchdog=True`` (the default; not GSO) only reports: an instance whose gradient norm
    jumps 100x above its running minimum is marked in ``state[p]["watchdog"]`` with one
    warning per param group, and the learned step goes on unchanged
    (:func:`torch_l2o.optim.watchdog.watch_gradient`)."""

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        _with_args(cls, _OUTPUT_ARGS)

    def __init__(self, params: Iterable, lr: float = 1.0, *, prox: str = "none", lam: float | None = None,
                 prox_params: dict | None = None, weights: Any = None, watchdog: bool = True,
                 instance_dims: int | None = None, nonfinite: str = "raise", state_dtype: torch.dtype = torch.float32,
                 **options: Any) -> None:
        super().__init__(params, dict(lr=lr, prox=prox, lam=lam, prox_params=prox_params, watchdog=watchdog,
                                      instance_dims=instance_dims, nonfinite=nonfinite), weights, state_dtype,
                         **options)

    def _watch(self, group, ps, gs, states, lrs, prox_params) -> None:
        # no prox-gradient map and no step size: report a diverging instance, change nothing
        horizon = ((self.weights_info.get("card") or {}).get("training") or {}).get("horizon")
        watchdog.watch_gradient(gs, group["instance_dims"], type(self).__name__, horizon, states[0]["step"],
                                self.state[group["params"][0]])

    def _check_group(self, group) -> None:
        name = type(self).__name__
        if group["prox"] != "none" and not self.architecture.applies_prox:
            raise ValueError(
                f"{name} learns an unconstrained update and applies no prox; for a composite "
                f"objective backpropagate F = f + r (its subgradient), or use PA / PAMR with prox={group['prox']!r}"
            )
        if group["lr"] is None:
            raise ValueError(f"{name}: lr scales the network's output and cannot be None (default 1.0)")
        super()._check_group(group)


class PA(ProxLearnedOptimizer):
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
    learned step only where it beats the step of a FISTA-restart sequence run alongside,
    and takes that step elsewhere (:mod:`torch_l2o.optim.safeguard`). The network (LSTM 2 x 20) has 5,742 parameters. The
    parameter holds ``y_k``; :meth:`solution` returns ``x_k``.
    """

    arch = "pa"


class PAGRU(ProxLearnedOptimizer):
    r"""L2O-PA-GRU: L2O-PA with a 2 x 16 GRU instead of the LSTM (the ablation of Liu, 2026,
    seed 000). Same update as :class:`PA`; 2,898 parameters."""

    arch = "pagru"


class PAMR(ProxLearnedOptimizer):
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


class L2ODM(OutputLearnedOptimizer):
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


class RNNProp(OutputLearnedOptimizer):
    r"""RNNProp (Lv, Jiang, Li, "Learning gradient descent: better generalization and longer
    horizons", ICML 2017).

    .. math::
        m_k, v_k &= \text{EMAs of } g, g^2 \ (\beta = 0.95),\ \text{bias-corrected } \hat m, \hat v,\\
        x_{k+1} &= x_k - 0.1\,\mathrm{lr}\,\tanh\!\Big(\mathrm{LSTM}\big(\mathrm{ELU}(W
        [g / (\sqrt{\hat v} + \epsilon),\ \hat m / (\sqrt{\hat v} + \epsilon)])\big)\Big)

    LSTM 2 x 20; 6,801 parameters.
    """

    arch = "rnnprop"


class MathGD(ProxLearnedOptimizer):
    r"""Math-L2O learned gradient descent (Song, Lin, Xu, "Learning provably improves the
    convergence of gradient descent", NeurIPS 2025).

    .. math::
        P_k = 2\sigma\big(W_3\,\mathrm{ReLU}(W_2\,\mathrm{ReLU}(W_1 [\nabla f(x_k), x_k]))\big),\quad
        x_{k+1} = x_k - s\, P_k \odot \nabla f(x_k)

    (with a ``prox``: :math:`x_{k+1} = \operatorname{prox}_{s P_k r}(\cdot)`), ``s = lr``
    (``0.9999 / L``; ``None``: estimated). With ``weights="untrained"`` the deterministic
    initialisation (``init_scale`` = e, last layer zero) makes ``P = 1``: plain gradient
    descent, exactly. ``hidden``/``init_scale`` set the network (H = 5120, e = 100 in the paper).
    """

    arch = "mathgd"
