"""ISTA and FISTA: textbook iterates, torch.optim behaviour, step sizes, bad input."""

import copy
import math

import pytest
import torch

import torch_l2o
from torch_l2o.problems import Lasso, LogisticL1, mean_relative_error, reference_solve

D = torch.float64


def soft(z, thr):
    return torch.sign(z) * torch.clamp(z.abs() - thr, min=0)


@pytest.fixture(scope="module")
def lasso16():
    return Lasso().sample(16, generator=torch.Generator().manual_seed(0), dtype=D)


def test_fista_reproduces_textbook_loop(lasso16):
    """float64, 16 LASSO instances in one (16, 500) parameter with per-instance steps."""
    prob = lasso16
    s = 0.9999 / prob.lipschitz.unsqueeze(-1)
    lam = 0.1
    # the textbook loop, Beck & Teboulle (2009) with t0 = 1, y0 = x0 = 0, one instance at a time
    ref = []
    for i in range(16):
        A, b = prob.A[i], prob.b[i]
        x = torch.zeros(500, dtype=D)
        y, t = x.clone(), 1.0
        xs = []
        for _ in range(100):
            x_new = soft(y - s[i] * (A.T @ (A @ y - b)), s[i] * lam)
            t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
            y = x_new + (t - 1) / t_new * (x_new - x)
            x, t = x_new, t_new
            xs.append(x)
        ref.append(torch.stack(xs))
    ref = torch.stack(ref, 1)  # (100, 16, 500)

    x = prob.x0().requires_grad_(True)
    opt = torch_l2o.FISTA([x], prox="l1", lam=lam, lr=s)
    for k in range(100):
        opt.zero_grad()
        prob.smooth(x).sum().backward()
        opt.step()
        assert (opt.solution(x) - ref[k]).abs().max() <= 1e-12


def test_ista_reproduces_textbook_loop(lasso16):
    prob = lasso16[:4]
    s = 0.9999 / prob.lipschitz.unsqueeze(-1)
    x_ref = prob.x0()
    x = prob.x0().requires_grad_(True)
    opt = torch_l2o.ISTA([x], prox="l1", lam=0.1, lr=s)
    for _ in range(50):
        x_ref = soft(x_ref - s * prob.grad(x_ref), s * 0.1)
        opt.zero_grad()
        prob.smooth(x).sum().backward()
        opt.step()
        assert (x.detach() - x_ref).abs().max() <= 1e-13
    assert opt.solution(x) is not None and torch.equal(opt.solution(x), x.detach())


def test_restart_reproduces_textbook_loop(lasso16):
    prob = lasso16[:4]
    s = 0.9999 / prob.lipschitz.unsqueeze(-1)
    x_ref = prob.x0()
    y_ref, t = x_ref.clone(), torch.ones(4, 1, dtype=D)
    x = prob.x0().requires_grad_(True)
    opt = torch_l2o.FISTA([x], prox="l1", lam=0.1, lr=s, restart=True)
    restarts = 0
    for _ in range(150):
        x_new = soft(y_ref - s * prob.grad(y_ref), s * 0.1)
        t_new = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        c = ((y_ref - x_new) * (x_new - x_ref)).sum(-1, keepdim=True) > 0
        restarts += int(c.sum())
        y_ref = torch.where(c, x_new, x_new + (t - 1) / t_new * (x_new - x_ref))
        t = torch.where(c, torch.ones_like(t), t_new)
        x_ref = x_new
        opt.zero_grad()
        prob.smooth(x).sum().backward()
        opt.step()
        assert (opt.solution(x) - x_ref).abs().max() <= 1e-12
        assert (x.detach() - y_ref).abs().max() <= 1e-12
    assert restarts > 0


def _iterations_to(prob, sol, opt_fn, iters, closure=False, targets=(1e-4, 1e-6), dtype=torch.float32):
    p = prob.to(dtype)
    x = p.x0().requires_grad_(True)
    opt = opt_fn([x])
    hit = dict.fromkeys(targets)

    def f():
        opt.zero_grad()
        val = p.smooth(x)
        val.sum().backward()
        return val

    for k in range(1, iters + 1):
        if closure:
            opt.step(f)
        else:
            f()
            opt.step()
        err = float(mean_relative_error(prob.objective(opt.solution(x).double()), sol.F))
        for tgt in targets:
            if hit[tgt] is None and err <= tgt:
                hit[tgt] = k
    return hit, err, opt, x


@pytest.fixture(scope="module")
def lasso64():
    prob = Lasso().sample(64, generator=torch.Generator().manual_seed(1), dtype=D)
    return prob, reference_solve(prob)


def test_fista_reaches_1e6_within_100_iterations(lasso64):
    """The 250 x 500 family in float32 as users run it (a plain loop needs about 92)."""
    prob, sol = lasso64
    s = prob.step_size().float()
    hit, err, _, _ = _iterations_to(prob, sol, lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=0.1, lr=s), 100)
    assert hit[1e-6] is not None and hit[1e-6] <= 100
    assert 40 <= hit[1e-4] <= 60  # the textbook rate, not a faster method


def test_restart_is_faster(lasso64):
    prob, sol = lasso64
    s = prob.step_size().float()
    plain, _, _, _ = _iterations_to(prob, sol, lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=0.1, lr=s), 100)
    rs, _, _, _ = _iterations_to(prob, sol, lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=0.1, lr=s, restart=True), 100)
    assert rs[1e-6] < plain[1e-6]


@pytest.mark.parametrize("closure", [False, True], ids=["secant", "backtracking"])
def test_automatic_step_size(lasso64, closure):
    """lr=None: the step comes from the shared mechanism; no more than 10% extra
    iterations against the known 1/L (it is usually fewer: local L < global L)."""
    prob, sol = lasso64
    known, _, _, _ = _iterations_to(
        prob, sol, lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=0.1, lr=prob.step_size().float()), 120)
    auto, err, opt, x = _iterations_to(
        prob, sol, lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=0.1, instance_dims=1), 120, closure=closure)
    assert auto[1e-6] is not None and auto[1e-6] <= 1.1 * known[1e-6]
    L_est = opt.state[x]["lipschitz"].flatten()
    L = prob.lipschitz
    if closure:  # backtracking: within the factor eta = 2 of the true constant
        assert bool((L_est <= 2 * L).all())
    else:  # secants are lower bounds of L
        assert bool((L_est <= L * (1 + 1e-4)).all())
    assert bool((L_est >= 0.3 * L).all())


def test_automatic_step_size_logistic():
    prob = LogisticL1().sample(32, generator=torch.Generator().manual_seed(2), dtype=D)
    sol = reference_solve(prob)
    for closure in (False, True):
        hit, _, _, _ = _iterations_to(
            prob, sol, lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=0.1, instance_dims=1), 40, closure=closure)
        assert hit[1e-6] is not None and hit[1e-6] <= 15


def _run(opt, x, prob, n):
    for _ in range(n):
        opt.zero_grad()
        prob.smooth(x).sum().backward()
        opt.step()


@pytest.mark.parametrize("kwargs", [
    dict(lr="L"), dict(lr="L", restart=True), dict(lr=None, instance_dims=1), dict(lr=None, restart=True, instance_dims=1),
], ids=["fista", "restart", "auto", "auto-restart"])
def test_state_dict_round_trip_is_bit_identical(lasso16, kwargs):
    prob = lasso16[:4].to(torch.float32)
    kwargs = dict(kwargs)
    if kwargs["lr"] == "L":
        kwargs["lr"] = prob.step_size()
    x = prob.x0().requires_grad_(True)
    opt = torch_l2o.FISTA([x], prox="l1", lam=0.1, **kwargs)
    _run(opt, x, prob, 5)
    saved = copy.deepcopy(opt.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    opt2 = torch_l2o.FISTA([x2], prox="l1", lam=0.1, **kwargs)
    opt2.load_state_dict(saved)
    assert opt2.state[x2]["t"].dtype == torch.float64
    _run(opt, x, prob, 5)
    _run(opt2, x2, prob, 5)
    assert torch.equal(x, x2) and torch.equal(opt.solution(x), opt2.solution(x2))


def test_bf16_parameters_keep_float64_momentum():
    x = torch.zeros(8, dtype=torch.bfloat16, requires_grad=True)
    opt = torch_l2o.FISTA([x], prox="l1", lam=0.1, lr=0.5)
    for _ in range(3):
        x.grad = torch.ones(8, dtype=torch.bfloat16)
        opt.step()
    opt2 = torch_l2o.FISTA([x], prox="l1", lam=0.1, lr=0.5)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[x]["t"].dtype == torch.float64 and opt2.state[x]["x"].dtype == torch.bfloat16
    assert torch.equal(opt2.state[x]["t"], opt.state[x]["t"])


def test_batched_equals_separate_runs(lasso16):
    prob = lasso16[:3]
    s = prob.step_size()
    xb = prob.x0().requires_grad_(True)
    ob = torch_l2o.FISTA([xb], prox="l1", lam=0.1, lr=s, restart=True)
    _run(ob, xb, prob, 60)
    for i in range(3):
        pi = prob[i : i + 1]
        xi = torch.zeros(500, dtype=D, requires_grad=True)
        oi = torch_l2o.FISTA([xi], prox="l1", lam=0.1, lr=float(s[i]), restart=True)
        for _ in range(60):
            oi.zero_grad()
            pi.smooth(xi[None]).sum().backward()
            oi.step()
        assert torch.allclose(oi.solution(xi), ob.solution(xb)[i], atol=1e-13, rtol=0)


def test_param_groups_and_add_param_group():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(20, 10, generator=g, dtype=D)
    b = torch.randn(20, generator=g, dtype=D)

    def loss(u, v):
        return 0.5 * (A @ torch.cat([u, v]) - b).square().sum()

    u = torch.zeros(5, dtype=D, requires_grad=True)
    v = torch.zeros(5, dtype=D, requires_grad=True)
    opt = torch_l2o.FISTA([{"params": [u]}], prox="l1", lam=0.5, lr=0.01)
    opt.add_param_group({"params": [v], "prox": "box", "prox_params": {"lo": -0.1, "hi": 0.1}, "lam": 0.0, "lr": 0.02})
    for _ in range(30):
        opt.zero_grad()
        loss(u, v).backward()
        opt.step()
    xv = opt.solution(v)
    assert bool((xv.abs() <= 0.1).all()) and bool((xv.abs() == 0.1).any())
    assert opt.param_groups[1]["lr"] == 0.02 and opt.param_groups[0]["lam"] == 0.5
    n_groups = len(opt.param_groups)
    with pytest.raises(ValueError, match="unknown prox"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "prox": "lasso"})
    assert len(opt.param_groups) == n_groups


def test_closure_and_scheduler():
    x = torch.tensor([3.0, -3.0], dtype=D, requires_grad=True)
    opt = torch_l2o.ISTA([x], lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def closure():
        opt.zero_grad()
        f = 0.5 * x.square().sum()
        f.backward()
        return f

    lrs = []
    for _ in range(3):
        loss = opt.step(closure)
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert isinstance(loss, torch.Tensor)
    assert lrs == [0.5, 0.25, 0.125]
    # x <- (1 - lr) x, three times
    assert torch.allclose(x.detach(), torch.tensor([3.0, -3.0], dtype=D) * 0.5 * 0.75 * 0.875)


def test_parameters_without_grad_are_left_alone():
    x = torch.ones(3, requires_grad=True)
    z = torch.ones(3, requires_grad=True)
    opt = torch_l2o.FISTA([x, z], lr=0.1)
    x.grad = torch.ones(3)
    opt.step()
    assert torch.equal(z, torch.ones(3)) and z not in opt.state


def _snapshot(opt, x):
    return x.detach().clone(), copy.deepcopy(opt.state_dict())


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return a == b


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_gradient_raises_and_touches_nothing(bad):
    x = torch.zeros(4, requires_grad=True)
    opt = torch_l2o.FISTA([x], prox="l1", lam=0.1, lr=0.1)
    x.grad = torch.ones(4)
    opt.step()
    before = _snapshot(opt, x)
    x.grad = torch.tensor([1.0, bad, 1.0, 1.0])
    with pytest.raises(FloatingPointError, match="parameter 0 in group 0 holds NaN or Inf.*nonfinite='skip'"):
        opt.step()
    after = _snapshot(opt, x)
    assert _same(before, after)


def test_nonfinite_gradient_skip_counts():
    x = torch.zeros(4, requires_grad=True)
    opt = torch_l2o.FISTA([x], lr=0.1, nonfinite="skip")
    x.grad = torch.full((4,), math.nan)
    opt.step()
    opt.step()
    assert torch.equal(x, torch.zeros(4)) and opt.state[x]["skipped_steps"] == 2
    x.grad = torch.ones(4)
    opt.step()
    assert torch.allclose(x.detach(), torch.full((4,), -0.1))


def test_sparse_and_complex_inputs():
    x = torch.zeros(5, requires_grad=True)
    opt = torch_l2o.ISTA([x], lr=0.1)
    x.grad = torch.zeros(5).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients.*dense"):
        opt.step()
    assert torch.equal(x, torch.zeros(5))
    with pytest.raises(TypeError, match="view_as_real"):
        torch_l2o.FISTA([torch.zeros(3, dtype=torch.complex64, requires_grad=True)], lr=0.1)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(prox="lasso", lr=0.1), ValueError, "unknown prox 'lasso'; registered: .*l1"),
    (dict(prox="l1", lam=-1.0, lr=0.1), ValueError, "lam must be finite and >= 0"),
    (dict(prox="box", prox_params={"lo": 1.0, "hi": -1.0}, lr=0.1), ValueError, "lo <= hi"),
    (dict(prox="box", lam=0.1, lr=0.1), ValueError, "takes no strength lam"),
    (dict(lr=-0.1), ValueError, "positive finite"),
    (dict(lr=math.nan), ValueError, "positive finite"),
    (dict(lr=torch.ones(3, 1)), ValueError, "does not fit a parameter of shape"),
    (dict(lr=0.1, nonfinite="ignore"), ValueError, "nonfinite must be"),
])
def test_bad_construction(kwargs, err, match):
    with pytest.raises(err, match=match):
        torch_l2o.FISTA([torch.zeros(4, 6, requires_grad=True)], **kwargs)


def test_solution_of_unknown_parameter():
    opt = torch_l2o.FISTA([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="not a parameter"):
        opt.solution(torch.zeros(2))


def test_probe_grows_until_a_secant_is_accepted():
    """A tiny gradient change (below the rounding floor) must not freeze the step at the probe."""
    A = torch.eye(4) * 1e-3  # f = 1/2 |A x - b|^2 has L = 1e-6: the first probe moves g by rounding only
    b = torch.ones(4)
    x = torch.zeros(4, requires_grad=True)
    opt = torch_l2o.FISTA([x])
    for _ in range(60):
        opt.zero_grad()
        (0.5 * (A @ x - b).square().sum()).backward()
        opt.step()
    L = float(opt.state[x]["lipschitz"])
    assert 0.5e-6 <= L <= 1.0e-6 * (1 + 1e-3)
    assert float((A @ opt.solution(x) - b).norm()) < 0.5  # it moved towards x* = 1000


@pytest.mark.parametrize("cls", [torch_l2o.ISTA, torch_l2o.FISTA])
def test_probe_at_a_minimiser_stays_finite(cls):
    """x = 0 is the LASSO solution when lam >= |A^T b|_inf: the probe cannot move, and must
    not grow to inf (it did, and the gradient turned NaN after ~40 steps)."""
    torch.manual_seed(0)
    A = torch.randn(3, 8, 5)
    b = torch.randn(3, 8)
    b[1] *= 1e-3  # instance 1: x* = 0
    x = torch.zeros(3, 5, requires_grad=True)
    opt = cls([x], prox="l1", lam=0.5, instance_dims=1)
    for _ in range(200):
        opt.zero_grad()
        (0.5 * (torch.einsum("bmn,bn->bm", A, x) - b).square().sum()).backward()
        opt.step()
    sol = opt.solution(x)
    assert torch.isfinite(opt.state[x]["probe_lr"]).all()
    assert torch.equal(sol[1], torch.zeros(5))
    assert torch.isfinite(sol).all() and (sol[0] != 0).any()


@pytest.mark.parametrize("fused", ["cpu", False])
def test_automatic_step_per_instance_over_tensors_of_different_ranks(fused):
    """``lr=None`` with ``instance_dims=1`` on a group of a (3, 40) and a (3, 2, 5) tensor:
    one estimate per instance over both tensors (it used to broadcast the two tensors'
    per-instance sums against each other into a (3, 3, 1) step and raise). On
    ``f = sum_i c_i (|a_i|^2 + |b_i|^2)`` the secant is exactly ``L_i = 2 c_i``."""
    from torch_l2o.kernels.fused import use_fused

    c = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 40, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    opt = torch_l2o.FISTA([a, b], prox="l1", lam=0.01, instance_dims=1)
    with use_fused(fused):
        for _ in range(3):
            opt.zero_grad()
            (c * (a.square().sum(1) + b.square().sum((1, 2)))).sum().backward()
            opt.step()
    for p in (a, b):
        L = opt.state[p]["lipschitz"]
        assert L.shape == (3, 1) and torch.allclose(L.flatten(), 2 * c, rtol=1e-10)
