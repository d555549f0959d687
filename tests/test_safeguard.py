"""Safeguarded learned steps: never worse than ISTA's guarantee, counted fallbacks."""

import copy
import math

import pytest
import torch

import torch_l2o
from torch_l2o.nets import PANet
from torch_l2o.problems import Lasso, mean_relative_error, reference_solve

D = torch.float64


def _heads(p_bias, a_bias):
    """PA weights whose heads output constants p = 2 sigmoid(p_bias), a = 2 sigmoid(a_bias)."""
    sd = PANet().state_dict()
    for k in list(sd):
        if k.startswith("heads.p") or k.startswith("heads.a"):
            sd[k] = torch.zeros_like(sd[k])
    sd["heads.p.bias"] += p_bias
    sd["heads.a.bias"] += a_bias
    return sd


@pytest.fixture(scope="module")
def prob():
    p = Lasso(m=40, n=80, sparsity=8).sample(6, generator=torch.Generator().manual_seed(0), dtype=D)
    return p, reference_solve(p).F


def _closure(opt, x, prob):
    def closure():
        opt.zero_grad()
        f = prob.smooth(x)
        f.sum().backward()
        return f
    return closure


def test_bad_learned_steps_diverge_unguarded_and_converge_guarded(prob):
    p, F_star = prob
    bad = _heads(10.0, 3.0)  # p ~ 2 (step 2/L), a ~ 1.9: unstable
    x = p.x0().requires_grad_(True)
    opt = torch_l2o.PA([x], prox="l1", lam=0.1, lr=p.step_size(), weights=bad, instance_dims=1, watchdog=False)
    with pytest.raises(FloatingPointError):
        for _ in range(300):
            opt.step(_closure(opt, x, p))
    # without a closure the watchdog catches it: a warning, then FISTA-restart steps that converge
    x = p.x0().requires_grad_(True)
    opt = torch_l2o.PA([x], prox="l1", lam=0.1, lr=p.step_size(), weights=bad, instance_dims=1)
    with pytest.warns(RuntimeWarning, match="diverged or stalled"):
        for _ in range(300):
            opt.zero_grad()
            p.smooth(x).sum().backward()
            opt.step()
    assert bool(opt.state[x]["watchdog"].all())
    assert float(mean_relative_error(p.objective(opt.solution(x)), F_star)) < 1e-6
    x = p.x0().requires_grad_(True)
    opt = torch_l2o.PA([x], prox="l1", lam=0.1, lr=p.step_size(), weights=bad, safeguard=True, instance_dims=1)
    F_prev = p.objective(p.x0())
    for _ in range(300):
        opt.step(_closure(opt, x, p))
        F = p.objective(opt.solution(x))
        assert bool((F <= F_prev + 1e-12 * F_prev.abs()).all())  # monotone, per instance
        F_prev = F
    assert float(mean_relative_error(F, F_star)) < 1e-6
    assert bool((opt.state[x]["fallbacks"] > 0).all())


def test_good_learned_steps_are_all_accepted(prob):
    """p = 1, a = 0 makes the learned step ISTA's, which meets the test: no fallback,
    the ISTA iterates exactly."""
    p, _ = prob
    x = p.x0().requires_grad_(True)
    opt = torch_l2o.PA([x], prox="l1", lam=0.1, lr=p.step_size(), weights=_heads(0.0, -math.inf),
                       safeguard=True, instance_dims=1)
    z = p.x0().requires_grad_(True)
    ista = torch_l2o.ISTA([z], prox="l1", lam=0.1, lr=p.step_size())
    for _ in range(40):
        opt.step(_closure(opt, x, p))
        ista.step(_closure(ista, z, p))
        assert torch.allclose(opt.solution(x), z.detach(), atol=1e-14, rtol=0)
    assert int(opt.state[x]["fallbacks"].sum()) == 0


def test_scalar_closure_decides_jointly(prob):
    p, F_star = prob
    x = p.x0().requires_grad_(True)
    opt = torch_l2o.PA([x], prox="l1", lam=0.1, lr=p.step_size(), weights=_heads(10.0, 3.0), safeguard=True,
                       instance_dims=1)

    def closure():
        opt.zero_grad()
        f = p.smooth(x).sum()
        f.backward()
        return f

    for _ in range(200):
        opt.step(closure)
    fb = opt.state[x]["fallbacks"]
    assert bool((fb == fb[0]).all()) and int(fb[0]) > 0  # all instances together
    assert float(mean_relative_error(p.objective(opt.solution(x)), F_star)) < 1e-5


def test_safeguard_needs_a_closure(prob):
    p, _ = prob
    x = p.x0().requires_grad_(True)
    opt = torch_l2o.PA([x], prox="l1", lam=0.1, lr=p.step_size(), weights="untrained", safeguard=True)
    p.smooth(x).sum().backward()
    with pytest.raises(RuntimeError, match="needs step\\(closure\\)"):
        opt.step()


def test_safeguard_state_round_trip(prob):
    p, _ = prob
    p32 = p.to(torch.float32)
    kw = dict(prox="l1", lam=0.1, lr=p32.step_size(), weights=_heads(2.0, 1.0), safeguard=True, instance_dims=1)
    x = p32.x0().requires_grad_(True)
    opt = torch_l2o.PA([x], **kw)
    for _ in range(6):
        opt.step(_closure(opt, x, p32))
    x2 = x.detach().clone().requires_grad_(True)
    opt2 = torch_l2o.PA([x2], **kw)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.state[x2]["sg_stale"].dtype == torch.bool and opt2.state[x2]["sg_F"].dtype == D
    for _ in range(6):
        opt.step(_closure(opt, x, p32))
        opt2.step(_closure(opt2, x2, p32))
    assert torch.equal(x, x2) and torch.equal(opt.state[x]["fallbacks"], opt2.state[x2]["fallbacks"])
