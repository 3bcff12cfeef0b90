#!/usr/bin/env bash
# One lent-GPU session in one command: versions, the test suite on the GPU (interpreter off),
# the self-check and the benchmark. Written for the lent machines (torch + triton preinstalled, no
# network); logs and results go to $OUT (or /tmp/pm_gpu), nothing is installed except what .whl/
# carries (vit-pytorch for the timm-marked tests: `bash scripts/fetch_gpu_wheels.sh` beforehand).
#
#   bash scripts/gpu_session.sh [tests] [selfcheck] [audit] [bench] [compile]   (default: all)
#
#   tests      pytest, every marker, 14 workers, junit XML       (PM_GPU_TEST_TIMEOUT, 300 s)
#   selfcheck  python -m pm_kernels
#   audit      python -m pm_kernels.audit --quick (compile-only, as in CI)
#   bench      python -m bench, providers pm_kernels / eager / sdpa, every case (PM_GPU_BENCH_ARGS)
#   tune       python -m bench.tune: launch-configuration sweep       (PM_GPU_TUNE_ARGS)
#   compile    python -m bench --append, the torch.compile provider on the paper cases
#              (max-autotune: minutes per case)
# Results of bench/compile land in bench/results/ (merged, --append) and are copied to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pm_gpu}
LOGS=/tmp/pm_gpu_logs          # tarred into $OUT/logs.tgz at the end (the device returns <= 8 files)
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests selfcheck audit bench compile)
has() { [[ " ${stages[*]} " == *" $1 "* ]]; }

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  # Noise sources: other processes on the GPU, load on the host CPUs that issue the launches.
  nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv; uptime; nproc
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
} 2>&1 | tee "$LOGS/env.txt"

if has tests; then
  # -v: xdist prints each result as it lands, so a run cut short by the timeout still says
  # what failed (tracebacks come at the end).
  timeout "${PM_GPU_TEST_TIMEOUT:-300}" $PY -m pytest -m "timm or not timm" -n 14 -v \
      --tb=short --durations=15 --junitxml="$OUT/junit.xml" > "$LOGS/tests.log" 2>&1
  # `timeout` stops pytest but not its xdist workers: left running, they would share the GPU
  # with the benchmark below.
  pkill -9 -f "exec\(eval\(sys.stdin" 2>/dev/null; pkill -9 -f "pytest" 2>/dev/null; sleep 1
  grep -E "FAILED|ERROR" "$LOGS/tests.log" | grep -v "^E " | sort -u | head -30
  grep -E "^(=+ .*(passed|failed)|[0-9.]+s (call|setup))" "$LOGS/tests.log" | head -20
fi
if has selfcheck; then
  $PY -m pm_kernels 2>&1 | tee "$LOGS/selfcheck.log" | tail -25
fi
if has audit; then   # CPU-only, but not beside the benchmark: it would steal its launch threads
  timeout 300 $PY -m pm_kernels.audit --quick --json "$LOGS/audit.json" > "$LOGS/audit.log" 2>&1
  echo "audit exit $?"; tail -3 "$LOGS/audit.log"
fi
if has bench; then
  # In two parts (the paper and high-resolution cases first), each merged into the results.
  timeout "${PM_GPU_BENCH_TIMEOUT:-150}" $PY -m bench --append --providers pm_kernels eager sdpa \
      --groups paper highres ${PM_GPU_BENCH_ARGS:-} > "$LOGS/bench.log" 2>&1
  timeout "${PM_GPU_BENCH_TIMEOUT:-150}" $PY -m bench --append --providers pm_kernels eager sdpa \
      --groups sweep-N sweep-D sweep-M ${PM_GPU_BENCH_ARGS:-} > "$LOGS/bench_sweeps.log" 2>&1
  grep -A60 "^targets" "$LOGS/bench.log" | head -40
fi
if has tune; then
  timeout 420 $PY -m bench.tune --json "$LOGS/tune.json" ${PM_GPU_TUNE_ARGS:-} 2>&1 \
      | tee "$LOGS/tune.log" | grep -E "^(==|--|   |.*ERROR)" | tail -60
fi
if has compile; then
  timeout "${PM_GPU_COMPILE_TIMEOUT:-420}" $PY -m bench --append --providers compile \
      --cases ${PM_GPU_COMPILE_CASES:-ViT-B/16 ViT-L/16 ViT-H/14 ViT-g/14} 2>&1 \
      | tee "$LOGS/compile.log" | grep -v "^  " | tail -40
fi
cp bench/results/*-20*.* "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$LOGS" .
ls -la "$OUT"
