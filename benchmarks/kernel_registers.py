"""Compile the fused learned-step kernels for a GPU without one, and report registers and spills.

    python benchmarks/kernel_registers.py [--arch 90] [--precision ieee tf32x3]

Triton lowers each kernel variant (PA LSTM, PA-GRU, PA-MR, L2O-DM, RNNProp) to PTX for
``sm_<arch>``; the ``ptxas`` bundled with Triton then reports registers per thread and
spill bytes per launch configuration. This catches kernels that do not compile for the
GPU (the interpreter runs them as NumPy) and configurations that spill, on a CPU-only
machine.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not for the interpreter
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from torch_l2o.kernels import triton_learned  # noqa: E402

VARIANTS = {
    "L2O-PA": dict(KIND=0, LSTM=True, LAYERS=2, H=20, HP=32, MR=False, W=1),
    "L2O-PA-GRU": dict(KIND=0, LSTM=False, LAYERS=2, H=16, HP=16, MR=False, W=1),
    "L2O-PA-MR": dict(KIND=0, LSTM=False, LAYERS=2, H=16, HP=16, MR=True, W=8),
    "PA-MR scaled": dict(KIND=0, LSTM=False, LAYERS=2, H=16, HP=16, MR=True, W=8, SCALED=True),
    "L2O-DM": dict(KIND=1, LSTM=True, LAYERS=2, H=20, HP=32, MR=False, W=1),
    "RNNProp": dict(KIND=2, LSTM=True, LAYERS=2, H=20, HP=32, MR=False, W=1),
}
_ITER = {"x_ptr", "y_ptr", "g_ptr"}
_STATE = {"h_ptr", "c_ptr", "m_ptr", "v_ptr", "win_ptr"}


def _signature(kernel, dtype: str, state: str) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name == "filled_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*" + (dtype if name in _ITER else state if name in _STATE else "fp32")
        elif name in ("n", "lr_div", "stride_l", "fs_div"):
            sig[name] = "i64"
        elif not name.isupper():
            sig[name] = "fp32"
    return sig


def _ptxas() -> str:
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for exe in ("ptxas-blackwell", "ptxas"):  # the newer one reads the newer PTX
        path = os.path.join(bin_dir, exe)
        if os.path.exists(path):
            return path
    raise SystemExit("no ptxas bundled with this Triton")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability, 90 for H100/H200")
    ap.add_argument("--precision", nargs="+", default=["ieee", "tf32x3"])
    ap.add_argument("--configs", nargs="+", default=["32x4", "64x4", "128x8"], help="BLOCKxWARPS")
    args = ap.parse_args(argv)
    kernel, target, ptxas = triton_learned._learned_step_kernel, GPUTarget("cuda", args.arch, 32), _ptxas()
    print(f"triton {triton.__version__}, sm_{args.arch}, {os.path.basename(ptxas)}")
    print(f"{'kernel':12s} {'precision':9s} {'block x warps':13s} {'registers':>9s} {'spill stores (B)':>16s}")
    for name, variant in VARIANTS.items():
        for prec in args.precision:
            for cfg in args.configs:
                block, warps = map(int, cfg.split("x"))
                const = {"SCALED": False, **variant, "PROX": 1, "HAS_LR": False, "GRAD_X": False, "BLOCK": block,
                         "PREC": prec}
                out = triton.compile(ASTSource(kernel, _signature(kernel, "fp32", "fp32"), constexprs=const),
                                     target=target, options={"num_warps": warps})
                with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                    f.write(out.asm["ptx"])
                res = subprocess.run([ptxas, "-v", "--gpu-name", f"sm_{args.arch}a", f.name, "-o", os.devnull],
                                     capture_output=True, text=True)
                os.unlink(f.name)
                regs = re.search(r"Used (\d+) registers", res.stderr)
                spill = re.search(r"(\d+) bytes spill stores", res.stderr)
                print(f"{name:12s} {prec:9s} {cfg:13s} {regs.group(1) if regs else '?':>9s} "
                      f"{spill.group(1) if spill else '?':>16s}", flush=True)


if __name__ == "__main__":
    main()
