"""Problem families, the float64 reference solver and the metric."""

import ast
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

import torch_l2o.problems as problems
from torch_l2o.problems import (BlockFamily, GaussianMixture, Lasso, LogisticL1, MatrixCompletion, Problem,
                                ProblemBase, ProblemFamily, kkt_residual, mean_relative_error, reference_solve)

D = torch.float64


def test_lasso_family_matches_protocol():
    prob = Lasso().sample(8, generator=torch.Generator().manual_seed(0))
    assert prob.A.shape == (8, 250, 500) and prob.b.shape == (8, 250) and prob.A.dtype == torch.float32
    assert torch.allclose(prob.A.norm(dim=1), torch.ones(8, 500), atol=1e-5)  # unit-norm columns
    assert ((prob.x_true != 0).sum(1) == 50).all()
    assert torch.allclose(prob.b, torch.einsum("bmn,bn->bm", prob.A, prob.x_true), atol=1e-5)
    # L = largest eigenvalue of A^T A, about 5.8 for this shape
    p64 = prob.to(D)
    eig = torch.linalg.eigvalsh(p64.A @ p64.A.transpose(1, 2))[:, -1]
    assert torch.allclose(p64.lipschitz, eig, rtol=1e-10)
    assert 5.0 < float(eig.mean()) < 6.5
    assert prob.prox == "l1" and prob.prox_params == {"lam": 0.1}


def test_logistic_family_matches_protocol():
    prob = LogisticL1().sample(4, generator=torch.Generator().manual_seed(0), dtype=D)
    assert prob.W.shape == (4, 1000, 50) and prob.y.shape == (4, 1000)
    assert ((prob.x_true != 0).sum(1) == 20).all()
    assert torch.equal(prob.y, (torch.einsum("bNn,bn->bN", prob.W, prob.x_true) >= 0).to(D))
    # L = |W|_2^2 / (4N): the Hessian's bound sigma(1 - sigma) <= 1/4
    L = torch.linalg.matrix_norm(prob.W, ord=2) ** 2 / 4000
    assert torch.allclose(prob.lipschitz, L)
    # smooth loss is the mean binary cross-entropy
    x = torch.randn(4, 50, dtype=D)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.einsum("bNn,bn->bN", prob.W, x), prob.y, reduction="none").mean(-1)
    assert torch.allclose(prob.smooth(x), bce)
    # analytic gradient equals autograd's
    xr = x.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(prob.smooth(xr).sum(), xr)
    assert torch.allclose(prob.grad(x), ga)


def test_sampling_is_reproducible():
    a = Lasso(m=20, n=40, sparsity=5).sample(3, generator=torch.Generator().manual_seed(7))
    b = Lasso(m=20, n=40, sparsity=5).sample(3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.A, b.A) and torch.equal(a.b, b.b)


def test_reference_solver_matches_sklearn_lasso():
    from sklearn.linear_model import Lasso as SkLasso

    prob = Lasso().sample(4, generator=torch.Generator().manual_seed(1), dtype=D)
    sol = reference_solve(prob)
    assert float(sol.kkt.max()) <= 1e-12
    for i in range(4):
        A, b = prob.A[i].numpy(), prob.b[i].numpy()
        # sklearn: 1/(2m) |b - A x|^2 + alpha |x|_1, so alpha = lam / m
        sk = SkLasso(alpha=0.1 / A.shape[0], fit_intercept=False, tol=1e-14, max_iter=100_000).fit(A, b)
        x_sk = torch.from_numpy(sk.coef_).expand(4, -1)
        F_sk = prob.objective(x_sk)[i]
        assert abs(float(F_sk - sol.F[i])) <= 1e-12 * float(sol.F[i])
        assert np.allclose(sk.coef_, sol.x[i].numpy(), atol=1e-8)


@pytest.mark.parametrize("solver", ["liblinear", "saga"])
def test_reference_solver_matches_sklearn_logistic(solver):
    from sklearn.linear_model import LogisticRegression

    prob = LogisticL1().sample(3, generator=torch.Generator().manual_seed(2), dtype=D)
    sol = reference_solve(prob)
    assert float(sol.kkt.max()) <= 1e-12
    for i in range(3):
        W, y = prob.W[i].numpy(), prob.y[i].numpy()
        # sklearn: C sum_i loss_i + |x|_1 = (C N) (mean loss + |x|_1 / (C N)): C = 1 / (N lam)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sk = LogisticRegression(l1_ratio=1.0, C=1 / (W.shape[0] * 0.1), solver=solver,
                                    fit_intercept=False, tol=1e-14, max_iter=100_000).fit(W, y)
        x_sk = torch.from_numpy(sk.coef_.ravel()).expand(3, -1)
        F_sk = prob.objective(x_sk)[i]
        # sklearn's own tolerance limits it; ours is certified by the KKT residual
        assert float(F_sk - sol.F[i]) >= -1e-13 * float(sol.F[i])
        assert float(F_sk - sol.F[i]) <= 1e-9 * float(sol.F[i])


def test_kkt_residual_detects_non_optimal_points():
    prob = Lasso(m=30, n=60, sparsity=5).sample(2, generator=torch.Generator().manual_seed(3), dtype=D)
    sol = reference_solve(prob)
    assert float(sol.kkt.max()) <= 1e-12
    assert float(kkt_residual(prob, sol.x + 1e-3).min()) > 1e-4


def test_metric():
    F = torch.tensor([1.1, 2.0])
    F_star = torch.tensor([1.0, 1.0], dtype=D)
    assert abs(float(mean_relative_error(F, F_star)) - (0.1 + 1.0) / 2) < 1e-7


def test_slicing_and_casting():
    prob = Lasso(m=10, n=20, sparsity=3).sample(5, generator=torch.Generator().manual_seed(0))
    sub = prob[1:3]
    assert sub.A.shape == (2, 10, 20) and torch.equal(sub.A, prob.A[1:3])
    p64 = prob.to(D)
    assert p64.A.dtype == D and p64.lipschitz.dtype == D and prob.A.dtype == torch.float32
    assert p64.x0().shape == (5, 20) and p64.x0().dtype == D


@dataclass
class CountingProblem(Problem):
    """A user's problem written as the docs show; counts how often its ``lipschitz`` body runs."""

    A: Tensor = None
    calls = 0

    def smooth(self, x):
        return 0.5 * torch.einsum("bmn,bn->bm", self.A, x).square().sum(-1)

    @property
    def lipschitz(self):
        CountingProblem.calls += 1
        return torch.linalg.matrix_norm(self.A, ord=2).square()

    @property
    def dim(self):
        return self.A.shape[-1]


def test_lipschitz_computed_once_per_problem():
    CountingProblem.calls = 0
    prob = CountingProblem(A=torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(0)))
    steps = [prob.step_size() for _ in range(5)]
    assert CountingProblem.calls == 1 and all(torch.equal(s, steps[0]) for s in steps)
    assert torch.equal(prob.lipschitz, torch.linalg.matrix_norm(prob.A, ord=2).square())
    # a new object computes its own, from its own data and in its own precision
    p64 = prob.to(torch.float64)
    assert p64.lipschitz.dtype == torch.float64 and CountingProblem.calls == 2
    assert torch.equal(p64.lipschitz, torch.linalg.matrix_norm(p64.A, ord=2).square())
    assert prob[1:3].lipschitz.shape == (2,) and CountingProblem.calls == 3
    assert prob.lipschitz.dtype == torch.float32 and CountingProblem.calls == 3


def test_builtin_lipschitz_cached_and_unchanged():
    prob = Lasso(m=20, n=40, sparsity=5).sample(3, generator=torch.Generator().manual_seed(0))
    assert prob.lipschitz is prob.lipschitz
    # the float32 constant from the float32 data, as before the cache
    assert torch.equal(prob.lipschitz, torch.linalg.matrix_norm(prob.A, ord=2).square())


def test_one_protocol_for_single_and_multi_block():
    lasso = Lasso(m=10, n=20, sparsity=3).sample(2, generator=torch.Generator().manual_seed(0), dtype=D)
    assert isinstance(lasso, ProblemBase) and lasso.blocks == ("x",) and lasso.batch == 2
    (x0,) = lasso.starts()
    assert torch.equal(x0, lasso.x0()) and lasso.block_prox() == [("l1", {"lam": 0.1})]
    x = torch.randn(2, 20, dtype=D)
    assert torch.equal(lasso.objective(x), lasso.smooth(x) + 0.1 * x.abs().sum(-1))
    assert torch.equal(lasso.regularizer(x), 0.1 * x.abs().sum(-1))

    for fam in (MatrixCompletion(n=10, rank=2), GaussianMixture(G=20)):
        assert isinstance(fam, ProblemFamily) and isinstance(fam, BlockFamily)
        prob = fam.sample(3, generator=torch.Generator().manual_seed(0), dtype=D)
        assert isinstance(prob, ProblemBase) and prob.batch == 3
        xs = prob.starts()
        assert len(xs) == len(prob.blocks) == len(prob.block_prox())
        assert all(torch.equal(a, b) for a, b in zip(xs, prob.x0()))
    # the simplex block's r (its indicator) counts in the objective
    w_out = torch.full_like(xs[1], 1.0)
    assert torch.isfinite(prob.objective(*xs)).all() and torch.isinf(prob.objective(xs[0], w_out)).all()


def test_soft_impute_baseline():
    from torch_l2o.baselines import soft_impute
    from torch_l2o.prox import prox_value

    prob = MatrixCompletion(n=20, rank=2, observe=0.5).sample(2, generator=torch.Generator().manual_seed(0), dtype=D)
    X = soft_impute(prob, 0.1, 100)
    F = lambda X: 0.5 * (prob.mask * (prob.R - X)).square().sum((1, 2)) + prox_value("nuclear", X, 1, lam=0.1)
    assert (F(X) < F(torch.zeros_like(X))).all() and float(prob.rmse(X).max()) < 0.5
    assert not hasattr(prob, "soft_impute")  # a solver on the optimizers, not a method of the problem


PROBLEMS = Path(problems.__file__).parent
MODULES = sorted(p.stem for p in PROBLEMS.glob("*.py"))


def _imports(path: Path) -> set[str]:
    """Absolute names of every module (and imported name) ``path`` imports, at any depth."""
    package = f"torch_l2o.problems.{path.stem}".split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] if node.level else [])
            mod = ".".join(p for p in (base, node.module) if p)
            out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("module", MODULES)
def test_problems_import_no_optim_and_no_cycle(module):
    names = _imports(PROBLEMS / f"{module}.py")
    assert not any(n == "torch_l2o.optim" or n.startswith("torch_l2o.optim.") for n in names), names
    if module == "base":  # the root of the package: it imports no sibling (solve imports it)
        assert not any(n.startswith("torch_l2o.problems.") for n in names), names
    # each module imports first in a fresh interpreter
    subprocess.run([sys.executable, "-c", f"import torch_l2o.problems.{module}"], check=True)


def test_optimal_values_beside_the_solver():
    from torch_l2o.problems import base, solve

    assert problems.optimal_values is solve.optimal_values and not hasattr(base, "optimal_values")


def test_reference_polish_is_linear_in_the_batch():
    """The Newton polish works on each instance's own slice: the whole batch's objective is
    evaluated a fixed number of times, not once per instance (that was O(B^2))."""
    from dataclasses import dataclass

    from torch_l2o.problems import LassoProblem

    sizes = []

    @dataclass
    class Counting(LassoProblem):
        def smooth(self, x):
            sizes.append(x.shape[0])
            return super().smooth(x)

    base = Lasso(m=15, n=30, sparsity=3).sample(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    prob = Counting(A=base.A, b=base.b, prox="l1", prox_params=base.prox_params)
    sol = reference_solve(prob)
    assert float(sol.kkt.max()) < 1e-12
    assert sizes.count(6) <= 2 and sizes.count(1) > 6  # the polish ran, on slices of one instance


@pytest.mark.parametrize("shape", [(3, 20, 40), (3, 40, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_spectral_norm_gram_path_matches_svd(monkeypatch, shape, dtype):
    """Beyond GRAM_ABOVE the spectral norm comes from the smaller Gram matrix: the SVD's
    value to float64 rounding, in the SVD path's dtype, wide and tall, batched."""
    from torch_l2o.problems import families

    M = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=D).to(dtype)
    svd = torch.linalg.matrix_norm(M.to(torch.promote_types(dtype, torch.float32)).double(), ord=2)
    monkeypatch.setattr(families, "GRAM_ABOVE", 8)
    gram = families._spectral_norm(M)
    assert gram.dtype == torch.promote_types(dtype, torch.float32) and gram.shape == (3,)
    tol = 1e-13 if dtype == D else 1e-6
    torch.testing.assert_close(gram.double(), svd, rtol=tol, atol=0)
    monkeypatch.setattr(families, "GRAM_ABOVE", 512)  # below it: the SVD itself, bit for bit
    assert torch.equal(families._spectral_norm(M), torch.linalg.matrix_norm(M.to(gram.dtype), ord=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matvec_and_rmatvec_are_the_batched_products(dtype):
    """``matvec`` / ``rmatvec`` (row-vector forms, fast on the CPU) compute ``M x`` and
    ``M^T r`` per instance, and autograd through ``matvec`` gives ``M^T`` of the upstream
    gradient: the einsum definitions up to summation order."""
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(5, 7, 3, generator=gen, dtype=dtype)
    x = torch.randn(5, 3, generator=gen, dtype=dtype, requires_grad=True)
    r = torch.randn(5, 7, generator=gen, dtype=dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    y = problems.matvec(M, x)
    torch.testing.assert_close(y, torch.einsum("bmn,bn->bm", M, x), **tol)
    torch.testing.assert_close(problems.rmatvec(M, r), torch.einsum("bmn,bm->bn", M, r), **tol)
    (g,) = torch.autograd.grad((y * r).sum(), x)
    torch.testing.assert_close(g, torch.einsum("bmn,bm->bn", M, r), **tol)
