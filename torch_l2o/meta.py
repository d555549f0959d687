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

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .nets import NETWORKS
from .optim.functional import dm_update, mathgd_update, pa_update, rnnprop_update
from .problems.base import Problem, ProblemFamily, mean_relative_error, optimal_values
from .problems.multiblock import BlockFamily, BlockProblem
from .prox import get_prox
from .weights import build_network

__all__ = ["meta_train", "MetaHistory", "rollout", "rollout_blocks", "evaluate"]

PA_FAMILY = ("pa", "pagru", "pamr")
PROX_ARCHS = PA_FAMILY + ("mathgd",)  # they apply the prox of r; the others see its subgradient
LOSSES = ("log", "mean", "log_gap", "last")


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


def _gradient(problem: Problem, y: Tensor, arch: str) -> Tensor:
    """``grad f(y)``, differentiable in ``y``; for L2O-DM and RNNProp the subgradient of
    ``F = f + r`` (they apply no prox)."""
    if type(problem).grad is not Problem.grad:
        g = problem.grad(y)
    else:
        with torch.enable_grad():
            yy = y if y.requires_grad else y.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(problem.smooth(yy).sum(), yy, create_graph=torch.is_grad_enabled())
    if arch not in PROX_ARCHS and problem.prox != "none":
        with torch.enable_grad():
            yy = y.detach().requires_grad_(True)
            (gr,) = torch.autograd.grad(problem.regularizer(yy).sum(), yy)
        g = g + gr
    return g


def rollout(arch: str, net, problem: Problem, carry: dict | None, steps: int, *, lr: Tensor | float | None = None,
           score: str = "x") -> tuple[Tensor, dict]:
    """Run ``steps`` iterations of the learned optimizer on ``problem`` (grad enabled:
    differentiable in the network's weights). Returns ``F`` at every iteration,
    shape ``(steps, B)``, and the carry (iterates, recurrent state, step count) to
    continue from. ``lr``: the PA family's base step (default ``problem.step_size()``),
    L2O-DM's and RNNProp's output scale (default 1)."""
    if carry is None:
        y = problem.x0()
        carry = {"x": y, "y": y, "state": net.init_state(y.numel(), y.device), "k": 0}
    x, y, state, k = carry["x"], carry["y"], carry["state"], carry["k"]
    if lr is None:
        lr = problem.step_size() if arch in PROX_ARCHS else 1.0
    spec = get_prox(problem.prox)
    params = spec.resolve(problem.prox_params)
    values = []
    for _ in range(steps):
        g = _gradient(problem, y, arch)
        if arch in PA_FAMILY:
            x, y, state = pa_update(net, state, y, g, x, lr=lr, prox=problem.prox, params=params, instance_dims=1)
        elif arch == "mathgd":
            y = mathgd_update(net, y, g, lr=lr, prox=problem.prox, params=params)
            x = y
        elif arch == "l2odm":
            y, state = dm_update(net, state, y, g, lr=lr)
            x = y
        else:
            y, state = rnnprop_update(net, state, y, g, lr=lr, step=k)
            x = y
        k += 1
        values.append(problem.objective(x if score == "x" else y))
    return torch.stack(values), {"x": x, "y": y, "state": state, "k": k}


def rollout_blocks(net, problem: BlockProblem, carry: dict | None, rounds: int, *, inner_steps: int = 10,
                   lr: float = 1.0) -> tuple[Tensor, dict]:
    """GSO's alternation (seed 003, Algorithm 2): per round, each block in turn takes
    ``inner_steps`` learned steps on the global loss with the others fixed. Returns ``F``
    after every round, shape ``(rounds, B)``, and the carry (blocks, states)."""
    if carry is None:
        xs = problem.x0()
        carry = {"xs": xs, "states": [net.nets[b].init_state(x.numel(), x.device) for b, x in enumerate(xs)], "k": 0}
    xs, states = list(carry["xs"]), list(carry["states"])
    proxes = [(name, get_prox(name).resolve(params)) for name, params in problem.block_prox()]
    create = torch.is_grad_enabled()
    values = []
    for _ in range(rounds):
        for b in range(len(xs)):
            for _ in range(inner_steps):
                with torch.enable_grad():
                    xb = xs[b] if xs[b].requires_grad else xs[b].detach().requires_grad_(True)
                    args = xs[:b] + [xb] + xs[b + 1 :]
                    (g,) = torch.autograd.grad(problem.smooth(*args).sum(), xb, create_graph=create)
                xs[b], states[b] = dm_update(net.nets[b], states[b], xb if create else xs[b], g, lr=lr,
                                             prox=proxes[b][0], params=proxes[b][1])
        values.append(problem.objective(*xs))
    return torch.stack(values), {"xs": xs, "states": states, "k": carry["k"] + rounds}


def _detach(carry: dict) -> dict:
    if "xs" in carry:
        return {"xs": [x.detach() for x in carry["xs"]], "k": carry["k"],
                "states": [{n: t.detach() for n, t in st.items()} for st in carry["states"]]}
    return {"x": carry["x"].detach(), "y": carry["y"].detach(), "k": carry["k"],
            "state": {n: t.detach() for n, t in carry["state"].items()}}


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
    gap = torch.clamp(F - F_star, min=0) + 1e-7 * F_star.abs()
    return torch.log(gap).mean()


@torch.no_grad()
def evaluate(arch: str, net, problem, F_star: Tensor | None, iters: int, inner_steps: int = 10) -> Tensor:
    """Mean relative error at every iteration 1..iters, float64, shape ``(iters,)``; for a
    multi-block problem (no ``F*``) the mean objective after every round."""
    if arch == "gso":
        F, _ = rollout_blocks(net, problem, None, iters, inner_steps=inner_steps)
        return F.double().mean(-1)
    F, _ = rollout(arch, net, problem, None, iters)
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


def _save_checkpoint(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the previous checkpoint intact


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
    seed: int = 0,
    checkpoint: str | None = None,
    checkpoint_every: int = 20,
    resume: str | None = None,
    init: Any = "untrained",
    inner_steps: int = 10,
    meta_optimizer: str = "adam",
    fixed_batch: bool = False,
    device: str = "cpu",
    progress: bool = True,
    callback: Callable[[int, MetaHistory], None] | None = None,
    **net_options: Any,
) -> tuple[dict[str, Tensor], MetaHistory]:
    """Meta-train learned optimizer ``arch`` (``"pa"``, ``"pagru"``, ``"pamr"``,
    ``"l2odm"``, ``"rnnprop"``) on ``family``; returns the best weights and the history.

    Args:
        steps: meta-training steps, each on a fresh batch of ``batch`` instances.
        horizon, unroll: iterations per batch, and the truncation
            segment: one Adam step per segment, everything detached between segments.
        lr: Adam's step (default 3e-3 for the ``"log"`` losses, 1e-2 for ``"mean"``).
        loss: ``"log"`` (default): mean over a segment's iterations and instances of
            ``log F`` -- scale-free, so every instance and every iteration counts, and
            training stays stable; ``"mean"``: the reference's mean of ``F`` (dominated by
            the first, large values; diverged in our trials at lr 1e-2);
            ``"log_gap"``: mean ``log(F - F*)``, which needs ``F*`` per batch (a float64
            solve per step) and rewards high accuracy most; ``"last"``: the batch-mean ``F``
            at a segment's last iteration (Math-L2O's objective; with ``unroll=horizon``,
            full backpropagation through the horizon).
        score: evaluate ``F`` at the prox output ``"x"`` (what users read, the default)
            or at the extrapolated point ``"y"`` (the reference code).
        clip: gradient-norm clipping (``None``: off).
        val_every, val_batch, val_iters: validation cadence, held instances, iterations
            (default ``horizon``); the kept weights are those with the best score.
        seed: fixes batches, validation set, initialisation and dropout.
        checkpoint, checkpoint_every, resume: where and how often to save; a checkpoint
            to continue from (the run then repeats the uninterrupted one exactly).
        init: initial weights (``"untrained"``, a name, a path or a state dict).
        inner_steps: for ``"gso"`` on a multi-block family: ``t_l``, the learned steps per
            block per round; ``horizon`` then counts rounds (``T``) and ``unroll`` the rounds
            per meta-update (``t_u``), the loss is over the global objective after each round.
        meta_optimizer: ``"adam"`` (default) or ``"sgd"`` (Math-L2O's protocol).
        fixed_batch: train on the same ``batch`` instances at every step (a fixed training
            set, as in Math-L2O's convergence analysis) instead of fresh ones.
        **net_options: the network's constructor arguments.
    """
    if arch not in NETWORKS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(NETWORKS)}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if score not in ("x", "y"):
        raise ValueError(f"score must be 'x' or 'y', got {score!r}")
    seg = unroll
    if horizon % seg:
        raise ValueError(f"horizon ({horizon}) must be a multiple of the unroll length ({seg})")
    lr = lr if lr is not None else (1e-2 if loss == "mean" else 3e-3)
    val_iters = val_iters or horizon
    blocks = isinstance(family, BlockFamily)
    if blocks != (arch == "gso"):
        raise ValueError("multi-block families train 'gso'; 'gso' trains on multi-block families "
                         f"(got arch {arch!r} and a {type(family).__name__})")
    if loss == "log_gap" and blocks:
        raise ValueError("loss='log_gap' needs F*, which multi-block (non-convex) families do not have")
    distributed = _init_distributed(device)
    rank, world = _rank_world()

    if blocks:
        net_options.setdefault("blocks", len(family.sample(1, generator=torch.Generator().manual_seed(0)).blocks))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(seed, 1))
        net, _ = build_network(arch, init, **net_options)
    net.to(device).train()
    for q in net.parameters():
        q.requires_grad_(True)
    if meta_optimizer not in ("adam", "sgd"):
        raise ValueError(f"meta_optimizer must be 'adam' or 'sgd', got {meta_optimizer!r}")
    opt = (torch.optim.Adam if meta_optimizer == "adam" else torch.optim.SGD)(net.parameters(), lr=lr)
    hist = MetaHistory()
    best = {k: v.detach().clone() for k, v in net.state_dict().items()}
    start = 0

    if resume is not None and os.path.exists(resume):
        try:
            ck = torch.load(resume, weights_only=True, map_location=device)  # no pickle: tensors and plain data
        except Exception as e:
            raise ValueError(f"checkpoint {resume} cannot be read ({type(e).__name__}: {e}); it is truncated, "
                             "corrupt or not a torch_l2o checkpoint: delete it to start over") from e
        if ck["arch"] != arch:
            raise ValueError(f"checkpoint {resume} is for {ck['arch']!r}, not {arch!r}")
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["opt"])
        best = ck["best"]
        hist = MetaHistory(**ck["history"])
        start = ck["step"]

    val = family.sample(val_batch, generator=torch.Generator().manual_seed(_seed(seed, 2)), dtype=torch.float64)
    val_F = None if blocks else optimal_values(val).to(device)
    val = val.to(device=device, dtype=torch.float32)

    def validate(step: int) -> None:
        net.eval()
        score_ = _val_score(evaluate(arch, net, val, val_F, val_iters, inner_steps))
        net.train()
        hist.val_step.append(step)
        hist.val_score.append(score_)
        if score_ < hist.best:
            hist.best, hist.best_step = score_, step
            best.update({k: v.detach().clone() for k, v in net.state_dict().items()})

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=f"meta_train {arch}", dynamic_ncols=True)
    t0 = time.perf_counter()
    if start == 0 and not hist.val_step:
        validate(0)
    for step in range(start, steps):
        gen = torch.Generator().manual_seed(_seed(seed, 3, 0 if fixed_batch else step, rank))
        prob = family.sample(batch, generator=gen, dtype=torch.float64 if loss == "log_gap" else torch.float32)
        F_star = optimal_values(prob).float().to(device) if loss == "log_gap" else None
        prob = prob.to(device=device, dtype=torch.float32)
        carry, seg_losses, seg_norms = None, [], []
        with torch.no_grad():
            F0 = (prob.objective(*prob.x0()) if blocks else prob.objective(prob.x0())).detach()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(seed, 4, step, rank))  # dropout
            for _ in range(horizon // seg):
                if blocks:
                    F, carry = rollout_blocks(net, prob, carry, seg, inner_steps=inner_steps)
                else:
                    F, carry = rollout(arch, net, prob, carry, seg, score=score)
                meta = _meta_loss(F, loss, F_star, F0)
                opt.zero_grad(set_to_none=False)
                ok = bool(torch.isfinite(meta))
                if ok:
                    meta.backward()
                grads = [q.grad for q in net.parameters()]
                if distributed:
                    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([float(ok)], device=device)])
                    dist.all_reduce(flat)
                    ok = flat[-1].item() == world  # a non-finite rank vetoes the step everywhere
                    off = 0
                    for g in grads:
                        g.copy_(flat[off : off + g.numel()].view_as(g) / world)
                        off += g.numel()
                norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip if clip else math.inf)
                if ok and bool(torch.isfinite(norm)):
                    opt.step()
                    seg_losses.append(float(meta.detach()))
                    seg_norms.append(float(norm))
                else:
                    hist.skipped += 1
                    carry = None if not ok else carry
                    if carry is None:
                        break  # iterates went non-finite: this batch is done
                carry = _detach(carry)
        hist.loss.append(sum(seg_losses) / len(seg_losses) if seg_losses else math.nan)
        hist.grad_norm.append(max(seg_norms) if seg_norms else math.nan)
        done = step + 1
        if done % val_every == 0 or done == steps:
            validate(done)
        hist.seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        if checkpoint and rank == 0 and (done % checkpoint_every == 0 or done == steps):
            _save_checkpoint(checkpoint, {"arch": arch, "step": done, "net": net.state_dict(),
                                          "opt": opt.state_dict(), "best": best, "history": hist.as_dict()})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{hist.loss[-1]:.3g}", best=f"{hist.best:.3g}", skipped=hist.skipped)
        if callback is not None:
            callback(done, hist)
    if bar is not None:
        bar.close()
    return best, hist

