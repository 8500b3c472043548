#!/usr/bin/env bash
# The GPU report, made to fit tries of at most ten minutes on a GPU node, air-gapped or not (docs/performance.md;
# the wheelhouse for an air-gapped node: docs/install.md).
#
#   bash benchmarks/gpu_session.sh install gpu_tests ops        # call 1: install, GPU tests, op benchmarks
#   bash benchmarks/gpu_session.sh install train inference      # call 2: the model (install: skipped when done)
#   bash benchmarks/gpu_session.sh                              # every stage in one go (about 6 min expected)
#   bash benchmarks/gpu_session.sh --cpu                        # CPU mode: GPU stages skipped, < 1 min
#   python3 benchmarks/gpu_session.py merge results.json call1/gpu_session.json call2/gpu_session.json
#
# Each stage runs under its own `timeout` (CAP_<STAGE> seconds overrides the cap), its status (passed,
# failed, timed_out, skipped) is recorded, and the session goes on after a stage that fails; the exit status
# is 1 when any stage failed. After every stage that ran, the report is rewritten, so a call cut short keeps
# what ran: $OUT holds gpu_session.json and .md and logs/<stage>.log (plus logs/pip.log): 8 files at most.
# Environment: OUT (default build/gpu_session), WORK (stage results, default build/gpu_session_work),
# WHEELHOUSE (default ./wheelhouse: used when it holds a manifest.json), RECLMIS_COMMIT (the commit recorded
# when the tree has no .git), PYTHON (default python3: the site's Python, whose torch is kept).
#
# Stages (cap; expected on one H200 node with 16 cores and cold caches, a prediction):
#   install    (150 s; 45-75 s) the offline install from $WHEELHOUSE (else from the index) with reclmis._C
#              built for this GPU's architecture only (TORCH_CUDA_ARCH_LIST from get_device_capability);
#              fails when the CUDA kernel is missing (a fallback to the CPU kernel) or lacks this GPU's code.
#              Skipped as done when the same sources were built for the same torch and GPU before.
#   gpu_tests  (280 s; 120-200 s) TRITON_INTERPRET=0 python3 -m pytest -m gpu: 68 tests
#   ops        (150 s; 50-80 s) the op suites at the paper shapes and B=256, bf16 (run_all.py --session)
#   train      (240 s; 60-110 s) training images/s at the paper preset, B=32: fused eager (fp32, bf16),
#              fused compiled in bf16 ("reduce-overhead"), the reference configuration (fp32, eager)
#   inference  (150 s; 35-60 s) ms/image at batch 1, eager and compiled
# Call 1's caps sum to 580 s, call 2's to 540 s (with its install). All stages: 5-9 min expected, about 6 at
# the lower figures; nearly all of it compilation, so the repetitions are set to cost under 30 s in all. The
# estimate (counts of compilations, times measured without a GPU): docs/performance.md, Running the GPU report.
set -euo pipefail
cd "$(dirname "$0")/.."
SELF="benchmarks/gpu_session.sh"
PYTHON="${PYTHON:-python3}"
export OUT="${OUT:-build/gpu_session}" WORK="${WORK:-build/gpu_session_work}" PYTHON
export WHEELHOUSE="${WHEELHOUSE:-wheelhouse}" LOGS="$OUT/logs"
ALL_STAGES=(install gpu_tests ops train inference)
declare -A CAP=([install]=150 [gpu_tests]=280 [ops]=150 [train]=240 [inference]=150)
OP_SUITES=(conditioned_attention max_similarity weighted_mask)

say() { echo "[gpu_session $(date -u +%H:%M:%S)] $*"; }

# One stage's work, run as `bash benchmarks/gpu_session.sh --body STAGE` under the stage's timeout.
body() {
  local results="$WORK/results"
  case "$1" in
    install)
      if [[ "$DEVICE" == cpu ]]; then  # CPU mode: the installed package as it is
        "$PYTHON" benchmarks/gpu_session.py check-extension --cpu --save "$WORK/reclmis_info.json"
        return
      fi
      local arch key stamp=build/.gpu_session_installed
      arch="$("$PYTHON" benchmarks/gpu_session.py arch)"
      export TORCH_CUDA_ARCH_LIST="$arch"
      key="$(cat setup.py pyproject.toml reclmis/cuda_toolkit.py csrc/* | sha256sum | cut -c1-16) sm_$arch"
      key+=" $("$PYTHON" -c 'import torch; print(torch.__version__)')"
      local check=("$PYTHON" benchmarks/gpu_session.py check-extension --save "$WORK/reclmis_info.json")
      if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" ]] && "${check[@]}"; then
        say "install: already built from these sources for this torch and GPU ($arch)"
        return
      fi
      say "install: reclmis._C for TORCH_CUDA_ARCH_LIST=$arch only"
      if [[ -f "$WHEELHOUSE/manifest.json" ]]; then
        "$PYTHON" tools/wheelhouse.py install --wheelhouse "$WHEELHOUSE" --log "$LOGS/pip.log"
      else
        say "install: no wheelhouse at $WHEELHOUSE (no manifest.json): from the package index"
        "$PYTHON" -m pip install --no-build-isolation -v -e ".[dev]" >"$LOGS/pip.log" 2>&1 ||
          { tail -20 "$LOGS/pip.log"; return 1; }
        grep "reclmis._C:" "$LOGS/pip.log" || true
      fi
      "${check[@]}"
      mkdir -p build && echo "$key" >"$stamp"
      ;;
    gpu_tests)
      TRITON_INTERPRET=0 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu
      ;;
    ops)
      if [[ "$DEVICE" == cpu ]]; then  # CPU mode: the plumbing, with the one op suite that is quick on CPU
        "$PYTHON" benchmarks/run_all.py --device cpu --quick --suites weighted_mask --out "$results/ops.json"
      else
        "$PYTHON" benchmarks/run_all.py --device cuda --session --suites "${OP_SUITES[@]}" --out "$results/ops.json"
      fi
      ;;
    train | inference)
      "$PYTHON" benchmarks/bench_model.py --device cuda --compile --session --parts "$1" --out "$results/$1.json"
      ;;
  esac
}

if [[ "${1:-}" == --body ]]; then
  body "$2"
  exit
fi

export GPU_SESSION_COMMAND="bash $SELF${*:+ $*}"
DEVICE=cuda
if [[ "${1:-}" == --cpu ]]; then
  DEVICE=cpu
  shift
fi
export DEVICE
[[ "$DEVICE" == cuda ]] && export TRITON_INTERPRET=0  # compiled kernels, whatever the caller's environment
STAGES=("$@")
[[ ${#STAGES[@]} -eq 0 ]] && STAGES=("${ALL_STAGES[@]}")
total=0
for stage in "${STAGES[@]}"; do
  [[ -n "${CAP[$stage]:-}" ]] || { echo "gpu_session: unknown stage $stage (stages: ${ALL_STAGES[*]})" >&2; exit 2; }
  var="CAP_${stage^^}"
  CAP[$stage]="${!var:-${CAP[$stage]}}"
  total=$((total + CAP[$stage]))
done
rm -rf "$WORK" "$LOGS" "$OUT/gpu_session.json" "$OUT/gpu_session.md"
mkdir -p "$WORK/results" "$LOGS"
say "stages: ${STAGES[*]} on $DEVICE; caps sum to ${total} s; report in $OUT"

no_gpu=""
if [[ "$DEVICE" == cuda ]] && ! "$PYTHON" benchmarks/gpu_session.py arch >/dev/null; then
  no_gpu="torch sees no CUDA device (the CPU mode is --cpu)"
fi
failed=0
for stage in "${STAGES[@]}"; do
  reason=""
  if [[ -n "$no_gpu" ]]; then  # a GPU report without a GPU: every stage fails, saying why
    say "$stage: failed ($no_gpu)"
    "$PYTHON" benchmarks/gpu_session.py record "$WORK" "$stage" failed 0 "${CAP[$stage]}" "$no_gpu"
    failed=1
    continue
  fi
  if [[ "$DEVICE" == cpu && "$stage" != install && "$stage" != ops ]]; then
    reason="CPU mode: needs a CUDA device"
  elif [[ "$DEVICE" == cpu && "$stage" == install ]]; then
    reason="CPU mode: the installed package is used as it is (reclmis info in the log)"
  fi
  if [[ -n "$reason" && "$stage" != install ]]; then
    say "$stage: skipped ($reason)"
    "$PYTHON" benchmarks/gpu_session.py record "$WORK" "$stage" skipped 0 "${CAP[$stage]}" "$reason"
    continue
  fi
  say "$stage: started (cap ${CAP[$stage]} s)"
  start=$SECONDS
  set +e
  timeout --kill-after=10 "${CAP[$stage]}" bash "$SELF" --body "$stage" 2>&1 | tee "$LOGS/$stage.log"
  rc=${PIPESTATUS[0]}
  set -e
  seconds=$((SECONDS - start))
  case "$rc" in
    0) status=passed ;;
    124 | 137) status=timed_out reason="cut at its cap of ${CAP[$stage]} s" ;;
    *) status=failed reason="exit status $rc; see logs/$stage.log" ;;
  esac
  [[ "$status" == passed ]] || failed=1
  say "$stage: $status in ${seconds} s${reason:+ ($reason)}"
  "$PYTHON" benchmarks/gpu_session.py record "$WORK" "$stage" "$status" "$seconds" "${CAP[$stage]}" "$reason"
  if [[ "$stage" != "${STAGES[-1]}" ]]; then  # the report so far: what a call cut short still returns
    "$PYTHON" benchmarks/gpu_session.py report "$WORK" "$OUT" >/dev/null || say "report: not written"
  fi
done
"$PYTHON" benchmarks/gpu_session.py report "$WORK" "$OUT"
say "done: $([[ $failed == 0 ]] && echo 'every stage passed or was skipped' || echo 'a stage failed or timed out')"
exit "$failed"
