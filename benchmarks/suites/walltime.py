"""Wall-clock time to accuracy on LASSO batches (m x 2m, m/5 nonzeros, lam 0.1).

Seconds and iterations to mean relative error 1e-4 and 1e-6, and ms per iteration, for
FISTA with adaptive restart (the headline baseline, first in every block), plain FISTA,
the learned optimizers with shipped LASSO weights (L2O-PA, L2O-PA-GRU, L2O-PA-MR;
trained on 250 x 500, so larger sizes are out of distribution for them; PA-GRU and PA-MR
also with ``hold_fixed=False``, every coordinate's network run at every step), scikit-learn's
``Lasso`` and skglm's ``Lasso`` (when installed). Rows, ``instances x (m x n)``:

* on CUDA, and with ``--full`` on any device: 1024 x (250 x 500), 64 x (1000 x 2000),
  8 x (4000 x 8000);
* the quick CPU run: 64 x (250 x 500), 8 x (1000 x 2000), 1 x (4000 x 8000) (about 4-6
  minutes on a 2-core CPU).

The torch methods solve the instances of a row as one batch, float32, with the step
``0.9999 / L``, and stop once the error is 1e-6 (at most 300 iterations, 1000 with
``--full``). Only their gradient and step are timed (``bench_lib.run_method``; CUDA
synchronized before and after every iteration), not the float64 scoring. Each method
first runs 3 untimed iterations on the same problem (same shapes, dtype and device;
``run_method`` does so in every suite), so one-time costs (CUDA context, cuBLAS
handles, Triton/Inductor compilation, lazy imports) are not charged to whichever
method runs first. scikit-learn fits the instances one per call (as users call it) on
every core at once (a thread per core; its coordinate descent releases the GIL), at each
tolerance of a sweep, and reports the least seconds that reach the target; skglm (numba,
holds the GIL) fits them one after another.

``F*`` comes from ``reference_solve`` in float64 on the run's device (with the Newton
polish up to 64 instances; for more, restarted FISTA to a KKT residual of 1e-10, far
below the 1e-6 targets). The Lipschitz constants are computed once, as the largest
eigenvalue of ``A A^T`` (equal to the library's SVD value to ~1e-14, and minutes faster).
On CUDA skglm runs only with ``--full`` (single-threaded, it alone would take over a
minute of a GPU session). Each row is also printed to stderr as soon as it is measured.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

import torch_l2o
from torch_l2o.problems import Lasso, mean_relative_error, reference_solve
from torch_l2o.problems.families import LassoProblem

from bench_lib import WARMUP_ITERS, retime, run_method, shipped, sync

TOLS = (1e-4, 1e-6)
SK_TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-10)
HEADLINE = "FISTA-restart"


@dataclass
class _LassoKnownL(LassoProblem):
    """A LASSO batch that carries its Lipschitz constants, computed once (the library's
    property runs an SVD per instance at every use: a minute for 8 x (1000 x 2000) on a
    2-core CPU, and a Jacobi SVD per matrix on CUDA)."""

    L: Tensor = None

    @property
    def lipschitz(self) -> Tensor:
        return self.L


def _with_lipschitz(prob: LassoProblem) -> _LassoKnownL:
    """``L = |A|_2^2`` as the largest eigenvalue of ``A A^T`` (``m <= n`` here): float64, one
    GEMM and a symmetric eigensolver per instance; equal to the SVD's value to ~1e-14."""
    A = prob.A.double()
    G = A @ A.mT if A.shape[-2] <= A.shape[-1] else A.mT @ A
    L = torch.linalg.eigvalsh(G)[..., -1].to(prob.A.dtype)
    return _LassoKnownL(**{f.name: getattr(prob, f.name) for f in fields(prob)}, L=L)


def sizes(cfg) -> list[tuple[int, int]]:
    """``(instances, m)`` of each row."""
    if cfg.full or torch.device(cfg.device).type == "cuda":
        return [(1024, 250), (64, 1000), (8, 4000)]
    return [(64, 250), (8, 1000), (1, 4000)]


def _sk_times(prob64, F_star, fit, workers: int = 1):
    """For each target: the least total seconds over solver tolerances that reach it.
    The instances are fitted one per call, ``workers`` calls at a time (threads)."""
    m = prob64.A.shape[1]
    lam = prob64.prox_params["lam"]
    As, bs = prob64.A.numpy(), prob64.b.numpy()
    out = {t: None for t in TOLS}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda i: None, range(workers)))  # start the threads before any timer
        for tol in SK_TOLS:
            t0 = time.perf_counter()
            coefs = list(pool.map(lambda i, tol=tol: fit(As[i], bs[i], lam / m, tol), range(prob64.batch)))
            sec = time.perf_counter() - t0
            xs = torch.stack([torch.from_numpy(np.asarray(c, dtype=np.float64)) for c in coefs])
            err = float(mean_relative_error(prob64.objective(xs), F_star))
            for t in TOLS:
                if err <= t and (out[t] is None or sec < out[t]):
                    out[t] = sec
            if err <= min(TOLS):
                break
    return out


def _sklearn_fit(A, b, alpha, tol):
    from sklearn.linear_model import Lasso as SkLasso

    return SkLasso(alpha=alpha, fit_intercept=False, tol=tol, max_iter=100_000).fit(A, b).coef_


def _skglm_fit(A, b, alpha, tol):
    from skglm import Lasso as GLasso

    return GLasso(alpha=alpha, fit_intercept=False, tol=tol, max_iter=1000).fit(A, b).coef_


def _torch_methods(s) -> dict:
    """Display name -> ``make_opt``, the headline first."""
    methods = {
        HEADLINE: lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=0.1, lr=s, restart=True),
        "FISTA": lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=0.1, lr=s),
    }
    learned = shipped("lasso", ("pa", "pagru", "pamr"))
    for label, _, cls in learned:
        methods[label] = lambda ps, cls=cls: cls(ps, prox="l1", lam=0.1, lr=s, weights="lasso", instance_dims=1)
    # the papers' recurrence (every coordinate's state steps): what holding the converged
    # coordinates (the default hold_fixed) saves, within this run
    for label, _, cls in learned:
        if label != "L2O-PA":
            methods[f"{label} hold_fixed=False"] = lambda ps, cls=cls: cls(
                ps, prox="l1", lam=0.1, lr=s, weights="lasso", instance_dims=1, hold_fixed=False)
    return methods


def _timing(row: dict, tr) -> None:
    iters = len(tr.errors) - 1
    row.update({**{f"s@{t:.0e}": tr.seconds_to(t) for t in TOLS}, **{f"it@{t:.0e}": tr.iterations_to(t) for t in TOLS},
                "iters run": iters, "ms/it": tr.seconds[-1] / max(iters, 1) * 1e3})


def run(cfg) -> dict:
    device = cfg.device
    rows_sizes = sizes(cfg)
    cap = 1000 if cfg.full else 300  # FISTA needs ~100 iterations to 1e-6 here, restarted FISTA ~50
    cores = os.cpu_count() or 1
    on_cuda = torch.device(device).type == "cuda"
    solvers = {"scikit-learn Lasso": (_sklearn_fit, cores)}
    try:
        if on_cuda and not cfg.full:
            raise ImportError  # one thread through 1024 + 64 + 8 fits: over a minute, outside a GPU session's budget
        import skglm  # noqa: F401

        solvers["skglm Lasso"] = (_skglm_fit, 1)
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    for fit, _ in solvers.values():  # imports, numba compilation
        fit(rng.normal(size=(20, 40)), np.ones(20), 0.01, 1e-4)
    rows = []
    for B, m in tqdm(rows_sizes, desc="walltime", leave=False):
        label_size = f"{B} x ({m} x {2 * m})"
        fam = Lasso(m=m, n=2 * m, sparsity=m // 5, lam=0.1)
        prob = fam.sample(B, generator=torch.Generator().manual_seed(cfg.seed), dtype=torch.float64)  # on the CPU
        prob_dev = _with_lipschitz(prob.to(device))
        sync(device)
        F_star = reference_solve(prob_dev, polish=B <= 64).F
        s = prob_dev.step_size().float()
        block, timed = [], []
        for label, make in _torch_methods(s).items():
            try:
                tr = run_method(label, prob_dev, F_star, make, cap, device=device, stop_below=min(TOLS))
            except RuntimeError as e:  # out of memory, a library limit: the row says so, the run goes on
                msg = str(e).splitlines()[0][:120] if str(e) else ""
                block.append({"instances x (m x n)": label_size,
                              "method": f"{label} (batch of {B}): failed: {type(e).__name__}: {msg}",
                              **{f"{c}@{t:.0e}": None for c in ("s", "it") for t in TOLS}, "iters run": None, "ms/it": None})
                _progress(block[-1])
                if on_cuda:
                    torch.cuda.empty_cache()
                continue
            block.append({"instances x (m x n)": label_size, "method": f"{label} (batch of {B})"})
            timed.append((block[-1], tr, make))
            _timing(block[-1], tr)
            _progress(block[-1])
        for _ in range(getattr(cfg, "repeats", 1) - 1):  # every method in turn, then again
            for row, tr, make in timed:
                retime(tr, prob_dev, make, device=device)
                _timing(row, tr)
        F_cpu = F_star.cpu()
        for label, (fit, workers) in solvers.items():
            times = _sk_times(prob, F_cpu, fit, workers)  # the CPU float64 copy of the same data
            threads = min(workers, B)
            block.append({"instances x (m x n)": label_size,
                          "method": f"{label} ({B} fit{'s' * (B > 1)}, {threads} thread{'s' * (threads > 1)})",
                          **{f"s@{t:.0e}": times[t] for t in TOLS}})
            _progress(block[-1])
        head = block[0]
        for r in block:
            for t in TOLS:
                k = f"s@{t:.0e}"
                r[f"time/{HEADLINE} @{t:.0e}"] = (r[k] / head[k] if r.get(k) is not None and head.get(k) else None)
        rows += block
        del prob, prob_dev
        if on_cuda:
            torch.cuda.empty_cache()
    notes = [(f"torch methods: float32, batch per row, up to {cap} iterations (stopping at 1e-6), "
              f"{WARMUP_ITERS} untimed warm-up iterations each, the least time of {getattr(cfg, 'repeats', 1)} timed run(s); scikit-learn on {cores} threads; device {device}")]
    return {"tables": {"walltime": rows, "crossover": _crossover(rows, [f"{B} x ({m} x {2 * m})" for B, m in rows_sizes])},
            "notes": notes, "plots": []}


def _progress(row: dict) -> None:
    """One line per row on stderr as it is measured: a run cut short keeps what it measured."""
    print("walltime: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
          file=sys.stderr, flush=True)


def _crossover(rows, sizes) -> list[dict]:
    """For each learned optimizer and target: the rows (sizes) where it beats FISTA-restart,
    and FISTA, in seconds."""
    out = []
    learned = sorted({r["method"].split(" (")[0] for r in rows if r["method"].startswith("L2O-")})

    def seconds(method, size, key):
        return next((r.get(key) for r in rows if r["instances x (m x n)"] == size
                     and r["method"].startswith(method + " (")), None)

    for name in learned:
        for t in TOLS:
            key = f"s@{t:.0e}"
            row = {"learned": name, "to": f"{t:.0e}"}
            for base in (HEADLINE, "FISTA"):
                wins = [size for size in sizes if seconds(base, size, key) is not None
                        and seconds(name, size, key) is not None and seconds(name, size, key) < seconds(base, size, key)]
                row[f"beats {base} in seconds at"] = "; ".join(wins) or "none of the sizes tried"
            out.append(row)
    return out
