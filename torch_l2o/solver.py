r"""``solve``: run any torch_l2o optimizer on a batch of problems until a certified stop.

For people who want the answer rather than an optimizer loop::

    res = torch_l2o.solve(problem, tol=1e-6)          # FISTA with adaptive restart
    res.x, res.converged, res.iterations               # (B, n), (B,), (B,)

Each instance stops on its own criterion, evaluated at the prox iterate ``x_k``
(``opt.solution(p)``), relative so that one ``tol`` fits every scale:

* **relative duality gap** (``criterion="gap"``), for ``l1`` LASSO and ``l1`` logistic
  regression: :math:`\mathrm{gap}(x) / F(x)` with :math:`\mathrm{gap}(x) = F(x) - D(\theta(x))
  \ge F(x) - F^\star \ge 0`, so ``criterion <= tol`` *certifies*
  :math:`F(x) - F^\star \le \mathrm{tol}\cdot F(x)` (see :func:`duality_gap` for the dual
  points);
* **relative gradient-mapping residual** (``criterion="residual"``), for any other problem:
  :math:`|G(x_k)| / |G(x_0)|` with :math:`G(x) = (x - \operatorname{prox}_{s r}(x - s\nabla
  f(x))) / s`, ``s = 0.9999 / L`` (the prox-gradient fixed-point residual; ``G(x) = 0`` iff ``x``
  is a minimiser of a convex ``F``).

An instance whose criterion reaches ``tol`` is frozen: its iterate and its share of the
optimizer state are restored after every later step, so it never moves again.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .optim import FISTA, ISTA, ProxOptimizer
from .optim.learned import LearnedOptimizer
from .problems.base import Problem, matvec, rmatvec
from .problems.families import LassoProblem, LogisticProblem
from .problems.solve import default_step, gradient_mapping
from .registry import available_architectures, get_architecture

__all__ = ["ConvergenceWarning", "SolveResult", "available_methods", "duality_gap", "gradient_mapping", "solve"]

_BASELINES = {"fista": FISTA, "ista": ISTA}
STALL = 200  # below float64: steps without a 10% improvement after which an instance stops


def available_methods() -> list[str]:
    """The method names :func:`solve` accepts: the baselines, then every registered
    architecture (a function: architectures may be registered at any time)."""
    return [*_BASELINES, *available_architectures()]


class ConvergenceWarning(UserWarning):
    """Some instances did not reach ``tol`` within ``max_iter`` iterations."""


@dataclass
class SolveResult:
    """What :func:`solve` returns.

    Attributes:
        x: ``(B, n)`` the solutions: the prox iterates ``x_k`` (sparse for ``l1``).
        objective: ``(B,)`` ``F(x)``.
        criterion: ``"gap"`` or ``"residual"``: which stopping criterion was used.
        converged: ``(B,)`` bool, criterion ``<= tol``.
        iterations: ``(B,)`` steps taken by each instance (0: the start was optimal).
        history: ``(K + 1, B)`` float64, the criterion at the start and at each of the
            ``K`` checks (after every step by default; ``check_every``); a frozen instance
            keeps its final value.
        seconds: wall-clock time of the solve.
    """

    x: Tensor
    objective: Tensor
    criterion: str
    converged: Tensor
    iterations: Tensor
    history: Tensor
    seconds: float


# ---------------------------------------------------------------- criteria


def _l1_weights(problem: Problem) -> Tensor | float:
    """``lam`` of an ``l1`` problem: a number, or a tensor of per-coordinate weights."""
    return problem.prox_params.get("lam", 0.0)


def _scale_to_box(c: Tensor, lam, penalized: Tensor | None = None) -> Tensor:
    """The largest ``s <= 1`` with ``s |c_j| <= lam_j`` for every (penalized) ``j``, per instance."""
    lam = torch.as_tensor(lam, dtype=c.dtype, device=c.device).expand_as(c)
    ratio = torch.where(c.abs() > lam, lam / c.abs(), torch.ones_like(c))
    if penalized is not None:
        ratio = torch.where(penalized, ratio, torch.ones_like(c))
    return ratio.amin(-1).clamp(max=1.0)


def _lasso_gap(problem: LassoProblem, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""LASSO, :math:`F = \tfrac12|Ax - b|^2 + \sum_j \lambda_j |x_j|`. Dual:
    :math:`D(\theta) = \langle b, \theta\rangle - \tfrac12|\theta|^2` over
    :math:`|A_j^\top\theta| \le \lambda_j`; the dual point is the residual scaled into the
    box, :math:`\theta = s (b - Ax)`, :math:`s = \min(1, \min_j \lambda_j / |A_j^\top (b - Ax)|)`."""
    lam = _l1_weights(problem)
    res = problem.b - matvec(problem.A, x)
    theta = _scale_to_box(rmatvec(problem.A, res), lam).unsqueeze(-1) * res
    F = 0.5 * res.square().sum(-1) + (lam * x.abs()).sum(-1)
    return F - ((problem.b * theta).sum(-1) - 0.5 * theta.square().sum(-1)), F


def _logistic_gap(problem: LogisticProblem, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""Logistic, :math:`F = \tfrac1N\sum_i \ell(w_i^\top x, y_i) + \sum_j\lambda_j|x_j|`,
    :math:`\ell(z, y) = \log(1 + e^z) - yz`. Fenchel dual:
    :math:`D(\theta) = -\tfrac1N\sum_i H(y_i + N\theta_i)`, :math:`H(v) = v\log v + (1 - v)\log(1 - v)`
    (the conjugate of :math:`\ell(\cdot, y)` at ``u`` is :math:`H(y + u)`), over
    :math:`|W_j^\top\theta| \le \lambda_j` and :math:`W_U^\top\theta = 0` for the unpenalized
    (intercept) coordinates ``U``. The dual point starts from the optimality condition
    :math:`\theta = \nabla_z = a / N`, :math:`a_i = \sigma(z_i) - y_i`; an intercept (a
    constant column) needs :math:`\sum_i a_i = 0`, got by shrinking the larger of the
    positive and negative parts of ``a`` onto the other; then ``a`` is scaled by ``s <= 1``
    into the box. Both moves take ``y + a`` towards ``y``, so it stays in ``[0, 1]``, where
    ``H`` is finite; at the minimiser nothing moves and the gap is 0."""
    lam = _l1_weights(problem)
    y = problem.y.to(x.dtype)
    z = matvec(problem.W, x)
    # sigma(z) - y without cancellation for the labels 0 and 1
    a = torch.where(y == 1, -torch.sigmoid(-z), torch.sigmoid(z) - y)
    penalized = (torch.as_tensor(lam, device=x.device) != 0).expand_as(x)
    if not bool(penalized.all()):
        pos, neg = a.clamp(min=0).sum(-1, keepdim=True), (-a).clamp(min=0).sum(-1, keepdim=True)
        shrink_pos = torch.where(pos > neg, neg / pos, torch.ones_like(pos))
        shrink_neg = torch.where(neg > pos, pos / neg, torch.ones_like(neg))
        a = torch.where(a > 0, a * shrink_pos, a * shrink_neg)
    N = problem.W.shape[1]
    a = a * _scale_to_box(rmatvec(problem.W, a) / N, lam, penalized).unsqueeze(-1)
    v, w = y + a, (1 - y) - a  # v and 1 - v, each without cancellation
    F = problem.smooth(x) + (lam * x.abs()).sum(-1)
    return F + (torch.xlogy(v, v) + torch.xlogy(w, w)).mean(-1), F


def _gap_function(problem: Problem) -> Callable[[Problem, Tensor], tuple[Tensor, Tensor]] | None:
    """The function ``x -> (gap, F(x))`` for ``problem``, or ``None`` where no gap is known."""
    if problem.prox != "l1" or not isinstance(problem, (LassoProblem, LogisticProblem)):
        return None
    ref = problem.x0()
    free = torch.broadcast_to(torch.as_tensor(_l1_weights(problem), device=ref.device) == 0, ref.shape)
    if not bool(free.any()):
        return _lasso_gap if isinstance(problem, LassoProblem) else _logistic_gap
    if isinstance(problem, LogisticProblem):
        # an unpenalized logistic coordinate is supported as an intercept: a constant column of W
        W = problem.W
        if bool(((W == W[:, :1]) | ~free.unsqueeze(1)).all()):
            return _logistic_gap
    # otherwise W_j^T theta = 0 (A_j^T theta = 0) is a dual constraint that no cheap dual point meets
    return None


def duality_gap(problem: Problem, x: Tensor) -> Tensor:
    r"""The duality gap :math:`F(x) - D(\theta(x)) \ge F(x) - F^\star \ge 0` per instance, for
    ``l1`` LASSO (:class:`~torch_l2o.problems.LassoProblem`) and ``l1`` logistic regression
    (:class:`~torch_l2o.problems.LogisticProblem`, mean binary cross-entropy).

    ``lam`` may be a number or a tensor of per-coordinate weights (broadcasting against
    ``x``); a logistic coordinate with weight 0 must have a constant column in ``W`` (an
    unpenalized intercept). It is exact up to rounding (``~1e-16 F``) and tends to 0 as
    ``x`` tends to the minimiser. Raises ``ValueError`` for other problems (use
    :func:`gradient_mapping`).
    """
    fn = _gap_function(problem)
    if fn is None:
        raise ValueError(
            f"no duality gap is known for {type(problem).__name__} with prox {problem.prox!r} "
            "(known: LassoProblem and LogisticProblem with prox 'l1'); use gradient_mapping, "
            "or solve(..., criterion='residual')")
    return fn(problem, x)[0]


# ---------------------------------------------------------------- the optimizer


def _build(method, p: Tensor, problem: Problem, lr, options: dict) -> ProxOptimizer | torch.optim.Optimizer:
    """The optimizer over ``p`` for ``method`` (a name, an optimizer class or a factory)."""
    cls = None
    if isinstance(method, str):
        key = method.lower()
        if key in _BASELINES:
            cls = _BASELINES[key]
            if cls is FISTA:
                options.setdefault("restart", True)
        elif key in available_architectures():
            cls = get_architecture(key).optimizer
        else:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(available_methods())} "
                             "(or pass an optimizer class or a factory params -> optimizer)")
    elif isinstance(method, type):
        if not issubclass(method, ProxOptimizer):
            raise TypeError(f"method={method.__name__} is not a torch_l2o ProxOptimizer; for another "
                            f"optimizer pass a factory, e.g. method=lambda ps: {method.__name__}(ps, lr=...)")
        cls = method
    elif callable(method):
        if not _is_default(lr) or options:
            raise TypeError("method is a factory params -> optimizer: give lr and options to the factory")
        opt = method([p])
        if not isinstance(opt, torch.optim.Optimizer) or not any(q is p for g in opt.param_groups for q in g["params"]):
            raise TypeError("the factory must return a torch.optim.Optimizer over the parameters it is given")
        return opt
    else:
        raise TypeError(f"method must be a name ({', '.join(available_methods())}), an optimizer class or a factory; "
                        f"got {type(method).__name__}")

    # which lr convention and whether the prox is the optimizer's job: the registry says
    arch = get_architecture(cls.arch) if issubclass(cls, LearnedOptimizer) else None
    lr_is_step = arch is None or arch.lr_is_step
    applies_prox = arch is None or arch.applies_prox
    kwargs: dict[str, Any] = {"instance_dims": 1}
    if applies_prox:
        kwargs.update(prox=problem.prox, prox_params=dict(problem.prox_params))
    if _is_default(lr):
        if lr_is_step:
            kwargs["lr"] = default_step(problem).to(p.dtype)
    else:
        kwargs["lr"] = lr
    return cls([p], **kwargs, **options)


def _is_default(lr) -> bool:
    return isinstance(lr, str) and lr == "default"


def _applies_prox(opt, problem: Problem) -> bool:
    """Whether ``opt`` applies the problem's prox itself (then it gets ``grad f``; else the
    subgradient of ``F = f + r``)."""
    return problem.prox == "none" or (
        isinstance(opt, ProxOptimizer) and all(g["prox"] == problem.prox for g in opt.param_groups))


# ---------------------------------------------------------------- freezing instances


def _per_instance(opt, p: Tensor, coord: dict[str, int | None]) -> dict[str, int]:
    """The state entries of ``p`` that hold per-instance data, each with the dim that
    indexes instances once viewed by :func:`_instance_view`: a learned network's state
    per coordinate (``B * n`` along its coordinate dim ``d``, instance-major: ``d``), and
    everything else whose first dim is ``B`` (``-1``). Shared entries (counters) stay."""
    out = {}
    for k, v in opt.state[p].items():
        if not isinstance(v, Tensor) or v.dim() == 0:
            continue
        d = coord.get(k)
        if d is not None and v.shape[d] == p.numel():
            out[k] = d
        elif d is None and v.shape[0] == p.shape[0]:
            out[k] = -1
    return out


def _instance_view(v: Tensor, d: int, B: int) -> tuple[Tensor, int]:
    """``v`` with a dim of size ``B`` indexing instances, and that dim."""
    return (v, 0) if d == -1 else (v.unflatten(d, (B, -1)), d)


def _snapshot(opt, p: Tensor, dims: dict[str, int]) -> dict[str, Tensor]:
    st = opt.state[p]
    return {"__p__": p.detach().clone(), **{k: st[k].clone() for k in dims}}


@torch.no_grad()
def _restore(opt, p: Tensor, frozen: Tensor, snap: dict[str, Tensor], dims: dict[str, int]) -> None:
    """Put the frozen instances' iterate and state back as they were before the step."""
    B = p.shape[0]
    p.copy_(torch.where(frozen.unsqueeze(-1), snap["__p__"], p))
    st = opt.state[p]
    for k, d in dims.items():
        new, dd = _instance_view(st[k], d, B)
        old, _ = _instance_view(snap[k], d, B)
        mask = frozen.reshape((1,) * dd + (B,) + (1,) * (new.dim() - dd - 1))
        st[k] = torch.where(mask, old, new).reshape(st[k].shape)


# ---------------------------------------------------------------- solve


def solve(problem: Problem, method: str | type | Callable = "fista", *, tol: float = 1e-6,
          max_iter: int = 10_000, lr: Any = "default", criterion: str = "auto", x0: Tensor | None = None,
          progress: bool = False, check_every: int = 1, **options: Any) -> SolveResult:
    r"""Minimise :math:`F(x) = f(x) + r(x)` for each of the ``B`` instances of ``problem``
    until a certified criterion reaches ``tol`` or ``max_iter`` steps.

    Args:
        problem: a :class:`~torch_l2o.problems.Problem` (iterate ``(B, n)``): its
            ``smooth`` is ``f``, its ``prox``/``prox_params`` name ``r``.
        method: ``"fista"`` (default: FISTA with adaptive restart), ``"ista"``, any
            registered learned architecture (``"pamr"``, ``"pa"``, ``"pagru"``, ``"l2odm"``,
            ``"rnnprop"``, ``"mathgd"``, ...), a :class:`~torch_l2o.optim.ProxOptimizer`
            subclass, or a factory ``params -> optimizer``. Optimizers that apply the
            problem's prox get ``grad f``; the others (L2O-DM, RNNProp, plain ``torch.optim``
            optimizers) get the subgradient of ``F`` (autograd of ``f + r``).
        tol: the stopping level (> 0) of the criterion (module docstring): relative
            duality gap for ``l1`` LASSO / logistic problems, else the relative
            gradient-mapping residual.
        max_iter: the most steps per instance.
        lr: ``"default"``: ``problem.step_size()`` (``0.9999 / L`` per instance) for
            step-size methods (ISTA, FISTA, the PA family, MathGD), the optimizer's own
            default (1.0) for those whose ``lr`` scales a network's output; ``None``: the
            optimizer's automatic step size; or a number / ``(B, 1)`` tensor.
        criterion: ``"auto"`` (the gap where known), ``"gap"`` or ``"residual"``.
        x0: the starting point ``(B, n)`` (default ``problem.x0()``).
        progress: show a tqdm progress bar.
        check_every: evaluate the criterion after every ``check_every``-th step (and the
            last): an instance stops at the first check that certifies it, at most
            ``check_every - 1`` steps after the step that reached ``tol``. The criterion
            costs about two gradients in float64 per check (on a batch of LASSO problems
            ``solve`` takes 2-4x the time of the bare steps with the default 1).
        **options: further optimizer arguments (``weights=``, ``safeguard=True``, ...).

    Returns:
        a :class:`SolveResult`. Warns :class:`ConvergenceWarning` when an instance did not
        converge.
    """
    t_start = time.perf_counter()
    if not isinstance(problem, Problem):
        raise TypeError(f"solve takes a torch_l2o.problems.Problem (one iterate of shape (B, n)), got "
                        f"{type(problem).__name__}; multi-block problems run their optimizer (GSO) in a loop")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be a number > 0, got {tol!r}; to run a fixed number of steps give a "
                         "tiny tol (1e-300) and max_iter")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
    if isinstance(lr, str) and not _is_default(lr):
        raise ValueError(f"lr must be 'default', None (automatic) or a step; got {lr!r}")
    if criterion not in ("auto", "gap", "residual"):
        raise ValueError(f"criterion must be 'auto', 'gap' or 'residual', got {criterion!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
    gap_fn = _gap_function(problem) if criterion != "residual" else None
    if criterion == "gap" and gap_fn is None:
        duality_gap(problem, problem.x0())  # raises the explanation
    B = problem.batch
    x_start = problem.x0() if x0 is None else x0.detach().to(problem.x0())
    if tuple(x_start.shape) != (B, problem.dim):
        raise ValueError(f"x0 must have shape {(B, problem.dim)}, got {tuple(x_start.shape)}")

    # the criterion in float64 whatever the iterates' dtype: in float32 the gap F - D cancels
    # to ~1e-5 of F, so tol=1e-6 could never be certified for a point that does reach it
    p64 = problem if problem.dtype == torch.float64 else problem.to(torch.float64)
    if gap_fn is not None:
        name = "gap"

        def measure(x):
            gap, F = gap_fn(p64, x.double())
            return gap / F.clamp(min=torch.finfo(F.dtype).tiny)
    else:
        name = "residual"
        step = default_step(p64)
        scale = gradient_mapping(p64, x_start.double(), step).clamp(min=torch.finfo(torch.float64).tiny)

        def measure(x):
            return gradient_mapping(p64, x.double(), step) / scale

    with torch.no_grad():
        crit = measure(x_start)
    done = crit <= tol
    if bool(done.any()) and not bool(done.all()):
        # Instances optimal at the start never meet the optimizer (whose state is created at
        # its first step, too late to freeze them): solve the others and put them back.
        return _solve_subset(problem, method, ~done, x_start, crit, name, t_start, tol=tol, max_iter=max_iter,
                             lr=lr, criterion=name, progress=progress, check_every=check_every, **options)

    p = x_start.clone().requires_grad_(True)
    opt = _build(method, p, problem, lr, dict(options))
    subgradient = not _applies_prox(opt, problem)
    coord = opt.net.coordinate_dims() if isinstance(opt, LearnedOptimizer) else {}

    def closure():
        opt.zero_grad()
        f = problem.smooth(p)
        (f + problem.regularizer(p) if subgradient else f).sum().backward()
        return f.detach()  # one value per instance: backtracking (lr=None) runs per instance

    def solution():
        return opt.solution(p) if isinstance(opt, ProxOptimizer) else p.detach()

    iterations = torch.zeros(B, dtype=torch.int64, device=crit.device)
    history = [crit]
    # below float64 an instance whose criterion stops improving (a float32 point's certified
    # gap floors near 1e-5 of F) is stopped too, unconverged, rather than run to max_iter;
    # in float64 slow stretches are progress (logistic regression at C = 1: 4,000 steps)
    stall_after = STALL if problem.dtype != torch.float64 else max_iter + 1
    mark, since = crit.clone(), torch.zeros_like(iterations)
    stopped = done.clone()
    with tqdm(total=max_iter, disable=not progress, desc=f"solve ({name})") as bar:
        frozen = stopped.clone()  # changes at checks only
        for k in range(max_iter):
            if bool(stopped.all()):
                break
            dims = _per_instance(opt, p, coord) if bool(frozen.any()) else None
            snap = _snapshot(opt, p, dims) if dims is not None else None
            opt.step(closure)
            if snap is not None:
                _restore(opt, p, frozen, snap, dims)
            iterations += ~frozen
            bar.update(1)
            if (k + 1) % check_every and k + 1 < max_iter:
                continue
            with torch.no_grad():
                crit = torch.where(frozen, crit, measure(solution()))
            done = done | (crit <= tol)
            better = crit < 0.9 * mark
            mark, since = torch.where(better, crit, mark), torch.where(better, 0, since + check_every)
            stopped = frozen | done | (since >= stall_after)
            frozen = stopped.clone()
            history.append(crit)
            bar.set_postfix(done=f"{int(done.sum())}/{B}", worst=f"{float(crit.max()):.2e}")

    x = solution().clone()
    with torch.no_grad():
        F = gap_fn(problem, x)[1] if gap_fn is not None else problem.objective(x)
    if not bool(done.all()):
        stalled = int((stopped & ~done).sum())
        low = problem.dtype != torch.float64
        warnings.warn(
            f"solve: {int((~done).sum())} of {B} instances did not reach {name} <= {tol:g} in "
            f"max_iter={max_iter} steps (worst {float(crit.max()):.3g})"
            + (f"; {stalled} stopped improving for {STALL} steps" if stalled else "")
            + ("; a float32 point's certified gap rarely goes below ~1e-5 of F: solve "
               "problem.to(torch.float64) for a tighter tol" if low and name == "gap" else "")
            + "; else raise max_iter, loosen tol, or try method='fista'", ConvergenceWarning, stacklevel=2)
    return SolveResult(x=x, objective=F.detach(), criterion=name, converged=done.cpu(),
                       iterations=iterations.cpu(), history=torch.stack(history).cpu(),
                       seconds=time.perf_counter() - t_start)


def _solve_subset(problem: Problem, method, active: Tensor, x_start: Tensor, crit0: Tensor, name: str,
                  t_start: float, *, lr, **kwargs) -> SolveResult:
    """:func:`solve` on the ``active`` instances only, the others kept at ``x_start``."""
    idx = torch.nonzero(active).squeeze(-1)
    if isinstance(lr, Tensor) and lr.dim() > 0 and lr.shape[0] == problem.batch:
        lr = lr[idx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # re-raised below with the full count
        sub = solve(problem[idx], method, x0=x_start[idx], lr=lr, **kwargs)
    x = x_start.clone()
    x[idx] = sub.x
    history = crit0.cpu().expand(sub.history.shape[0], -1).clone()
    history[:, idx.cpu()] = sub.history
    converged = torch.ones(problem.batch, dtype=torch.bool)
    converged[idx.cpu()] = sub.converged
    iterations = torch.zeros(problem.batch, dtype=torch.int64)
    iterations[idx.cpu()] = sub.iterations
    with torch.no_grad():
        gap_fn = _gap_function(problem) if name == "gap" else None
        F = gap_fn(problem, x)[1] if gap_fn is not None else problem.objective(x)
    if not bool(converged.all()):
        warnings.warn(
            f"solve: {int((~converged).sum())} of {problem.batch} instances did not reach {name} <= "
            f"{kwargs['tol']:g} in max_iter={kwargs['max_iter']} steps; raise max_iter, loosen tol, or try "
            "method='fista'", ConvergenceWarning, stacklevel=3)
    return SolveResult(x=x, objective=F, criterion=name, converged=converged, iterations=iterations,
                       history=history, seconds=time.perf_counter() - t_start)
