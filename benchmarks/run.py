"""torch_l2o benchmarks: ``python benchmarks/run.py [--suite NAME] [--full]``.

Prints a table per suite and writes ``<out>/results.json`` and PNG plots. The default
is a quick run of the main suites on built-in data (under 10 minutes on a 2-core CPU:
32 instances, 200 iterations); ``--all`` adds the safeguard, GSO and Math-L2O suites;
``--full`` runs every suite with the papers' protocol (1024 instances, 1000 iterations).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench_lib import format_table, machine, save_json  # noqa: E402
from suites import DEFAULT, SUITES  # noqa: E402


def parse(argv=None) -> SimpleNamespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", action="append", choices=sorted(SUITES), help="run only this suite (repeatable)")
    ap.add_argument("--all", action="store_true", help=f"every suite (default: {', '.join(DEFAULT)})")
    ap.add_argument("--full", action="store_true", help="the papers' protocol (1024 instances, 1000 iterations), every suite")
    ap.add_argument("--instances", type=int, help="instances per test batch (default 32, --full 1024)")
    ap.add_argument("--iters", type=int, help="iterations per method (default 200, --full 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data-dir", default=os.environ.get("TORCH_L2O_DATA"),
                    help="folder with real data sets (Ionosphere, Spambase, images); env TORCH_L2O_DATA")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
                    help="folder for results.json and the plots")
    ap.add_argument("--report", help="also write the tables as Markdown to this file")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time each method's run this many times and keep the least time (ood, ood_auto, walltime; "
                         "the iterates are the same, timing noise only adds)")
    a = ap.parse_args(argv)
    return SimpleNamespace(
        suites=a.suite or (list(SUITES) if a.all or a.full else DEFAULT), full=a.full, seed=a.seed,
        device=a.device, data_dir=a.data_dir, out=a.out, report=a.report, repeats=max(1, a.repeats),
        instances=a.instances or (1024 if a.full else 32), iters=a.iters or (1000 if a.full else 200),
        iters_given=a.iters is not None,  # a suite may pick its own budget when it is not
    )


def _warn_between_bars(message, category, filename, lineno, file=None, line=None):
    """Warnings (the watchdog's) printed above the progress bars instead of through them."""
    tqdm.write(warnings.formatwarning(message, category, filename, lineno, line).rstrip(), file=sys.stderr)


def main(argv=None) -> dict:
    cfg = parse(argv)
    os.makedirs(cfg.out, exist_ok=True)
    results = {"machine": machine(), "command": " ".join(["python benchmarks/run.py"] + (argv or sys.argv[1:])),
               "config": {k: v for k, v in vars(cfg).items() if k != "previous"}, "suites": {}}
    for name in cfg.suites:
        t0 = time.perf_counter()
        cfg.previous = results["suites"]  # later suites may reuse earlier runs (the ablation does)
        res = SUITES[name](cfg)
        res["seconds"] = time.perf_counter() - t0
        results["suites"][name] = res
        for tname, rows in res["tables"].items():
            print(f"\n## {tname}  ({res['seconds']:.0f} s)\n")
            print(format_table(rows))
        for note in res.get("notes", []):
            print(f"note: {note}")
        for p in res.get("plots", []):
            print(f"plot: {p}")
        save_json(os.path.join(cfg.out, "results.json"), results)
    print(f"\nresults: {os.path.join(cfg.out, 'results.json')}")
    if cfg.report:
        write_report(cfg.report, results)
        print(f"report: {cfg.report}")
    return results


def write_report(path: str, results: dict) -> None:
    """Every table as Markdown, with the command, the machine and links to the plots."""
    lines = [f"Command: `{results['command']}`", "", f"Machine: {results['machine']}", ""]
    base = os.path.dirname(os.path.abspath(path))
    for name, res in results["suites"].items():
        lines += [f"### Suite `{name}` ({res['seconds']:.0f} s)", ""]
        for note in res.get("notes", []):
            lines += [f"*{note}*", ""]
        for tname, rows in res["tables"].items():
            lines += [f"**{tname}**", "", format_table(rows), ""]
        for p in res.get("plots", []):
            lines += [f"![{os.path.basename(p)}]({os.path.relpath(p, base)})", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


if __name__ == "__main__":
    warnings.showwarning = _warn_between_bars  # the script's own: main() called from code leaves it alone
    main()
