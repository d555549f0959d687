"""Math-L2O learned gradient descent: starts as GD exactly, trains with the paper's protocol."""

import math

import pytest
import torch

import torch_l2o
from torch_l2o.nets import MathGDNet
from torch_l2o.optim.functional import mathgd_update
from torch_l2o.problems import LeastSquares

FAM = LeastSquares(m=12, n=16)


def _run(opt, x, prob, n):
    for _ in range(n):
        opt.zero_grad()
        prob.smooth(x).sum().backward()
        opt.step()


def test_untrained_is_gradient_descent_exactly():
    prob = FAM.sample(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = prob.step_size()
    for e in (1.0, 100.0):
        x = prob.x0().requires_grad_(True)
        z = prob.x0().requires_grad_(True)
        _run(torch_l2o.MathGD([x], lr=s, weights="untrained", init_scale=e, hidden=64), x, prob, 20)
        _run(torch_l2o.ISTA([z], lr=s), z, prob, 20)  # ISTA with no prox: gradient descent
        assert torch.equal(x, z)


def test_deterministic_initialisation():
    a, b = MathGDNet(hidden=32, init_scale=5.0), MathGDNet(hidden=32, init_scale=5.0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.equal(a.out.weight, torch.zeros(1, 32))
    assert torch.allclose(torch.linalg.svdvals(a.l2.weight), torch.full((2,), 5.0))
    assert torch.allclose(a.l1.weight @ a.l1.weight.T, 25 * torch.eye(2), atol=1e-4)
    assert all(p.bias is None for p in (a.l1, a.l2, a.out))
    assert sum(p.numel() for p in MathGDNet().parameters()) == 3 * 5120 + 4


def test_step_is_bounded_and_the_shared_function():
    prob = FAM.sample(3, generator=torch.Generator().manual_seed(1))
    net = MathGDNet(hidden=16, init_scale=1.0)
    with torch.no_grad():
        net.out.weight.normal_(0, 10.0)
    p, _ = net(torch.randn(100, 2) * 10, {})
    assert bool(((p >= 0) & (p <= 2)).all())  # 2 sigmoid: (0, 2), saturating to its ends in float32
    with torch.no_grad():
        net.out.weight.normal_(0, 0.3)
    x = prob.x0().requires_grad_(True)
    opt = torch_l2o.MathGD([x], lr=prob.step_size(), weights=net.state_dict(), hidden=16)
    y = prob.x0()
    for _ in range(4):
        _run(opt, x, prob, 1)
        yr = y.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(prob.smooth(yr).sum(), yr)
        with torch.no_grad():
            (y,), _, _ = mathgd_update(opt.net, {}, [y], [g], [y], lr=prob.step_size())
        assert torch.equal(x.detach(), y)


def test_meta_training_with_the_papers_protocol_lowers_the_last_step_objective():
    kw = dict(steps=6, batch=4, horizon=20, unroll=20, loss="last", meta_optimizer="sgd", lr=0.05, val_every=3,
              val_batch=4, progress=False, hidden=32, init_scale=5.0)
    w1, h1 = torch_l2o.meta_train("mathgd", FAM, seed=0, **kw)
    w2, h2 = torch_l2o.meta_train("mathgd", FAM, seed=0, **kw)
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and h1.loss == h2.loss
    assert h1.val_score[-1] < h1.val_score[0]  # better than GD (the untrained start) on held instances
    assert all(math.isfinite(v) for v in h1.loss)


def test_least_squares_family():
    prob = LeastSquares(m=40, n=50).sample(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(prob.W.norm(dim=1), torch.ones(3, 50, dtype=torch.float64))
    assert torch.allclose(prob.smooth(prob.x_true), torch.zeros(3, dtype=torch.float64), atol=1e-20)
    assert torch.equal(prob.optimal_value(), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="meta_optimizer must be"):
        torch_l2o.meta_train("mathgd", FAM, meta_optimizer="lbfgs")
