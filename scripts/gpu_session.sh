#!/usr/bin/env bash
# One lent-GPU session in one command: versions, the test suite on the GPU (interpreter off),
# the self-check and the benchmark. Written for the lent machines (torch + triton preinstalled, no
# network); logs and results go to $OUT (or /tmp/pm_gpu), nothing is installed except what .whl/
# carries (vit-pytorch for the timm-marked tests: `bash scripts/fetch_gpu_wheels.sh` beforehand).
#
#   bash scripts/gpu_session.sh [tests] [selfcheck] [profile] [audit] [bench] [tune] [compile]
#   (default: tests selfcheck profile audit bench compile)
#
# The stages run in the fixed order below (whichever are named), each under its own time limit,
# and all of them within PM_GPU_BUDGET_S seconds (default 540: one device call may run 600 s;
# set it to what the session has left, see bench/results/README.md): a stage gets at most what
# is left of the budget and is skipped, saying so, when less than its minimum is left (30 s;
# tune 120 s, compile 300 s). Everything measured so far is packed into $OUT after every stage
# (results files, tune / profile JSON, logs.tgz), so a call cut off at its limit still returns
# the stages it finished, and bench writes its files after every case.
#   tests      pytest, every marker, 14 workers, junit XML       (PM_GPU_TEST_TIMEOUT, 300 s)
#   selfcheck  python -m pm_kernels
#   profile    python -m bench.profile: GPU time per kernel and host idle time, paper shapes
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
rm -rf "$LOGS"                 # a warm machine keeps /tmp between calls: this call's logs only
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests selfcheck profile audit bench compile)
has() { [[ " ${stages[*]} " == *" $1 "* ]]; }
BUDGET=${PM_GPU_BUDGET_S:-540}
# limit NAME SECONDS [MIN]: the stage's time limit, cut to the budget left (20 s kept for
# packing up); prints nothing and fails when under MIN (default 30) seconds would be left.
limit() {
  local l=$(( BUDGET - SECONDS - 20 )) min=${3:-30}
  (( l > $2 )) && l=$2
  if (( l < min )); then echo "== $1: skipped, ${l}s of the ${BUDGET}s budget left" >&2; return 1; fi
  echo "$l"
}
# pack: copy this run's results files (not the committed ones: the device returns at most 8
# files) and the logs into $OUT. Run after every stage.
pack() {
  find bench/results -maxdepth 1 -type f -newer "$LOGS/env.txt" -exec cp {} "$OUT/" \; 2>/dev/null
  tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null
}
# in_group SECONDS CMD...: CMD in a process group of its own, killed as a group when it ends
# or at the limit (pytest-xdist workers outlive a plain `timeout` of pytest and would share the
# GPU with the benchmark that follows). Returns CMD's status, 124 at the limit.
in_group() {
  local secs=$1; shift
  setsid "$@" &
  local pid=$!
  ( sleep "$secs"; kill -TERM -- -"$pid" 2>/dev/null; sleep 5; kill -KILL -- -"$pid" 2>/dev/null ) &
  local dog=$!
  wait "$pid"; local rc=$?
  kill "$dog" 2>/dev/null; kill -KILL -- -"$pid" 2>/dev/null
  (( rc == 143 || rc == 137 )) && rc=124
  return $rc
}

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# One Triton cache for every stage (the tests' conftest uses this one): the benchmark then
# reuses the kernels the tests compiled.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton_cache}
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  # Noise sources: other processes on the GPU, load on the host CPUs that issue the launches.
  nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv; uptime; nproc
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
} 2>&1 | tee "$LOGS/env.txt"

if has tests && lim=$(limit tests "${PM_GPU_TEST_TIMEOUT:-300}"); then
  # -v: xdist prints each result as it lands, so a run cut short by the limit still says
  # what failed (tracebacks come at the end).
  # tests/test_audit.py compiles for sm_80..120 on the CPU (the `audit` stage, and CI, run it):
  # minutes of this machine's budget that say nothing about this GPU.
  in_group "$lim" $PY -m pytest -m "timm or not timm" -n 14 -v --ignore=tests/test_audit.py \
      --tb=short --durations=15 --junitxml="$OUT/junit.xml" > "$LOGS/tests.log" 2>&1
  echo "tests exit $? (limit ${lim}s)"
  grep -E "FAILED|ERROR" "$LOGS/tests.log" | grep -v "^E " | sort -u | head -30
  grep -E "^(=+ .*(passed|failed)|[0-9.]+s (call|setup))" "$LOGS/tests.log" | head -20
  pack
fi
if has selfcheck && lim=$(limit selfcheck 120); then
  timeout "$lim" $PY -m pm_kernels 2>&1 | tee "$LOGS/selfcheck.log" | tail -25
  pack
fi
if has profile && lim=$(limit profile 90); then
  timeout "$lim" $PY -m bench.profile --json "$OUT/profile.json" > "$LOGS/profile.log" 2>&1
  echo "profile exit $?"; grep -E "^==" "$LOGS/profile.log"
  pack
fi
if has audit && lim=$(limit audit 300); then   # CPU-only, but not beside the benchmark: it would steal its launch threads
  timeout "$lim" $PY -m pm_kernels.audit --quick --json "$LOGS/audit.json" > "$LOGS/audit.log" 2>&1
  echo "audit exit $?"; tail -3 "$LOGS/audit.log"
  pack
fi
if has bench && lim=$(limit bench "${PM_GPU_BENCH_TIMEOUT:-150}"); then
  # In two parts (the paper and high-resolution cases first), each merged into the results.
  timeout "$lim" $PY -m bench --append --providers pm_kernels eager sdpa \
      --groups paper highres ${PM_GPU_BENCH_ARGS:-} > "$LOGS/bench.log" 2>&1
  echo "bench exit $? (limit ${lim}s)"
  grep -A60 "^targets" "$LOGS/bench.log" | head -40
  pack
  # PM_GPU_SWEEPS=0: the paper and high-resolution cases only.
  if [ "${PM_GPU_SWEEPS:-1}" != 0 ] && lim=$(limit bench-sweeps "${PM_GPU_BENCH_TIMEOUT:-150}"); then
    timeout "$lim" $PY -m bench --append --providers pm_kernels eager sdpa \
        --groups sweep-N sweep-D sweep-M ${PM_GPU_BENCH_ARGS:-} > "$LOGS/bench_sweeps.log" 2>&1
    echo "bench sweeps exit $? (limit ${lim}s)"
    pack
  fi
fi
if has tune && lim=$(limit tune 420 120); then
  # bench.tune's own budget ends it in time; the limit is the backstop. Its JSON is rewritten
  # after every (shape, kernel) job, straight into $OUT.
  timeout "$lim" $PY -m bench.tune --budget $(( lim - 30 )) --json "$OUT/tune.json" \
      ${PM_GPU_TUNE_ARGS:-} > "$LOGS/tune.log" 2>&1
  echo "tune exit $? (limit ${lim}s)"
  grep -E "^(==|--|   |.*ERROR)" "$LOGS/tune.log" | tail -60
  pack
fi
if has compile && lim=$(limit compile "${PM_GPU_COMPILE_TIMEOUT:-420}" 300); then
  timeout "$lim" $PY -m bench --append --providers compile \
      --cases ${PM_GPU_COMPILE_CASES:-ViT-B/16 ViT-L/16 ViT-H/14 ViT-g/14} > "$LOGS/compile.log" 2>&1
  echo "compile exit $? (limit ${lim}s)"
  grep -v "^  " "$LOGS/compile.log" | tail -40
  pack
fi
pack
ls -la "$OUT"
