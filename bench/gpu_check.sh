#!/usr/bin/env bash
# The GPU check: everything that can only be checked on a CUDA device, in one command, with every
# log and result under bench/results/gpu-check_<device>_<time>/ (device, driver, torch / triton
# versions and commit in environment.txt; the benchmark files carry them too).
#   bash bench/gpu_check.sh            # from the checkout's root, on any CUDA machine
# 1. the correctness suite on the GPU (kernel tests run on CUDA when one is present; tests/test_gpu.py:
#    the bf16 golden trajectory, compiled, kernels on vs off, GPT-2 and the modern architecture);
# 2. the benchmark suite at the device's full memory, then capped to a 12 GB card's
#    (--emulate-vram=12GiB), each writing its results files to bench/results/.
# Budget: written to finish in under 10 minutes on an H100-class card; each step's wall time is
# logged, so a slow step shows. Exit status: non-zero when any step failed (all steps still run).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
name=$(python -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null)
if [ -z "$name" ]; then
    echo "error: no CUDA device: this check runs on a GPU (the CPU suite is plain \`pytest\`)" >&2
    exit 2
fi
out="bench/results/gpu-check_$(echo "$name" | tr -cs 'A-Za-z0-9' '-' | sed 's/-*$//')_$(date -u +%Y%m%d-%H%M%S)"
mkdir -p "$out"
{
    echo "device: $name"
    nvidia-smi --query-gpu=driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | sed 's/^/driver, memory, max SM clock: /'
    python -c "import torch, triton; print('torch', torch.__version__, '/ triton', triton.__version__, '/ CUDA', torch.version.cuda)"
    echo "commit: $(git rev-parse --short=12 HEAD 2>/dev/null)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo -dirty)"
    echo "started: $(date -u +%FT%TZ)"
} | tee "$out/environment.txt"
failed=0
step() {  # step NAME COMMAND...: run, log to $out/NAME.log, record the wall time and status
    local name=$1; shift
    local start=$SECONDS
    "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$out/environment.txt"
    [ $rc -eq 0 ] || failed=1
}
step tests python -m pytest -q -p no:cacheprovider -m "not slow" tests
step tests_gpu python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_compile.py
step bench python -m pytest -q -p no:cacheprovider bench --benchmark-only --time-to-loss=quick
step bench_12gib python -m pytest -q -p no:cacheprovider bench/bench_train.py --benchmark-only --emulate-vram=12GiB
echo "finished: $(date -u +%FT%TZ)" >> "$out/environment.txt"
exit $failed
