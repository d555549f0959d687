"""Run by tests/test_meta.py under torchrun: two CPU ranks meta-train together."""

import sys

import torch
import torch.distributed as dist

import torch_l2o
from torch_l2o.problems import Lasso

if __name__ == "__main__":
    torch.set_num_threads(1)
    out = sys.argv[1]
    fam = Lasso(m=8, n=12, sparsity=2, lam=0.1)
    w, h = torch_l2o.meta_train("pa", fam, steps=3, seed=0, batch=4, horizon=6, unroll=3, val_every=2,
                                val_batch=6, progress=False)
    rank = dist.get_rank()
    torch.save({"weights": w, "losses": h.loss}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
