"""Solve a LASSO with torch_l2o.FISTA in an ordinary PyTorch loop, and check it.

    python examples/lasso_fista.py
"""

import torch

import torch_l2o

torch.manual_seed(0)
m, n, lam = 250, 500, 0.1
A = torch.randn(m, n)
A /= A.norm(dim=0)                      # unit-norm columns
x_true = torch.zeros(n)
x_true[torch.randperm(n)[:50]] = torch.randn(50)
b = A @ x_true

L = torch.linalg.matrix_norm(A, ord=2).item() ** 2   # Lipschitz constant of grad f
x = torch.zeros(n, requires_grad=True)
opt = torch_l2o.FISTA([x], prox="l1", lam=lam, lr=0.9999 / L, restart=True)
for k in range(200):
    opt.zero_grad()
    f = 0.5 * (A @ x - b).square().sum()   # the smooth part only: r = lam |x|_1 is the prox's
    f.backward()
    opt.step()

x_hat = opt.solution(x)                  # the prox iterate: sparse (x itself holds y_k)
F = 0.5 * (A @ x_hat - b).square().sum() + lam * x_hat.abs().sum()
print(f"F = {F:.6f}, nonzeros = {(x_hat != 0).sum().item()}, |x_hat - x_true| = {(x_hat - x_true).norm():.3f}")

# Without knowing L: lr=None estimates it (a secant estimate; backtracking with a closure)
x2 = torch.zeros(n, requires_grad=True)
opt2 = torch_l2o.FISTA([x2], prox="l1", lam=lam)
for k in range(200):
    opt2.zero_grad()
    (0.5 * (A @ x2 - b).square().sum()).backward()
    opt2.step()
print(f"estimated L = {opt2.state[x2]['lipschitz'].item():.3f} (true {L:.3f});",
      f"same solution: {torch.allclose(opt2.solution(x2), x_hat, atol=1e-4)}")
