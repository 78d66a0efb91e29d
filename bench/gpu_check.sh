#!/usr/bin/env bash
# The GPU check: everything that can only be checked on a CUDA device, in one command, with every
# log and result under bench/results/gpu-check_<device>_<time>/ (device, driver, torch / triton
# versions and commit in environment.txt; the benchmark files in bench/results/ carry them too).
#   bash bench/gpu_check.sh                      # every step, from the checkout's root
#   bash bench/gpu_check.sh tests_gpu bench_kernels   # only the named steps, in the order given
# Steps, most telling first (wall times are logged, so a slow step shows):
#   tests_gpu      tests/test_gpu.py (20 bf16 steps compiled, kernels on vs off, GPT-2 + AdamW and
#                  modern + Muon; small, mid and medium trained 50 steps under a 12 GiB cap at the
#                  planner's choice for 11 GiB) and the sm_89 / sm_90 compile checks
#   bench_kernels  LayerNorm / RMSNorm, cross-entropy and AdamW against torch eager, torch.compile,
#                  the peers and the measured bandwidth floor
#   bench_fp8      each GPT-2 small / medium Linear shape and the head in the fused loss, bf16 against FP8
#   bench_train    one optimizer step per 4070 config, gptfast vs the compiled PyTorch path
#   bench_stepcost the step-cost model's milliseconds per category beside the profiler's (calibration)
#   bench_compile  time to the first step, whole-model compile against regional (compile_scope blocks)
#   bench_memory   the planner's predicted peak against the allocator's (--memory-grid=quick)
#   bench_12gib    bench_train under a 12 GiB cap (--emulate-vram=12GiB)
#   tests          the correctness suite without its slow end-to-end runs, kernel tests on the device
# GPU_CHECK_ARGS: more pytest arguments for every step, e.g. GPU_CHECK_ARGS='-k "small_4070 and not speedrun"'.
# Each step is stopped after GPU_CHECK_STEP_TIMEOUT seconds (default 600) and logged as timed out,
# so one slow step cannot take the others' time. Exit status: non-zero when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
# A machine without the network reads GPT-2's BPE files from a copy carried beside the checkout.
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d .carry/tiktoken_cache ]; then
    export TIKTOKEN_CACHE_DIR="$PWD/.carry/tiktoken_cache"
fi
PY=$(command -v python || command -v python3)  # some images have only python3
ALL_STEPS=(tests_gpu bench_kernels bench_fp8 bench_train bench_stepcost bench_compile bench_memory bench_12gib tests)
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=("${ALL_STEPS[@]}")
for s in "${steps[@]}"; do
    if [[ ! " ${ALL_STEPS[*]} " =~ " $s " ]]; then
        echo "error: unknown step '$s' (steps: ${ALL_STEPS[*]})" >&2
        exit 2
    fi
done
name=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null)
if [ -z "$name" ]; then
    echo "error: no CUDA device: this check runs on a GPU (the CPU suite is plain \`pytest\`)" >&2
    exit 2
fi
out="bench/results/gpu-check_$(echo "$name" | tr -cs 'A-Za-z0-9' '-' | sed 's/-*$//')_$(date -u +%Y%m%d-%H%M%S)"
mkdir -p "$out"
{
    echo "device: $name"
    nvidia-smi --query-gpu=driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | sed 's/^/driver, memory, max SM clock: /'
    "$PY" -c "import torch, triton; print('torch', torch.__version__, '/ triton', triton.__version__, '/ CUDA', torch.version.cuda)"
    # a copy of the tree without .git names its commit in GPTFAST_COMMIT (the benchmarks read it too)
    echo "commit: ${GPTFAST_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo -dirty)}"
    echo "steps: ${steps[*]}"
    echo "started: $(date -u +%FT%TZ)"
} | tee "$out/environment.txt"
eval "extra_args=(${GPU_CHECK_ARGS:-})"
[ ${#extra_args[@]} -eq 0 ] || echo "pytest arguments: ${extra_args[*]}" >> "$out/environment.txt"
pytest_q=("$PY" -m pytest -q -p no:cacheprovider)
failed=0
for s in "${steps[@]}"; do
    case $s in
        tests_gpu)     cmd=("${pytest_q[@]}" tests/test_gpu.py tests/test_gpu_compile.py) ;;
        bench_kernels) cmd=("${pytest_q[@]}" bench/bench_layernorm.py bench/bench_cross_entropy.py bench/bench_adamw.py --benchmark-only) ;;
        bench_fp8)     cmd=("${pytest_q[@]}" bench/bench_fp8.py --benchmark-only) ;;
        bench_train)   cmd=("${pytest_q[@]}" bench/bench_train.py --benchmark-only) ;;
        bench_stepcost) cmd=("${pytest_q[@]}" bench/bench_stepcost.py --benchmark-only) ;;
        bench_compile) cmd=("${pytest_q[@]}" bench/bench_compile.py --benchmark-only) ;;
        bench_memory)  cmd=("${pytest_q[@]}" bench/bench_memory.py --benchmark-only --memory-grid=quick) ;;
        bench_12gib)   cmd=("${pytest_q[@]}" bench/bench_train.py --benchmark-only --emulate-vram=12GiB) ;;
        tests)         cmd=("${pytest_q[@]}" -m "not slow" tests) ;;
    esac
    start=$SECONDS
    timeout --kill-after=10 "${GPU_CHECK_STEP_TIMEOUT:-600}" "${cmd[@]}" "${extra_args[@]}" > "$out/$s.log" 2>&1
    rc=$?
    verdict="exit $rc"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="timed out after ${GPU_CHECK_STEP_TIMEOUT:-600} s"
    echo "$s: $verdict in $((SECONDS - start)) s" | tee -a "$out/environment.txt"
    [ $rc -eq 0 ] || failed=1
done
echo "finished: $(date -u +%FT%TZ)" >> "$out/environment.txt"
exit $failed
