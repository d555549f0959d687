"""The quick examples run as a user runs them and print what their docstrings promise.
(``custom_family.py`` meta-trains, about 30 s on two cores: a script, not a test.)"""

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_lasso_fista_example():
    out = _run("lasso_fista.py")
    assert "same solution: True" in out


def test_gso_mixture_example_matches_em():
    out = _run("gso_mixture.py")
    nll = re.search(r"start NLL ([\d.]+)\s+GSO ([\d.]+)\s+EM ([\d.]+)", out)
    total = re.search(r"sum ([\d.]+)", out)
    assert nll and total, out
    start, gso, em = map(float, nll.groups())
    assert gso < start and abs(gso - em) < 0.01 * (start - em), out
    assert abs(float(total.group(1)) - 1) < 1e-4, out


def test_learned_lasso_example():
    """PA-MR and PA-GRU beat FISTA-restart in iterations on their family; out of it every
    method reaches 1e-6 and the mixture weights need fewer iterations than the default ones."""
    out = _run("learned_lasso.py")
    family, other = ({k: v for k, v in re.findall(r"^  (.+?)\s{2,}(\d+|None) iterations", part, re.M)}
                     for part in out.split("correlated columns"))
    assert len(family) == 4 and len(other) == 3 and "None" not in [*family.values(), *other.values()], out
    assert int(family["L2O-PA-MR"]) < int(family["FISTA-restart"]) <= 60, out
    assert int(family["L2O-PA-GRU"]) < int(family["FISTA-restart"]), out
    assert int(other["L2O-PA-MR, lasso-mix"]) < int(other["L2O-PA-MR (default weights)"]), out


def test_lasso_path_example():
    """Every lam of the path certified by every method, and the solutions are scikit-learn's."""
    out = _run("lasso_path.py")
    assert out.count("all certified: True") == 3, out
    diff = re.search(r"largest coefficient difference from FISTA-restart's ([\d.e+-]+)", out)
    assert diff and float(diff.group(1)) < 1e-4, out
