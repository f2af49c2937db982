#!/usr/bin/env bash
# One GPU session: GPU tests, kernel sweeps, the kernel targets table (SDPA rerun in the same
# process), the backward benchmark and the Flux end-to-end run; full logs under $OUT, a short
# table last. Pick stages with STAGES (default: tests bench bwd flux; also: sweep launch small prologue).
#   bash benchmarks/gpu_session.sh                     (on the GPU machine, from the repo root)
#   STAGES="tests sweep launch" bash benchmarks/gpu_session.sh
# diffusers is optional: if a wheel sits in .whl/ it is installed to /tmp/site first.
set -u -o pipefail
OUT=${OUT:-results}; mkdir -p "$OUT"
STAGES=" ${STAGES:-tests bench bwd flux} "
export PYTHONPATH=$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/diffusers-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/diffusers-*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
has() { [[ "$STAGES" == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"

if has tests; then
  # eleven shards in parallel, two CPU threads each: Triton compiles and the CPU references dominate
  # the GPU test time, and torch's default (one thread per core in every shard) starved them
  # (session 6: 16 pytest-xdist workers reached 4 % in 520 s; these shards all finished in <= 430 s
  # on the H200). `python3 -u`: a shard that `timeout` kills keeps the output it printed.
  T=${TEST_LIMIT:-540}
  export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
  # faulthandler: a test that runs over 200 s prints every thread's stack (a hang shows where)
  run_shard() { n=$1; shift; timeout "$T" python3 -u -m pytest -v -p no:cacheprovider -p no:xdist -p no:benchmark \
    --tb=short -rfE -o faulthandler_timeout=200 --durations=12 "$@" > "$OUT/tests_$n.log" 2>&1; }
  BIG="test_gpu_grads_vs_fp32 or test_masks or test_grads_match_fp64_autograd or test_op_saved_tensors"
  BIG="$BIG or test_ste_reuse_forward_stats"
  run_shard 1 tests/test_kernels.py -k "fp8" &
  run_shard 2 tests/test_kernels.py -k "not fp8" &
  run_shard 3 tests/test_ops.py tests/test_sdpa.py &
  run_shard 4 tests/test_attention_api.py &
  run_shard 5 tests/test_backward.py -k "$BIG" &
  run_shard 6 tests/test_backward.py -k "not ($BIG)" &
  run_shard 7 tests/test_small_calls.py tests/test_hopper.py tests/test_checks.py tests/test_tuning.py &
  run_shard 8 tests/test_nonfinite.py tests/test_interpreter_fixes.py tests/test_prologue_quality.py &
  run_shard 11 tests/test_fuzz_kernels.py &  # compiles a kernel for most draws
  run_shard 9 tests/test_prologue.py tests/test_prologue_diffusers.py tests/test_bitexact_golden.py \
    tests/test_architecture.py tests/test_transformers.py tests/test_parallel.py tests/test_cli_accuracy.py \
    tests/test_readme.py &
  run_shard 10 tests/test_training.py tests/test_diffusers.py tests/test_fastlaunch.py tests/test_cli_bench.py \
    tests/test_flux_example.py tests/test_quant.py tests/test_reference.py tests/test_config.py &
  wait
  unset OMP_NUM_THREADS MKL_NUM_THREADS
fi
if has prologue; then
  timeout "${PROLOGUE_LIMIT:-240}" python3 benchmarks/prologue_bench.py --out "$OUT" ${PROLOGUE_ARGS:-} \
    > "$OUT/prologue.log" 2>&1
fi
if has sweep; then
  timeout "${SWEEP_LIMIT:-200}" python3 benchmarks/sweep.py --out "$OUT" --presets int8-fp8 --variants "${SWEEP_N:-6}" \
    > "$OUT/sweep.log" 2>&1
  timeout 120 python3 benchmarks/sweep.py --out "$OUT" --presets fp8,none --variants 2 >> "$OUT/sweep.log" 2>&1
fi
if has launch; then
  timeout 200 python3 benchmarks/launch_overhead.py --out "$OUT" --presets none,int8,int8-fp8,fp8,int4 --pieces \
    > "$OUT/launch.log" 2>&1
fi
if has small; then  # issue 15: the six small shapes through `qflash bench` (SDPA rerun in the same process)
  timeout 150 python3 -c "import sys; from qflash.cli import main; sys.exit(main(sys.argv[1:]))" bench --no-progress \
    --out "$OUT/small" --shapes 1x1x64x64,1x1x512x64,1x1x1024x128,1x24x256x128,8x16x77x64,1x8x1:4096x128 \
    > "$OUT/small.log" 2>&1
fi
if has bench; then
  timeout 200 python3 benchmarks/kernel_bench.py --out "$OUT" --quick --presets int8,int8-fp8,fp8,int4,none \
    > "$OUT/kernel_bench.log" 2>&1
fi
if has bwd; then
  timeout "${BWD_LIMIT:-120}" python3 benchmarks/bwd_bench.py ${BWD_ARGS:---no-sweep} > "$OUT/bwd_bench.log" 2>&1
fi
if has flux && python3 -c "import diffusers" 2>/dev/null; then
  timeout "${FLUX_LIMIT:-200}" python3 examples/flux/run.py --out "$OUT" ${FLUX_ARGS:-} > "$OUT/flux.log" 2>&1
fi

if has tests; then
  echo "== tests"; for f in "$OUT"/tests_*.log; do echo "$(basename "$f"): $(grep -E "passed|failed" "$f" | tail -1)"; done
  grep -hE "^FAILED|^ERROR" "$OUT"/tests_*.log | cut -c1-200 | head -30
fi
has prologue && { echo "== prologue"; grep -E "^(4096|16384|best)" "$OUT/prologue.log" | cut -c1-300; }
has sweep && { echo "== sweep"; grep -E "^BEST|^shape" "$OUT/sweep.log"; }
has launch && { echo "== launch (CPU us per call)"; grep -E "us/call|torch.mean|GPU us" "$OUT/launch.log"; }
has small && { echo "== small shapes (qflash bench)"; grep -E "^### |qflash|^\| sdpa \|" "$OUT/small.log" | cut -c1-90; }
has bwd && { echo "== backward"; tail -8 "$OUT/bwd_bench.log" 2>/dev/null; }
has flux && { echo "== flux"; tail -14 "$OUT/flux.log" 2>/dev/null; }
has bench && { echo "== kernels (forward, quantisation included)"; grep -E "^\|" "$OUT/kernel_bench.log" | tail -40; }
exit 0
