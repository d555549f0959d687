#!/usr/bin/env bash
# One prepared GPU session (the device tool runs it from the repository root):
#     bash benchmarks/gpu_session.sh            # results and logs under $OUT
# Each part runs under its own timeout and writes as it goes, so a part that runs out
# of time leaves the others' results. About 9 minutes in all on an H100 / H200,
# plus at most 2.5 for the papers' LASSO protocol at the end.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
part() {  # part NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  echo "== $name ($(date +%T))"
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  echo "   rc=$? ($(date +%T))"; tail -3 "$OUT/$name.log"
}
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
part kernel_tests 180 python -m pytest -q -x -p no:cacheprovider tests/test_fused.py tests/test_kernels.py
part sweep_quick 120 python benchmarks/kernel_sweep.py --quick --out "$OUT/sweep_quick.json"
part sweep 150 python benchmarks/kernel_sweep.py --sizes 1e7 --out "$OUT/sweep.json"
# the row-form batched products (torch_l2o.problems.matvec) must not be slower on the GPU
part batched_matvec 60 python benchmarks/batched_matvec.py --device cuda
part step_suite 120 python benchmarks/run.py --suite step --device cuda --out "$OUT/step"
part walltime_suite 150 python benchmarks/run.py --suite walltime --device cuda --out "$OUT/walltime"
part all_tests 240 python -m pytest -q -n 8 -p no:cacheprovider
# last, so that a call cut at its limit keeps the parts above: the papers' protocol (issue 16)
part full_lasso 150 python benchmarks/run.py --suite lasso --full --device cuda --out "$OUT/full_lasso" \
  --report "$OUT/full_lasso.md"
echo "done $(date +%T)"
