"""torch_l2o.solve: certified stopping (duality gaps checked against F - F*), every method,
frozen instances, and errors that name the fix."""

import warnings
from typing import ClassVar

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torch_l2o.optim import FISTA, PAMR
from torch_l2o.problems import (
    Lasso,
    LeastSquares,
    LeastSquaresProblem,
    LogisticL1,
    LogisticProblem,
    reference_solve,
)
from torch_l2o.solver import ConvergenceWarning, duality_gap, gradient_mapping, solve

D = torch.float64


def _lasso(batch=3, seed=0):
    return Lasso(m=20, n=40, sparsity=4).sample(batch, generator=torch.Generator().manual_seed(seed), dtype=D)


def _logistic(batch=3, seed=0):
    return LogisticL1(N=60, n=12, sparsity=4, lam=0.02).sample(batch, generator=torch.Generator().manual_seed(seed),
                                                                dtype=D)


class _InterceptLogistic(LogisticProblem):
    """Per-coordinate l1 weights, the last (a column of ones) unpenalized: the estimators' form."""

    def regularizer(self, x):
        return (self.prox_params["lam"] * x.abs()).sum(-1)


def _logistic_intercept(batch=2, seed=0):
    p = _logistic(batch, seed)
    W = torch.cat([p.W, torch.ones(batch, p.W.shape[1], 1, dtype=D)], -1)
    y = p.y.clone()
    y[:, :40] = 1.0  # unbalanced classes: the intercept matters
    lam = torch.full((W.shape[-1],), 0.02, dtype=D)
    lam[-1] = 0.0
    return _InterceptLogistic(W=W, y=y, prox="l1", prox_params={"lam": lam})


@pytest.fixture(scope="module")
def solved():
    """Problems with their minimisers and F* (the float64 reference solver, certified by KKT
    residual <= 1e-10; the intercept problem by a FISTA run to a gradient-mapping residual 1e-13)."""
    out = {}
    for name, prob in (("lasso", _lasso()), ("logistic", _logistic())):
        ref = reference_solve(prob)
        out[name] = (prob, ref.x, ref.F)
    prob = _logistic_intercept()
    ref = solve(prob, criterion="residual", tol=1e-13, max_iter=20_000)
    out["intercept"] = (prob, ref.x, ref.objective)
    return out


# ---------------------------------------------------------------- the certificates


@pytest.mark.parametrize("name", ["lasso", "logistic", "intercept"])
def test_gap_bounds_the_true_gap_along_a_path_and_vanishes(solved, name):
    prob, x_star, F_star = solved[name]
    g = torch.Generator().manual_seed(1)
    d = torch.randn(x_star.shape, generator=g, dtype=D)
    prev = None
    for t in [1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 0.0]:
        x = x_star + t * d
        F = prob.smooth(x) + prob.regularizer(x)
        gap = duality_gap(prob, x)
        true = F - F_star
        assert bool((true >= -1e-12 * F_star).all())  # F* is the minimum
        assert bool((gap >= true - 1e-12 * F_star).all()), (t, gap, true)  # weak duality
        if prev is not None and t > 0:
            assert bool((gap < prev).all())
        prev = gap
    assert float((gap / F_star).max()) <= 1e-9  # at the minimiser: 0 up to its accuracy


@pytest.mark.parametrize("name", ["lasso", "logistic", "intercept"])
@given(seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-6, 1))
def test_gap_is_an_upper_bound_anywhere(solved, name, seed, log_scale):
    prob, x_star, F_star = solved[name]
    x = x_star + 10**log_scale * torch.randn(x_star.shape, generator=torch.Generator().manual_seed(seed), dtype=D)
    F = prob.smooth(x) + prob.regularizer(x)
    assert bool((duality_gap(prob, x) >= F - F_star - 1e-12 * F_star).all())


@pytest.mark.parametrize("name", ["lasso", "logistic", "intercept"])
def test_solve_stops_certified(solved, name):
    prob, _, F_star = solved[name]
    res = solve(prob, tol=1e-8)
    assert res.criterion == "gap" and bool(res.converged.all())
    rel = (res.objective - F_star) / F_star
    assert float(rel.max()) <= 1e-8 and float(rel.min()) >= -1e-12
    # the history: the criterion at the start and after each step, final values <= tol
    assert res.history.shape == (int(res.iterations.max()) + 1, prob.batch)
    assert bool((res.history[res.iterations, torch.arange(prob.batch)] <= 1e-8).all())
    assert bool((res.history[res.iterations - 1, torch.arange(prob.batch)] > 1e-8).all())


@pytest.mark.parametrize("name", ["lasso", "logistic"])
@pytest.mark.parametrize("k", [3, 7])
def test_checking_every_k_steps(solved, name, k):
    """``check_every=k``: the same iterates, checked after every k-th step; an instance
    stops at the first check that certifies it: here (the criterion stays below tol once
    there) after the step count of checking every step, rounded up to a multiple of k."""
    prob, _, F_star = solved[name]
    every = solve(prob, tol=1e-8)
    res = solve(prob, tol=1e-8, check_every=k)
    assert bool(res.converged.all()) and float(((res.objective - F_star) / F_star).max()) <= 1e-8
    want = (every.iterations + k - 1) // k * k  # the first multiple of k at or after it
    assert torch.equal(res.iterations, want)
    # one history row per check: the start, then after steps k, 2k, ...
    assert res.history.shape == (int(want.max()) // k + 1, prob.batch)
    torch.testing.assert_close(res.history[1], every.history[k])
    with pytest.raises(ValueError, match="check_every must be an int >= 1"):
        solve(prob, check_every=0)


# ---------------------------------------------------------------- every method


@pytest.mark.parametrize("method", ["fista", "ista", "pamr", "pa", "pagru", "mathgd"])
def test_methods_reach_tol(solved, method):
    prob, _, F_star = solved["lasso"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a learned optimizer's watchdog may take over
        res = solve(prob, method, tol=1e-6, max_iter=5000)
    assert bool(res.converged.all())
    assert float(((res.objective - F_star) / F_star).max()) <= 1e-6
    assert bool((res.x == 0).any())  # the prox iterate: sparse


@pytest.mark.parametrize("method", ["l2odm", "rnnprop"])
def test_methods_without_prox_run_on_the_subgradient(method):
    prob = _lasso(2)
    with pytest.warns(ConvergenceWarning, match="did not reach"):
        res = solve(prob, method, max_iter=5)
    assert res.history.shape == (6, 2) and bool(torch.isfinite(res.x).all())
    assert res.iterations.tolist() == [5, 5] and not bool(res.converged.any())


def test_optimizers_without_prox_get_the_subgradient_of_F():
    prob = _lasso(2)
    x0 = torch.ones(2, prob.dim, dtype=D)
    with pytest.warns(ConvergenceWarning):
        res = solve(prob, lambda ps: torch.optim.SGD(ps, lr=1e-3), max_iter=1, x0=x0)
    lam = prob.prox_params["lam"]
    assert torch.allclose(res.x, x0 - 1e-3 * (prob.grad(x0) + lam * torch.sign(x0)), rtol=0, atol=1e-14)


def test_factory_and_class_and_automatic_step(solved):
    prob, _, F_star = solved["lasso"]
    lam = prob.prox_params["lam"]
    by_factory = solve(prob, lambda ps: FISTA(ps, lr=prob.step_size(), prox="l1", lam=lam, restart=True))
    by_class = solve(prob, FISTA)
    auto = solve(prob, lr=None)  # backtracking, per instance
    for res in (by_factory, by_class, auto):
        assert bool(res.converged.all()) and float(((res.objective - F_star) / F_star).max()) <= 1e-6


def test_residual_criterion_for_problems_without_a_gap():
    prob = LeastSquares(m=30, n=20).sample(2, generator=torch.Generator().manual_seed(0), dtype=D)
    res = solve(prob, tol=1e-8)
    assert res.criterion == "residual" and bool(res.converged.all())
    g0 = gradient_mapping(prob, prob.x0())
    assert bool((gradient_mapping(prob, res.x) <= 1e-8 * g0).all())
    nonneg = LeastSquaresProblem(W=prob.W, y=prob.y - 1.0, prox="nonneg")  # another prox
    res = solve(nonneg, tol=1e-8)
    assert res.criterion == "residual" and bool(res.converged.all()) and bool((res.x >= 0).all())
    forced = solve(_lasso(2), criterion="residual", tol=1e-8)
    assert forced.criterion == "residual" and bool(forced.converged.all())


def test_not_converging_warns_and_says_so():
    prob = _lasso(2)
    with pytest.warns(ConvergenceWarning, match="2 of 2 instances did not reach gap <= 1e-12"):
        res = solve(prob, "ista", tol=1e-12, max_iter=7)
    assert res.iterations.tolist() == [7, 7] and not bool(res.converged.any())


def test_progress_bar_runs():
    assert bool(solve(_lasso(2), progress=True).converged.all())


# ---------------------------------------------------------------- frozen instances


def _recording(base):
    class Recording(base):
        """Keeps a copy of the iterate and the per-instance state before each step (that is,
        after the previous step and solve's restoring)."""

        log: ClassVar[list] = []

        def step(self, closure=None):
            (p,) = self.param_groups[0]["params"]
            if p in self.state:
                st = {k: v.clone() for k, v in self.state[p].items() if isinstance(v, torch.Tensor)}
                type(self).log.append((p.detach().clone(), st))
            type(self).opt = self
            return super().step(closure)

    Recording.log = []
    return Recording


@pytest.mark.parametrize("base", [FISTA, PAMR])
def test_converged_instances_never_move_again(base):
    prob = Lasso(m=20, n=40, sparsity=4).sample(4, generator=torch.Generator().manual_seed(3), dtype=D)
    cls = _recording(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = solve(prob, cls, tol=1e-6)
    its = res.iterations.tolist()
    assert bool(res.converged.all()) and len(set(its)) > 1  # they stop at different iterations
    opt = cls.opt
    (p,) = opt.param_groups[0]["params"]
    final = (p.detach(), {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)})
    records = cls.log + [final]  # records[j]: after step j + 1
    B, n = p.shape
    coord = opt.net.coordinate_dims() if base is PAMR else {}

    def rows(key, v, i):
        d = coord.get(key)
        if d is not None:
            return v.unflatten(d, (B, n)).select(d, i)
        return v[i] if v.dim() and v.shape[0] == B else None

    checked = 0
    for i, k in enumerate(its):
        ref_p, ref_st = records[k - 1]
        assert torch.equal(ref_st["x"][i], res.x[i])  # the solution is the prox iterate at convergence
        for y, state in records[k - 1:]:
            assert torch.equal(y[i], ref_p[i])
            for key, v in state.items():
                r = rows(key, v, i)
                if r is not None:
                    assert torch.equal(r, rows(key, ref_st[key], i)), (i, key)
                    checked += 1
    assert checked > 0


def test_instances_optimal_at_the_start_take_no_step():
    prob = _lasso(3)
    prob.b[1] = 0.0  # x = 0 is optimal, F = 0
    res = solve(prob)
    assert res.iterations[1] == 0 and res.iterations[0] > 0 and bool(res.converged.all())
    assert bool((res.x[1] == 0).all()) and res.history.shape[1] == 3
    ref = solve(prob[torch.tensor([0, 2])])
    assert torch.equal(res.x[[0, 2]], ref.x)


# ---------------------------------------------------------------- bad input


def test_errors_name_the_fix():
    prob = _lasso(2)
    with pytest.raises(ValueError, match="unknown method 'adam'; known: fista, ista, pa, .*pamr"):
        solve(prob, "adam")
    for tol in (0, -1e-6, float("nan")):
        with pytest.raises(ValueError, match="tol must be a number > 0"):
            solve(prob, tol=tol)
    with pytest.raises(ValueError, match="max_iter must be an int >= 0"):
        solve(prob, max_iter=-1)
    with pytest.raises(TypeError, match="solve takes a torch_l2o.problems.Problem"):
        solve(prob.A, "fista")
    with pytest.raises(TypeError, match="pass a factory"):
        solve(prob, torch.optim.SGD)
    with pytest.raises(TypeError, match="give lr and options to the factory"):
        solve(prob, lambda ps: torch.optim.SGD(ps, lr=0.1), lr=0.1)
    with pytest.raises(ValueError, match="x0 must have shape"):
        solve(prob, x0=torch.zeros(3, prob.dim, dtype=D))
    ls = LeastSquares(m=5, n=4).sample(1, dtype=D)
    with pytest.raises(ValueError, match="no duality gap is known .* criterion='residual'"):
        solve(ls, criterion="gap")
    with pytest.raises(ValueError, match="lr must be 'default', None"):
        solve(prob, lr="1/L")
    with pytest.raises(ValueError, match="criterion must be"):
        solve(prob, criterion="kkt")



def test_float32_gap_floor_stops_early_and_says_why():
    """A float32 point certifies a LASSO gap of only ~1e-5 of F: asked for 1e-6, solve stops
    the instances once they stop improving, long before max_iter, and the warning names
    the fix (float64)."""
    import warnings

    import torch_l2o
    from torch_l2o.problems import Lasso

    problem = Lasso(m=60, n=120, sparsity=12, lam=0.1).sample(4, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = torch_l2o.solve(problem, tol=1e-9, max_iter=5000)
    assert not bool(res.converged.any()) and int(res.iterations.max()) < 2000
    assert any("problem.to(torch.float64)" in str(w.message) for w in caught)
    res64 = torch_l2o.solve(problem.to(torch.float64), tol=1e-9, max_iter=5000)
    assert bool(res64.converged.all())
