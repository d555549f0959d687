"""How many iterations could a first-order method need on the papers' LASSO family?

    python benchmarks/oracle_bound.py            # ~1 minute on a 2-core CPU

The issue's in-distribution target asks L2O-PA-MR for 2.5x fewer iterations than
FISTA-restart to a mean relative error of 1e-6 (<= 19 against 47-48). This script puts
that number beside what is possible: on the held instances of the pretrained cards'
family (LASSO 250 x 500, 50-sparse, lam 0.1; 128 instances, float64) it runs

* FISTA-restart and L2O-PA-MR (the shipped ``"lasso"`` weights), float32 as users run
  them, with the fraction of instances whose iterate has found the minimiser's support
  and signs;
* an *oracle* that is given the support and signs of ``x*``: conjugate gradient on the
  reduced quadratic ``min_z 1/2 |A_S z - b|^2 + lam s^T z`` from 0 (the best a Krylov,
  i.e. first-order, method can do once the support is known), and heavy-ball with the
  reduced spectrum's optimal constants (the best momentum method with fixed constants).

Iterations are counted to the batch's mean relative error ``(F - F*) / |F*|``.
"""

from __future__ import annotations

import argparse

import torch

import torch_l2o
from torch_l2o.problems.families import Lasso
from torch_l2o.problems.solve import reference_solve


def first_below(err: torch.Tensor, tol: float) -> int | None:
    hit = (err < tol).nonzero()
    return int(hit[0]) + 1 if len(hit) else None


def run_optimizer(make, P32, Fs, K, x_star):
    x = P32.x0().requires_grad_(True)
    opt = make([x])
    errs, found = [], []
    sign_star = torch.sign(x_star) * (x_star.abs() > 1e-9)

    def closure():
        opt.zero_grad()
        f = P32.smooth(x).sum()
        f.backward()
        return f

    for _ in range(K):
        opt.step(closure)
        xk = opt.solution(x).detach()
        errs.append(((P32.objective(xk).double() - Fs) / Fs.abs()).clamp(min=0))
        found.append((torch.sign(xk.double()) == sign_star).all(1).double().mean())
    return torch.stack(errs).mean(1), torch.stack(found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=128)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--seed", type=int, default=12345)
    a = ap.parse_args()
    lam = 0.1
    P = Lasso(m=250, n=500, sparsity=50, lam=lam).sample(a.instances, generator=torch.Generator().manual_seed(a.seed),
                                                          dtype=torch.float64)
    x_star = reference_solve(P).x
    Fs = P.objective(x_star)
    P32 = P.to(dtype=torch.float32)
    lr = (0.9999 / P32.lipschitz).unsqueeze(-1)
    K = a.iters

    rows = {}
    rows["FISTA-restart"] = run_optimizer(
        lambda ps: torch_l2o.FISTA(ps, lr=lr, prox="l1", lam=lam, restart=True, instance_dims=1), P32, Fs, K, x_star)
    rows["L2O-PA-MR"] = run_optimizer(
        lambda ps: torch_l2o.PAMR(ps, lr=lr, prox="l1", lam=lam, instance_dims=1), P32, Fs, K, x_star)

    cg = torch.zeros(K, a.instances, dtype=torch.float64)
    hb = torch.zeros(K, a.instances, dtype=torch.float64)
    kappas = []
    for i in range(a.instances):
        A, b, x = P.A[i], P.b[i], x_star[i]
        S = x.abs() > 1e-9
        As, s = A[:, S], torch.sign(x[S])
        H, c = As.T @ As, As.T @ b - lam * s
        ev = torch.linalg.eigvalsh(H)
        mu, L = float(ev[0]), float(ev[-1])
        kappas.append(L / mu)

        def rel(z):
            xf = torch.zeros_like(x)
            xf[S] = z
            return (0.5 * (A @ xf - b).square().sum() + lam * xf.abs().sum() - Fs[i]) / Fs[i].abs()

        z = torch.zeros(int(S.sum()), dtype=torch.float64)
        r = c - H @ z
        p = r.clone()
        for k in range(K):  # conjugate gradient
            Hp = H @ p
            alpha = (r @ r) / (p @ Hp)
            z = z + alpha * p
            r_new = r - alpha * Hp
            p = r_new + (r_new @ r_new) / (r @ r) * p
            r = r_new
            cg[k, i] = rel(z)
        alpha = 4 / (L**0.5 + mu**0.5) ** 2
        beta = ((L**0.5 - mu**0.5) / (L**0.5 + mu**0.5)) ** 2
        z = z_prev = torch.zeros(int(S.sum()), dtype=torch.float64)
        for k in range(K):  # heavy ball, the reduced spectrum's optimal constants
            z, z_prev = z - alpha * (H @ z - c) + beta * (z - z_prev), z
            hb[k, i] = rel(z)
    rows["oracle support + conjugate gradient"] = (cg.clamp(min=0).mean(1), None)
    rows["oracle support + heavy ball"] = (hb.clamp(min=0).mean(1), None)

    # the base step lr=None gives the PA family (half its estimate of 1/L), over L's 1/L
    x = P32.x0().requires_grad_(True)
    opt = torch_l2o.PAMR([x], prox="l1", lam=lam, instance_dims=1)
    for _ in range(20):
        opt.zero_grad()
        P32.smooth(x).sum().backward()
        opt.step()
    c_auto = (opt.auto_lr_scale * P32.lipschitz.double() / opt.state[x]["lipschitz"].double().reshape(-1)).median()

    kappas.sort()
    print(f"{a.instances} instances, support size {float((x_star.abs() > 1e-9).sum(1).double().mean()):.1f} "
          f"(median), restricted condition number median {kappas[len(kappas) // 2]:.1f}; with lr=None PA-MR "
          f"steps at {float(c_auto):.2f} / L (median over instances, after 20 steps)")
    print("| method | 1e-2 | 1e-4 | 1e-6 | support and signs found after 10 / 20 / 40 iterations |")
    print("|---|---|---|---|---|")
    for name, (err, found) in rows.items():
        its = [first_below(err, t) for t in (1e-2, 1e-4, 1e-6)]
        f = "given" if found is None else " / ".join(f"{float(found[k - 1]):.0%}" for k in (10, 20, 40) if k <= K)
        print(f"| {name} | " + " | ".join(str(v) for v in its) + f" | {f} |")


if __name__ == "__main__":
    main()
