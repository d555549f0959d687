"""Many LASSO problems at once with a pretrained learned optimizer, against FISTA with restart.

    python examples/learned_lasso.py

64 problems of the papers' family (A 250 x 500 with unit-norm columns, 50-sparse codes,
lam 0.1) are one (64, 500) parameter with one step per instance. L2O-PA-MR and L2O-PA-GRU
with their default weights and FISTA with adaptive restart run the same loop; each stops at
mean relative error
1e-6 (against a float64 reference solve) and prints its iterations and seconds. Then a
problem unlike that family (correlated columns, Toeplitz 0.8): there the default weights'
watchdog may move instances to FISTA-restart steps (it warns), and the weights trained on a
broad mixture, ``weights="lasso-mix"``, are the better choice. 10-20 s on two cores.

Read the seconds plainly: on a CPU at 250 x 500 a learned step costs more than a
FISTA-restart step (the network does several times the gradient's work per coordinate,
though only on the coordinates not yet settled at zero: ``hold_fixed``). In the family
PA-GRU takes about 0.8x FISTA-restart's seconds and PA-MR 0.9x (one run on a 2-core CPU);
on the correlated problems PA-MR with the mixture weights needs fewer iterations but about
1.4x the seconds. ``benchmarks/RESULTS.md`` has the measured figures at other sizes.
"""

import time
import warnings

import torch

import torch_l2o
from torch_l2o.problems import Lasso, matvec, mean_relative_error, reference_solve
from torch_l2o.problems.ood import correlated_lasso


def solve(make, problem, F_star, max_iter=500, tol=1e-6):
    """Run ``make([x])`` on ``problem`` until the mean relative error is at most ``tol``."""
    A, b = problem.A.float(), problem.b.float()
    x = torch.zeros(b.shape[0], A.shape[-1], requires_grad=True)   # (instances, n)
    opt = make([x])
    seconds = 0.0
    for k in range(1, max_iter + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        r = matvec(A, x) - b                                          # A x per instance
        (0.5 * r.square().sum()).backward()                          # the smooth part only
        opt.step()
        seconds += time.perf_counter() - t0
        with torch.no_grad():                                        # scoring, not timed
            err = mean_relative_error(problem.objective(opt.solution(x).double()), F_star)
        if err <= tol:
            return k, seconds, opt
    return None, seconds, opt


def compare(name, problem, methods):
    F_star = reference_solve(problem).F                              # float64 minimum per instance
    print(name)
    for label, make in methods.items():
        its, secs, opt = solve(make, problem, F_star)
        moved = opt.state[opt.param_groups[0]["params"][0]].get("watchdog")
        note = f"  (watchdog: {int(moved.sum())} of {moved.numel()} instances on FISTA-restart steps)" \
            if moved is not None and bool(moved.any()) else ""
        print(f"  {label:28s} {its} iterations, {secs:.3f} s{note}")


torch.manual_seed(0)
family = Lasso(m=250, n=500, sparsity=50, lam=0.1)
problem = family.sample(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
lr = problem.step_size().float()                                    # (64, 1): 0.9999 / L per instance
compare("64 LASSO problems of the papers' family", problem, {
    "FISTA-restart": lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=0.1, lr=lr, restart=True),
    "L2O-PA-MR": lambda ps: torch_l2o.PAMR(ps, prox="l1", lam=0.1, lr=lr),
    "L2O-PA-GRU": lambda ps: torch_l2o.PAGRU(ps, prox="l1", lam=0.1, lr=lr),
    "L2O-PA-MR, lr=None": lambda ps: torch_l2o.PAMR(ps, prox="l1", lam=0.1, instance_dims=1),
})

other = correlated_lasso(32, seed=3)                                  # outside the training family
lr = other.step_size().float()
lam = other.prox_params["lam"]
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)                  # the watchdog's; counted above
    compare("32 LASSO problems with correlated columns", other, {
        "FISTA-restart": lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=lam, lr=lr, restart=True),
        "L2O-PA-MR (default weights)": lambda ps: torch_l2o.PAMR(ps, prox="l1", lam=lam, lr=lr),
        "L2O-PA-MR, lasso-mix": lambda ps: torch_l2o.PAMR(ps, prox="l1", lam=lam, lr=lr, weights="lasso-mix"),
    })
