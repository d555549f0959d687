"""Meta-training: truncated backpropagation through the optimizers' own update functions.

``meta_train(arch, family)`` trains one learned optimizer on a problem family with the
MS4L2O protocol as defaults: each step draws a fresh batch, unrolls ``horizon``
iterations in segments of ``unroll`` (iterates and recurrent state detached between
segments), and takes one Adam step per segment on the segment's meta-loss. The
unroll calls exactly the functions the optimizers' ``step()`` calls
(:mod:`torch_l2o.optim.functional`), out of place and differentiably.

Reliability: gradient clipping; a segment whose meta-loss or gradient is not finite is
skipped and counted, never applied; validation on held instances every
``val_every`` steps keeps the best weights; checkpoints every ``checkpoint_every``
steps (atomic, loaded with ``torch.load(weights_only=True)``) and ``resume=`` repeat
the run exactly; a seed fixes everything. Data-parallel with ``torch.distributed``
(launch with ``torchrun``; gloo on CPU, NCCL on GPUs): each rank samples its own
instances and the gradients are averaged.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .problems import Problem, ProblemFamily, mean_relative_error, optimal_values
from .problems.base import relative_gap
from .optim import stepsize
from .prox import get_prox
from .registry import Architecture, available_architectures, get_architecture
from .weights import build_network

__all__ = ["meta_train", "MetaHistory", "rollout", "evaluate"]

LOSSES = ("log", "mean", "log_gap", "log_mean_gap", "last")
GAP_LOSSES = ("log_gap", "log_mean_gap")  # need F* per training batch


@dataclass
class MetaHistory:
    """What a run recorded; ``best`` is the validation score of the kept weights."""

    loss: list[float] = field(default_factory=list)          # mean meta-loss per step
    grad_norm: list[float] = field(default_factory=list)     # before clipping
    val_step: list[int] = field(default_factory=list)
    val_score: list[float] = field(default_factory=list)     # lower is better, see evaluate()
    skipped: int = 0                                         # segments not applied (non-finite)
    best: float = math.inf
    best_step: int = -1
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------- the unroll


def _gradient(problem, ys: list[Tensor], b: int, subgradient: bool) -> Tensor:
    """``grad f`` in block ``b`` at ``ys``, differentiable when grad is enabled; with
    ``subgradient`` plus that of the block's ``r`` (for architectures that apply no prox)."""
    create = torch.is_grad_enabled()
    y = ys[b]
    if isinstance(problem, Problem) and type(problem).grad is not Problem.grad:
        g = problem.grad(y)  # closed form
    else:
        with torch.enable_grad():
            yy = y if y.requires_grad else y.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(problem.smooth(*ys[:b], yy, *ys[b + 1:]).sum(), yy, create_graph=create)
    name, params = problem.block_prox()[b]
    if subgradient and name != "none":
        spec = get_prox(name)
        with torch.enable_grad():
            yy = y.detach().requires_grad_(True)
            (gr,) = torch.autograd.grad(spec.r(yy, 1, **spec.resolve(params)).sum(), yy)
        g = g + gr
    return g


def rollout(arch: str, net, problem, carry: dict | None, steps: int, *, lr: Tensor | float | None = None,
            score: str = "x", inner_steps: int = 1) -> tuple[Tensor, dict]:
    """Run ``steps`` rounds of the learned optimizer on ``problem`` (grad enabled:
    differentiable in the network's weights). A round moves each variable block in turn
    by ``inner_steps`` learned steps with the others fixed (GSO's alternation, seed 003
    Algorithm 2); a single-block problem with ``inner_steps=1`` takes one step per round.
    Returns ``F`` after every round, shape ``(steps, B)``, and the carry (iterates,
    recurrent states, rounds) to continue from. ``lr``: the base step for architectures
    whose ``lr`` is a step (default ``problem.step_size()``), else the output scale (1);
    ``"auto"``: the step ``lr=None`` gives ``step()`` (the secant estimate of ``1/L``, a
    probe first, times the optimizer class's ``auto_lr_scale``), by the same function."""
    spec = get_architecture(arch)
    if carry is None:
        ys = problem.starts()
        carry = {"xs": list(ys), "ys": list(ys), "k": 0,
                 "states": [net.block(b).init_state(y.numel(), y.device) for b, y in enumerate(ys)]}
    xs, ys, states, k = list(carry["xs"]), list(carry["ys"]), list(carry["states"]), carry["k"]
    auto = isinstance(lr, str) and lr == "auto"
    if auto:  # the estimator's state, one dict per block as step() keeps one per parameter
        estimates = [dict(d) for d in carry.get("auto", [{} for _ in ys])]
    elif lr is None:
        lr = problem.step_size() if spec.lr_is_step else 1.0
    proxes = [(name, get_prox(name).resolve(params)) if spec.applies_prox else ("none", {})
              for name, params in problem.block_prox()]
    values = []
    for _ in range(steps):
        for b in range(len(ys)):
            for i in range(inner_steps):
                g = _gradient(problem, ys, b, subgradient=not spec.applies_prox)
                step_lr = lr
                if auto:  # a step is data, as in step(): no gradient flows through the estimate
                    step_lr = spec.optimizer.auto_lr_scale * stepsize.online_lipschitz(
                        [estimates[b]], [ys[b].detach()], [g.detach()], 1)
                xn, yn, states[b] = spec.update(
                    net.block(b), states[b], [ys[b]], [g], [xs[b] if spec.extrapolates else ys[b]], lr=step_lr,
                    prox=proxes[b][0], params=proxes[b][1], step=k * inner_steps + i, instance_dims=1)
                xs[b], ys[b] = xn[0], yn[0]
        k += 1
        values.append(problem.objective(*(xs if score == "x" else ys)))
    out = {"xs": xs, "ys": ys, "states": states, "k": k}
    if auto:
        out["auto"] = estimates
    return torch.stack(values), out


def _detach(carry: dict) -> dict:
    xs = [x.detach() for x in carry["xs"]]
    ys = [y.detach() if y is not x else d for x, y, d in zip(carry["xs"], carry["ys"], xs)]
    out = {"xs": xs, "ys": ys, "k": carry["k"], "states": [{n: t.detach() for n, t in st.items()}
                                                           for st in carry["states"]]}
    if "auto" in carry:  # the step estimator's state: detached already
        out["auto"] = carry["auto"]
    return out


def _meta_loss(F: Tensor, kind: str, F_star: Tensor | None, F0: Tensor | None = None) -> Tensor:
    """Scalar meta-loss of a segment from ``F`` of shape ``(steps, B)``; ``F0`` is each
    instance's objective at the start of the horizon."""
    if kind == "mean":
        return F.mean()
    if kind == "log":
        # log F's gradient 1/F vanishes as an instance diverges: charge an objective above
        # its start linearly, so the rare instance that blows up is pushed back hard
        penalty = torch.relu(F / F0 - 1).mean() if F0 is not None else 0.0
        return torch.log(F).mean() + penalty
    if kind == "last":
        return F[-1].mean()
    if kind == "log_mean_gap":
        # the benchmark's metric: its value is ruled by the slowest instances, which decide
        # when the mean reaches a tolerance; it pulls every instance alike per unit of
        # relative gap (log_gap's pull, 1 / gap, grows as an instance converges)
        rel = torch.clamp(relative_gap(F, F_star), min=0) + 1e-7
        return torch.log(rel.mean(-1)).mean()
    gap = torch.clamp(F - F_star, min=0) + 1e-7 * F_star.abs()
    return torch.log(gap).mean()


@torch.no_grad()
def evaluate(arch: str, net, problem, F_star: Tensor | None, iters: int, inner_steps: int = 1,
             lr: Tensor | str | None = None) -> Tensor:
    """Mean relative error after every round 1..iters, float64, shape ``(iters,)``; without
    ``F*`` (non-convex multi-block problems) the mean objective after every round. ``lr``
    as in :func:`rollout`."""
    F, _ = rollout(arch, net, problem, None, iters, lr=lr, inner_steps=inner_steps)
    if F_star is None:
        return F.double().mean(-1)
    return torch.stack([mean_relative_error(f, F_star) for f in F])


def _val_score(errs: Tensor) -> float:
    """Mean over iterations of log10 of the mean relative error (floored at 1e-12):
    the area under the convergence curve on a log scale; lower is better."""
    e = torch.nan_to_num(errs, nan=1e6, posinf=1e6).clamp(min=1e-12, max=1e6)
    return float(torch.log10(e).mean())


# ---------------------------------------------------------------- training


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_distributed(device: str) -> bool:
    """Join the process group torchrun describes in the environment; False if alone."""
    if not (dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return True


def _seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & ((1 << 63) - 1)
    return h


def _check_arguments(arch: Any, family: Any, loss: str, score: str, horizon: int, unroll: int, steps: int,
                     batch: int, meta_optimizer: str, val_batches: int = 1, step_scale: Any = None,
                     auto_step: Any = 0.0) -> Architecture:
    """Every argument error before anything runs, each naming the fix."""
    if not isinstance(arch, str) and (hasattr(arch, "sample") or isinstance(family, str)):
        raise TypeError("meta_train(arch, family): the architecture's name comes first, e.g. "
                        "meta_train('pamr', Lasso())")
    spec = get_architecture(arch)
    if isinstance(family, type):
        raise TypeError(f"meta_train needs a family instance, e.g. {family.__name__}(), not the class {family.__name__}")
    if not callable(getattr(family, "sample", None)):
        what = "a sampled problem batch" if hasattr(family, "objective") else type(family).__name__
        raise TypeError(f"meta_train needs a ProblemFamily (something with .sample(batch)), got {what}; "
                        "pass the family itself, e.g. Lasso(m=250, n=500), not family.sample(...)")
    for name, v in (("steps", steps), ("batch", batch), ("horizon", horizon), ("unroll", unroll),
                    ("val_batches", val_batches)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"meta_train: {name} must be an int >= 1, got {v!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if score not in ("x", "y"):
        raise ValueError(f"score must be 'x' or 'y', got {score!r}")
    if horizon % unroll:
        raise ValueError(f"horizon ({horizon}) must be a multiple of the unroll length ({unroll})")
    if meta_optimizer not in ("adam", "sgd"):
        raise ValueError(f"meta_optimizer must be 'adam' or 'sgd', got {meta_optimizer!r}")
    if step_scale is not None:
        ok = (isinstance(step_scale, (tuple, list)) and len(step_scale) == 2
              and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in step_scale))
        if not ok or not 0 < step_scale[0] <= step_scale[1] < math.inf:
            raise ValueError(f"step_scale must be a pair (lo, hi) with 0 < lo <= hi < inf, e.g. (0.5, 1.0); "
                             f"got {step_scale!r}")
        if not spec.lr_is_step:
            raise ValueError(f"step_scale scales the base step 1/L; {spec.display_name}'s lr scales its output "
                             "instead: leave step_scale=None")
    if isinstance(auto_step, bool) or not isinstance(auto_step, (int, float)) or not 0 <= auto_step <= 1:
        raise ValueError(f"auto_step is the share of batches trained with the automatic step, a number in "
                         f"[0, 1], e.g. 0.5; got {auto_step!r}")
    if auto_step and not spec.lr_is_step:
        raise ValueError(f"auto_step trains at the estimated base step 1/L; {spec.display_name}'s lr scales its "
                         "output instead: leave auto_step=0")
    return spec


def build(spec: Architecture, *, init: Any, seed: int, device: str, meta_optimizer: str,
          lr: float, net_options: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The network to train (seeded, on ``device``, in training mode) and its optimizer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(seed, 1))
        net, _ = build_network(spec.name, init, **net_options)
    net.to(device).train()
    for q in net.parameters():
        q.requires_grad_(True)
    opt = (torch.optim.Adam if meta_optimizer == "adam" else torch.optim.SGD)(net.parameters(), lr=lr)
    return net, opt


def _save_checkpoint(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the previous checkpoint intact


def _describe(family) -> str:
    """A family's settings as text, stable across processes (a dataclass's repr; otherwise
    only its type: an object's default repr holds its memory address)."""
    return repr(family) if dataclasses.is_dataclass(family) else type(family).__qualname__


def save_checkpoint(path: str, arch: str, step: int, net, opt, best: dict, hist: MetaHistory,
                    run: dict | None = None) -> None:
    """Everything a resumed run needs to repeat the uninterrupted one; ``run``: the settings
    that must match for a resume to be that run (everything but ``steps``)."""
    _save_checkpoint(path, {"arch": arch, "step": step, "net": net.state_dict(), "opt": opt.state_dict(),
                            "best": best, "history": hist.as_dict(), "run": run or {}})


def load_checkpoint(path: str, arch: str, net, opt, device: str,
                    run: dict | None = None) -> tuple[dict, MetaHistory, int]:
    """Restore ``net`` and ``opt`` from ``path``; returns the best weights, history and step.
    A checkpoint written with other ``run`` settings is refused: resuming it would silently
    continue a different run (checkpoints written before settings were recorded are accepted)."""
    try:
        ck = torch.load(path, weights_only=True, map_location=device)  # no pickle: tensors and plain data
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is truncated, "
                         "corrupt or not a torch_l2o checkpoint: delete it to start over") from e
    if ck["arch"] != arch:
        raise ValueError(f"checkpoint {path} is for {ck['arch']!r}, not {arch!r}")
    saved = ck.get("run") or {}
    differ = sorted(k for k in (run or {}) if k in saved and saved[k] != run[k])
    if differ:
        what = "; ".join(f"{k}: checkpoint {saved[k]!r}, now {run[k]!r}" for k in differ)
        raise ValueError(f"checkpoint {path} is another run ({what}): resume it with its settings, "
                         "or pass another checkpoint path (or delete it) to start this one")
    net.load_state_dict(ck["net"])
    opt.load_state_dict(ck["opt"])
    return ck["best"], MetaHistory(**ck["history"]), ck["step"]


class Validation:
    """Held instances (``batches`` seeded batches, float64 ``F*`` where the family is
    convex) and the record of the best weights: calling it scores ``net`` (the mean of the
    batches' scores) and keeps it if best. Several batches cover a mixture family whose
    batches differ in shape. ``steps``: the base steps to score at (``None``: ``0.9999 / L``;
    ``"auto"``: as ``lr=None``), the score their mean."""

    def __init__(self, spec: Architecture, family: ProblemFamily, *, batch: int, iters: int, inner_steps: int,
                 seed: int, device: str, batches: int = 1, steps: tuple = (None,)) -> None:
        self.sets = []
        for i in range(batches):
            # the first batch is the one a single-batch validation has always drawn
            gen = torch.Generator().manual_seed(_seed(seed, 2) if i == 0 else _seed(seed, 2, i))
            val = family.sample(batch, generator=gen, dtype=torch.float64)
            F_star = optimal_values(val).to(device) if isinstance(val, Problem) else None
            self.sets.append((val.to(device=device, dtype=torch.float32), F_star))
        self.spec, self.iters, self.inner_steps, self.steps = spec, iters, inner_steps, steps

    def __call__(self, step: int, net, hist: MetaHistory, best: dict) -> None:
        net.eval()
        score = sum(_val_score(evaluate(self.spec.name, net, prob, F_star, self.iters, self.inner_steps, lr=lr))
                    for prob, F_star in self.sets for lr in self.steps) / (len(self.sets) * len(self.steps))
        net.train()
        hist.val_step.append(step)
        hist.val_score.append(score)
        if score < hist.best:
            hist.best, hist.best_step = score, step
            best.update({k: v.detach().clone() for k, v in net.state_dict().items()})


def all_reduce_gradients(params, ok: bool, device: str) -> bool:
    """Average the gradients over the ranks (one all-reduce); a rank whose segment was
    not finite vetoes the step everywhere. Returns whether every rank was finite."""
    world = dist.get_world_size()
    grads = [q.grad for q in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([float(ok)], device=device)])
    dist.all_reduce(flat)
    off = 0
    for g in grads:
        g.copy_(flat[off : off + g.numel()].view_as(g) / world)
        off += g.numel()
    return flat[-1].item() == world


def meta_step(spec: Architecture, net, opt, problem, *, horizon: int, unroll: int, loss: str, score: str,
              clip: float | None, inner_steps: int, F_star: Tensor | None, distributed: bool, device: str,
              hist: MetaHistory, lr: Tensor | str | None = None) -> tuple[list[float], list[float]]:
    """One meta-training step on one batch: unroll ``horizon`` rounds in segments of
    ``unroll``, one optimizer step per segment on its meta-loss, everything detached
    between segments. A segment whose loss or gradient is not finite is skipped (and
    counted in ``hist.skipped``); non-finite iterates end the batch. Returns the applied
    segments' losses and gradient norms. ``lr``: the base step (default the problem's
    ``0.9999 / L``; ``"auto"``: as ``step()`` with ``lr=None``, see :func:`rollout`)."""
    carry, losses, norms = None, [], []
    with torch.no_grad():
        F0 = problem.objective(*problem.starts()).detach()
    for _ in range(horizon // unroll):
        F, carry = rollout(spec.name, net, problem, carry, unroll, lr=lr, score=score, inner_steps=inner_steps)
        meta = _meta_loss(F, loss, F_star, F0)
        opt.zero_grad(set_to_none=False)
        ok = bool(torch.isfinite(meta))
        if ok:
            meta.backward()
        if distributed:
            ok = all_reduce_gradients(list(net.parameters()), ok, device)
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip if clip else math.inf)
        if ok and bool(torch.isfinite(norm)):
            opt.step()
            losses.append(float(meta.detach()))
            norms.append(float(norm))
        else:
            hist.skipped += 1
            if not ok:
                break  # iterates went non-finite: this batch is done
        carry = _detach(carry)
    return losses, norms


def meta_train(
    arch: str,
    family: ProblemFamily,
    *,
    steps: int = 500,
    batch: int = 64,
    horizon: int = 100,
    unroll: int = 20,
    lr: float | None = None,
    loss: str = "log",
    score: str = "x",
    clip: float = 1.0,
    val_every: int = 20,
    val_batch: int = 256,
    val_iters: int | None = None,
    val_batches: int = 1,
    seed: int = 0,
    checkpoint: str | None = None,
    checkpoint_every: int = 20,
    resume: str | None = None,
    init: Any = "untrained",
    inner_steps: int | None = None,
    meta_optimizer: str = "adam",
    fixed_batch: bool = False,
    step_scale: tuple[float, float] | None = None,
    auto_step: float = 0.0,
    device: str = "cpu",
    progress: bool = True,
    callback: Callable[[int, MetaHistory], None] | None = None,
    **net_options: Any,
) -> tuple[dict[str, Tensor], MetaHistory]:
    """Meta-train the learned optimizer ``arch`` (any registered architecture:
    :func:`~torch_l2o.registry.available_architectures`) on ``family``; returns the best
    weights and the history.

    Args:
        steps: meta-training steps, each on a fresh batch of ``batch`` instances.
        horizon, unroll: rounds per batch (for a single-block family, iterations), and
            the truncation segment: one meta-optimizer step per segment, everything
            detached between segments.
        lr: the meta-optimizer's step (default 3e-3 for the ``"log"`` losses, 1e-2 for ``"mean"``).
        loss: ``"log"`` (default): mean over a segment's iterations and instances of
            ``log F`` -- scale-free, so every instance and every iteration counts, and
            training stays stable; ``"mean"``: the reference's mean of ``F`` (dominated by
            the first, large values; diverged in our trials at lr 1e-2);
            ``"log_gap"``: mean ``log(F - F*)``, which needs ``F*`` per batch (a float64
            solve per step) and rewards high accuracy most; ``"log_mean_gap"``: mean over
            iterations of ``log`` of the batch-mean relative gap ``(F - F*) / |F*|`` (the
            benchmark's metric, ruled by the slowest instances); ``"last"``: the batch-mean ``F``
            at a segment's last iteration (Math-L2O's objective; with ``unroll=horizon``,
            full backpropagation through the horizon).
        score: evaluate ``F`` at the prox output ``"x"`` (what users read, the default)
            or at the extrapolated point ``"y"`` (the reference code).
        clip: gradient-norm clipping (``None``: off).
        val_every, val_batch, val_iters: validation cadence, held instances, rounds
            (default ``horizon``); the kept weights are those with the best score.
        val_batches: validate on this many held batches of ``val_batch`` (a mixture family
            draws a shape per batch: several batches cover it); the score is their mean.
        seed: fixes batches, validation set, initialisation and dropout.
        checkpoint, checkpoint_every, resume: where and how often to save; a checkpoint
            to continue from (the run then repeats the uninterrupted one exactly; one written
            with other settings, ``steps`` aside, is refused).
        init: initial weights (``"untrained"``, a name, a path or a state dict).
        inner_steps: learned steps per variable block per round (``t_l`` of GSO; default
            the architecture's training setting, else 1). On a multi-block family each
            round moves every block in turn and the loss is over the global objective.
        meta_optimizer: ``"adam"`` (default) or ``"sgd"`` (Math-L2O's protocol).
        fixed_batch: train on the same ``batch`` instances at every step (a fixed training
            set, as in Math-L2O's convergence analysis) instead of fresh ones.
        step_scale: ``(lo, hi)``: train with the base step ``c / L``, ``c`` drawn per instance
            and batch log-uniformly from ``[lo, hi]`` instead of ``0.9999 / L`` (augmentation:
            with ``lr=None`` and the default multiplier 0.5 the PA family steps at half the
            estimate ``1 / L_k``, which on the LASSO family is about ``0.7 / L``: a step a
            network trained at ``1 / L`` alone never met; ``auto_step`` trains at the
            estimated step itself). Validation stays at ``0.9999 / L``. Only for
            architectures whose ``lr`` is the base step.
        auto_step: the share of training batches (drawn per batch) unrolled with the
            step ``lr=None`` gives ``step()``: the secant estimate of ``1/L`` with its
            first, probing step, times the optimizer class's ``auto_lr_scale`` (0.5 for
            the PA family; a card's calibrated multiplier is measured after training,
            ``pretrained/train.py --calibrate-step``), by the same function.
            ``step_scale`` does not apply to those batches. The validation
            score is then the mean of the scores at ``0.9999 / L`` and with the automatic
            step. Only for architectures whose ``lr`` is the base step.
        **net_options: the network's constructor arguments.

    Time: a step costs about ``batch x horizon`` learned steps forward and backward; on
    one CPU core the shipped LASSO settings (batch 32, horizon 100, 300 steps) take
    40-110 minutes per architecture.
    """
    spec = _check_arguments(arch, family, loss, score, horizon, unroll, steps, batch, meta_optimizer, val_batches,
                            step_scale, auto_step)
    auto_step = float(auto_step)
    if step_scale is not None:
        step_scale = (float(step_scale[0]), float(step_scale[1]))
    lr = lr if lr is not None else (1e-2 if loss == "mean" else 3e-3)
    inner_steps = inner_steps if inner_steps is not None else spec.training.get("inner_steps", 1)
    sample = family.sample(1, generator=torch.Generator().manual_seed(0))
    convex = isinstance(sample, Problem)
    if spec.lr_is_step and not convex:
        raise ValueError(f"{spec.display_name}'s lr is the base step 1/L, which a multi-block family does not give: "
                         f"train an architecture whose lr scales its output on it "
                         f"({', '.join(a for a in available_architectures() if not get_architecture(a).lr_is_step)})")
    if loss in GAP_LOSSES and not convex:
        raise ValueError(f"loss={loss!r} needs F*, which multi-block (non-convex) families do not have")
    if resume is not None and not os.path.exists(resume) and resume != checkpoint:
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint (to start fresh and checkpoint there, "
                                "pass the same path as checkpoint=)")
    distributed = _init_distributed(device)
    rank, _ = _rank_world()

    if "blocks" in inspect.signature(spec.network.__init__).parameters:  # one network per variable block
        net_options.setdefault("blocks", len(sample.blocks))
    net, opt = build(spec, init=init, seed=seed, device=device, meta_optimizer=meta_optimizer, lr=lr,
                     net_options=net_options)
    hist = MetaHistory()
    best = {k: v.detach().clone() for k, v in net.state_dict().items()}
    start = 0
    # what makes this run this run (everything but its length): a resume must match it
    run = {"family": _describe(family), "batch": batch, "horizon": horizon, "unroll": unroll, "lr": lr, "loss": loss,
           "score": score, "clip": clip, "val_every": val_every, "val_batch": val_batch, "val_iters": val_iters,
           "val_batches": val_batches, "seed": seed, "inner_steps": inner_steps, "meta_optimizer": meta_optimizer,
           "fixed_batch": fixed_batch, **({"step_scale": list(step_scale)} if step_scale else {}),
           **({"auto_step": auto_step} if auto_step else {}),
           "net_options": repr(sorted(net_options.items())),
           "init": init if isinstance(init, str) else "given weights"}
    if resume is not None and os.path.exists(resume):
        best, hist, start = load_checkpoint(resume, spec.name, net, opt, device, run=run)
    validate = Validation(spec, family, batch=val_batch, iters=val_iters or horizon, inner_steps=inner_steps,
                          seed=seed, device=device, batches=val_batches,
                          steps=(None, "auto") if auto_step else (None,))

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=f"meta_train {spec.name}", dynamic_ncols=True)
    t0 = time.perf_counter()
    if start == 0 and not hist.val_step:
        validate(0, net, hist, best)
    for step in range(start, steps):
        gen = torch.Generator().manual_seed(_seed(seed, 3, 0 if fixed_batch else step, rank))
        prob = family.sample(batch, generator=gen, dtype=torch.float64 if loss in GAP_LOSSES else torch.float32)
        F_star = optimal_values(prob).float().to(device) if loss in GAP_LOSSES else None
        prob = prob.to(device=device, dtype=torch.float32)
        base_step = None
        if step_scale is not None:  # log-uniform c per instance, from this batch's generator
            L = prob.lipschitz.double().cpu().unsqueeze(-1)
            lo, hi = math.log(step_scale[0]), math.log(step_scale[1])
            c = torch.exp(lo + (hi - lo) * torch.rand(L.shape, generator=gen, dtype=torch.float64))
            base_step = (c / L).to(device=device, dtype=torch.float32)
        if auto_step and float(torch.rand((), generator=gen)) < auto_step:
            base_step = "auto"  # as step() with lr=None; drawn last, so runs without it repeat
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(seed, 4, step, rank))  # dropout
            losses, norms = meta_step(spec, net, opt, prob, horizon=horizon, unroll=unroll, loss=loss, score=score,
                                      clip=clip, inner_steps=inner_steps, F_star=F_star, distributed=distributed,
                                      device=device, hist=hist, lr=base_step)
        hist.loss.append(sum(losses) / len(losses) if losses else math.nan)
        hist.grad_norm.append(max(norms) if norms else math.nan)
        done = step + 1
        if done % val_every == 0 or done == steps:
            validate(done, net, hist, best)
        hist.seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        if checkpoint and rank == 0 and (done % checkpoint_every == 0 or done == steps):
            save_checkpoint(checkpoint, spec.name, done, net, opt, best, hist, run=run)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{hist.loss[-1]:.3g}", best=f"{hist.best:.3g}", skipped=hist.skipped)
        if callback is not None:
            callback(done, hist)
    if bar is not None:
        bar.close()
    return best, hist
