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
                sec = t.blocked_autorange(min_run_time=0.3 if not cfg.full else 1.0).median
                base = base or sec
                rows.append({"operands": mode, "elements": n, "impl": name, "ns/element": sec / n * 1e9,
                             "GB/s": n_bytes / sec / 1e9, "speedup vs unfused": base / sec})
    return {"tables": {"step": rows}, "plots": []}
