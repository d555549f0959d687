"""Problem families, the float64 reference solver and the metric."""

import warnings

import numpy as np
import pytest
import torch

from torch_l2o.problems import Lasso, LogisticL1, kkt_residual, mean_relative_error, reference_solve

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
