"""meta_train: repeatable, resumable, robust to non-finite batches, data-parallel."""

import dataclasses
import math
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import torch_l2o
import torch_l2o.meta as meta
from torch_l2o.meta import evaluate, rollout
from torch_l2o.problems import Lasso, LassoProblem, MatrixCompletion, ProblemFamily, reference_solve
from torch_l2o.registry import available_architectures, get_architecture
from torch_l2o.weights import build_network

TINY = dict(batch=4, horizon=6, unroll=3, val_every=2, val_batch=6, progress=False)
FAM = Lasso(m=8, n=12, sparsity=2, lam=0.1)


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SMALL = {"mathgd": {"hidden": 16, "init_scale": 1.0},  # the paper's H = 5120 is slow for a test
         "gso": {"inner_steps": 2}}  # 6 rounds of 2 steps per block
# each architecture on a family of its kind: GSO alternates over the blocks of matrix completion
FAMILY = {"gso": MatrixCompletion(n=12, rank=2, observe=0.5)}


@pytest.mark.parametrize("arch", available_architectures())
def test_seed_repeats_exactly_and_training_improves(arch):
    opts, fam = SMALL.get(arch, {}), FAMILY.get(arch, FAM)
    w1, h1 = torch_l2o.meta_train(arch, fam, steps=4, seed=3, **TINY, **opts)
    w2, h2 = torch_l2o.meta_train(arch, fam, steps=4, seed=3, **TINY, **opts)
    assert _equal(w1, w2) and h1.loss == h2.loss and h1.val_score == h2.val_score
    w3, _ = torch_l2o.meta_train(arch, fam, steps=4, seed=4, **TINY, **opts)
    assert not _equal(w1, w3)
    assert all(math.isfinite(v) for v in h1.loss) and h1.skipped == 0


def test_resume_after_interruption_repeats_the_run(tmp_path):
    ck = str(tmp_path / "ck.pt")
    full, hf = torch_l2o.meta_train("pa", FAM, steps=6, seed=1, **TINY)

    class Stop(Exception):
        pass

    def kill_after_5(step, hist):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        torch_l2o.meta_train("pa", FAM, steps=6, seed=1, checkpoint=ck, checkpoint_every=2,
                             callback=kill_after_5, **TINY)
    assert torch.load(ck, weights_only=True)["step"] == 4  # at most checkpoint_every steps lost
    resumed, hr = torch_l2o.meta_train("pa", FAM, steps=6, seed=1, checkpoint=ck, resume=ck, **TINY)
    assert _equal(full, resumed) and hr.loss == hf.loss and hr.val_score == hf.val_score


def test_best_validated_weights_are_kept():
    w, h = torch_l2o.meta_train("pagru", FAM, steps=6, seed=0, **{**TINY, "val_every": 1})
    assert h.best == min(h.val_score) and h.val_step[h.val_score.index(h.best)] == h.best_step
    net, _ = build_network("pagru", w)
    val = FAM.sample(6, generator=torch.Generator().manual_seed(torch_l2o.meta._seed(0, 2)), dtype=torch.float64)
    F_star = reference_solve(val).F
    score = torch_l2o.meta._val_score(evaluate("pagru", net, val.to(torch.float32), F_star, 6))
    assert abs(score - h.best) < 1e-6


def test_validation_over_several_batches_is_their_mean():
    """``val_batches=3``: the score is the mean over three held batches, the first the one
    a single-batch validation draws; a mixture's batches differ in shape."""
    from torch_l2o.problems import LassoMixture

    fam = LassoMixture(shapes=((9, 12), (16, 10)), designs=("gaussian", "factor"))
    w, h = torch_l2o.meta_train("pagru", fam, steps=2, seed=0, val_batches=3, **{**TINY, "val_every": 1})
    net, _ = build_network("pagru", w)
    scores = []
    for i in range(3):
        seed = torch_l2o.meta._seed(0, 2) if i == 0 else torch_l2o.meta._seed(0, 2, i)
        val = fam.sample(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        scores.append(torch_l2o.meta._val_score(evaluate("pagru", net, val.to(torch.float32), reference_solve(val).F, 6)))
    assert abs(sum(scores) / 3 - h.best) < 1e-6
    with pytest.raises(ValueError, match="val_batches must be an int >= 1"):
        torch_l2o.meta_train("pa", FAM, val_batches=0, **TINY)


@dataclass
class PoisonedLasso(ProblemFamily):
    """A LASSO family whose every other batch has an infinite entry."""

    calls: int = 0

    def sample(self, batch, *, generator=None, dtype=torch.float32, device=None):
        p = FAM.sample(batch, generator=generator, dtype=dtype, device=device)
        self.calls += 1
        if batch == TINY["batch"] and self.calls % 2 == 0:
            p = LassoProblem(A=p.A, b=p.b.clone().fill_(math.inf), prox="l1", prox_params=p.prox_params)
        return p


def test_nonfinite_batches_are_skipped_never_applied():
    w, h = torch_l2o.meta_train("pa", PoisonedLasso(), steps=4, seed=0, **TINY)
    assert h.skipped >= 2
    assert all(bool(torch.isfinite(v).all()) for v in w.values())
    assert sum(math.isfinite(v) for v in h.loss) == 2  # the two clean batches trained


@pytest.mark.parametrize("loss", ["log", "mean", "log_gap", "log_mean_gap"])
def test_meta_losses(loss):
    w, h = torch_l2o.meta_train("pa", FAM, steps=2, seed=0, loss=loss, **TINY)
    assert all(math.isfinite(v) for v in h.loss)


def test_log_mean_gap_is_the_log_of_the_benchmark_metric():
    """Per iteration, log(mean_relative_error + 1e-7), averaged over iterations. Its pull
    on an instance does not shrink as the instance converges (log_gap's, 1 / gap, grows:
    that loss is won on the fast instances, the metric is lost on the slow ones)."""
    from torch_l2o.meta import _meta_loss
    from torch_l2o.problems.base import mean_relative_error

    F_star = torch.tensor([2.0, -1.0, 0.5, 0.0])
    F = F_star + torch.tensor([[1e-3, 2e-1, 5e-2, 1e-2], [1e-5, 1e-4, 1e-6, 1e-8]])
    expect = sum(math.log(float(mean_relative_error(f, F_star)) + 1e-7) for f in F) / len(F)
    assert float(_meta_loss(F, "log_mean_gap", F_star)) == pytest.approx(expect, rel=1e-5)
    scale = torch.tensor([2.0, 1.0, 0.5, 1.0])
    for kind in ("log_mean_gap", "log_gap"):
        Fg = F.clone().requires_grad_(True)
        _meta_loss(Fg, kind, F_star).backward()
        pull = Fg.grad[1] * scale  # per unit of relative gap, at the second iteration
        if kind == "log_mean_gap":
            assert torch.allclose(pull, pull[0].expand(4), rtol=1e-5)  # every instance alike
        else:
            assert int(pull.argmax()) == 3 and float(pull[3] / pull[1]) > 100  # the converged one most


def test_step_scale_trains_at_drawn_steps_and_validates_at_one_over_L(monkeypatch):
    """step_scale=(lo, hi): each training batch unrolls at c / L with c drawn per instance
    in [lo, hi]; validation (and the default) at 0.9999 / L."""
    seen = []
    real = meta.rollout

    def spy(arch, net, problem, carry, steps, *, lr=None, **kw):
        L = problem.lipschitz.unsqueeze(-1)
        seen.append(None if lr is None else (lr * L).detach().reshape(-1))
        return real(arch, net, problem, carry, steps, lr=lr, **kw)

    monkeypatch.setattr(meta, "rollout", spy)
    torch_l2o.meta_train("pa", FAM, steps=2, seed=0, step_scale=(0.5, 0.8), **{**TINY, "val_every": 100})
    train = [c for c in seen if c is not None]
    assert len(train) == 2 * (TINY["horizon"] // TINY["unroll"]) and len(seen) - len(train) >= 1  # validation: lr=None
    c = torch.cat(train)
    assert bool((c >= 0.5 - 1e-6).all() and (c <= 0.8 + 1e-6).all()) and float(c.std()) > 0.01
    assert not torch.equal(train[0], train[-1])  # a fresh draw per batch
    seen.clear()
    torch_l2o.meta_train("pa", FAM, steps=1, seed=0, **TINY)
    assert all(c is None for c in seen)  # default: the problem's own 0.9999 / L


def test_step_scale_changes_training_and_repeats():
    w1, _ = torch_l2o.meta_train("pa", FAM, steps=2, seed=0, step_scale=(0.5, 1.0), **TINY)
    w2, _ = torch_l2o.meta_train("pa", FAM, steps=2, seed=0, step_scale=(0.5, 1.0), **TINY)
    w0, _ = torch_l2o.meta_train("pa", FAM, steps=2, seed=0, **TINY)
    assert _equal(w1, w2) and not _equal(w1, w0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown architecture 'lstm'; known: pa, pagru, pamr"):
        torch_l2o.meta_train("lstm", FAM)
    with pytest.raises(TypeError, match="the architecture's name comes first"):
        torch_l2o.meta_train(FAM, "pa")
    with pytest.raises(TypeError, match=r"a family instance, e.g. Lasso\(\)"):
        torch_l2o.meta_train("pa", Lasso)
    with pytest.raises(TypeError, match=r"not family.sample\(...\)"):
        torch_l2o.meta_train("pa", FAM.sample(2))
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        torch_l2o.meta_train("pa", FAM, batch=0)
    with pytest.raises(TypeError, match=r"L2O-PA-MR has no option 'windw' \(did you mean 'window'\?\); its network options: hidden"):
        torch_l2o.meta_train("pamr", FAM, windw=3, **TINY)
    with pytest.raises(ValueError, match="loss must be one of"):
        torch_l2o.meta_train("pa", FAM, loss="mse")
    with pytest.raises(ValueError, match="multiple of the unroll"):
        torch_l2o.meta_train("pa", FAM, horizon=10, unroll=3)
    for bad in [(1.0, 0.5), (0.0, 1.0), (0.5, math.inf), 0.5, (True, 1.0)]:
        with pytest.raises(ValueError, match=r"step_scale must be a pair \(lo, hi\) with 0 < lo <= hi < inf"):
            torch_l2o.meta_train("pa", FAM, step_scale=bad, **TINY)
    with pytest.raises(ValueError, match="L2O-DM's lr scales its output instead: leave step_scale=None"):
        torch_l2o.meta_train("l2odm", FAM, step_scale=(0.5, 1.0), **TINY)
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(ValueError, match=r"auto_step is the share of batches .* a number in \[0, 1\]"):
            torch_l2o.meta_train("pa", FAM, auto_step=bad, **TINY)
    with pytest.raises(ValueError, match="L2O-DM's lr scales its output instead: leave auto_step=0"):
        torch_l2o.meta_train("l2odm", FAM, auto_step=0.5, **TINY)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        torch_l2o.meta_train("pa", FAM, resume="/no/such/checkpoint.pt", **TINY)


def _take_steps(opt, prob, x, n):
    """``n`` steps of ``opt`` on ``prob``'s smooth part, as a user's loop takes them."""
    for _ in range(n):
        opt.zero_grad()
        prob.smooth(x).sum().backward()
        opt.step()


def test_rollout_is_the_optimizer():
    """meta_train's unroll and the optimizer's steps are the same function (no second copy)."""
    net, _ = build_network("pamr", "untrained", window=3)
    prob = FAM.sample(3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        F, carry = rollout("pamr", net, prob, None, 7)
    x = prob.x0().requires_grad_(True)
    opt = torch_l2o.PAMR([x], prox="l1", lam=0.1, lr=prob.step_size(), weights=net.state_dict(), window=3,
                         instance_dims=1)
    _take_steps(opt, prob, x, 7)
    assert torch.allclose(opt.solution(x), carry["xs"][0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(prob.objective(opt.solution(x)), F[-1], rtol=1e-5)


@pytest.mark.parametrize("arch", ["pamr", "pagru"])
def test_rollout_auto_is_the_optimizer_with_lr_none(arch):
    """lr="auto": the unroll takes the steps step() takes with lr=None (probe, secant
    estimate, auto_lr_scale), also across a truncation (the estimator's state is carried)."""
    net, _ = build_network(arch, "untrained")
    prob = FAM.sample(3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        F1, carry = rollout(arch, net, prob, None, 3, lr="auto")
        F2, carry = rollout(arch, net, prob, meta._detach(carry), 4, lr="auto")
        F_fixed, _ = rollout(arch, net, prob, None, 7)
    x = prob.x0().requires_grad_(True)
    opt = get_architecture(arch).optimizer([x], prox="l1", lam=0.1, weights=net.state_dict(), instance_dims=1,
                                           watchdog=False)
    _take_steps(opt, prob, x, 7)
    assert torch.allclose(opt.solution(x), carry["xs"][0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(prob.objective(opt.solution(x)), F2[-1], rtol=1e-5)
    # the estimate differs from 1/L, so the trajectory does: the test can fail
    assert not torch.allclose(F_fixed[-1], F2[-1], rtol=1e-3)
    assert torch.allclose(carry["auto"][0]["lipschitz"].reshape(-1), opt.state[x]["lipschitz"].reshape(-1))


def test_auto_step_trains_some_batches_with_the_estimated_step(monkeypatch):
    """auto_step=q: a share q of the batches (drawn per batch) unroll with lr="auto";
    validation scores both steps; runs repeat exactly and differ from plain training."""
    seen = []
    real = meta.rollout

    def spy(arch, net, problem, carry, steps, *, lr=None, **kw):
        seen.append(lr if isinstance(lr, str) else None if lr is None else "given")
        return real(arch, net, problem, carry, steps, lr=lr, **kw)

    monkeypatch.setattr(meta, "rollout", spy)
    w1, _ = torch_l2o.meta_train("pa", FAM, steps=6, seed=0, auto_step=0.5, **{**TINY, "val_every": 100})
    segments = TINY["horizon"] // TINY["unroll"]
    train = seen[2:-2]  # validation before the first step and after the last, at 1/L and automatic
    assert seen[:2] == seen[-2:] == [None, "auto"] and len(train) == 6 * segments
    per_batch = [set(train[i:i + segments]) for i in range(0, len(train), segments)]
    assert all(len(s) == 1 for s in per_batch)  # one draw per batch, kept across its segments
    assert {next(iter(s)) for s in per_batch} == {"auto", None}
    seen.clear()
    torch_l2o.meta_train("pa", FAM, steps=6, seed=0, **{**TINY, "val_every": 100})
    assert "auto" not in seen
    monkeypatch.setattr(meta, "rollout", real)
    w2, _ = torch_l2o.meta_train("pa", FAM, steps=6, seed=0, auto_step=0.5, **{**TINY, "val_every": 100})
    w0, _ = torch_l2o.meta_train("pa", FAM, steps=6, seed=0, **{**TINY, "val_every": 100})
    assert _equal(w1, w2) and not _equal(w1, w0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_two_processes(tmp_path):
    worker = Path(__file__).with_name("dist_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(worker), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert _equal(w0["weights"], w1["weights"])  # gradients averaged: the ranks stay in step
    assert w0["losses"] != w1["losses"]  # each rank sampled its own instances
    single, _ = torch_l2o.meta_train("pa", FAM, steps=3, seed=0, **TINY)
    assert not _equal(single, w0["weights"])  # two ranks' batches are not one rank's


def test_resume_with_other_settings_is_refused(tmp_path):
    """A checkpoint records its run's settings: resuming it with another lr or family would
    silently continue a different run, so it is refused, naming what differs; more steps
    are fine (that is what resuming is for)."""
    ck = str(tmp_path / "ck.pt")
    torch_l2o.meta_train("pa", FAM, steps=2, seed=0, checkpoint=ck, checkpoint_every=1, **TINY)
    with pytest.raises(ValueError, match=r"another run \(lr: checkpoint 0.003, now 0.001\)"):
        torch_l2o.meta_train("pa", FAM, steps=3, seed=0, resume=ck, **{**TINY, "lr": 1e-3})
    other = dataclasses.replace(FAM, lam=0.2)
    with pytest.raises(ValueError, match="another run \\(family: checkpoint"):
        torch_l2o.meta_train("pa", other, steps=3, seed=0, resume=ck, **TINY)
    _, h = torch_l2o.meta_train("pa", FAM, steps=3, seed=0, resume=ck, **TINY)
    assert len(h.loss) == 3


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    ck = tmp_path / "ck.pt"
    torch_l2o.meta_train("pa", FAM, steps=2, seed=0, checkpoint=str(ck), checkpoint_every=1, **TINY)
    data = ck.read_bytes()
    ck.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated, corrupt or not a torch_l2o checkpoint"):
        torch_l2o.meta_train("pa", FAM, steps=4, seed=0, resume=str(ck), **TINY)
    torch_l2o.meta_train("pa", FAM, steps=2, seed=0, checkpoint=str(ck), checkpoint_every=1, **TINY)
    with pytest.raises(ValueError, match="is for 'pa', not 'pagru'"):
        torch_l2o.meta_train("pagru", FAM, steps=4, seed=0, resume=str(ck), **TINY)
