"""The fused learned-step kernels (Triton; the interpreter on a CPU) against the PyTorch reference.

The reference is the update function's own PyTorch code (``use_fused(False)``): the
networks of :mod:`torch_l2o.nets` and the prox-gradient step. Both compute in float32
with different summation orders (``tl.dot`` against a BLAS GEMM, the cells' gates summed
in another order, an exp-based tanh), so they agree to rounding, not bit for bit: per
dot product of ``K <= 2 * 64`` terms the difference is a few ``K * eps`` of its terms'
magnitudes (~1e-6 here). Per step we allow ``RTOL = 2e-5`` relative to the largest
magnitude of each compared tensor: 10-100x the measured differences (2e-7 to 2e-6) and
far below what a wrong gate, weight or bias moves (1e-2 and up). Iterates stored in
bfloat16 are rounded once more (Triton's interpreter truncates; L2O-DM's and RNNProp's
reference also rounds the direction to the storage dtype): two of its ulps at that scale.
"""

import copy

import pytest
import torch
from cases import STRENGTHS, tensor_strengths

import torch_l2o
from torch_l2o.kernels import HAVE_TRITON, interpret_mode
from torch_l2o.kernels.fused import fused_step, use_fused
from torch_l2o.kernels.triton_learned import learned_step_triton
from torch_l2o.nets import DMNet, PAGRUNet, PAMRNet, PANet, RNNPropNet
from torch_l2o.optim.functional import dm_update, pa_update, rnnprop_update
from torch_l2o.weights import build_network

pytestmark = pytest.mark.skipif(
    not HAVE_TRITON or not (torch.cuda.is_available() or interpret_mode()),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = 2e-5

# kind, update, network factory
NETS = {
    "pa": ("pa", pa_update, lambda: build_network("pa", "lasso")[0]),
    "pagru": ("pa", pa_update, lambda: build_network("pagru", "lasso")[0]),
    "pamr": ("pa", pa_update, lambda: build_network("pamr", "lasso")[0]),
    "pamr-window1": ("pa", pa_update, lambda: PAMRNet(window=1).eval()),
    "pamr-h12-w3": ("pa", pa_update, lambda: PAMRNet(hidden=12, heads=3, window=3).eval()),  # padded to 16
    "pa-h5-3layers": ("pa", pa_update, lambda: PANet(hidden=5, layers=3)),
    "l2odm": ("dm", dm_update, lambda: build_network("l2odm", "lasso")[0]),
    "l2odm-grad_x": ("dm", dm_update, lambda: DMNet(inputs="grad_x")),
    "rnnprop": ("rnnprop", rnnprop_update, lambda: build_network("rnnprop", "lasso")[0]),
    # scale-free inputs: 1 / sigma per instance (instance_dims=1) from the reference's reduction
    "pa-scaled": ("pa", pa_update, lambda: PANet(inputs="scaled")),
    "pagru-scaled": ("pa", pa_update, lambda: PAGRUNet(inputs="scaled")),
    "pamr-scaled": ("pa", pa_update, lambda: PAMRNet(inputs="scaled").eval()),
}


def _close(got, ref, what):
    scale = ref.float().abs().max().clamp(min=1e-30)
    err = (got.float() - ref.float()).abs().max()
    tol = RTOL + (2 * torch.finfo(ref.dtype).eps if ref.dtype in (torch.bfloat16, torch.float16) else 0.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.3g} x {scale:.3g}"


def _problem(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda s, scale=1.0: (scale * torch.randn(s, generator=gen)).to(DEVICE, dtype)  # noqa: E731
    return [mk(s) for s in shapes], [mk(s, 0.5) for s in shapes], [mk(s) for s in shapes]


def _state(net, shapes, kind, update, lrs, prox, params, steps=3, dtype=torch.float32):
    """A state after a few reference steps (window partly filled, moments nonzero)."""
    n = sum(torch.Size(s).numel() for s in shapes)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in net.init_state(n, DEVICE).items()}
    ys, gs, xs = _problem(shapes, torch.float32, seed=1)
    if kind != "pa":
        xs = ys
    with use_fused(False), torch.no_grad():
        for k in range(steps):
            xs, ys, state = update(net, state, ys, gs, xs, lr=lrs, prox=prox, params=params, step=k, inplace=False,
                                   instance_dims=1)
    return state


def _step_both(kind, update, net, state, ys, gs, xs, lrs, prox, params):
    """Step 3: the reference on copies (returned with its state), the kernel in place on
    ``ys`` and ``xs``; returns ``(ref_ys, ref_xs, ref_state, kernel_state)``."""
    ref_ys = [y.clone() for y in ys]
    ref_xs = [x.clone() for x in xs] if kind == "pa" else ref_ys
    with use_fused(False), torch.no_grad():
        _, _, ref_state = update(net, copy.deepcopy(state), ref_ys, gs, ref_xs, lr=lrs, prox=prox, params=params,
                                 step=3, inplace=True, instance_dims=1)
    with use_fused("triton"):
        got_state = learned_step_triton(kind, net, copy.deepcopy(state), ys, gs, xs, lr=lrs, prox=prox,
                                        params=params, step=3, instance_dims=1)
    assert got_state is not None, "the kernel declined a step it serves"
    return ref_ys, ref_xs, ref_state, got_state


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("variant", ["l1, scalar lr", "box, per-instance lr, two tensors", "none, bfloat16",
                                     "l1, bfloat16 state"])
def test_one_step_matches_reference(name, variant):
    kind, update, make = NETS[name]
    net = make().to(DEVICE)
    prox, params = {"l1": ("l1", {"lam": 0.1}), "box": ("box", {"lo": -0.5, "hi": 0.8}),
                    "none": ("none", {})}[variant.split(",")[0]]
    if kind == "rnnprop" and prox != "none":
        prox, params = "none", {}
    dtype = torch.bfloat16 if variant.endswith("bfloat16") else torch.float32
    state_dtype = torch.bfloat16 if "state" in variant else torch.float32
    shapes = [(3, 50), (3, 20)] if "two" in variant else [(4, 40)]
    if "per-instance" in variant:
        lrs = [torch.tensor([[0.05], [0.1], [0.02]], device=DEVICE) for _ in shapes]
    else:
        lrs = [0.05] * len(shapes)
    state = _state(net, shapes, kind, update, lrs, prox, params, dtype=state_dtype)
    ys, gs, xs = _problem(shapes, dtype, seed=2)
    if kind != "pa":
        xs = ys

    ref_ys, ref_xs, ref_state, got_state = _step_both(kind, update, net, state, ys, gs, xs, lrs, prox, params)
    for i in range(len(shapes)):
        _close(ys[i], ref_ys[i], f"y[{i}]")
        if kind == "pa":
            _close(xs[i], ref_xs[i], f"x[{i}]")
    assert set(got_state) == set(ref_state)
    for k in ref_state:
        assert got_state[k].dtype == ref_state[k].dtype
        if ref_state[k].is_floating_point():
            _close(got_state[k], ref_state[k], f"state[{k!r}]")
        else:
            assert torch.equal(got_state[k], ref_state[k])


@pytest.mark.parametrize("name", ["pagru", "pamr-scaled", "l2odm"])
@pytest.mark.parametrize("variant", STRENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_strengths_match_reference(name, variant, dtype):
    """Prox strengths as tensors of the iterates' dtype, one per instance ``(B, 1)`` or one
    per coordinate (a LASSO path's ``lam`` per instance, an unpenalized intercept): the
    kernel steps as the reference does, held coordinates included."""
    kind, update, make = NETS[name]
    net = make().to(DEVICE)
    shapes = [(4, 40)]
    prox, params = tensor_strengths(variant, shapes[0], dtype, DEVICE)
    lrs = [torch.tensor([[0.05], [0.1], [0.02], [0.2]], device=DEVICE)]
    state = _state(net, shapes, kind, update, lrs, prox, params)
    ys, gs, xs = _problem(shapes, dtype, seed=2)
    ys[0][:, ::4], gs[0][:, ::4] = 0.0, 0.001  # fixed points of l1 and elastic_net: held where hold_fixed
    xs = xs if kind == "pa" else ys
    if kind == "pa":
        xs[0][:, ::4] = 0.0
    ref_ys, ref_xs, ref_state, got_state = _step_both(kind, update, net, state, ys, gs, xs, lrs, prox, params)
    _close(ys[0], ref_ys[0], "y")
    _close(xs[0], ref_xs[0], "x")
    for k in ref_state:
        if ref_state[k].is_floating_point():
            _close(got_state[k], ref_state[k], f"state[{k!r}]")


@pytest.mark.parametrize("arch", ["pa", "pamr"])
def test_drift_over_1000_steps(arch):
    """The optimizer run fused and unfused from the same start on a LASSO batch: the
    iterates stay together for 1000 steps. Both converge to the same minimiser, so the
    per-step rounding differences do not accumulate: measured in the interpreter, at most
    1.1e-7 of max |x| after 1, 10, 100 and 1000 steps (PA, PA-GRU, PA-MR); bound RTOL."""
    family = torch_l2o.problems.Lasso(m=24, n=32, sparsity=4, lam=0.1)
    prob = family.sample(2, generator=torch.Generator().manual_seed(0), device=DEVICE)
    runs = []
    for fused in ("triton", False):
        x = torch.zeros(2, 32, device=DEVICE, requires_grad=True)
        opt = torch_l2o.get_architecture(arch).optimizer([x], prox="l1", lam=0.1, lr=0.9999 / prob.lipschitz[:, None],
                                                         weights="lasso", instance_dims=1, watchdog=False)
        traj = []
        with use_fused(fused):
            for k in range(1000):
                opt.zero_grad()
                prob.smooth(x).sum().backward()
                opt.step()
                if k in (9, 99, 999):
                    traj.append(opt.solution(x).detach().clone())
        runs.append(traj)
    for got, ref in zip(*runs):
        _close(got, ref, "x")


def test_declines_what_it_does_not_serve():
    with use_fused("triton"):
        _declines()


def _declines():
    shapes = [(2, 30)]
    ys, gs, xs = _problem(shapes, torch.float32)
    common = dict(lr=0.1, prox="l1", params={"lam": 0.1}, step=0)
    pamr = PAMRNet().to(DEVICE)
    # dropout active (training mode), attention across coordinates, a subclass, float64
    assert learned_step_triton("pa", pamr.train(), pamr.init_state(60, DEVICE), ys, gs, xs, **common) is None
    coords = PAMRNet(attend="coordinates").to(DEVICE)
    assert learned_step_triton("pa", coords, coords.init_state(60, DEVICE), ys, gs, xs, **common) is None

    class MyNet(PANet):
        pass

    mine = MyNet().to(DEVICE)
    assert learned_step_triton("pa", mine, mine.init_state(60, DEVICE), ys, gs, xs, **common) is None
    y64, g64, x64 = _problem(shapes, torch.float64)
    pa = PANet().to(DEVICE)
    assert learned_step_triton("pa", pa, pa.init_state(60, DEVICE), y64, g64, x64, **common) is None
    # a prox the kernel does not know; autograd through the inputs
    assert learned_step_triton("pa", pa, pa.init_state(60, DEVICE), ys, gs, xs, lr=0.1, prox="group_l1",
                               params={"lam": 0.1}, step=0) is None
    yg = [ys[0].clone().requires_grad_(True)]
    assert fused_step("pa", pa, pa.init_state(60, DEVICE), yg, gs, xs, **common) is None
    # a tensor strength of another dtype (the reference computes in the promoted one), or
    # whose shape is no prefix of the iterates'
    for lam in (torch.full((2, 1), 0.1, dtype=torch.float64, device=DEVICE), torch.full((30,), 0.1, device=DEVICE)):
        assert learned_step_triton("pa", pa, pa.init_state(60, DEVICE), ys, gs, xs, lr=0.1, prox="l1",
                                   params={"lam": lam}, step=0) is None
    # three inputs per coordinate: the reference's
    three = PAGRUNet(inputs="prox").to(DEVICE)
    assert learned_step_triton("pa", three, three.init_state(60, DEVICE), ys, gs, xs, **common) is None
    # RNNProp applies no prox
    rp = RNNPropNet().to(DEVICE)
    assert learned_step_triton("rnnprop", rp, rp.init_state(60, DEVICE), ys, gs, ys, **common) is None
    assert learned_step_triton("pa", PAGRUNet().to(DEVICE), {}, ys, gs, xs, **common) is None


def test_optimizer_step_runs_the_kernel(monkeypatch):
    """``opt.step()`` goes through the backend (else the tests above would test nothing
    the users run), and nothing runs it out of place."""
    calls = []
    import torch_l2o.kernels.fused as fused

    real = dict(fused._BACKENDS)["triton"]

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(fused, "_BACKENDS", [("triton", spy)])
    x = torch.randn(3, 40, device=DEVICE, requires_grad=True)
    opt = torch_l2o.PA([x], prox="l1", lam=0.1, lr=0.05, instance_dims=1)
    with use_fused("triton"):
        for _ in range(2):
            opt.zero_grad()
            (x * x).sum().backward()
            opt.step()
    assert calls == [True, True]
    # by default the interpreter is never picked: CPU steps run the reference (or the CPU backend)
    if DEVICE == "cpu":
        opt.zero_grad()
        (x * x).sum().backward()
        opt.step()
        assert calls == [True, True, False]


def test_packed_weights_follow_the_network():
    """The kernel's packed copy of the weights is rebuilt when a weight changes in place
    (meta-training, ``load_state_dict``): a stale copy would step with old weights."""
    from torch_l2o.kernels.triton_learned import pack_network

    net = PANet().to(DEVICE)
    first = pack_network(net)
    assert pack_network(net) is first
    with torch.no_grad():
        net.heads.p.bias.add_(1.0)
    second = pack_network(net)
    assert second is not first
    assert torch.allclose(second["head"][-2], net.heads.p.bias.float().reshape(()))
