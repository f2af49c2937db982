#!/usr/bin/env bash
# One GPU session: GPU tests, the kernel targets table (SDPA rerun in the same process), the
# backward benchmark and the Flux end-to-end run; full logs under $OUT, a short table last.
#   bash benchmarks/gpu_session.sh            (on the GPU machine, from the repo root)
# diffusers is optional: if a wheel sits in .whl/ it is installed to /tmp/site first.
set -u -o pipefail
OUT=${OUT:-results}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/diffusers-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/diffusers-*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
TESTS=${TESTS:-"tests/test_kernels.py tests/test_ops.py tests/test_sdpa.py tests/test_backward.py"}
timeout "${TEST_LIMIT:-420}" python3 -m pytest -q -p no:cacheprovider --tb=line -m "not slow" $TESTS \
  > "$OUT/tests.log" 2>&1; echo "tests rc=$?" | tee -a "$OUT/tests.log"
timeout 200 python3 benchmarks/kernel_bench.py --out "$OUT" --quick --presets int8,int8-fp8,fp8,int4,none \
  > "$OUT/kernel_bench.log" 2>&1
if [ -f benchmarks/bwd_bench.py ]; then
  timeout 120 python3 benchmarks/bwd_bench.py --no-sweep > "$OUT/bwd_bench.log" 2>&1
fi
if python3 -c "import diffusers" 2>/dev/null; then
  timeout "${FLUX_LIMIT:-200}" python3 examples/flux/run.py --out "$OUT" ${FLUX_ARGS:-} > "$OUT/flux.log" 2>&1
fi
echo "== tests"; grep -E "passed|failed|rc=" "$OUT/tests.log" | tail -3; grep -E "^FAILED|Error" "$OUT/tests.log" | head -8
echo "== backward"; tail -8 "$OUT/bwd_bench.log" 2>/dev/null
echo "== flux"; tail -14 "$OUT/flux.log" 2>/dev/null
echo "== kernels (forward, quantisation included)"; grep -E "^\|" "$OUT/kernel_bench.log" | tail -40
