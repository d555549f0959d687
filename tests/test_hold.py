"""``hold_fixed``: a PA-family coordinate at a fixed point of the prox-gradient map keeps
its iterates and recurrent state (:func:`torch_l2o.optim.functional.pa_update`).

The reference defines it; the fused CPU loop and the Triton kernel (interpreter) must
pick exactly the same coordinates, and step the others as without the rule."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_l2o
from torch_l2o.kernels import HAVE_TRITON, interpret_mode
from torch_l2o.kernels import cpu_step
from torch_l2o.kernels.cpu_step import cpu_learned_step
from torch_l2o.kernels.fused import use_fused
from torch_l2o.kernels.reference import prox_point_reference
from torch_l2o.kernels.triton_learned import learned_step_triton
from torch_l2o.optim.functional import held_coordinates, pa_update
from torch_l2o.weights import build_network

RTOL = 2e-5  # the kernels' parity tolerance (tests/test_cpu_step.py, tests/test_fused.py)
# a prox, its strengths, and a fixed point for it: (y, g) with x = y = prox_{s r}(y - s g) for every s > 0
FIXED = {
    "l1": ({"lam": 0.1}, lambda n, gen: (torch.zeros(n), 0.1 * (2 * torch.rand(n, generator=gen) - 1))),
    "nonneg_l1": ({"lam": 0.05}, lambda n, gen: (torch.zeros(n), torch.rand(n, generator=gen) - 0.049)),
    "box": ({"lo": -0.5, "hi": 0.8}, lambda n, gen: (torch.full((n,), 0.8, dtype=torch.float64), -torch.rand(n, generator=gen))),
    "elastic_net": ({"lam": 0.1, "lam2": 0.3}, lambda n, gen: (torch.zeros(n), 0.1 * (2 * torch.rand(n, generator=gen) - 1))),
}


def _batch(prox, shape=(3, 40), seed=0, dtype=torch.float32):
    """Iterates where every other coordinate sits at a fixed point, the rest anywhere."""
    gen = torch.Generator().manual_seed(seed)
    params, fixed = FIXED[prox]
    y, g, x = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    fy, fg = (v.double() for v in fixed(y.numel(), gen))  # then rounded to dtype, as the kernels round hi
    sel = torch.zeros(shape, dtype=torch.bool)
    sel.view(-1)[::2] = True
    y = torch.where(sel, fy.view(shape), y)
    g = torch.where(sel, fg.view(shape), g)
    x = torch.where(sel, y, x)
    return y.to(dtype), g.to(dtype), x.to(dtype), params, sel


def _net(arch, hold):
    net = build_network(arch, "lasso")[0]
    net.hold_fixed = hold
    return net


def _state(net, n):
    """A nonzero state: a few reference steps on random iterates."""
    state = net.init_state(n)
    gen = torch.Generator().manual_seed(1)
    y, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    with use_fused(False), torch.no_grad():
        for k in range(3):
            _, _, state = pa_update(net, state, [y.clone()], [g], [y.clone() + 1], lr=0.05, prox="none", step=k)
    return state


@pytest.mark.parametrize("prox", sorted(FIXED))
def test_reference_holds_exactly_the_fixed_points(prox):
    """The constructed fixed points, and only they, are held: their iterates and state
    are unchanged bit for bit, and every other coordinate steps exactly as without the rule."""
    y, g, x, params, sel = _batch(prox)
    lr = torch.tensor([[0.05], [0.2], [0.01]])
    assert torch.equal(held_coordinates([y], [g], [x], [lr], prox, params).view(sel.shape), sel)
    out = {}
    for hold in (True, False):
        net = _net("pamr", hold)
        state = _state(net, y.numel())
        ys, xs = [y.clone()], [x.clone()]
        with use_fused(False), torch.no_grad():
            _, _, new = pa_update(net, copy.deepcopy(state), ys, [g], xs, lr=[lr], prox=prox, params=params, step=3,
                                  inplace=True, instance_dims=1)
        out[hold] = ys[0], xs[0], new, state
    (yh, xh, sh, s0), (yf, xf, sf, _) = out[True], out[False]
    assert torch.equal(yh[sel], y[sel]) and torch.equal(xh[sel], x[sel])
    assert torch.equal(yh[~sel], yf[~sel]) and torch.equal(xh[~sel], xf[~sel])
    flat = sel.reshape(-1)
    for k, d in _net("pamr", True).coordinate_dims().items():
        if d is None:
            assert torch.equal(sh[k], sf[k])  # PA-MR's window fill counts the step either way
            continue
        assert torch.equal(sh[k].index_select(d, flat.nonzero().flatten()), s0[k].index_select(d, flat.nonzero().flatten()))
        keep = (~flat).nonzero().flatten()
        assert torch.equal(sh[k].index_select(d, keep), sf[k].index_select(d, keep))
        assert not torch.equal(sf[k].index_select(d, flat.nonzero().flatten()),
                               s0[k].index_select(d, flat.nonzero().flatten()))  # without the rule they would move


@settings(max_examples=40, deadline=None)
@given(prox=st.sampled_from(sorted(FIXED)), c=st.floats(1e-4, 1e3), seed=st.integers(0, 2**16))
def test_a_fixed_point_does_not_depend_on_the_step(prox, c, seed):
    """Why holding is safe: where ``x = y = prox_{s r}(y - s g)``, the prox-gradient point
    at any other step ``c`` (any learned ``p``) is ``y`` too, so the step moves nothing."""
    y, g, _, params, sel = _batch(prox, seed=seed)
    assert torch.equal(prox_point_reference(y, g, c, 1.0, prox, params)[sel], y[sel])


def _backends():
    out = []
    if cpu_step._compiler() is not None:
        out.append(("cpu", cpu_learned_step))
    if HAVE_TRITON and interpret_mode() and not torch.cuda.is_available():
        out.append(("triton", learned_step_triton))
    return out


@pytest.mark.parametrize("backend", [b[0] for b in _backends()])
@pytest.mark.parametrize("arch", ["pa", "pagru", "pamr"])
@pytest.mark.parametrize("hold", [True, False])
@pytest.mark.parametrize("variant", ["l1, per-instance lr", "box, float64", "elastic_net, two tensors"])
def test_fused_steps_hold_what_the_reference_holds(backend, arch, hold, variant):
    """Half the coordinates at fixed points (a converged sparse run's picture): a fused
    step leaves exactly the reference's held coordinates untouched and steps the others
    to the reference's values; with ``hold_fixed=False`` it steps them all."""
    fn = dict(_backends())[backend]
    prox = variant.split(",")[0]
    dtype = torch.float64 if "float64" in variant and backend == "cpu" else torch.float32
    batches = [_batch(prox, seed=s, dtype=dtype) for s in ((0, 1) if "two" in variant else (0,))]
    ys, gs, xs = [b[0] for b in batches], [b[1] for b in batches], [b[2] for b in batches]
    params = batches[0][3]
    lrs = [torch.tensor([[0.05], [0.2], [0.01]], dtype=dtype) if "per-instance" in variant else 0.05 for _ in ys]
    net = _net(arch, hold)
    state = _state(net, sum(y.numel() for y in ys))
    ref_ys, ref_xs = [y.clone() for y in ys], [x.clone() for x in xs]
    with use_fused(False), torch.no_grad():
        _, _, ref = pa_update(net, copy.deepcopy(state), ref_ys, gs, ref_xs, lr=lrs, prox=prox, params=params, step=3,
                              inplace=True, instance_dims=1)
    got_ys, got_xs = [y.clone() for y in ys], [x.clone() for x in xs]
    prev = cpu_step.set_cpu_step_backend("compile")  # conftest sets the reference outside test_cpu_step.py
    try:
        with use_fused(backend), torch.no_grad():
            got = fn("pa", net, copy.deepcopy(state), got_ys, gs, got_xs, lr=lrs, prox=prox, params=params, step=3,
                     instance_dims=1)
    finally:
        cpu_step.set_cpu_step_backend(prev)
    assert got is not None, "the backend declined a step it serves"
    for y, gy, ry, x, gx, rx, b in zip(ys, got_ys, ref_ys, xs, got_xs, ref_xs, batches):
        sel = b[4]
        if hold:  # untouched, bit for bit
            assert torch.equal(gy[sel], y[sel]) and torch.equal(gx[sel], x[sel])
        for got_t, ref_t in ((gy, ry), (gx, rx)):
            assert (got_t - ref_t).abs().max() <= RTOL * ref_t.abs().max()
    flat = torch.cat([b[4].reshape(-1) for b in batches])
    for k, d in net.coordinate_dims().items():
        if d is None:
            assert torch.equal(got[k], ref[k])
            continue
        assert (got[k] - ref[k]).abs().max() <= RTOL * ref[k].abs().max()
        if hold:
            idx = flat.nonzero().flatten()
            assert torch.equal(got[k].index_select(d, idx), state[k].index_select(d, idx))


def test_hold_fixed_is_an_option_of_any_weights():
    """Weights trained before the option exist (and ran without it): asking for either
    value is allowed, recorded in the network's config, and the default holds."""
    for arch, weights in (("pa", "lasso"), ("pagru", "lasso-mix"), ("pamr", "logistic-mix")):
        cls = torch_l2o.get_architecture(arch).optimizer
        x = torch.zeros(2, 5, requires_grad=True)
        assert cls([x], lr=0.1, prox="l1", lam=0.1, instance_dims=1, weights=weights).net.hold_fixed is True
        opt = cls([x], lr=0.1, prox="l1", lam=0.1, instance_dims=1, weights=weights, hold_fixed=False)
        assert opt.net.hold_fixed is False and opt.net.config()["hold_fixed"] is False
    with pytest.raises(ValueError, match="trained with"):  # a weights option still clashes
        torch_l2o.PAGRU([x], lr=0.1, prox="l1", lam=0.1, instance_dims=1, weights="lasso-mix", inputs="raw")


def test_a_held_run_reaches_the_same_minimiser():
    """End to end, fused: a LASSO run with and without the rule converges to the same
    point (the rule changes the learned steps' inputs history, not where they lead)."""
    prob = torch_l2o.problems.Lasso(m=60, n=120, sparsity=10, lam=0.1).sample(4, generator=torch.Generator().manual_seed(3))
    sols = []
    for hold in (True, False):
        x = prob.x0().requires_grad_(True)
        opt = torch_l2o.PAGRU([x], lr=prob.step_size(), prox="l1", lam=0.1, instance_dims=1, hold_fixed=hold)
        for _ in range(300):
            opt.zero_grad()
            prob.smooth(x).sum().backward()
            opt.step()
        sols.append(opt.solution(x))
    assert (sols[0] - sols[1]).abs().max() <= 1e-4 * sols[1].abs().max()
    assert ((sols[0] == 0) == (sols[1] == 0)).all()


def test_a_saved_file_leaves_the_inference_option_to_the_loader(tmp_path):
    """``hold_fixed`` is not a property of the weights: a saved header omits it (a file
    loads in versions without the option), the card records what its figures ran with, and
    the loader picks either value."""
    import json

    from safetensors import safe_open

    from torch_l2o.weights import build_network, save_weights

    net = build_network("pagru", "lasso")[0]
    net.hold_fixed = False
    path = save_weights(tmp_path / "w.safetensors", net, "pagru", card={"note": "test"})
    with safe_open(str(path), "pt") as h:
        assert "hold_fixed" not in json.loads(h.metadata()["config"])
    assert json.loads(path.with_suffix(".json").read_text())["config"]["hold_fixed"] is False
    assert build_network("pagru", str(path))[0].hold_fixed is True
    again = build_network("pagru", str(path), hold_fixed=False)[0]
    assert again.hold_fixed is False
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))
