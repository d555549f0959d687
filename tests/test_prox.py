"""The prox registry: textbook formulas, optimality, errors, user registration."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torch_l2o
from torch_l2o.prox import available_prox, get_prox, prox_value, register_prox

D = torch.float64
BUILTIN = ["none", "l1", "nonneg", "nonneg_l1", "elastic_net", "l2sq", "box", "group_l1", "nuclear", "simplex"]
PARAMS = {
    "none": {}, "l1": {"lam": 0.7}, "nonneg": {}, "nonneg_l1": {"lam": 0.3},
    "elastic_net": {"lam": 0.4, "lam2": 1.5}, "l2sq": {"lam": 2.0}, "box": {"lo": -0.5, "hi": 0.25},
    "group_l1": {"lam": 0.6, "dim": -1}, "nuclear": {"lam": 0.8}, "simplex": {"dim": -1},
}


def test_builtins_registered():
    assert set(BUILTIN) <= set(available_prox())
    kernel = {n for n in BUILTIN if get_prox(n).kernel is not None}
    assert kernel == {"none", "l1", "nonneg", "nonneg_l1", "elastic_net", "l2sq", "box"}


def test_soft_threshold_textbook():
    z = torch.tensor([-3.0, -0.5, 0.0, 0.2, 2.0], dtype=D)
    x = get_prox("l1")(z, 0.5, lam=2.0)  # threshold 1
    assert torch.equal(x, torch.tensor([-2.0, 0.0, 0.0, 0.0, 1.0], dtype=D))


def test_per_coordinate_step():
    z = torch.tensor([2.0, 2.0, -2.0], dtype=D)
    t = torch.tensor([0.5, 1.0, 3.0], dtype=D)
    assert torch.equal(get_prox("l1")(z, t, lam=1.0), torch.tensor([1.5, 1.0, 0.0], dtype=D))
    assert torch.equal(get_prox("nonneg_l1")(z, t, lam=1.0), torch.tensor([1.5, 1.0, 0.0], dtype=D))
    assert torch.allclose(get_prox("l2sq")(z, t, lam=1.0), z / (1 + t))


def test_elementwise_formulas():
    z = torch.linspace(-3, 3, 13, dtype=D)
    t = 0.5
    assert torch.equal(get_prox("nonneg")(z, t), z.clamp(min=0))
    assert torch.equal(get_prox("box")(z, t, lo=-1.0, hi=2.0), z.clamp(-1, 2))
    en = get_prox("elastic_net")(z, t, lam=1.0, lam2=2.0)
    assert torch.allclose(en, torch.sign(z) * (z.abs() - 0.5).clamp(min=0) / 2)


def _objective(name, params, u, z, t):
    """r(u) + sum (u - z)^2 / (2 t), the function the prox minimises."""
    return prox_value(name, u, **params) + ((u - z) ** 2 / (2 * t)).sum()


@pytest.mark.parametrize("name", BUILTIN)
def test_prox_minimises_its_objective(name):
    """prox_{t r}(z) beats every nearby feasible point on r(u) + |u - z|^2 / (2t)."""
    g = torch.Generator().manual_seed(0)
    shape = (4, 5)
    z = torch.randn(shape, generator=g, dtype=D) * 2
    t = torch.rand(4, 1, generator=g, dtype=D) + 0.2 if name != "nuclear" else 0.7
    params = PARAMS[name]
    x = get_prox(name)(z, t, **params)
    best = _objective(name, params, x, z, t)
    for _ in range(200):
        u = x + 1e-3 * torch.randn(shape, generator=g, dtype=D)
        if name in ("nonneg", "nonneg_l1"):
            u = u.clamp(min=0)
        if name == "box":
            u = u.clamp(-0.5, 0.25)
        if name == "simplex":  # stay on the simplex: move along directions that sum to zero
            u = x + 1e-3 * (lambda d: d - d.mean(-1, keepdim=True))(torch.randn(shape, generator=g, dtype=D))
            u = torch.where(x == 0, torch.zeros_like(u).clamp(min=0), u)
            if bool((u < 0).any()) or not torch.allclose(u.sum(-1), torch.ones(4, dtype=D)):
                continue
        assert _objective(name, params, u, z, t) >= best - 1e-12


def test_group_l1_is_block_soft_threshold():
    z = torch.tensor([[3.0, 4.0], [0.3, 0.4], [1.0, 0.0]], dtype=D)
    x = get_prox("group_l1")(z, 1.0, lam=1.0, dim=-1)
    expect = torch.tensor([[3 * 0.8, 4 * 0.8], [0.0, 0.0], [0.0, 0.0]], dtype=D)
    assert torch.allclose(x, expect)
    # groups along dim 0: columns
    xc = get_prox("group_l1")(z.T.contiguous(), 1.0, lam=1.0, dim=0)
    assert torch.allclose(xc, expect.T)


@given(st.integers(0, 10_000))
def test_group_l1_variable_metric_optimality(seed):
    """With a step varying inside a group, the prox solves the metric problem: its
    optimality condition (z - x) / t in lam * d|x|_2 holds."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, 6, generator=g, dtype=D) * 2
    t = torch.rand(3, 6, generator=g, dtype=D) + 0.1
    lam = 0.9
    x = get_prox("group_l1")(z, t, lam=lam, dim=-1)
    v = (z - x) / t
    for i in range(3):
        nx = x[i].norm()
        if nx > 0:
            assert torch.allclose(v[i], lam * x[i] / nx, atol=1e-9)
        else:
            assert v[i].norm() <= lam + 1e-12
    # uniform t inside groups agrees with the closed form
    tu = t[:, :1].expand(3, 6).contiguous()
    assert torch.allclose(get_prox("group_l1")(z, tu, lam=lam), get_prox("group_l1")(z, t[:, :1], lam=lam),
                          atol=1e-12)


def test_nuclear_thresholds_singular_values():
    g = torch.Generator().manual_seed(1)
    Z = torch.randn(2, 6, 4, generator=g, dtype=D)
    X = get_prox("nuclear")(Z, torch.tensor([[[0.5]], [[1.0]]], dtype=D), lam=1.0)
    s_in = torch.linalg.svdvals(Z)
    s_out = torch.linalg.svdvals(X)
    expect = torch.stack([(s_in[0] - 0.5).clamp(min=0), (s_in[1] - 1.0).clamp(min=0)])
    assert torch.allclose(s_out, expect, atol=1e-10)
    assert torch.allclose(prox_value("nuclear", Z, 1, lam=2.0), 2 * s_in.sum(-1))
    with pytest.raises(ValueError, match="per-coordinate step"):
        get_prox("nuclear")(Z, torch.rand(2, 6, 4, dtype=D), lam=1.0)
    with pytest.raises(ValueError, match="2-D"):
        get_prox("nuclear")(torch.ones(3, dtype=D), 1.0, lam=1.0)


def test_values():
    x = torch.tensor([[1.0, -2.0], [0.5, 0.0]], dtype=D)
    assert torch.equal(prox_value("l1", x, 1, lam=0.5), torch.tensor([1.5, 0.25], dtype=D))
    assert prox_value("l1", x, lam=0.5).item() == 1.75
    assert torch.equal(prox_value("nonneg", x, 1), torch.tensor([math.inf, 0.0], dtype=D))
    assert torch.equal(prox_value("box", x, 1, lo=-2.0, hi=1.0), torch.tensor([0.0, 0.0], dtype=D))
    assert prox_value("box", x, lo=0.0, hi=1.0).item() == math.inf
    assert torch.allclose(prox_value("elastic_net", x, 1, lam=1.0, lam2=2.0), torch.tensor([3 + 5, 0.5 + 0.25], dtype=D))
    assert torch.allclose(prox_value("group_l1", x, 1, lam=1.0), torch.tensor([5 ** 0.5, 0.5], dtype=D))


def test_unknown_name_lists_registered():
    with pytest.raises(ValueError, match="unknown prox 'l0'.*registered: .*l1.*nuclear"):
        get_prox("l0")


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("l1", {"lam": -0.1}, "lam must be finite and >= 0"),
        ("l1", {"lam": math.nan}, "lam must be finite"),
        ("elastic_net", {"lam": 0.1, "lam2": -1.0}, "lam2 must be finite and >= 0"),
        ("box", {"lo": 1.0, "hi": 0.0}, "lo <= hi"),
        ("l1", {"mu": 1.0}, "takes no parameter 'mu'; it accepts: lam"),
        ("group_l1", {"lam": 1.0, "dim": 1.5}, "dim must be an int"),
    ],
)
def test_invalid_strengths(name, params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        get_prox(name).resolve(params)


def test_register_user_prox():
    def shrink(z, t, lam=0.0, c=1.0):
        return z / (1 + t * lam * c)

    def value(x, lam=0.0, c=1.0):
        return 0.5 * lam * c * (x * x).sum()

    name = "test_scaled_ridge"
    register_prox(name, shrink, value, overwrite=True)
    spec = get_prox(name)
    assert spec.defaults == {"lam": 0.0, "c": 1.0} and spec.kernel is None
    with pytest.raises(ValueError, match="already registered"):
        register_prox(name, shrink, value)
    # per-instance values come from vmapping the user's scalar value
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=D)
    assert torch.allclose(prox_value(name, x, 1, lam=2.0, c=0.5), torch.tensor([2.5, 4.5], dtype=D))
    # and an optimizer accepts it, running the reference path
    p = torch.zeros(2, dtype=D, requires_grad=True)
    opt = torch_l2o.ISTA([p], lr=0.5, prox=name, lam=2.0, prox_params={"c": 1.0})
    p.grad = torch.tensor([-2.0, 4.0], dtype=D)
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([1.0, -2.0], dtype=D) / 2)


def test_simplex_projection():
    z = torch.tensor([[0.5, 0.5, 0.5], [3.0, 0.0, -1.0], [0.2, 0.3, 0.5]], dtype=D)
    x = get_prox("simplex")(z, 1.0)
    assert torch.allclose(x, torch.tensor([[1 / 3] * 3, [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], dtype=D))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 7, generator=g, dtype=D) * 3
    x = get_prox("simplex")(z, 0.1)
    assert bool((x >= 0).all()) and torch.allclose(x.sum(-1), torch.ones(50, dtype=D))
    # optimality: x_i = max(z_i - theta, 0) with one theta per row, i.e. z - x is constant on the support
    d = torch.where(x > 0, z - x, torch.nan)
    assert torch.allclose(torch.nanmean(d, -1, keepdim=True).expand_as(d)[x > 0], d[x > 0])
    # along dim 0, radius 2
    x0 = get_prox("simplex")(z.T.contiguous(), 1.0, dim=0, radius=2.0)
    assert torch.allclose(x0.sum(0), torch.full((50,), 2.0, dtype=D))
    assert float(prox_value("simplex", x, 1).max()) == 0.0
    assert float(prox_value("simplex", z, 1).min()) == math.inf


def test_l1_values_weigh_each_coordinate_by_a_tensor_lam():
    """A per-coordinate lam (0 for an unpenalized intercept) weighs |x_i|, per instance."""
    from torch_l2o.prox import prox_value

    x = torch.tensor([[1.0, -2.0, 3.0], [-1.0, 0.5, 0.0]])
    lam = torch.tensor([0.5, 0.0, 2.0])
    assert torch.equal(prox_value("l1", x, 1, lam=lam), torch.tensor([6.5, 0.5]))
    assert torch.equal(prox_value("nonneg_l1", x.abs(), 1, lam=lam), torch.tensor([6.5, 0.5]))
    assert torch.allclose(prox_value("elastic_net", x, 1, lam=lam, lam2=lam), torch.tensor([6.5 + 9.25, 0.75]))
