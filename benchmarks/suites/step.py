"""The step itself: the fused prox-gradient step against the unfused PyTorch expression.

``x+ = soft(y - t g, t lam)``, ``y+ = x+ + a (x+ - x)`` with ``t = lr * p``, in place,
float32, for scalar ``p, a`` (FISTA) and per-coordinate ``p, a`` (learned optimizers).
Effective bandwidth counts the bytes the step must move at least: read ``y, g, x``
(and ``p, a`` when tensors), write ``x, y``.

Implementations: the unfused eager expression a user would write; torch_l2o's
dispatcher (the PyTorch reference on CPU, the Triton kernel on CUDA); its
``backend="compile"`` (the reference through ``torch.compile``, one fused loop on a
CPU); and, on CUDA, the Triton kernel called directly.
"""

from __future__ import annotations

import torch
from torch.utils import benchmark

from torch_l2o.kernels import prox_grad_step

LAM = 0.1


def _min_run_time(cfg) -> float:
    """Seconds per timed measurement: short in the quick run, which must fit 10 minutes."""
    return 1.0 if cfg.full else 0.1


def unfused(y, g, x, lr, p, a):
    t = lr * p
    z = y - t * g
    xn = torch.sign(z) * torch.clamp(z.abs() - t * LAM, min=0)
    yn = xn + a * (xn - x)
    x.copy_(xn)
    y.copy_(yn)


def dispatcher(y, g, x, lr, p, a):
    prox_grad_step(y, g, x, lr=lr, p=p, a=a, prox="l1", params={"lam": LAM}, inplace=True)


def compiled(y, g, x, lr, p, a):
    prox_grad_step(y, g, x, lr=lr, p=p, a=a, prox="l1", params={"lam": LAM}, inplace=True, backend="compile")


def triton_direct(y, g, x, lr, p, a):
    prox_grad_step(y, g, x, lr=lr, p=p, a=a, prox="l1", params={"lam": LAM}, inplace=True, backend="triton")


def _optimizers():
    import torch_l2o

    learned = dict(prox="l1", lam=LAM, lr=0.1, weights="untrained")
    return {
        "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
        "ISTA": lambda ps: torch_l2o.ISTA(ps, prox="l1", lam=LAM, lr=0.1),
        "FISTA": lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=LAM, lr=0.1),
        "FISTA lr=None": lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=LAM),
        "L2O-DM": lambda ps: torch_l2o.L2ODM(ps, weights="untrained"),
        "RNNProp": lambda ps: torch_l2o.RNNProp(ps, weights="untrained"),
        "L2O-PA": lambda ps: torch_l2o.PA(ps, **learned),
        "L2O-PA-GRU": lambda ps: torch_l2o.PAGRU(ps, **learned),
        "L2O-PA-MR": lambda ps: torch_l2o.PAMR(ps, **learned),
        "L2O-PA-MR W=1": lambda ps: torch_l2o.PAMR(ps, window=1, **learned),
    }


def optimizer_costs(cfg) -> list[dict]:
    """State bytes per parameter element and seconds per step per element (gradient given)."""
    device = cfg.device
    sizes = [10**4, 10**5, 10**6] if not cfg.full else [10**4, 10**5, 10**6, 10**7]
    rows = []
    for n in sizes:
        adam = None
        for name, make in _optimizers().items():
            x = torch.zeros(n, device=device, requires_grad=True)
            x.grad = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
            opt = make([x])
            opt.step()  # creates the state
            state_bytes = sum(v.numel() * v.element_size() for v in opt.state[x].values()
                              if isinstance(v, torch.Tensor))
            t = benchmark.Timer("opt.step()", globals={"opt": opt})
            sec = t.blocked_autorange(min_run_time=_min_run_time(cfg)).median
            adam = adam or sec
            rows.append({"elements": n, "optimizer": name, "state bytes/element": state_bytes / n,
                         "ns/element/step": sec / n * 1e9, "time vs Adam": sec / adam})
            del opt, x
    return rows


def mlp_params(tensors: int = 50, width: int = 64) -> list[torch.Tensor]:
    """The parameters of a ``torch.nn`` MLP of ``tensors // 2`` linear layers (a weight and
    a bias each), with gradients: many small tensors, as in a real model."""
    net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(tensors // 2)])
    ps = list(net.parameters())
    gen = torch.Generator().manual_seed(0)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    return ps


def many_tensors(cfg) -> list[dict]:
    """One step over many parameter tensors: the 50 of an nn MLP (25 x Linear(64, 64)), and
    200 vectors of 256 (norm layers' parameters). Per-tensor overheads (one network call
    per tensor, or per batch of a group's tensors) show here, not at 10^6 elements in one."""
    rows = []
    models = {"nn MLP, 25 x Linear(64, 64)": mlp_params, "200 vectors of 256": lambda: [torch.zeros(256)] * 200}
    for model, params in models.items():
        for name, make in _optimizers().items():
            ps = [p.detach().clone().to(cfg.device).requires_grad_(True) for p in params()]
            gen = torch.Generator().manual_seed(0)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(cfg.device)
            opt = make(ps)
            opt.step()  # creates the state
            t = benchmark.Timer("opt.step()", globals={"opt": opt})
            sec = t.blocked_autorange(min_run_time=_min_run_time(cfg)).median
            n = sum(p.numel() for p in ps)
            rows.append({"model": model, "tensors": len(ps), "elements": n, "optimizer": name, "ms/step": sec * 1e3,
                         "ns/element/step": sec / n * 1e9})
    return rows


def run(cfg) -> dict:
    device = cfg.device
    sizes = [10**4, 10**5, 10**6, 10**7] if not cfg.full else [10**3, 10**4, 10**5, 10**6, 10**7, 3 * 10**7]
    rows = []
    for mode in ("scalar p, a", "tensor p, a"):
        for n in sizes:
            impls = {"unfused eager": unfused, "torch_l2o (dispatcher)": dispatcher,
                     "torch_l2o backend='compile'": compiled}
            if device == "cuda":
                impls["triton kernel"] = triton_direct
            gen = torch.Generator().manual_seed(0)
            y, g, x = (torch.randn(n, generator=gen).to(device) for _ in range(3))
            if mode == "scalar p, a":
                p, a, n_bytes = 1.0, 0.3, 5 * 4 * n
            else:
                p = (torch.rand(n, generator=gen) * 2).to(device)
                a = torch.rand(n, generator=gen).to(device)
                n_bytes = 7 * 4 * n
            base = None
            for name, fn in impls.items():
                fn(y, g, x, 0.1, p, a)  # warm-up (and compilation)
                t = benchmark.Timer("fn(y, g, x, 0.1, p, a)", globals=dict(fn=fn, y=y, g=g, x=x, p=p, a=a))
                sec = t.blocked_autorange(min_run_time=_min_run_time(cfg)).median
                base = base or sec
                rows.append({"operands": mode, "elements": n, "impl": name, "ns/element": sec / n * 1e9,
                             "GB/s": n_bytes / sec / 1e9, "speedup vs unfused": base / sec})
    return {"tables": {"step": rows, "optimizer cost": optimizer_costs(cfg),
                       "optimizer cost, many tensors": many_tensors(cfg)}, "plots": []}
