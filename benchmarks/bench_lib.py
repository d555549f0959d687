"""Shared benchmark machinery: run a method on a batch of problems, score it, report.

Every method starts from the same point (the problem's ``x0``), is scored at its prox
output (``opt.solution(x)``; a plain ``torch.optim`` optimizer at its iterate) by
the mean relative error against a float64 ``F*``, and is timed on the work a user
pays for (gradient and step), not on the scoring.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from torch_l2o.problems import Problem, mean_relative_error
from torch_l2o.registry import available_architectures, get_architecture
from torch_l2o.weights import available_weights

TARGETS = (1e-2, 1e-4, 1e-6)
# untimed iterations of every method before its timed run, on a fresh copy of the same
# problem: one-time costs (the C++ step's library load or compilation, Triton and
# Inductor compilation, CUDA context and cuBLAS handles, lazy imports, first-touch
# allocations) are then charged to no method, whichever runs first
WARMUP_ITERS = 3


@dataclass
class Trace:
    method: str
    errors: list[float]          # mean relative error after each iteration (index 0: x0)
    seconds: list[float]         # cumulative seconds of optimizer work after each iteration
    extra: dict = field(default_factory=dict)

    def iterations_to(self, tol: float) -> int | None:
        return next((k for k, e in enumerate(self.errors) if e <= tol), None)

    def seconds_to(self, tol: float) -> float | None:
        k = self.iterations_to(tol)
        return None if k is None else self.seconds[k]

    def error_at(self, k: int) -> float | None:
        return self.errors[k] if k < len(self.errors) else None

    def summary(self) -> dict:
        out = {"method": self.method}
        for t in TARGETS:
            out[f"it@{t:.0e}"] = self.iterations_to(t)
            s = self.seconds_to(t)
            out[f"s@{t:.0e}"] = None if s is None else round(s, 4)
        out["err@100"] = self.error_at(100)
        out["err@end"] = self.errors[-1]
        out["iters"] = len(self.errors) - 1
        out.update(self.extra)
        return out


def shipped(weights: str, archs=None) -> list[tuple[str, str, type]]:
    """``(display name, architecture, optimizer class)`` of the architectures (default:
    every registered one trained on the family ``weights``) whose ``weights`` are shipped."""
    archs = archs if archs is not None else [a for a in available_architectures()
                                             if weights in get_architecture(a).families]
    return [(get_architecture(a).display_name, a, get_architecture(a).optimizer) for a in archs
            if weights in available_weights(a)]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_method(
    name: str,
    problem: Problem,
    F_star: torch.Tensor,
    make_opt: Callable,
    iters: int,
    *,
    composite_loss: bool = False,
    closure: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    stop_below: float | None = None,
    warmup: int = WARMUP_ITERS,
    repeats: int = 1,
) -> Trace:
    """Run ``make_opt([x])`` for ``iters`` steps on every instance at once.

    ``composite_loss``: differentiate ``F = f + r`` (subgradient methods such as Adam)
    instead of the smooth part. ``closure``: pass a closure to ``step`` (backtracking).
    ``stop_below``: stop early once the mean relative error is at most this (default:
    run all ``iters``). ``warmup``: iterations of a separate optimizer from ``make_opt``
    on the same problem first, untimed and discarded (0: none). ``repeats``: run the same
    iterations this many times in all, the others unscored, and keep per iteration the
    least cumulative time (the iterates are the same; timing noise only adds).
    """
    if warmup > 0:
        run_method(name, problem, F_star, make_opt, warmup, composite_loss=composite_loss, closure=closure,
                   dtype=dtype, device=device, warmup=0)
    p = problem.to(device=device, dtype=dtype)
    p64 = problem.to(device=device, dtype=torch.float64)
    F_star = F_star.to(device)
    x, opt, step = _start(p, make_opt, composite_loss, closure, device)
    solution = getattr(opt, "solution", lambda q: q.detach())
    errors = [float(mean_relative_error(p64.objective(x.detach().double()), F_star))]
    seconds = [0.0]
    for _ in range(iters):
        seconds.append(seconds[-1] + step())
        with torch.no_grad():
            err = float(mean_relative_error(p64.objective(solution(x).double()), F_star))
        errors.append(err if math.isfinite(err) else float("inf"))
        if stop_below is not None and errors[-1] <= stop_below:
            break
    trace = Trace(name, errors, seconds)
    for _ in range(repeats - 1):
        retime(trace, problem, make_opt, composite_loss=composite_loss, closure=closure, dtype=dtype, device=device)
    return trace


def retime(trace: Trace, problem: Problem, make_opt: Callable, *, composite_loss: bool = False,
           closure: bool = False, dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
    """Run ``trace``'s iterations again on a fresh optimizer, unscored, and keep per
    iteration the least cumulative time (the iterates are the same; timing noise only
    adds). A suite that retimes every method in turn spreads a slow spell of the machine
    over all of them instead of one."""
    _, _, step = _start(problem.to(device=device, dtype=dtype), make_opt, composite_loss, closure, device)
    elapsed = 0.0
    for k in range(1, len(trace.seconds)):
        elapsed += step()
        trace.seconds[k] = min(trace.seconds[k], elapsed)


def _start(p: Problem, make_opt: Callable, composite_loss: bool, closure: bool, device: str):
    """A fresh run: the iterate, its optimizer, and a function that takes one timed step
    (gradient and update) and returns its seconds."""
    x = p.x0().requires_grad_(True)
    opt = make_opt([x])
    loss_fn = p.objective if composite_loss else p.smooth

    def f():
        opt.zero_grad()
        val = loss_fn(x)
        val.sum().backward()
        return val

    def step() -> float:
        sync(device)
        t0 = time.perf_counter()
        if closure:
            opt.step(f)
        else:
            f()
            opt.step()
        sync(device)
        return time.perf_counter() - t0

    return x, opt, step


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table of summary rows."""
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2e}" if (abs(v) < 1e-2 or abs(v) >= 1e4) and v != 0 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "cores": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def save_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1, default=str)


def plot_traces(path: str, title: str, traces: list[Trace]) -> bool:
    """Relative error against iterations and against seconds, log scale. False without
    matplotlib or without traces (a data set that is absent: no empty plot)."""
    if not traces:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, tr in enumerate(traces):
        errs = [max(e, 1e-16) for e in tr.errors]
        style = dict(label=tr.method, color=f"C{i % 10}", linestyle="-" if i < 10 else "--")  # 10 colours, then dashed
        axes[0].semilogy(range(len(errs)), errs, **style)
        axes[1].semilogy(tr.seconds, errs, **style)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("seconds")
    for ax in axes:
        ax.set_ylabel("mean (F - F*) / F*")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
