"""Smoke tests of the step and walltime benchmark suites at toy sizes (seconds, CPU)."""

import math
import os
import sys
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")))

from suites import step, walltime

pytest.importorskip("sklearn")


def _cfg(**kw):
    return SimpleNamespace(device="cpu", full=False, seed=0, **kw)


def test_step_optimizer_cost_counts_min_bytes():
    cfg = _cfg()
    n = 2000
    roofline = step.copy_bandwidth(n, "cpu", cfg)
    assert roofline > 0
    # one row per optimizer: the default path (a fused backend adds a "reference" row)
    rows = {}
    for r in step.optimizer_costs(cfg, roofline, [n]):
        rows.setdefault(r["optimizer"], r)
    assert {"Adam", "ISTA", "FISTA", "FISTA-restart", "L2O-DM", "RNNProp", "L2O-PA", "L2O-PA-GRU", "L2O-PA-MR"} <= set(rows)
    # p read + written, g read; Adam also m, v read + written (its step counter: 4 bytes in all)
    assert rows["ISTA"]["min bytes/element"] == 12
    assert rows["Adam"]["min bytes/element"] == pytest.approx(28, abs=0.01)
    assert rows["FISTA"]["min bytes/element"] == pytest.approx(20, abs=0.01)
    assert rows["Adam"]["time vs Adam"] == 1
    for r in rows.values():
        assert math.isfinite(r["% of roofline"]) and r["% of roofline"] > 0
        assert r["path"] in ("-", "fused", "reference", "mixed")
    assert rows["Adam"]["path"] == "-" and rows["L2O-PA"]["path"] != "-"
    assert rows["L2O-PA"]["state bytes/element"] > 100  # the LSTM state


def test_walltime_runs_and_ranks_the_headline_first(monkeypatch):
    monkeypatch.setattr(walltime, "sizes", lambda cfg: [(2, 20)])
    monkeypatch.setitem(sys.modules, "skglm", None)  # its numba compilation takes seconds
    res = walltime.run(_cfg())
    rows = res["tables"]["walltime"]
    assert rows[0]["method"].startswith("FISTA-restart (")
    assert rows[0]["time/FISTA-restart @1e-06"] == 1
    torch_rows = [r for r in rows if "batch of" in r["method"]]
    assert {r["method"].split(" (")[0] for r in torch_rows} >= {"FISTA-restart", "FISTA", "L2O-PA", "L2O-PA-MR"}
    for r in torch_rows:
        assert r["it@1e-06"] is not None and r["iters run"] == r["it@1e-06"]  # stopped at the target
        assert r["ms/it"] > 0
    assert any(r["method"].startswith("scikit-learn Lasso") and r["s@1e-06"] is not None for r in rows)
    assert res["tables"]["crossover"]
    calls = []
    monkeypatch.setattr(walltime, "retime", lambda tr, *a, **k: calls.append(tr.method))
    res = walltime.run(_cfg(repeats=3))  # every method timed again, in turn, twice
    names = [r["method"].split(" (")[0] for r in res["tables"]["walltime"] if "batch of" in r["method"]]
    assert calls == names * 2 and "least time of 3" in res["notes"][0]


def test_ood_summary_counts_a_method_only_where_it_ran():
    """Mixture weights shipped for one family only: their rows exist in that family's
    sets; elsewhere the summary shows '-' and neither counts them as failures nor in the
    median."""
    from suites import ood

    def rows(base, **its):
        return [{"method": ood.BASELINE, "it@1e-06": base}] + [{"method": m, "it@1e-06": v} for m, v in its.items()]

    per_set = {"lasso_a": rows(100, **{"L2O-PA-MR": 150, "L2O-PA-MR mix": 90}),
               "lasso_b": rows(50, **{"L2O-PA-MR": None, "L2O-PA-MR mix": 60}),
               "logistic_a": rows(20, **{"L2O-PA-MR": 10})}
    table, _ = ood.summary(per_set, iters=200)
    by = {r["set"]: r for r in table}
    assert by["logistic_a"]["L2O-PA-MR mix"] == "-" and by["lasso_b"]["L2O-PA-MR"] == "never"
    med = next(r for r in table if r["set"].startswith("median"))
    worst, never = by["worst"], next(r for r in table if r["set"].startswith("never"))
    assert med["L2O-PA-MR mix"] == 1.05 and worst["L2O-PA-MR mix"] == 1.2  # median of (0.9, 1.2)
    assert med["L2O-PA-MR"] == 1.5 and worst["L2O-PA-MR"] == "never"  # median of (0.5, 1.5, inf)
    assert never["L2O-PA-MR"] == 1 and never["L2O-PA-MR mix"] == 0


def test_ood_auto_runs_every_method_with_the_estimated_step():
    """The ood_auto suite: the same methods at lr=None (FISTA-restart first), no safeguarded
    rows; the learned optimizers step at their weights' calibrated multiplier."""
    import torch

    from suites import ood
    from torch_l2o.problems import Lasso

    prob = Lasso(m=10, n=20, sparsity=3).sample(2, generator=torch.Generator().manual_seed(0))
    plain, auto = ood.methods(prob, "lasso"), ood.methods(prob, "lasso", auto=True)
    assert auto[0][0] == ood.BASELINE and [m for m in auto if m[2]] == []
    assert {m[0] for m in auto} == {m[0] for m in plain if not m[0].endswith("safeguard")}
    for label, make, _ in auto:
        opt = make([torch.zeros(2, 20, requires_grad=True)])
        assert opt.param_groups[0]["lr_auto"], label
        if hasattr(opt, "weights_info"):
            card = opt.weights_info.get("card") or {}
            assert opt.auto_lr_scale == card.get("auto_lr_scale", 0.5), label
    for label, make, _ in plain:
        opt = make([torch.zeros(2, 20, requires_grad=True)])
        assert not opt.param_groups[0]["lr_auto"], label


def test_run_method_warms_up_on_a_separate_optimizer():
    """The warm-up is untimed and discarded: the timed trace equals a run without it,
    and each run builds its own optimizer (the last one built is the timed one's)."""
    import torch
    import torch_l2o
    from bench_lib import WARMUP_ITERS, run_method
    from torch_l2o.problems import Lasso

    prob = Lasso(m=20, n=40, sparsity=4, lam=0.1).sample(3, generator=torch.Generator().manual_seed(0),
                                                         dtype=torch.float64)
    F_star = prob.objective(torch.zeros(3, 40, dtype=torch.float64))  # any reference serves here
    built = []

    def make(ps):
        built.append(torch_l2o.FISTA(ps, prox="l1", lam=0.1, lr=prob.step_size().float(), restart=True,
                                     instance_dims=1))
        return built[-1]

    cold = run_method("FISTA-restart", prob, F_star, make, 7, warmup=0)
    assert len(built) == 1
    warm = run_method("FISTA-restart", prob, F_star, make, 7)
    assert len(built) == 2 + 1 and WARMUP_ITERS > 0
    assert warm.errors == cold.errors and len(warm.seconds) == 8
    assert built[-1].state[next(iter(built[-1].state))]["step"] == 7  # the timed optimizer took 7 steps, no more


def test_repeated_timing_keeps_the_scored_trace_and_the_least_time(monkeypatch):
    """``repeats=3``: two more runs of the same iterations on fresh optimizers, unscored;
    the errors are the scored run's, and each cumulative time is the least of the three."""
    import bench_lib
    import torch
    import torch_l2o
    from torch_l2o.problems import Lasso

    prob = Lasso(m=20, n=40, sparsity=4, lam=0.1).sample(3, generator=torch.Generator().manual_seed(0),
                                                         dtype=torch.float64)
    F_star = prob.objective(torch.zeros(3, 40, dtype=torch.float64))
    built = []

    def make(ps):
        built.append(torch_l2o.FISTA(ps, prox="l1", lam=0.1, lr=prob.step_size().float(), restart=True,
                                     instance_dims=1))
        return built[-1]

    clock = iter([0.0, 5.0, 5.0, 6.0] * 3)  # two readings a step: step times 5, 1, 5, 1, 5, 1
    monkeypatch.setattr(bench_lib.time, "perf_counter", lambda: next(clock))
    once = bench_lib.run_method("FISTA-restart", prob, F_star, make, 6, warmup=0)
    assert len(built) == 1 and once.seconds == [0.0, 5.0, 6.0, 11.0, 12.0, 17.0, 18.0]
    clock = iter([0.0, 5.0, 5.0, 6.0] * 3 + [0.0, 1.0, 1.0, 10.0] * 3 + [0.0, 2.0, 2.0, 4.0] * 3)
    monkeypatch.setattr(bench_lib.time, "perf_counter", lambda: next(clock))
    best = bench_lib.run_method("FISTA-restart", prob, F_star, make, 6, warmup=0, repeats=3)
    assert len(built) == 1 + 3 and best.errors == once.errors
    # cumulative: run 1 (5, 6, 11, 12, 17, 18), run 2 (1, 10, 11, 20, 21, 30), run 3 (2, 4, 6, 8, 10, 12)
    assert best.seconds == [0.0, 1.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    assert all(built[i].state[next(iter(built[i].state))]["step"] == 6 for i in range(1, 4))


def test_ood_seconds_summary_ranks_by_time():
    """The seconds table: each method's seconds to 1e-6 over FISTA-restart's per set, the
    median, the worst, and on how many sets it took less time."""
    from suites import ood

    def rows(base, **secs):
        return [{"method": ood.BASELINE, "s@1e-06": base}] + [{"method": m, "s@1e-06": v} for m, v in secs.items()]

    per_set = {"a": rows(1.0, **{"L2O-PA-GRU mix": 0.5}), "b": rows(2.0, **{"L2O-PA-GRU mix": 3.0}),
               "c": rows(None, **{"L2O-PA-GRU mix": 1.0}), "d": rows(4.0, **{"L2O-PA-GRU mix": None})}
    table, notes = ood.summary(per_set, iters=200, key="s@1e-06")
    by = {r["set"]: r for r in table}
    assert by["a"]["L2O-PA-GRU mix"] == 0.5 and by["c"]["L2O-PA-GRU mix"] == "n/a (FR never)"
    assert by["d"]["L2O-PA-GRU mix"] == "never" and "PA-MR beats PA" not in by["a"]
    med = next(r for r in table if r["set"].startswith("median"))
    won = next(r for r in table if r["set"].startswith("sets won"))
    assert med["L2O-PA-GRU mix"] == 1.5 and by["worst"]["L2O-PA-GRU mix"] == "never"  # median of (0.5, 1.5, inf)
    assert won["L2O-PA-GRU mix"] == 1 and "seconds" in notes[0]


def test_ood_retimes_every_method_in_turn(monkeypatch, tmp_path):
    """``--repeats 3``: after a set's scored runs, every method is timed again, in turn,
    twice (a slow spell of the machine then falls on all methods, not one), and the
    seconds in its row are the trace's least times."""
    import torch

    from suites import ood
    from torch_l2o.problems import Lasso

    prob = Lasso(m=10, n=20, sparsity=3).sample(2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    monkeypatch.setattr(ood, "sets", lambda cfg: [("tiny", "lasso", "a tiny set", lambda: prob)])
    orig = ood.methods
    monkeypatch.setattr(ood, "methods", lambda p, w, auto=False: orig(p, w, auto)[:2])
    calls, first = [], {}

    def fake_retime(tr, problem, make, **kw):
        calls.append(tr.method)
        first.setdefault(tr.method, tr.seconds_to(1e-6))
        tr.seconds[1:] = [s / 2 for s in tr.seconds[1:]]

    monkeypatch.setattr(ood, "retime", fake_retime)
    cfg = SimpleNamespace(iters=300, iters_given=True, repeats=3, device="cpu", out=str(tmp_path), data_dir=None,
                          instances=2, full=False, seed=0)
    out = ood.run(cfg)
    names = [r["method"] for r in out["tables"]["ood_tiny"]]
    assert calls == names * 2
    for row in out["tables"]["ood_tiny"]:  # the row shows the trace after both retimings
        assert row["s@1e-06"] == round(first[row["method"]] / 4, 4)
    assert any("least of 3" in n for n in out["notes"])



def test_step_overhead_script_runs(capsys):
    import step_overhead

    step_overhead.main(["--steps", "2", "--runs", "1"])
    out = capsys.readouterr().out
    assert "PA-GRU mix, watchdog in numpy" in out and "1024 x 500:" in out


def test_solve_overhead_script_runs(capsys):
    import solve_overhead

    solve_overhead.main(["--runs", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert out.count("check_every=10") == 2 and "NOT converged" not in out
